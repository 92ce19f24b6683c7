"""Choosing the latents that carry the forget domain: one scorer per rule, registered by name (`--scorer`).

The paper's rule (official code, `get_top_features_percentile`), with numpy's linear percentiles over all latents:

    S_f = m_f²,  S_r = m_r²,  R = S_f / (S_r + 1e-21)
    candidates = { j : R_j >= P_ratio(R)  and  S_f_j >= P_min_forget(S_f) }
    selected   = the top N candidates by S_f (ties: lower latent id first)

Ours on top: a latent whose forget score is 0 (it never fires on the forget corpus) is never selected, so a corpus
or SAE on which fewer than N latents fire yields fewer than N. Squaring non-negative means is monotone, so this is
the mean-activation ratio in disguise; the "fisher" scorer uses the true second moment E[f²] instead. The
"frequency" scorer is the SAEBench / Farrell et al. static-clamp rule: drop latents firing on more than
`retain_cutoff` of retain tokens, rank the rest by forget firing frequency.

A scorer is a class with `forget_retain(forget, retain)` (the per-latent scores it ranks by, from
stats.LatentSums) and `select(forget, retain, config)` (the latent ids, best first); a new one is a class here
(or in its own file) with one registration line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DSGError
from ..registry import Registry

SCORERS: Registry[type] = Registry("latent scorer")
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


def _pair(forget, retain, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_numpy(forget, names[0]), _as_numpy(retain, names[1])
    if a.shape != b.shape:
        raise DSGError(f"forget and retain statistics differ in length: {a.shape[0]} vs {b.shape[0]}.")
    return a, b


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
    m_f, m_r = _pair(forget_mean, retain_mean, ("forget_mean", "retain_mean"))
    s_f, s_r = (m_f**2, m_r**2) if scorer == "ratio" else (m_f, m_r)
    ratio = s_f / (s_r + EPS)
    candidates = (ratio >= np.percentile(ratio, ratio_percentile)) & (s_f >= np.percentile(s_f, min_forget_percentile))
    # Ours: a latent that never fires on forget text carries nothing of it. The paper's percentile cuts let such
    # latents through when at most 5 % of latents fire on the forget corpus (both cuts fall to 0), and clamping them
    # would push the residual along unrelated directions.
    return _top_n(s_f, candidates & (s_f > 0), n_features)


def select_by_frequency(
    forget_frequency: Sequence[float] | torch.Tensor,
    retain_frequency: Sequence[float] | torch.Tensor,
    n_features: int = 20,
    retain_cutoff: float = 0.01,
) -> list[int]:
    """SAEBench / Farrell et al.: latents firing on < `retain_cutoff` of retain tokens, by forget frequency."""
    _check(n_features)
    p_f, p_r = _pair(forget_frequency, retain_frequency, ("forget_frequency", "retain_frequency"))
    return _top_n(p_f, (p_r < retain_cutoff) & (p_f > 0), n_features)


@SCORERS.register("ratio")
class Ratio:
    """The paper's: mean activation squared, forget over retain."""

    @staticmethod
    def forget_retain(forget, retain) -> tuple[torch.Tensor, torch.Tensor]:
        return forget.mean.double() ** 2, retain.mean.double() ** 2

    @staticmethod
    def select(forget, retain, config) -> list[int]:
        return select_features(
            forget.mean,
            retain.mean,
            config.n_features,
            config.ratio_percentile,
            config.min_forget_percentile,
            scorer="ratio",
        )


@SCORERS.register("fisher")
class Fisher:
    """The true second moment E[f²] (diagonal Fisher proxy), forget over retain."""

    @staticmethod
    def forget_retain(forget, retain) -> tuple[torch.Tensor, torch.Tensor]:
        return forget.mean_square.double(), retain.mean_square.double()

    @staticmethod
    def select(forget, retain, config) -> list[int]:
        return select_features(
            forget.mean_square,
            retain.mean_square,
            config.n_features,
            config.ratio_percentile,
            config.min_forget_percentile,
            scorer="fisher",
        )


@SCORERS.register("frequency")
class Frequency:
    """SAEBench / Farrell et al.: forget firing frequency after a retain-frequency cut-off."""

    @staticmethod
    def forget_retain(forget, retain) -> tuple[torch.Tensor, torch.Tensor]:
        return forget.frequency.double(), retain.frequency.double()

    @staticmethod
    def select(forget, retain, config) -> list[int]:
        return select_by_frequency(forget.frequency, retain.frequency, config.n_features, config.retain_cutoff)


def scores(forget, retain, scorer: str = "ratio") -> dict[str, torch.Tensor]:
    """Per-latent forget score, retain score and ratio under `scorer`, for inspection and saving.

    `forget` and `retain` are stats.LatentSums.
    """
    s_f, s_r = SCORERS[scorer].forget_retain(forget, retain)
    return {"score_forget": s_f.float(), "score_retain": s_r.float(), "score_ratio": (s_f / (s_r + EPS)).float()}
