"""Gradient-based unlearning as in open-unlearning (`src/trainer/unlearn/{grad_ascent,grad_diff,npo}.py`).

With NLL(x) the mean next-token negative log-likelihood over the batch's target tokens (padding excluded, as the
HF `loss`), log π(x) a sequence's summed target log-probability, γ the forget weight and α the retain weight:

    ga        L = -γ · NLL(x_f)
    graddiff  L = -γ · NLL(x_f) + α · R(x_r)
    npo       L =  γ · mean_b [ -(2/β) · log σ(-β · (log π_θ(x_f,b) - log π_ref(x_f,b))) ] + α · R(x_r)

    R = NLL(x_r)                                    retain_loss="nll"
    R = mean over target positions of KL(π_ref ‖ π_θ)  retain_loss="kl"

NPO at θ = ref is (2/β)·log 2 per sequence (σ(0) = 1/2). The reference model is never held: its outputs are
computed once up front for the fixed batches the run visits (see baselines.common). For NPO that is one number
per forget sequence. For KL, a full-vocabulary distribution per retain token would be too large on CPU, so the
reference's top-k log-probabilities (`kl_top_k`) are cached and KL is taken between the (k+1)-outcome
distributions {top-k tokens, everything else}: a lower bound of the full KL that equals it when the tail mass is
0 (kl_top_k = 0 caches the full vocabulary and is exact).

Trainable parameters: by default every parameter of the MLP blocks of all decoder layers ("mlp"), which keeps
the optimizer state and the weight gradients to about 60% of a Llama-style model's non-embedding parameters
and the saved edit to those tensors; "all" trains everything, anything else is a regular expression over
parameter names. The model runs in eval mode (no dropout), deterministically seeded; AdamW.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import check_choice
from ..errors import DSGError
from .common import (
    Cost,
    batch_tensors,
    forward_params,
    layer_of,
    layer_params,
    mlp_parameter_names,
    seed_everything,
    training,
    training_windows,
)
from .weights import Edit, make_edit, whole_model_fingerprint

METHODS = ("ga", "graddiff", "npo")
RETAIN_LOSSES = ("nll", "kl")


@dataclass
class GradientConfig:
    """Gradient ascent, GradDiff and NPO hyperparameters (open-unlearning's defaults where it has them)."""

    method: str = "npo"
    """ga (gradient ascent on the forget NLL), graddiff (plus a retain term) or npo (negative preference optimization)."""
    retain_loss: str = "nll"
    """graddiff/npo retain term: nll (retain NLL) or kl (KL from the frozen reference on retain text)."""
    gamma: float = 1.0
    """γ: weight of the forget term."""
    alpha: float = 1.0
    """α: weight of the retain term (graddiff, npo)."""
    beta: float = 0.1
    """β: NPO temperature."""
    lr: float = 1e-5
    """AdamW learning rate."""
    steps: int = 80
    """Optimizer steps (one forget batch, plus one retain batch for graddiff/npo)."""
    batch_size: int = 4
    """Sequences per batch."""
    max_length: int = 128
    """Tokens per sequence; longer documents are split into windows."""
    params: str = "mlp"
    """Trainable parameters: mlp (all MLP blocks), all, or a regular expression over parameter names."""
    kl_top_k: int = 64
    """retain_loss=kl: reference log-probs cached per token (0 = the full vocabulary, exact)."""
    seed: int = 0
    """Seed for the batch order."""

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise DSGError("Gradient unlearning needs steps >= 1, batch_size >= 1 and max_length >= 2.")
        if self.lr <= 0 or self.beta <= 0 or self.kl_top_k < 0:
            raise DSGError("Gradient unlearning needs lr > 0, beta > 0 and kl_top_k >= 0.")

    @property
    def uses_retain(self) -> bool:
        return self.method != "ga"


def trainable_names(model: torch.nn.Module, params: str) -> list[str]:
    if params == "mlp":
        return mlp_parameter_names(model)
    if params == "all":
        return [n for n, _ in model.named_parameters()]
    try:
        pattern = re.compile(params)
    except re.error as e:
        raise DSGError(f"params must be 'mlp', 'all' or a regular expression; {params!r} is not one: {e}.") from None
    names = [n for n, _ in model.named_parameters() if pattern.search(n)]
    if not names:
        raise DSGError(f"The params pattern {params!r} matches no parameter of {type(model).__name__}.")
    return names


# ---- the pieces of the losses ---------------------------------------------------------------------------------


def target_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax of the predictions for tokens 1..T-1 [B, T-1, V], target mask [B, T-1] bool)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1), mask[:, 1:].bool()


