"""Train a sparse autoencoder on one hook point of a language model, cheaply enough for a CPU.

The recipe is sparsify's (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

* activations at the hook over real tokens only (no padding, BOS/EOS/PAD, or first position, which is an
  attention sink with an outsized norm), collected by running the model only as far as the hooked layer;
* b_dec starts at the activation mean; decoder rows are unit-norm, and the encoder starts as the decoder's
  transpose;
* loss = FVU (squared error over the batch's total variance, so it is scale-free) + AuxK: the top-k_aux *dead*
  latents (no firing for `dead_tokens` tokens) are asked to reconstruct what the live ones missed, which revives
  them;
* Adam; the decoder gradient's component along each row is removed before the update and the rows are
  renormalised after it, so latent sizes stay comparable (and an L1 penalty cannot be dodged by growing rows);
* the learning rate warms up linearly and decays linearly to zero over the last 20% of the steps.

`architecture="standard"` trains a ReLU SAE with an L1 penalty instead (dense math, about 2.5x slower per token,
and it needs far more tokens: on SmolLM2-135M layer 6, 400k tokens gave FVU 0.55 at L0 114 where TopK gave 0.11
at L0 32).

Why it is fast on a CPU: a TopK SAE's forward needs the dense encoder product (the one unavoidable d_in x d_sae
matmul per token), but only k (+k_aux) latents per token carry gradient. The backward therefore uses
sparse-dense products (`_TopKEncode`, `_SparseDecode`) and costs a fraction of the forward, instead of two more
dense matmuls. Activations are cached in memory as bfloat16 by default (0.4% relative rounding, far below the
reconstruction error of any SAE; half the memory of fp32: 500k tokens x 576 dims = 0.6 GB) and upcast one batch
at a time.

Metrics are computed on held-out texts: FVU, mean L0, the fraction of latents that never fire, and the
cross-entropy loss recovered when the SAE's reconstruction replaces the residual (at real tokens) relative to
replacing it by zeros.
"""

from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..config import MAX_SEED
from ..errors import DSGError
from ..files import atomic_directory, is_text, write_json
from ..lm.fingerprint import model_fingerprint
from ..lm.hooks import HookPoint, forward_to_hook, hidden_size, hooked, resolve
from ..lm.models import check_sequences_fit
from ..lm.text import batches, corpus_sha256, pad_id_of, real_token_mask, special_token_ids, tokenize
from .base import SAE
from .formats import FORMATS

