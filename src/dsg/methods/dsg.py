"""DSG as a compared method: the paper's gated clamp, fitted with dsg.fit over a grid of selection and gate
settings."""

from __future__ import annotations

import dataclasses

from ..guard.fit import FitConfig
from .base import METHODS, budget_level
from .guardrail import GuardrailMethod


@METHODS.register("dsg")
class DSG(GuardrailMethod):
    name = "dsg"
    label = "DSG (gated clamp)"
    config_class = FitConfig

    def grid(self, bench, budget: float) -> list[dict]:
        level = budget_level(budget)
        if level == "smoke":
            return [{"n_features": 20, "ratio_percentile": 95.0, "clamp": 500.0}]
        if level == "default":
            # the gate percentile defaults to the bench's (95, the paper's); stricter gates trade forget-domain
            # coverage for fewer retain inputs clamped. clamp_mode "active" (only the latents that fire) is gentler
            # on the retain inputs the gate lets through by mistake.
            return (
                [
                    {"n_features": n, "ratio_percentile": p, "clamp": 500.0}
                    for n, p in ((10, 95.0), (20, 95.0), (50, 95.0), (20, 90.0))
                ]
                + [
                    {"n_features": n, "ratio_percentile": 95.0, "clamp": 500.0, "gate_percentile": g}
                    for n, g in ((20, 99.0), (50, 98.0), (50, 99.0))
                ]
                + [
                    {
                        "n_features": 50,
                        "ratio_percentile": 95.0,
                        "clamp": 500.0,
                        "gate_percentile": 98.0,
                        "clamp_mode": "active",
                    }
                ]
            )
        return [
            {"n_features": n, "ratio_percentile": p, "clamp": c, "gate_percentile": g}
            for n in (10, 20, 30, 50)
            for p in (90.0, 95.0)
            for c in (100.0, 500.0)
            for g in (95.0, 98.0)
        ]

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        return dataclasses.replace(bench.fit, **cfg)