def token_logprobs(logp_BTV: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logp_BTV.gather(-1, ids[:, 1:, None]).squeeze(-1)


def mean_nll(logp_BTV, ids, tmask) -> torch.Tensor:
    lp = token_logprobs(logp_BTV, ids)
    return -(lp * tmask).sum() / tmask.sum().clamp(min=1)


def sequence_logprob(logp_BTV, ids, tmask) -> torch.Tensor:
    """log π(x) per sequence [B]: summed log-probability of its target tokens."""
    return (token_logprobs(logp_BTV, ids) * tmask).sum(1)


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/β) · mean log σ(-β (log π_θ - log π_ref)) over sequences (open-unlearning compute_dpo_loss, no winner)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


def reference_topk(logp_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What to cache of the reference's distribution at N positions: (log-probs [N, k'], token ids [N, k'])."""
    if k == 0 or k >= logp_NV.shape[-1]:
        idx = torch.arange(logp_NV.shape[-1], device=logp_NV.device).expand_as(logp_NV)
        return logp_NV.detach().clone(), idx.clone()
    vals, idx = logp_NV.detach().topk(k, dim=-1)
    return vals, idx


def _log1mexp_sum(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(logp)) over the last dim, floored so that a zero tail stays finite."""
    return torch.log((1.0 - logp.exp().sum(-1)).clamp(min=1e-12))


def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logp_NV: torch.Tensor) -> torch.Tensor:
    """Mean over N positions of KL(ref ‖ θ) between the distributions {the cached tokens, the rest}."""
    q = logp_NV.gather(-1, ref_idx)
    head = (ref_logp.exp() * (ref_logp - q)).sum(-1)
    p_tail_log, q_tail_log = _log1mexp_sum(ref_logp), _log1mexp_sum(q)
    p_tail = p_tail_log.exp()
    tail = torch.where(p_tail > 1e-9, p_tail * (p_tail_log - q_tail_log), torch.zeros_like(p_tail))
    return (head + tail).mean()


# ---- training -------------------------------------------------------------------------------------------------


@torch.no_grad()
def _reference(model, seqs, batches, pad_id, device, what: str, k: int) -> list:
    out = []
    for idx in batches:
        ids, mask = batch_tensors(seqs, idx, pad_id, device)
        logp, tmask = target_logprobs(model, ids, mask)
        out.append(sequence_logprob(logp, ids, tmask) if what == "sequence" else reference_topk(logp[tmask], k))
    return out


def _windows(model, tokenizer, forget, retain, config: GradientConfig):
    return training_windows(model, tokenizer, forget, retain, config.max_length, config.batch_size, config.seed,
                            use_retain=config.uses_retain)


def unlearn_gradient(
    model: torch.nn.Module,
    tokenizer,
    forget: Sequence,
    retain: Sequence = (),
    config: GradientConfig | None = None,
    *,
    progress: bool = True,
) -> Edit:
    """Train GA / GradDiff / NPO on `model` (texts or token-id lists) and return the edit; the model is unchanged."""
    config = config or GradientConfig()
    names = trainable_names(model, config.params)
    device = next(model.parameters()).device
    pad_id, f_seqs, r_seqs, f_batches, r_batches = _windows(model, tokenizer, forget, retain, config)
    base_fp = whole_model_fingerprint(model)
    seed_everything(config.seed)

    cost = Cost()
    p_fwd = forward_params(model)
    layers = [layer_of(model, n) for n in names]
    first = min((i for i in layers if i is not None), default=None)
    p_bwd = p_fwd - (layer_params(model, range(first)) if first is not None else 0)
    if any(i is None for i in layers):  # embeddings or head train: gradients flow through everything
        p_bwd = p_fwd
    p_train = sum(p.numel() for n, p in model.named_parameters() if n in set(names))

    steps_f = f_batches[: min(config.steps, len(f_batches))]
    steps_r = r_batches[: min(config.steps, len(r_batches))]
    tokens = lambda seqs, bs: sum(len(b) * max(len(seqs[i]) for i in b) for b in bs)
    ref_f = ref_r = None
    if config.method == "npo":
        ref_f = _reference(model, f_seqs, steps_f, pad_id, device, "sequence", 0)
        cost.forward(p_fwd, tokens(f_seqs, steps_f), "reference forget log-probs")
    if config.uses_retain and config.retain_loss == "kl":
        ref_r = _reference(model, r_seqs, steps_r, pad_id, device, "topk", config.kl_top_k)
        cost.forward(p_fwd, tokens(r_seqs, steps_r), "reference retain top-k")

    log = []
    with training(model, names) as (params, originals):
        opt = torch.optim.AdamW(params, lr=config.lr)
        for step in tqdm(range(config.steps), desc=config.method, disable=not progress, unit="step"):
            fi = step % len(f_batches)
            ids, mask = batch_tensors(f_seqs, f_batches[fi], pad_id, device)
            logp, tmask = target_logprobs(model, ids, mask)
            n_tok = ids.numel()
            if config.method == "npo":
                forget_term = npo_loss(sequence_logprob(logp, ids, tmask), ref_f[fi], config.beta)
            else:
                forget_term = -mean_nll(logp, ids, tmask)
            loss = config.gamma * forget_term
            retain_term = torch.zeros(())
            if config.uses_retain:
                ri = step % len(r_batches)
                ids, mask = batch_tensors(r_seqs, r_batches[ri], pad_id, device)
                logp, tmask = target_logprobs(model, ids, mask)
                n_tok += ids.numel()
                if config.retain_loss == "nll":
                    retain_term = mean_nll(logp, ids, tmask)
                else:
                    retain_term = topk_kl(*ref_r[ri], logp[tmask])
                loss = loss + config.alpha * retain_term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cost.train(p_fwd, p_bwd, p_train, n_tok)
            value = float(loss.detach())
            log.append({"step": step, "loss": value, "forget": float(forget_term.detach()), "retain": float(retain_term.detach())})
            if not math.isfinite(value):
                raise DSGError(f"{config.method} diverged at step {step} (loss {value}); lower lr.")
        edit = make_edit(model, originals, {
            "method": config.method,
            "config": dataclasses.asdict(config),
            "seed": config.seed,
            "updated": f"{len(names)} tensors ({config.params})",
            "base": {"model": base_fp},
            "cost": cost.record(p_fwd=p_fwd, p_bwd=p_bwd, p_train=p_train),
            "log": log,
        })
    edit.info["cost"]["seconds"] = cost.record()["seconds"]
    return edit


@torch.no_grad()
def gradient_loss(model, tokenizer, forget, retain, config: GradientConfig, edit: Edit | None = None) -> dict:
    """The objective over every fixed batch the run visits, under `edit` (reference = the model without it);
    batch losses are averaged with equal weight. For tests and diagnostics."""
    from .weights import edited

    device = next(model.parameters()).device
    pad_id, f_seqs, r_seqs, f_batches, r_batches = _windows(model, tokenizer, forget, retain, config)
    f_batches, r_batches = f_batches[: config.steps], r_batches[: config.steps]
    ref_f = _reference(model, f_seqs, f_batches, pad_id, device, "sequence", 0)
    ref_r = _reference(model, r_seqs, r_batches, pad_id, device, "topk", config.kl_top_k) if r_batches else []
    forget_terms, retain_terms = [], []
    with edited(model, edit if edit is not None else {}, verify=edit is not None):
        for b, idx in enumerate(f_batches):
            ids, mask = batch_tensors(f_seqs, idx, pad_id, device)
            logp, tmask = target_logprobs(model, ids, mask)
            forget_terms.append(float(npo_loss(sequence_logprob(logp, ids, tmask), ref_f[b], config.beta))
                                if config.method == "npo" else -float(mean_nll(logp, ids, tmask)))
        for b, idx in enumerate(r_batches):
            ids, mask = batch_tensors(r_seqs, idx, pad_id, device)
            logp, tmask = target_logprobs(model, ids, mask)
            retain_terms.append(float(mean_nll(logp, ids, tmask)) if config.retain_loss == "nll"
                                else float(topk_kl(*ref_r[b], logp[tmask])))
    forget_term = sum(forget_terms) / len(forget_terms)
    retain_term = sum(retain_terms) / len(retain_terms) if retain_terms else 0.0
    return {"loss": config.gamma * forget_term + config.alpha * retain_term, "forget": forget_term, "retain": retain_term}
