"""DSG as a compared method, fitted with dsg.fit over a grid of selection, gate and clamp settings:

dsg         the gate that ships (bench.setting.DEMO_FIT): the detector over windows of 8 tokens, held open 32
            tokens in a prompt, a prompt's tokens clamped only near windows over the latch level raised by half
            its gap above the threshold, where that costs at most 3 points of forgetting on the forget validation
            questions (eval/prompt_level.py)
dsg_paper   the paper's rule: clamp every input whose whole-input share of flagged tokens exceeds tau
"""

from __future__ import annotations

import dataclasses

from ..guard.fit import FitConfig
from .base import METHODS, budget_level
from .guardrail import GuardrailMethod

# The shipped gate (bench.setting.DEMO_FIT's; importing it from here would be circular: tests check they agree).
DETECTOR = {
    "gate_window": 8,
    "gate_hold": 32,
    "gate_latch_percentile": 100.0,
    "gate_latch_margin": 0.25,
    "gate_prompt_percentile": 100.0,
    "gate_prompt_margin": 0.5,
    "detector": True,
    "detector_context": 0,
    "gate_percentile": 93.0,
}
PAPER_RULE = {"gate_window": None, "gate_hold": None, "gate_latch_percentile": None, "gate_latch_margin": 0.0,
              "gate_latch_run_percentile": None, "gate_prompt_percentile": None, "gate_prompt_margin": 0.0,
              "detector": False, "detector_context": 0, "gate_percentile": 95.0, "clamp_mode": "all"}  # fmt: skip


@METHODS.register("dsg")
class DSG(GuardrailMethod):
    name = "dsg"
    label = "DSG (detector gate)"
    config_class = FitConfig

    def grid(self, bench, budget: float) -> list[dict]:
        # The shipped clamp first (50 latents at -100, all of them at a flagged token), then gentler and harder
        # ones: at the layer-12 SAE a -500 clamp breaks guarded text into repetition, a -20 one forgets little
        # (benchmarks/clamp_sweep.py).
        level = budget_level(budget)
        shipped = {"n_features": 50, "clamp": 100.0, "clamp_mode": "all"}
        if level == "smoke":
            return [shipped]
        grid = [shipped, shipped | {"clamp": 50.0}, shipped | {"n_features": 20}, shipped | {"gate_percentile": 99.0}]
        if level == "wide":
            grid += [{"n_features": n, "clamp": c, "clamp_mode": m, "gate_window": w}
                     for n in (50, 150) for c in (20.0, 500.0) for m in ("all", "active") for w in (8, 16)]  # fmt: skip
        return grid

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        merged = DETECTOR | cfg
        for level in ("latch", "prompt"):  # the shipped margin raises a level that this entry turns off
            if merged[f"gate_{level}_percentile"] is None and f"gate_{level}_margin" not in cfg:
                merged[f"gate_{level}_margin"] = 0.0
        return _capped(dataclasses.replace(bench.fit, **merged), bench)


@METHODS.register("dsg_paper")
class DSGPaper(GuardrailMethod):
    name = "dsg_paper"
    label = "DSG (paper's whole-input gate)"
    config_class = FitConfig

    def grid(self, bench, budget: float) -> list[dict]:
        level = budget_level(budget)
        if level == "smoke":
            return [{"n_features": 20, "ratio_percentile": 95.0, "clamp": 500.0}]
        if level == "default":
            # the gate percentile defaults to the bench's (95, the paper's); stricter gates trade forget-domain
            # coverage for fewer retain inputs clamped. clamp_mode "active" is gentler on the retain inputs the
            # gate lets through by mistake.
            return [
                {"n_features": 20, "ratio_percentile": 95.0, "clamp": 500.0},
                {"n_features": 50, "ratio_percentile": 95.0, "clamp": 500.0},
                {"n_features": 50, "ratio_percentile": 95.0, "clamp": 500.0, "gate_percentile": 98.0},
                {"n_features": 50, "ratio_percentile": 95.0, "clamp": 500.0, "gate_percentile": 98.0,
                 "clamp_mode": "active"},
            ]  # fmt: skip
        return [
            {"n_features": n, "ratio_percentile": p, "clamp": c, "gate_percentile": g}
            for n in (10, 20, 30, 50)
            for p in (90.0, 95.0)
            for c in (100.0, 500.0)
            for g in (95.0, 98.0)
        ]

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        return _capped(dataclasses.replace(bench.fit, **(PAPER_RULE | cfg)), bench)


def _capped(config: FitConfig, bench) -> FitConfig:
    """A grid written for the embedded SAE still runs on a smaller one: N is capped at its latent count."""
    sae = getattr(bench, "sae", None)
    if sae is not None and config.n_features > sae.d_sae:
        return dataclasses.replace(config, n_features=sae.d_sae)
    return config
