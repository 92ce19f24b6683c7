"""Forward-only passes sharded over the processes of a `torchrun` launch.

    torchrun --nproc-per-node 2 -m dsg fit --model ... --out guard/

The statistics pass and the gate calibration are sums (or per-sequence values) over batches of a corpus. Inside
`sharded()` each process runs the batches whose index modulo the world size is its rank, and the per-batch
results are gathered and folded **in batch order**, exactly as one process would fold them: the guardrail written
by N processes is byte-identical to the one written by one (see tests/test_parallel.py). Outside `sharded()`, or
without a process group, every pass runs whole in the calling process.

`init_from_env()` starts the process group that torchrun describes in the environment (gloo on CPU, NCCL when
the process owns a GPU) and `shutdown()` leaves it; the CLI calls both, and writes outputs from rank 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import DSGError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_SHARDED: ContextVar[bool] = ContextVar("dsg_sharded", default=False)


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> World:
    """Join the process group torchrun set up (no-op for a single process)."""
    if not launched():
        return World()
    dist = torch.distributed
    if not dist.is_available():
        raise DSGError("This PyTorch build has no torch.distributed; run without torchrun.")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]  # what init reads
    if not dist.is_initialized() and missing:
        raise DSGError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not set: start the processes with torchrun, or unset "
                       "WORLD_SIZE to run one process.")  # fmt: skip
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return process_world()


def process_world() -> World:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def world() -> World:
    """The world the passes in progress are sharded over: the process group inside `sharded()`, else one process."""
    return process_world() if _SHARDED.get() else World()


@contextmanager
def sharded():
    """Shard the statistics and calibration passes inside the block over the processes of the group."""
    token = _SHARDED.set(True)
    try:
        yield process_world()
    finally:
        _SHARDED.reset(token)


def my_share(items: Iterable[T]) -> Iterator[tuple[int, T]]:
    """(index, item) for the items this process handles: every world-size-th one, starting at its rank."""
    w = world()
    for i, item in enumerate(items):
        if i % w.size == w.rank:
            yield i, item


def _collective(op, *args) -> None:
    """A collective step with the other processes; a peer that stopped (its connection closed) or stopped answering
    (the group's timeout) is one line here too, not a backend traceback beside that process's own message."""
    try:
        op(*args)
    except RuntimeError as e:  # gloo and NCCL report a peer's end as RuntimeError (DistBackendError)
        first = " ".join(str(e).split())[:160]
        raise DSGError(f"Another process of this torchrun launch stopped, or did not answer within the process "
                       f"group's timeout ({first}).") from None  # fmt: skip


def gather_ordered(mine: list[tuple[int, T]]) -> list[T]:
    """Everyone's (index, result) pairs, as one list ordered by index, on every process."""
    w = world()
    if w.size == 1:
        return [r for _, r in sorted(mine, key=lambda p: p[0])]
    everyone: list[list[tuple[int, T]] | None] = [None] * w.size
    _collective(torch.distributed.all_gather_object, everyone, mine)
    merged = sorted((p for part in everyone for p in part), key=lambda p: p[0])
    return [r for _, r in merged]


def agree(record: dict) -> None:
    """Refuse, in every process, a launch whose processes were given different inputs (`record`: what each one
    read, as comparable values: arguments, digests of the model, SAE and texts). Each process folds its share of
    the batches into one result, so a process given another model or corpus makes a wrong result that looks
    right."""
    w = process_world()
    if w.size == 1:
        return
    everyone: list[dict | None] = [None] * w.size
    _collective(torch.distributed.all_gather_object, everyone, record)
    first = everyone[0] or {}
    for rank, other in enumerate(everyone[1:], 1):
        differ = _differences(first, other or {})
        if differ:
            raise DSGError(f"The processes of this torchrun launch were not given the same {', '.join(differ)} "
                           f"(process 0 and process {rank} differ); start every process with the same command, "
                           "files and model.")  # fmt: skip


def _differences(a: dict, b: dict) -> list[str]:
    """The keys whose values differ; for a dict of arguments, which of them (`arguments (--sae, --forget)`)."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            names = ", ".join("--" + str(n).replace("_", "-") for n in sorted(set(x) | set(y), key=str)
                              if x.get(n) != y.get(n))  # fmt: skip
            out.append(f"{k} ({names})")
        else:
            out.append(str(k))
    return out


def barrier() -> None:
    if process_world().size > 1:
        _collective(torch.distributed.barrier)


def leave_together() -> bool:
    """Leave the process group, every process at once (True), before work one process does alone: a barrier waits
    only the group's timeout, and a process that tears its gloo connections down alone while a peer keeps them
    can abort, which torchrun reports as the whole launch failed. False (and nothing done) outside a group."""
    if process_world().size == 1:
        return False
    barrier()
    shutdown()
    return True


def shutdown() -> None:
    """Leave the process group, if this process joined one. A gloo process that exits without it tears its
    connection threads down during interpreter shutdown, racing the peer that closes the same sockets; the loser
    aborts ("terminate called without an active exception") and torchrun reports the whole launch failed, although
    the work was done."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
