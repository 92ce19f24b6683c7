"""Streamed per-latent statistics over a corpus, and per-input gate rates.

Every forward pass stops right after the hooked layer (lm.hooks.StopForward), and only running sums are kept:
memory is O(d_sae) whatever the corpus size. The sums are plain float64 tensors, so statistics from several
processes or shards combine by addition (`LatentSums.merge`). Under `torchrun` (inside `dsg.parallel.sharded()`)
each process runs its share of the batches and the per-batch sums are folded in batch order on every process, so
the result is bit-for-bit the single-process one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import DSGError
from ..lm.hooks import activations_by_batch
from ..lm.text import batches
from ..parallel import gather_ordered, my_share, world
from . import rule
from .detector import firing


@dataclass
class LatentSums:
    """Running sums over real tokens: f, 1[f > 0], f², and the residual norm at the hook."""

    n_tokens: torch.Tensor  # [] float64
    act_sum: torch.Tensor  # [d_sae] float64
    fire_count: torch.Tensor  # [d_sae] float64
    sq_sum: torch.Tensor  # [d_sae] float64
    norm_sum: torch.Tensor  # [] float64, sum of ||x_t||

    @classmethod
    def zeros(cls, d_sae: int, device=None) -> LatentSums:
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(z(()), z(d_sae), z(d_sae), z(d_sae), z(()))

    def add(self, f_NF: torch.Tensor, x_ND: torch.Tensor) -> None:
        self.n_tokens += f_NF.shape[0]
        self.act_sum += f_NF.sum(0).double()
        self.fire_count += (f_NF > 0).sum(0).double()
        self.sq_sum += f_NF.square().sum(0).double()
        self.norm_sum += x_ND.float().norm(dim=-1).sum().double()

    def add_sparse(self, values_NK: torch.Tensor, indices_NK: torch.Tensor, x_ND: torch.Tensor) -> None:
        """Same as `add` for a TopK encoding given as k values and latent ids per token (no dense [N, d_sae])."""
        idx, v = indices_NK.reshape(-1), values_NK.reshape(-1).double()
        self.n_tokens += values_NK.shape[0]
        self.act_sum.index_add_(0, idx, v)
        self.fire_count.index_add_(0, idx, (v > 0).double())
        self.sq_sum.index_add_(0, idx, v * v)
        self.norm_sum += x_ND.float().norm(dim=-1).sum().double()

    def merge(self, other: LatentSums) -> LatentSums:
        return LatentSums(*(a + b for a, b in zip(self.as_tensors(), other.as_tensors())))

    def as_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.n_tokens, self.act_sum, self.fire_count, self.sq_sum, self.norm_sum)

    def _per_token(self, t: torch.Tensor) -> torch.Tensor:
        return (t / self.n_tokens.clamp(min=1)).float()

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation per latent, E[f_j]."""
        return self._per_token(self.act_sum)

    @property
    def frequency(self) -> torch.Tensor:
        """Firing frequency per latent, P(f_j > 0)."""
        return self._per_token(self.fire_count)

    @property
    def mean_square(self) -> torch.Tensor:
        """Mean squared activation per latent, E[f_j²] (the diagonal Fisher proxy)."""
        return self._per_token(self.sq_sum)

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the residual at the hook."""
        return float(self._per_token(self.norm_sum))

    def summary(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}_mean": self.mean,
            f"{prefix}_frequency": self.frequency,
            f"{prefix}_mean_square": self.mean_square,
            f"{prefix}_tokens": self.n_tokens.float().reshape(1),
            f"{prefix}_mean_norm": torch.tensor([self.mean_norm]),
        }


@torch.inference_mode()
def collect_stats(
    model: torch.nn.Module,
    sae,
    hook: str,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "statistics",
    progress: bool = True,
    fires: list | None = None,
) -> LatentSums:
    """Per-latent sums of the SAE's activations at `hook` over the real tokens of `sequences`.

    An SAE that gives its codes as (values, latent ids) pairs (TopK: `encode_topk`) is summed sparsely. With
    `fires` (a list) it also receives, per sequence, where the latents fire (detector.Fires; None for the
    sequences another process measured), so that the detector's window features need no second pass.
    """
    from ..runtime.hf import refuse_if_attached  # the runtime imports this package

    refuse_if_attached(model, "Fitting (the latent statistics)")
    sums = LatentSums.zeros(sae.d_sae)
    sparse = getattr(sae, "encode_topk", None)
    shard = list(my_share(batches(sequences, batch_size, pad_id, model)))
    index_of = {i: idx for i, (idx, _, _) in shard}
    if fires is not None:
        fires[:] = [None] * len(sequences)
    mine = []  # (batch index, that batch's sums)
    bar = tqdm(total=sum(int(m.sum()) for _, (_, _, m) in shard), desc=desc, unit="tok", leave=False,
               disable=not progress or not world().main)  # fmt: skip
    chunks = ((i, ids, mask) for i, (_, ids, mask) in shard)
    for i, mask, x_BTD, real in activations_by_batch(model, hook, chunks):
        if x_BTD.shape[-1] != sae.d_in:
            raise DSGError(f"Hook point {hook!r} gives activations of width {x_BTD.shape[-1]}, but the SAE reads width "
                           f"{sae.d_in}; hook a residual-stream point such as 'blocks.L.hook_resid_post'.")  # fmt: skip
        x_ND = x_BTD[real]
        if not bool(torch.isfinite(x_ND).all()):
            raise DSGError(f"The model's activations at {hook!r} hold NaN or infinite values (batch {i}): its weights "
                           "are damaged, or its dtype overflows on these texts.")  # fmt: skip
        part = LatentSums.zeros(sae.d_sae, x_ND.device)
        if sparse is not None:
            values, ids = sparse(x_ND)
            part.add_sparse(values, ids, x_ND)
            if fires is not None:
                on = torch.zeros(x_ND.shape[0], sae.d_sae, dtype=torch.bool, device=x_ND.device)
                on.scatter_(1, ids, values > 0)
        else:
            f_NF = sae.encode(x_ND)
            part.add(f_NF, x_ND)
            if fires is not None:
                on = f_NF > 0
        if fires is not None:  # x_ND holds the batch's real tokens row after row
            for seq, rows in zip(index_of[i], on.split(real.sum(1).tolist())):
                fires[seq] = firing(rows)
        if world().size == 1:  # fold as we go (the order is the batch order)
            sums = sums.merge(LatentSums(*(t.cpu() for t in part.as_tensors())))
        else:
            mine.append((i, tuple(t.cpu() for t in part.as_tensors())))
        bar.update(int(mask.sum()))
    bar.close()
    for part in gather_ordered(mine):  # in batch order, whichever process ran each batch
        sums = sums.merge(LatentSums(*part))
    return sums


@torch.inference_mode()
def gate_rates(
    model: torch.nn.Module,
    guardrail,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "calibration",
    progress: bool = True,
    windows: list | None = None,
) -> torch.Tensor:
    """The statistic the guardrail's gate compares with its threshold, for each sequence [n]: rho(x), the fraction
    of its real tokens on which any selected latent fires, or (windowed gate) the largest such fraction over any
    `window` consecutive real tokens (with a detector: the largest window mean of its evidence), ending at a token
    the gate judges (Guardrail.counted: with a hold counted in words, a word). With `windows` (a list; windowed gate)
    it also receives, per sequence, those judged windows' scores in order (1-D float tensors, on the CPU)."""
    from ..runtime.hf import refuse_if_attached

    refuse_if_attached(model, "Calibrating a gate (gate_rates)")
    guardrail.to(next(model.parameters()).device)
    out = torch.zeros(len(sequences))
    shard = [batch for _, batch in my_share(batches(sequences, batch_size, pad_id, model))]
    bar = tqdm(shard, desc=desc, unit="batch", disable=not progress or not world().main, leave=False)
    mine = []
    windowed = getattr(guardrail, "window", None) is not None
    if windows is not None:
        windows[:] = [None] * len(sequences)
    for (idx, _, x_BTD, real), (_, ids, _) in zip(activations_by_batch(model, guardrail.hook, iter(bar)), shard):
        _, a, e = guardrail.flags(x_BTD, real)
        scores = None
        if not windowed:
            values = rule.rho(a, real)
        else:  # the largest window at a token the gate judges (a held gate counted in words judges only words),
            # as window_gate keeps it in the state's `peak` (which starts at 0)
            counted = guardrail.counted(real, ids.to(real.device))
            share, judged = judged_windows(a if e is None else e, real, counted, guardrail.window)
            values = torch.where(judged, share, 0.0).max(1).values.clamp(min=0)
            if windows is not None:
                scores = _at_judged(share, judged)
        mine.append((idx[0], (idx, values.cpu(), scores)))
    for idx, values, scores in gather_ordered(mine):
        out[idx] = values
        if windows is not None and scores is not None:
            for i, s in zip(idx, scores):
                windows[i] = s
    return out


def judged_windows(signal_BT, real_BT, counted_BT, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the window score at each token [B, T], the tokens the gate judges [B, T]) of sequences read from their
    start: rule.window_gate's own windows."""
    state = rule.WindowState.start(real_BT.shape[0], window, real_BT.device)
    kept, _ = rule.in_windows(real_BT, counted_BT, state.line)
    return rule._window_shares(state, signal_BT, kept)[0], rule.judged_tokens(real_BT, counted_BT)


def judged_window_scores(signal_BT, real_BT, counted_BT, window: int) -> list[torch.Tensor]:
    """Each row's window scores at the tokens the gate judges, in order, on the CPU: their largest is the state's
    `peak`, their longest run over a threshold its `longest`."""
    return _at_judged(*judged_windows(signal_BT, real_BT, counted_BT, window))


def _at_judged(share_BT: torch.Tensor, judged_BT: torch.Tensor) -> list[torch.Tensor]:
    """Each row's window scores at the tokens the gate judges, in order, on the CPU."""
    return [share_BT[b][judged_BT[b]].cpu() for b in range(share_BT.shape[0])]
