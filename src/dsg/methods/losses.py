"""The loss terms the trained methods share (open-unlearning's formulas; RMU's activation distance).

With NLL(x) the mean next-token negative log-likelihood over a batch's target tokens (padding excluded, as the HF
`loss`) and log π(x) a sequence's summed target log-probability:

    mean_nll            NLL(x)
    npo_loss            -(2/β) · mean_b log σ(-β · (log π_θ(x_b) - log π_ref(x_b)))       (= (2/β)·log 2 at θ = ref)
    topk_kl             mean over positions of KL(π_ref ‖ π_θ) between {the reference's top-k tokens, the rest}:
                        a lower bound of the full KL, equal to it when the tail mass is 0 (k = 0: full vocabulary)
    mean_sq_distance    mean over tokens of ||h - target||²   (RMU)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def mean_sq_distance(h_ND: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over N tokens of the squared L2 distance to `target` ([D] or [N, D])."""
    return (h_ND - target).square().sum(-1).mean()