TRAINING_RECORD = "training.json"
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TrainConfig:
    """How to train an SAE on one hook point."""

    hook: str = "blocks.6.hook_resid_post"
    """Hook point whose activations the SAE reconstructs, e.g. 'blocks.6.hook_resid_post'."""

    d_sae: int | None = None
    """Number of latents. Default: 8 x the model's hidden size."""

    architecture: str = "topk"
    """'topk' (keep each token's k largest latents; Gao et al.) or 'standard' (ReLU with an L1 penalty)."""

    k: int = 32
    """Active latents per token (topk only)."""

    l1_coefficient: float = 0.2
    """Weight of the L1 penalty (standard only). The penalty is the sum of the latents divided by the batch's mean
    distance of an activation from the mean, so it is scale-free like the FVU it is added to."""

    lr: float | None = None
    """Adam learning rate. Default: 2.5e-3 / sqrt(d_sae / 4096), i.e. 2.4e-3 for 4608 latents (sparsify's
    1/sqrt(d_sae) rule, scaled up for runs of a few hundred steps)."""

    lr_warmup_steps: int = 20
    """Steps of linear learning-rate warm-up."""

    lr_decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to zero."""

    batch_size: int = 4096
    """Activation vectors (tokens) per optimizer step."""

    n_tokens: int = 1_000_000
    """Total training tokens (steps x batch_size). When the cache holds fewer, it is reused over several epochs."""

    unique_tokens: int | None = None
    """Distinct activations to collect and cache in memory. Default: n_tokens / 2, i.e. two epochs over the cache:
    collecting a token costs 3-5x more than training on it, and a second pass costs little quality. Capped by the
    corpus size (the cache is then reused for as many epochs as n_tokens needs)."""

    max_length: int = 128
    """Tokens per window; longer documents are split into several windows."""

    forward_batch_size: int = 32
    """Windows per forward pass of the language model."""

    cache_dtype: str = "bfloat16"
    """dtype of the in-memory activation cache: 'bfloat16' (default), 'float16' or 'float32'."""

    auxk_coefficient: float = 1 / 32
    """Weight of the AuxK loss on dead latents (topk only; 0 turns it off)."""

    k_aux: int | None = None
    """Dead latents used by the AuxK loss per token. Default: d_in / 2."""

    dead_tokens: int = 100_000
    """A latent that has not fired for this many training tokens counts as dead (for AuxK and the train metric)."""

    seed: int = 0
    """Seed for initialisation, the train/validation split, window choice and shuffling."""

    val_fraction: float = 0.05
    """Share of the texts held out for the metrics (chosen by seed; at least one text when > 0)."""

    eval_tokens: int = 16384
    """Held-out tokens (at most) for FVU, L0 and the dead-latent fraction (each costs a forward to the hook only)."""

    ce_eval_tokens: int = 4096
    """Held-out tokens (at most) for the CE-loss-recovered metric (each costs three full forward passes)."""

    eval_batch_size: int = 8
    """Windows per forward pass during evaluation (full forward passes with logits over the vocabulary)."""

    @property
    def n_steps(self) -> int:
        """Optimiser steps of the run: n_tokens / batch_size, rounded up."""
        return math.ceil(self.n_tokens / self.batch_size)

    def validate(self) -> None:
        def bad(name: str, expected: str) -> DSGError:
            return DSGError(f"Training option {name}={getattr(self, name)!r} is invalid; expected {expected}.")

        if self.architecture not in ("topk", "standard"):
            raise bad("architecture", "'topk' or 'standard'")
        if self.d_sae is not None and self.d_sae < 1:
            raise bad("d_sae", "a positive integer")
        if self.architecture == "topk" and (self.k < 1 or (self.d_sae is not None and self.k > self.d_sae)):
            raise bad("k", "an integer between 1 and d_sae")
        for name in ("batch_size", "n_tokens", "max_length", "forward_batch_size", "dead_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if self.max_length < 2:
            raise bad("max_length", "at least 2 tokens")
        if self.unique_tokens is not None and self.unique_tokens < 1:
            raise bad("unique_tokens", "a positive integer or None")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a positive number")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise bad("lr_decay_fraction", "a number in [0, 1]")
        if self.lr_warmup_steps < 0:
            raise bad("lr_warmup_steps", "a non-negative integer")
        if self.lr_warmup_steps > self.n_steps:  # the learning rate would never reach its value: an SAE barely trained
            raise bad(
                "lr_warmup_steps",
                f"at most the run's {self.n_steps} steps (n_tokens / batch_size): lower it, or "
                "train on more tokens or smaller batches",
            )
        for name in ("l1_coefficient", "auxk_coefficient"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):  # NaN fails both
                raise bad(name, "a finite non-negative number")
        if self.k_aux is not None and self.k_aux < 1:
            raise bad("k_aux", "a positive integer or None")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "a number in [0, 1)")
        for name in ("eval_tokens", "ce_eval_tokens"):
            if getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        if self.cache_dtype not in CACHE_DTYPES:
            raise bad("cache_dtype", f"one of {sorted(CACHE_DTYPES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"an integer from 0 to {MAX_SEED}")

    def resolved(self, d_in: int) -> TrainConfig:
        """A copy with every default that depends on the model filled in."""
        d_sae = self.d_sae or 8 * d_in
        out = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.d_sae = d_sae
        out.lr = self.lr if self.lr is not None else 2.5e-3 / math.sqrt(d_sae / 4096)
        out.k_aux = self.k_aux or max(1, d_in // 2)
        if out.architecture != "topk":  # k and k_aux belong to TopK: a standard SAE's record holds none
            out.k, out.k_aux = None, None
        out.unique_tokens = self.unique_tokens or max(1, self.n_tokens // 2)
        out.validate()
        return out


# ---- sparse autograd: the encoder and decoder of a TopK SAE ---------------------------------------------------


def _coo(values_BK: torch.Tensor, idx_BK: torch.Tensor, n_latents: int, transpose: bool = False) -> torch.Tensor:
    """The sparse [B, n_latents] matrix (or its transpose) holding values_BK at columns idx_BK of each row."""
    B, K = idx_BK.shape
    rows = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
    cols = idx_BK.reshape(-1)
    index = torch.stack([cols, rows]) if transpose else torch.stack([rows, cols])
    size = (n_latents, B) if transpose else (B, n_latents)
    return torch.sparse_coo_tensor(index, values_BK.reshape(-1), size, check_invariants=False)


def _gather_dot(g_BD: torch.Tensor, W_FD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    """out[b, j] = g[b] · W[idx[b, j]], without materialising the [B, K, D] gather (a sampled matmul)."""
    B, K = idx_BK.shape
    sorted_idx, order = idx_BK.sort(dim=-1)
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, sorted_idx.reshape(-1), g_BD.new_zeros(B * K), (B, W_FD.shape[0]), check_invariants=False
        )
        sampled = torch.sparse.sampled_addmm(pattern, g_BD, W_FD.t(), beta=0.0).values().view(B, K)
    return torch.empty_like(sampled).scatter_(-1, order, sampled)


class _TopKEncode(torch.autograd.Function):
    """Pre-activations pre = (x - b_dec) @ W_enc + b_enc, reduced to each token's top k (and, for AuxK, the
    top k_aux among dead latents). Only those entries carry gradient, so the backward is sparse."""

    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_FD, b_enc_F, k, dead_F, k_aux):
        pre_BF = torch.addmm(b_enc_F, x_BD - b_dec_D, W_enc_FD.t())
        top_BK, top_idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
        if dead_F is not None and k_aux > 0:
            aux_BA, aux_idx_BA = pre_BF.masked_fill_(~dead_F, -math.inf).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_BA = x_BD.new_zeros(x_BD.shape[0], 0)
            aux_idx_BA = top_idx_BK.new_zeros(x_BD.shape[0], 0)
        ctx.save_for_backward(x_BD, b_dec_D, W_enc_FD, top_idx_BK, aux_idx_BA)
        ctx.mark_non_differentiable(top_idx_BK, aux_idx_BA)
        return top_BK, top_idx_BK, aux_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_top_BK, _g_idx, g_aux_BA, _g_aux_idx):
        x_BD, b_dec_D, W_enc_FD, top_idx_BK, aux_idx_BA = ctx.saved_tensors
        if g_top_BK is None:
            g_top_BK = x_BD.new_zeros(top_idx_BK.shape)
        if g_aux_BA is None:
            g_aux_BA = x_BD.new_zeros(aux_idx_BA.shape)
        g_BK = torch.cat([g_top_BK, g_aux_BA], dim=1)
        idx_BK = torch.cat([top_idx_BK, aux_idx_BA], dim=1)
        n_latents = W_enc_FD.shape[0]
        g_b_enc_F = torch.zeros(n_latents, dtype=g_BK.dtype, device=g_BK.device).index_add_(
            0, idx_BK.reshape(-1), g_BK.reshape(-1)
        )
        g_W_enc_FD = torch.sparse.mm(_coo(g_BK, idx_BK, n_latents, transpose=True), x_BD - b_dec_D)
        # d pre / d b_dec = -W_enc for every token, so the per-token input gradients only matter summed.
        g_b_dec_D = -(g_b_enc_F @ W_enc_FD)
        return None, g_b_dec_D, g_W_enc_FD, g_b_enc_F, None, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat = sum_j f_j W_dec[idx_j] for K (index, value) pairs per token, without a dense [B, d_sae] f."""

    @staticmethod
    def forward(ctx, f_BK, idx_BK, W_dec_FD):
        ctx.save_for_backward(f_BK, idx_BK, W_dec_FD)
        ctx.mark_non_differentiable(idx_BK)
        return torch.sparse.mm(_coo(f_BK, idx_BK, W_dec_FD.shape[0]), W_dec_FD)

    @staticmethod
    def backward(ctx, g_BD):
        f_BK, idx_BK, W_dec_FD = ctx.saved_tensors
        g_f_BK = _gather_dot(g_BD, W_dec_FD, idx_BK)
        g_W_dec_FD = torch.sparse.mm(_coo(f_BK, idx_BK, W_dec_FD.shape[0], transpose=True), g_BD)
        return g_f_BK, None, g_W_dec_FD


