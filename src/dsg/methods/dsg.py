"""DSG as a compared method, and the base of every method whose result is a guardrail fitted from the bench's
shared latent statistics (DSG, the ungated SAE clamps).

The statistics pass is the expensive part and does not depend on the selection settings, so the bench measures
it once (`bench.latent_stats`) and every configuration reuses it; each configuration's cost counts it in full.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..guard.fit import FitConfig, fit
from ..guard.guardrail import Guardrail
from .base import METHODS, Fitted, UnlearningMethod, budget_level
from .cost import forward_params


class GuardrailMethod(UnlearningMethod):
    """A guardrail fitted with dsg.fit from the bench's shared statistics."""

    kind = "guardrail"

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        raise NotImplementedError

    def calibration(self, bench) -> list[str] | None:
        return bench.calibration

    def fit(self, bench, cfg: dict, run_dir: Path, progress: bool) -> Fitted:
        stats, shared = bench.latent_stats(progress)
        t = time.perf_counter()
        guard = fit(
            bench.model,
            bench.tokenizer,
            bench.sae,
            bench.forget_texts,
            bench.retain_texts,
            self.calibration(bench),
            self.fit_config(bench, cfg),
            name=self.name,
            progress=progress,
            stats=stats,
        )
        own = time.perf_counter() - t
        calib_tokens = guard.info["data"]["calibration"]["tokens"]
        own_flops = (
            2.0 * (forward_params(bench.model, bench.layer) + bench.sae.d_in * len(guard.features)) * calib_tokens
        )
        cost = {
            "seconds": round(shared["seconds"] + own, 3),
            "flops": shared["flops"] + own_flops,
            "statistics_seconds": shared["seconds"],
            "statistics_flops": shared["flops"],
            "own_seconds": round(own, 3),
            "own_flops": own_flops,
            "note": "forward passes only: latent statistics (shared by all DSG/clamp configurations, counted in full "
            "for each) + gate calibration",
        }
        record = {k: getattr(guard, k) for k in ("hook", "features", "threshold", "clamp", "clamp_mode", "gated")}
        return Fitted(guard, cost, record)

    def restore(self, bench, run: dict, run_dir: Path) -> Fitted:
        r = run["record"]
        guard = Guardrail(
            bench.sae, r["hook"], r["features"], r["threshold"], r["clamp"], r["clamp_mode"], r["gated"], name=self.name
        )
        return Fitted(guard, run["cost"], r)


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
