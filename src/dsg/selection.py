"""Choosing the latents that carry the forget domain.

The paper's rule (official code, `get_top_features_percentile`), with numpy's linear percentiles over all latents:

    S_f = m_f²,  S_r = m_r²,  R = S_f / (S_r + 1e-21)
    candidates = { j : R_j >= P_ratio(R)  and  S_f_j >= P_min_forget(S_f) }
    selected   = the top N candidates by S_f (ties: lower latent id first)

Squaring non-negative means is monotone, so this is the mean-activation ratio in disguise; the "fisher" scorer
uses the true second moment E[f²] instead. The "frequency" scorer is the SAEBench / Farrell et al. static-clamp
rule: drop latents firing on more than `retain_cutoff` of retain tokens, rank the rest by forget firing frequency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import DSGError

SCORERS = ("ratio", "fisher", "frequency")
EPS = 1e-21


def _as_numpy(x, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise DSGError(f"{name} must be a 1-D vector of per-latent values, got shape {arr.shape}.")
    return arr


def _top_n(order_key: np.ndarray, candidates: np.ndarray, n: int) -> list[int]:
    idx = np.flatnonzero(candidates)
    idx = idx[np.lexsort((idx, -order_key[idx]))]  # by key descending, then id ascending
    return [int(j) for j in idx[:n]]


def _check(n_features: int, *percentiles: float) -> None:
    if n_features < 1:
        raise DSGError(f"n_features must be at least 1, got {n_features}.")
    for p in percentiles:
        if not 0 <= p <= 100:
            raise DSGError(f"Percentiles must lie in [0, 100], got {p}.")


def select_features(
    forget_mean: Sequence[float] | torch.Tensor,
    retain_mean: Sequence[float] | torch.Tensor,
    n_features: int = 20,
    ratio_percentile: float = 95,
    min_forget_percentile: float = 5,
    scorer: str = "ratio",
) -> list[int]:
    """The paper's selection rule. With scorer="fisher", pass mean *squared* activations; they are not squared again."""
    if scorer not in ("ratio", "fisher"):
        raise DSGError(f"select_features scorer must be 'ratio' or 'fisher' (use select_by_frequency), got {scorer!r}.")
    _check(n_features, ratio_percentile, min_forget_percentile)
    m_f, m_r = _as_numpy(forget_mean, "forget_mean"), _as_numpy(retain_mean, "retain_mean")
    if m_f.shape != m_r.shape:
        raise DSGError(f"forget and retain statistics differ in length: {m_f.shape[0]} vs {m_r.shape[0]}.")
    s_f, s_r = (m_f**2, m_r**2) if scorer == "ratio" else (m_f, m_r)
    ratio = s_f / (s_r + EPS)
    candidates = (ratio >= np.percentile(ratio, ratio_percentile)) & (s_f >= np.percentile(s_f, min_forget_percentile))
    return _top_n(s_f, candidates, n_features)


def select_by_frequency(
    forget_frequency: Sequence[float] | torch.Tensor,
    retain_frequency: Sequence[float] | torch.Tensor,
    n_features: int = 20,
    retain_cutoff: float = 0.01,
) -> list[int]:
    """SAEBench / Farrell et al.: latents firing on < `retain_cutoff` of retain tokens, by forget frequency."""
    _check(n_features)
    p_f, p_r = _as_numpy(forget_frequency, "forget_frequency"), _as_numpy(retain_frequency, "retain_frequency")
    if p_f.shape != p_r.shape:
        raise DSGError(f"forget and retain statistics differ in length: {p_f.shape[0]} vs {p_r.shape[0]}.")
    return _top_n(p_f, (p_r < retain_cutoff) & (p_f > 0), n_features)


def scores(forget, retain, scorer: str = "ratio") -> dict[str, torch.Tensor]:
    """Per-latent forget score, retain score and ratio under `scorer`, for inspection and saving.

    `forget` and `retain` are stats.LatentSums.
    """
    if scorer == "ratio":
        s_f, s_r = forget.mean.double() ** 2, retain.mean.double() ** 2
    elif scorer == "fisher":
        s_f, s_r = forget.mean_square.double(), retain.mean_square.double()
    elif scorer == "frequency":
        s_f, s_r = forget.frequency.double(), retain.frequency.double()
    else:
        raise DSGError(f"Unknown scorer {scorer!r}; expected one of {SCORERS}.")
    return {"score_forget": s_f.float(), "score_retain": s_r.float(), "score_ratio": (s_f / (s_r + EPS)).float()}