# ---- the trainer ----------------------------------------------------------------------------------------------


class _Trainer:
    """Parameters, optimizer and one training step. Encoder stored as W_enc_FD = W_enc.T (rows are latents)."""

    def __init__(self, cfg: TrainConfig, d_in: int, b_dec_init: torch.Tensor, generator: torch.Generator):
        F_, D = cfg.d_sae, d_in
        W_dec = torch.randn(F_, D, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec_FD = W_dec.requires_grad_()
        self.W_enc_FD = W_dec.detach().clone().requires_grad_()
        self.b_enc_F = torch.zeros(F_, requires_grad=True)
        self.b_dec_D = b_dec_init.detach().clone().float().requires_grad_()
        self.params = [self.W_enc_FD, self.W_dec_FD, self.b_enc_F, self.b_dec_D]
        self.cfg = cfg
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.tokens_since_fired_F = torch.zeros(F_, dtype=torch.long)

    def sae(self, hook: str, model_name: str | None) -> SAE:
        c = self.cfg
        return SAE(
            self.W_enc_FD.detach().t().contiguous().clone(),
            self.W_dec_FD.detach().clone(),
            self.b_enc_F.detach().clone(),
            self.b_dec_D.detach().clone(),
            architecture=c.architecture,
            k=c.k if c.architecture == "topk" else None,
            hook_name=hook,
            model_name=model_name,
        )

    @property
    def dead_F(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.cfg.dead_tokens

    def step(self, x_BD: torch.Tensor, lr: float) -> dict[str, float]:
        c = self.cfg
        total_variance = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        if c.architecture == "topk":
            fvu, aux, fired_F, l0 = self._topk_losses(x_BD, total_variance)
            loss = fvu + c.auxk_coefficient * aux
            penalty = aux
        else:
            pre_BF = (x_BD - self.b_dec_D) @ self.W_enc_FD.t() + self.b_enc_F
            f_BF = torch.relu(pre_BF)
            x_hat_BD = f_BF @ self.W_dec_FD + self.b_dec_D
            fvu = (x_hat_BD - x_BD).pow(2).sum() / total_variance
            scale = (x_BD - x_BD.mean(0)).norm(dim=-1).mean()
            penalty = (f_BF * self.W_dec_FD.norm(dim=1)).sum(-1).mean() / scale
            loss = fvu + c.l1_coefficient * penalty
            active_BF = f_BF > 0
            fired_F, l0 = active_BF.any(0), float(active_BF.sum(-1).float().mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._remove_parallel_decoder_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec_FD /= self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.tokens_since_fired_F += x_BD.shape[0]
        self.tokens_since_fired_F[fired_F] = 0
        out = {"loss": loss.item(), "fvu": fvu.item(), "penalty": penalty.item(), "l0": l0}
        if not math.isfinite(out["loss"]) or not bool(torch.isfinite(self.W_enc_FD).all()):
            raise DSGError(f"SAE training diverged (the loss or the weights became NaN or infinite at learning rate "
                           f"{lr:g}); lower --lr (now {c.lr:g}), or check that the model's activations at the hook "
                           "are finite.")  # fmt: skip
        return out

    def _topk_losses(self, x_BD: torch.Tensor, total_variance: torch.Tensor):
        c = self.cfg
        dead_F = self.dead_F
        n_dead = int(dead_F.sum())
        k_aux = min(c.k_aux, n_dead) if c.auxk_coefficient > 0 else 0
        top_BK, idx_BK, aux_BA, aux_idx_BA = _TopKEncode.apply(
            x_BD, self.b_dec_D, self.W_enc_FD, self.b_enc_F, c.k, dead_F if k_aux else None, k_aux
        )
        f_BK = torch.relu(top_BK)
        x_hat_BD = _SparseDecode.apply(f_BK, idx_BK, self.W_dec_FD) + self.b_dec_D
        residual_BD = x_BD - x_hat_BD
        fvu = residual_BD.pow(2).sum() / total_variance
        aux = fvu.new_zeros(())
        if k_aux:
            # Dead latents learn to predict what the live ones missed (Gao et al. App. B.1); the loss is scaled
            # down while only a few latents are dead.
            e_hat_BD = _SparseDecode.apply(torch.relu(aux_BA), aux_idx_BA, self.W_dec_FD)
            aux = min(n_dead / c.k_aux, 1.0) * (e_hat_BD - residual_BD.detach()).pow(2).sum() / total_variance
        active_BK = f_BK > 0
        fired_F = torch.zeros(c.d_sae, dtype=torch.bool)
        fired_F[idx_BK[active_BK]] = True
        return fvu, aux, fired_F, float(active_BK.sum(-1).float().mean())

    def _remove_parallel_decoder_grad(self) -> None:
        # Rows are renormalised after the step, so a gradient along a row would only change its (discarded) norm.
        W, g = self.W_dec_FD.detach(), self.W_dec_FD.grad
        if g is not None:
            g -= (g * W).sum(dim=1, keepdim=True) * W


def _lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay_steps = int(cfg.lr_decay_fraction * n_steps)
    decay = min(1.0, (n_steps - step) / decay_steps) if decay_steps else 1.0
    return cfg.lr * min(warm, decay)


# ---- activations ----------------------------------------------------------------------------------------------


def _choose_windows(windows: list[list[int]], budget: int, seed: int) -> list[list[int]]:
    """A seeded random subset of windows holding about `budget` tokens (all of them if the corpus is smaller)."""
    order = list(range(len(windows)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= budget:
            break
        chosen.append(windows[i])
        total += len(windows[i]) - 1  # the first position never counts
    return chosen


@torch.inference_mode()
def collect_activations(
    model: torch.nn.Module,
    hook: HookPoint | str,
    windows: list[list[int]],
    *,
    limit: int | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
    dtype: torch.dtype = torch.float32,
    desc: str = "activations",
    progress: bool = True,
) -> torch.Tensor:
    """Activations [N, d_in] at `hook` over the real tokens of `windows` (at most `limit` of them).

    Each forward stops right after the hooked layer. The result is preallocated, so peak memory is the result
    plus one batch.
    """
    from ..runtime.hf import refuse_if_attached  # the runtime imports the SAE package

    refuse_if_attached(model, "Training an SAE (its activations)")
    point = resolve(model, hook) if isinstance(hook, str) else hook
    specials = special_token_ids(model)
    capacity = sum(len(w) - 1 for w in windows)
    limit = capacity if limit is None else min(limit, capacity)
    out = torch.empty(limit, hidden_size(model), dtype=dtype)
    filled = 0
    device = next(model.parameters()).device
    bar = tqdm(total=limit, desc=desc, unit="tok", disable=not progress, leave=False, file=sys.stderr)
    for _, ids, mask in batches(windows, batch_size, pad_id):
        if filled >= limit:
            break
        ids, mask = ids.to(device), mask.to(device)
        real = real_token_mask(ids, mask, specials)
        hooked = forward_to_hook(model, point, input_ids=ids, attention_mask=mask)
        if not isinstance(hooked, torch.Tensor) or hooked.shape[:2] != ids.shape or hooked.shape[-1] != out.shape[1]:
            got = tuple(hooked.shape) if isinstance(hooked, torch.Tensor) else type(hooked).__name__
            raise DSGError(f"Hook point {point.name!r} gives {got} for inputs of shape {tuple(ids.shape)}; an SAE "
                           f"reads a residual stream of width {out.shape[1]} per token: hook a point such as "
                           "'blocks.L.hook_resid_post'.")  # fmt: skip
        acts = hooked[real][: limit - filled]
        out[filled : filled + len(acts)] = acts.to("cpu", dtype)
        filled += len(acts)
        bar.update(len(acts))
    bar.close()
    return out[:filled]


# ---- evaluation -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def _reconstruction_metrics(sae: SAE, acts_ND: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """FVU (against the held-out mean), mean L0 and the share of latents that never fire."""
    mean_D = acts_ND.double().mean(0)
    sq_err, total_var, l0 = 0.0, 0.0, 0.0
    fired_F = torch.zeros(sae.d_sae, dtype=torch.bool)
    for start in range(0, len(acts_ND), chunk):
        x = acts_ND[start : start + chunk].float()
        f = sae.encode(x)
        sq_err += float((sae.decode(f) - x).double().pow(2).sum())
        total_var += float((x.double() - mean_D).pow(2).sum())
        active = f > 0
        l0 += float(active.sum())
        fired_F |= active.any(0)
    n = max(len(acts_ND), 1)
    return {
        "fvu": sq_err / total_var if total_var > 0 else float("nan"),
        "l0": l0 / n,
        "dead_fraction": float((~fired_F).float().mean()),
    }


@torch.inference_mode()
def _ce_metrics(model, point: HookPoint, sae: SAE, windows, batch_size: int, pad_id: int, progress: bool):
    """Next-token CE with the residual at real tokens kept, zeroed, or replaced by the SAE's reconstruction.

    Special tokens and each window's first position keep their clean residual in all three runs: the SAE never
    saw them, and zeroing the attention sink would measure something else. CE is averaged over predictions made
    at real positions.
    """
    specials = special_token_ids(model)
    sums = {"clean": 0.0, "zero": 0.0, "sae": 0.0}
    count = 0
    device = next(model.parameters()).device
    bar = tqdm(
        total=sum(len(w) for w in windows),
        desc="evaluate CE",
        unit="tok",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    for _, ids, mask in batches(windows, batch_size, pad_id):
        ids, mask = ids.to(device), mask.to(device)
        real_BT = real_token_mask(ids, mask, specials)
        scored = real_BT[:, :-1] & mask[:, 1:].bool()
        targets = ids[:, 1:][scored]
        edits = {
            "clean": None,
            "zero": lambda x, real_BT=real_BT: x.masked_fill(real_BT[..., None], 0.0),
            "sae": lambda x, real_BT=real_BT: torch.where(real_BT[..., None], sae(x).to(x.dtype), x),
        }
        for name, edit in edits.items():
            with hooked(model, point, edit or (lambda x: None), this_thread=True):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            sums[name] += float(F.cross_entropy(logits[:, :-1][scored].float(), targets, reduction="sum"))
        count += int(scored.sum())
        bar.update(int(mask.sum()))
    bar.close()
    ce = {name: s / max(count, 1) for name, s in sums.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_zero_ablation": ce["zero"],
        "ce_with_sae": ce["sae"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else float("nan"),
        "ce_tokens": count,
    }


# ---- the entry point ------------------------------------------------------------------------------------------


def _split_texts(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if val_fraction == 0:
        return list(texts), []
    if len(texts) < 2:
        raise DSGError(f"Training an SAE with val_fraction={val_fraction} needs at least 2 texts, got {len(texts)}.")
    n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    held = set(random.Random(seed).sample(range(len(texts)), n_val))
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def train_sae(
    model: torch.nn.Module, tokenizer, texts: list[str], config: TrainConfig | None = None, progress: bool = True
) -> tuple[SAE, dict]:
    """Train an SAE on `config.hook` of `model` over `texts`; returns (sae, metrics).

    Deterministic for a fixed `config.seed` on a given machine and thread count.
    """
    start = time.perf_counter()
    config = config or TrainConfig()
    config.validate()
    point = resolve(model, config.hook)
    d_in = hidden_size(model)
    cfg = config.resolved(d_in)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DSGError("Training an SAE needs at least one non-empty text, and none was given.")
    bad = next((i for i, t in enumerate(texts) if not is_text(t)), None)
    if bad is not None:
        raise DSGError(f"Training text {bad} holds an unpaired surrogate (bytes that are not UTF-8, or half of an "
                       "escaped pair): it is not text a tokenizer can read.")  # fmt: skip
    check_sequences_fit(model, tokenize(tokenizer, texts, cfg.max_length), cfg.max_length)  # before any forward
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    pad_id = pad_id_of(tokenizer, model)
    model_name = str(getattr(model.config, "_name_or_path", "") or "") or None
    was_training = model.training
    model.eval()

    def activations(texts: list[str], budget: int, desc: str, dtype: torch.dtype = torch.float32):
        return _activations_of(model, point, tokenizer, texts, budget, cfg, pad_id, desc, progress, dtype)

    train_texts, val_texts = _split_texts(texts, cfg.val_fraction, cfg.seed)
    t0 = time.perf_counter()
    train_windows, cache_ND = activations(
        train_texts, cfg.unique_tokens, "collect activations", CACHE_DTYPES[cfg.cache_dtype]
    )
    collect_s = time.perf_counter() - t0
    if not train_windows:
        raise DSGError(f"The training texts hold no window of at least 2 tokens (max_length={cfg.max_length}).")
    if len(cache_ND) == 0:
        raise DSGError("The training texts hold no real tokens (only special tokens and first positions).")

    mean_D = torch.zeros(d_in, dtype=torch.float64)
    for s in range(0, len(cache_ND), 65536):
        mean_D += cache_ND[s : s + 65536].double().sum(0)
    trainer = _Trainer(cfg, d_in, (mean_D / len(cache_ND)).float(), generator)

    val_windows, val_acts = [], None
    if val_texts and cfg.eval_tokens > 0:
        val_windows, val_acts = activations(val_texts, cfg.eval_tokens, "held-out activations")
    metrics: dict = {}
    if val_acts is not None and len(val_acts):
        metrics["fvu_at_init"] = _reconstruction_metrics(trainer.sae(cfg.hook, model_name), val_acts)["fvu"]

    t0 = time.perf_counter()
    last, fvu_ema, n_steps = _train_steps(trainer, cache_ND, cfg, generator, progress)
    trained = n_steps * _step_tokens(cfg, cache_ND)
    train_s = time.perf_counter() - t0

    sae = trainer.sae(cfg.hook, model_name)
    metrics |= {
        "train_fvu": fvu_ema,
        "train_l0": last.get("l0"),
        "train_dead_fraction": float(trainer.dead_F.float().mean()),
        "train_tokens": trained,
        "unique_tokens": len(cache_ND),
        "epochs": trained / len(cache_ND),
        "steps": n_steps,
        "collect_tokens_per_s": len(cache_ND) / collect_s if collect_s > 0 else None,
        "train_tokens_per_s": trained / train_s if train_s > 0 else None,
    }
    if val_acts is not None and len(val_acts):
        metrics.update(_heldout_metrics(model, point, sae, val_acts, val_windows, cfg, pad_id, progress))
    metrics |= _provenance(cfg, texts)
    metrics["wall_time_s"] = time.perf_counter() - start
    if was_training:
        model.train()
    return sae, metrics


def _activations_of(
    model,
    point,
    tokenizer,
    texts,
    budget: int,
    cfg: TrainConfig,
    pad_id: int,
    desc: str,
    progress: bool,
    dtype: torch.dtype = torch.float32,
):
    """(windows, activations at their real tokens): a seeded choice of windows holding about `budget` tokens."""
    windows = _choose_windows(tokenize(tokenizer, texts, cfg.max_length), budget, cfg.seed)
    if not windows:
        return windows, None
    acts = collect_activations(
        model,
        point,
        windows,
        limit=budget,
        batch_size=cfg.forward_batch_size,
        pad_id=pad_id,
        dtype=dtype,
        desc=desc,
        progress=progress,
    )
    return windows, acts


def _train_steps(trainer: _Trainer, cache_ND: torch.Tensor, cfg: TrainConfig, generator, progress: bool):
    """(last step's numbers, smoothed FVU, steps): n_tokens / batch_size steps over shuffled cache batches, each of
    _step_tokens tokens."""
    n_steps = cfg.n_steps
    bar = tqdm(total=n_steps * _step_tokens(cfg, cache_ND), desc="train SAE", unit="tok", disable=not progress,
               file=sys.stderr)  # fmt: skip
    perm, pos, last, fvu_ema = None, 0, {}, None
    for step in range(n_steps):
        # A new shuffle per epoch; a final partial batch is dropped (unless the cache is smaller than a batch).
        if perm is None or (pos > 0 and pos + cfg.batch_size > len(cache_ND)):
            perm, pos = torch.randperm(len(cache_ND), generator=generator), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += len(idx)
        last = trainer.step(cache_ND[idx].float(), _lr_at(step, n_steps, cfg))
        fvu_ema = last["fvu"] if fvu_ema is None else 0.9 * fvu_ema + 0.1 * last["fvu"]
        bar.update(len(idx))
        if step % 10 == 0 or step == n_steps - 1:
            dead = float(trainer.dead_F.float().mean())
            bar.set_postfix(fvu=f"{fvu_ema:.3f}", l0=f"{last['l0']:.0f}", dead=f"{dead:.1%}")
    bar.close()
    return last, fvu_ema, n_steps


def _step_tokens(cfg: TrainConfig, cache_ND: torch.Tensor) -> int:
    """Tokens in every training batch: batch_size, or the whole cache when it holds fewer (a partial batch at an
    epoch's end is dropped for a new shuffle)."""
    return min(cfg.batch_size, len(cache_ND))


def _heldout_metrics(model, point, sae: SAE, val_acts, val_windows, cfg: TrainConfig, pad_id: int, progress: bool):
    """FVU, L0 and dead latents on held-out activations, and CE loss recovered on held-out windows."""
    t0 = time.perf_counter()
    metrics = _reconstruction_metrics(sae, val_acts)
    metrics["val_tokens"] = len(val_acts)
    if cfg.ce_eval_tokens > 0:
        ce_windows = _choose_windows(val_windows, cfg.ce_eval_tokens, cfg.seed)
        metrics.update(_ce_metrics(model, point, sae, ce_windows, cfg.eval_batch_size, pad_id, progress))
    metrics["eval_s"] = time.perf_counter() - t0
    return metrics


# ---- saving ---------------------------------------------------------------------------------------------------


def _provenance(cfg: TrainConfig, texts: list[str]) -> dict:
    """What the SAE's bytes depend on: its config, its training texts (in order) and the machine's kind of sums."""
    return {"config": asdict(cfg), "texts": {"documents": len(texts), "sha256": corpus_sha256(texts)},
            "machine": machine_record()}  # fmt: skip


def machine_record() -> dict:
    """What a training run's floating-point sums depend on besides its inputs: the same command gives the same
    bytes on the same CPU kind and thread count, and other bytes (the same metrics to about 1 %) elsewhere."""
    return {"platform": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}  # fmt: skip


RECORDED_APART = ("config", "wall_time_s", "texts", "machine")  # metrics keys training.json keeps outside "metrics"


def save_trained_sae(path: str | os.PathLike, sae: SAE, metrics: dict, model: torch.nn.Module | None = None,
                     sources: list[str] | None = None) -> Path:  # fmt: skip
    """Write the SAE (SAELens layout) and `training.json` into `path`, atomically: all of it or nothing.

    `training.json` records the config, metrics, seed, library versions, the SAE's hash, the training texts (how
    many, their hash, and the `sources` they were read from: data domains or files), the machine the sums ran on
    and, when `model` is given, the fingerprint of the weights upstream of the hook.
    """
    config = metrics.get("config", {})
    record = {
        "dsg_version": __version__,
        "torch_version": torch.__version__,
        "seed": config.get("seed"),
        "hook": sae.hook_name,
        "config": config,
        "metrics": {k: _finite_or_none(v) for k, v in metrics.items() if k not in RECORDED_APART},
        "wall_time_s": metrics.get("wall_time_s"),
        "sae_sha256": sae.sha256(),
    }
    if "texts" in metrics:
        record["texts"] = metrics["texts"] | ({"sources": list(sources)} if sources else {})
    if "machine" in metrics:
        record["machine"] = metrics["machine"]
    if model is not None and sae.hook_name:
        record["model"] = model_fingerprint(model, resolve(model, sae.hook_name))
    path = Path(path)
    with atomic_directory(path, "SAE") as tmp:
        FORMATS["saelens"].write(sae, tmp)
        write_json(tmp / TRAINING_RECORD, record)
    return path


def _finite_or_none(value):
    """NaN/inf would make training.json invalid JSON; record them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
