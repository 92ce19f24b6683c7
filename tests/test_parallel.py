"""Statistics on many processes: `torchrun --nproc-per-node 2 -m dsg fit` writes the same guardrail, byte for byte,
as one process (the per-batch sums are folded in batch order whichever process ran each batch), for a ReLU SAE
and for a TopK SAE (summed sparsely); and the sharding helpers hand every item to exactly one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsg import parallel
from dsg.errors import DSGError
from dsg.guard.guardrail import JSON_NAME, TENSORS_NAME

from tiny import FORGET_TEXTS, RETAIN_TEXTS, bpe_tokenizer, sparse_sae, tiny_model, tiny_sae

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    tok = bpe_tokenizer(add_bos=True)
    model = tiny_model("llama", seed=0, vocab=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.1).save(root / "relu")
    tiny_sae(d_in=32, architecture="topk", k=4, hook="blocks.0.hook_resid_post").save(root / "topk")
    # more documents than batches x processes, of different lengths, so the shards differ in shape
    (root / "forget.txt").write_text("\n\n".join(f"{t} {i}" * (1 + i % 3) for i, t in enumerate(FORGET_TEXTS * 4)))
    # retain documents: each text alone, and each ordered pair of two, so that no two share all their windows
    pairs = [f"{t} {u}" for t in RETAIN_TEXTS for u in RETAIN_TEXTS if t != u]
    (root / "retain.txt").write_text("\n\n".join(f"{t} {i}" for i, t in enumerate(RETAIN_TEXTS + pairs)))
    return root


def _fit(ws: Path, sae: str, out: str, nproc: int) -> subprocess.CompletedProcess:
    args = ["fit", "--model", str(ws / "model"), "--sae", str(ws / sae), "--forget", str(ws / "forget.txt"),
            "--retain", str(ws / "retain.txt"), "--max-length", "24", "--batch-size", "2", "--n-features", "3",
            "--ratio-percentile", "50", "--out", str(ws / out)]  # fmt: skip
    if sae == "topk":  # every token fires some of a random TopK SAE's latents: a static clamp
        args.append("--no-gated")
    if nproc > 1:
        cmd = [*TORCHRUN, str(nproc), "-m", "dsg", *args]
    else:
        cmd = [sys.executable, "-m", "dsg", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("sae", ["relu", "topk"])
def test_torchrun_fit_writes_the_single_process_guardrail(ws, sae):
    one, two = _fit(ws, sae, f"{sae}_1", 1), _fit(ws, sae, f"{sae}_2", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stdout and two.stdout.count("Wrote") == 1  # one process writes and reports
    for name in (JSON_NAME, TENSORS_NAME):
        assert (ws / f"{sae}_1" / name).read_bytes() == (ws / f"{sae}_2" / name).read_bytes(), name


def test_torchrun_refuses_commands_that_do_not_shard(ws):
    cmd = [*TORCHRUN, "2", "-m", "dsg", "inspect", str(ws / "relu_1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "only fit and compare shard" in done.stderr


def test_a_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    """WORLD_SIZE inherited from a scheduler, without the rest of what torchrun sets: one sentence, not a traceback
    from torch.distributed."""
    from dsg.parallel import init_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DSGError, match="RANK, MASTER_ADDR, MASTER_PORT are not set: start the processes with torchrun"):
        init_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(DSGError, match="MASTER_PORT is not set"):
        init_from_env()


def test_shares_cover_every_item_once(monkeypatch):
    items = list(range(11))
    seen = []
    for rank in range(3):
        monkeypatch.setattr(parallel, "process_world", lambda rank=rank: parallel.World(rank, 3))
        with parallel.sharded():
            seen += [i for i, _ in parallel.my_share(items)]
        assert [i for i, _ in parallel.my_share(items)] == items  # outside sharded(): everything, here
    assert sorted(seen) == items


def test_every_command_leaves_the_process_group_even_when_it_fails(monkeypatch):
    """A process that exits inside a gloo group races its peer tearing the connection down (one of them can abort
    and fail the launch), so the CLI leaves the group on every way out of a command."""
    import torch.distributed as dist

    from dsg import cli

    left = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: left.append(True))
    assert cli.main(["inspect", "/nonexistent/guardrail"]) == 2  # a DSGError: exit status 2, one sentence
    assert left == [True]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    parallel.shutdown()  # outside a group: nothing to leave
    assert left == [True]


def test_torchrun_compare_shares_the_statistics_pass_and_gives_the_single_process_results(ws):
    """Under torchrun, compare's statistics pass is sharded and the rest runs in the first process: the same
    comparison as one process (every swept configuration's validation summary, the choice, the test numbers)."""
    import json

    qs = {"cyber": ("The exploit", ["payload", "buffer", "shellcode", "packet"]),
          "geo": ("The capital", ["Paris", "Tokyo", "Lima", "Rome"])}  # fmt: skip
    for name, (stem, answers) in qs.items():
        rows = [{"question": f"{stem} number {i} is", "choices": answers, "answer": i % 4} for i in range(12)]
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
    args = ["compare", "--model", str(ws / "model"), "--sae", str(ws / "relu"), "--forget-corpus",
            str(ws / "forget.txt"), "--retain-corpus", str(ws / "retain.txt"), "--forget-questions",
            str(ws / "cyber.jsonl"), "--retain-questions", str(ws / "geo.jsonl"), "--heldout", str(ws / "retain.txt"),
            "--methods", "dsg", "--budget", "0.1", "--generation-tokens", "4", "--fit-sequences", "16"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = {}
    for nproc, cmd in ((1, [sys.executable, "-m", "dsg"]), (2, [*TORCHRUN, "2", "-m", "dsg"])):
        out = ws / f"compare_{nproc}"
        done = subprocess.run([*cmd, *args, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((out / "compare.json").read_text())
    one, two = results[1]["methods"]["dsg"], results[2]["methods"]["dsg"]
    for key in ("chosen", "test", "generations"):
        assert one[key] == two[key], key
    untimed = [[{k: v for k, v in r.items() if not k.endswith("seconds")} for r in x["sweep"]] for x in (one, two)]
    assert untimed[0] == untimed[1] and untimed[0]  # wall times aside, every swept configuration is the same
    assert results[1]["base"] == results[2]["base"]


# A torchrun entry for the tests below: rank 1 may read another file (DSG_RANK1_SWAP="old:new"), the process group
# may wait less than its 30 minutes after the sharded passes (DSG_PG_TIMEOUT_S), and the first process's
# prompt-level check may take longer than that wait (DSG_SETTLE_SLEEP_S), as a large question set on a large model
# does.
ENTRY = """
import os, sys, time
from datetime import timedelta
import torch.distributed.distributed_c10d as c10d
import dsg.cli as cli
if os.environ.get("DSG_PG_TIMEOUT_S"):  # from the end of the sharded passes on
    fit = cli.fit
    def fit_then_wait_less(*a, **k):
        out = fit(*a, **k)
        c10d._set_pg_timeout(timedelta(seconds=float(os.environ["DSG_PG_TIMEOUT_S"])))
        return out
    cli.fit = fit_then_wait_less
if os.environ.get("DSG_SETTLE_SLEEP_S"):
    settle = cli.settle_prompt_level
    def slow(*a, **k):
        time.sleep(float(os.environ["DSG_SETTLE_SLEEP_S"]))
        return settle(*a, **k)
    cli.settle_prompt_level = slow
args = sys.argv[1:]
if os.environ.get("RANK") == "1" and os.environ.get("DSG_RANK1_SWAP"):
    old, new = os.environ["DSG_RANK1_SWAP"].split(":")
    args = [a.replace(old, new) for a in args]
sys.exit(cli.main(args))
"""


def _torchrun_fit(ws: Path, out: str, extra: list[str], env: dict) -> subprocess.CompletedProcess:
    (ws / "entry.py").write_text(ENTRY)
    args = ["fit", "--model", str(ws / "model"), "--sae", str(ws / "relu"), "--forget", str(ws / "forget.txt"),
            "--retain", str(ws / "retain.txt"), "--max-length", "24", "--batch-size", "2", "--n-features", "3",
            "--ratio-percentile", "50", "--out", str(ws / out), *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | env
    return subprocess.run([*TORCHRUN, "2", str(ws / "entry.py"), *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_processes_given_different_inputs_are_refused_in_every_process(ws):
    """Each process folds its share of the batches: one that read another corpus made a guardrail that looked
    right (its hash recorded, another corpus's statistics in it)."""
    other = (ws / "forget.txt").read_text().replace("exploit", "garden")
    (ws / "forget_other.txt").write_text(other)
    done = _torchrun_fit(ws, "mismatch", [], {"DSG_RANK1_SWAP": "forget.txt:forget_other.txt"})
    assert done.returncode != 0
    # each process says so (one that torchrun stops first, once a peer has exited, says "terminated")
    assert "were not given the same arguments (--forget), forget corpus (process 0 and process 1" in done.stderr
    frames = [line for line in done.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "dsg" in f], frames  # torchrun's own report of the failed launch aside
    assert not (ws / "mismatch").exists()


def test_the_first_processs_own_work_after_the_fit_may_outlast_the_groups_timeout(ws):
    """The prompt level's check on forget questions runs in the first process only, after the sharded passes: the
    others leave the group first instead of waiting at a barrier that times out (and takes the fit with it)."""
    import json

    rows = [{"question": f"The exploit number {i} is", "choices": ["payload", "garden", "river", "Paris"],
             "answer": 0} for i in range(6)]  # fmt: skip
    (ws / "forget_q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
    gate = ["--gate-window", "6", "--detector", "--detector-c", "1.0", "--gate-percentile", "90", "--gate-hold", "4",
            "--gate-prompt-percentile", "100", "--forget-questions", str(ws / "forget_q.jsonl")]  # fmt: skip
    done = _torchrun_fit(ws, "slow_check", gate, {"DSG_PG_TIMEOUT_S": "4", "DSG_SETTLE_SLEEP_S": "8"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote") == 1 and (ws / "slow_check" / JSON_NAME).is_file()


def test_a_peer_that_stopped_is_one_sentence(monkeypatch):
    """A collective step whose peer ended (gloo: 'Connection closed by peer') says so in one line, beside that
    peer's own message, instead of a backend traceback."""

    def closed(*_):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")

    with pytest.raises(DSGError, match="Another process of this torchrun launch stopped, or did not answer within"):
        parallel._collective(closed)


def test_a_stop_signal_while_stopping_is_not_a_second_stop(monkeypatch, capsys):
    """torchrun forwards Ctrl-C as SIGINT and then SIGTERM within a millisecond: the second arrived while the first
    was being reported and ended the process in a traceback. After it, both signals are handled as before."""
    import signal

    from dsg import cli

    def interrupted(args):
        raise KeyboardInterrupt

    def report_then_terminate():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode, inside the KeyboardInterrupt handler

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    monkeypatch.setattr(cli, "_close_bars", report_then_terminate)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert cli.main(["inspect", "anything"]) == 130
    assert capsys.readouterr().err.strip() == "dsg inspect: interrupted"
    assert {s: signal.getsignal(s) for s in before} == before
