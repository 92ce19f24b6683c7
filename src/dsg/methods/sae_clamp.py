"""SAE clamping without DSG's sequence gate: the static and the conditional clamp, built with `dsg.fit`.

Both select latents the SAEBench / Farrell et al. way (`FitConfig(scorer="frequency")`: drop latents firing on
at least `retain_cutoff` of retain tokens, keep the N most frequent on forget text) and apply to every input
(`gated=False`). They differ in what is clamped at a token:

    static        clamp_mode="all"     at every token where any selected latent fires, set *all* N selected
                                       latents to -c: DSG's clamp with the gate removed, so comparing it with
                                       DSG isolates what the sequence-level gate buys.
    conditional   clamp_mode="active"  at every token, set each selected latent that fires (f_j > 0) to -c and
                                       leave the others: the per-latent, per-token conditional clamp.

How this maps to the literature (paper.md §9.1, §9.2; ecosystem.md §3.4), honestly: the SAEBench / Farrell code
(`anthropic_clamp_resid_SAE_features`), which the DSG paper reports as the "static" / "Farrell et al." baseline,
and Khoriaty et al.'s "Clamp Prime" apply the *same* rule, our `conditional` one; "static" in those papers means
"no gate", not "clamp at every token". Khoriaty et al. chose their latents by reading Neuronpedia descriptions,
which has no counterpart here, so we select them by frequency for both. Neither variant can clamp a token where
no selected latent fires: that would add a constant steering vector at every token, which no cited method does.
So `static` is the ungated "all" clamp (DSG minus its gate), and `conditional` is the SAEBench/Farrell/Khoriaty
rule. Both keep the SAE error term (x' = x + sum_j (f'_j - f_j) W_dec[j]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import check_choice, check_types
from ..guard.fit import CorpusStats, FitConfig, fit
from ..guard.guardrail import Guardrail
from .base import METHODS, budget_level
from .guardrail import GuardrailMethod

VARIANTS = {"static": "all", "conditional": "active"}


@dataclass
class ClampConfig:
    """An ungated SAE clamp (SAEBench frequency selection). SAEBench sweeps N in {10, 20}, c in {25..200}."""

    variant: str = "conditional"
    """static: all selected latents at every flagged token; conditional: only the latents that fire
    (SAEBench/Farrell/Khoriaty)."""
    n_features: int = 20
    """Number of latents to select (N)."""
    retain_cutoff: float = 0.01
    """Drop latents firing on at least this fraction of retain tokens."""
    clamp: float = 100.0
    """Clamp strength c: clamped latents are set to -c."""

    def __post_init__(self):
        check_types(self)
        check_choice("variant", self.variant, tuple(VARIANTS))


def unused_calibration(retain: Sequence[str]) -> list[str]:
    """An ungated guardrail never reads its threshold, so the gate calibration pass runs on one text only."""
    return [next((t for t in retain if t.strip()), "")]


def clamp_fit_config(config: ClampConfig, base: FitConfig | None = None) -> FitConfig:
    """The FitConfig that builds this clamp (data settings such as max_length come from `base`)."""
    return dataclasses.replace(
        base or FitConfig(),
        scorer="frequency",
        gated=False,
        gate_window=None,
        gate_hold=None,
        gate_latch_percentile=None,
        gate_latch_margin=0.0,
        gate_latch_run_percentile=None,
        gate_prompt_percentile=None,
        gate_prompt_margin=0.0,
        detector=False,
        detector_context=0,
        clamp_mode=VARIANTS[config.variant],
        n_features=config.n_features,
        retain_cutoff=config.retain_cutoff,
        clamp=config.clamp,
        clamp_relative_to_norm=False,
    )


def fit_clamp(
    model: torch.nn.Module,
    tokenizer,
    sae,
    forget: Sequence[str],
    retain: Sequence[str],
    config: ClampConfig | None = None,
    base: FitConfig | None = None,
    *,
    stats: CorpusStats | None = None,
    progress: bool = True,
) -> Guardrail:
    """An ungated clamp guardrail. Pass `stats` (dsg.fit.measure with `base`'s data settings) to reuse statistics."""
    config = config or ClampConfig()
    fc = clamp_fit_config(config, base)
    calibration = unused_calibration(retain)
    guard = fit(
        model,
        tokenizer,
        sae,
        forget,
        retain,
        calibration,
        fc,
        name=f"{config.variant}-clamp",
        progress=progress,
        stats=stats,
    )
    guard.info["baseline"] = dataclasses.asdict(config)
    return guard


class SAEClamp(GuardrailMethod):
    """An ungated clamp as a compared method; the variant is fixed by the method's name."""

    config_class = ClampConfig

    def grid(self, bench, budget: float) -> list[dict]:
        level = budget_level(budget)
        variant = self.fixed["variant"]
        if level == "smoke":
            return [{"variant": variant, "n_features": 20, "retain_cutoff": 0.01, "clamp": 100.0}]
        if level == "default":
            # small clamps too: ungated, a large -c on every token where a latent fires wrecks retain perplexity
            return [
                {"variant": variant, "n_features": n, "retain_cutoff": 0.01, "clamp": c}
                for n, c in ((10, 25.0), (20, 25.0), (20, 100.0))
            ]
        return [
            {"variant": variant, "n_features": n, "retain_cutoff": r, "clamp": c}
            for n in (10, 20, 50)
            for r in (0.001, 0.01)
            for c in (10.0, 50.0, 200.0)
        ]

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        return clamp_fit_config(self.config(cfg), bench.fit)

    def calibration(self, bench) -> list[str]:
        return unused_calibration(bench.retain_texts)


@METHODS.register("static_clamp")
class StaticClamp(SAEClamp):
    name = "static_clamp"
    label = "static clamp (no gate, all latents)"
    fixed = {"variant": "static"}


@METHODS.register("conditional_clamp")
class ConditionalClamp(SAEClamp):
    name = "conditional_clamp"
    label = "conditional clamp (no gate, active latents; SAEBench/Farrell/Khoriaty)"
    fixed = {"variant": "conditional"}
