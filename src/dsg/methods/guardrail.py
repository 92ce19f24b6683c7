"""The base of every method whose result is a guardrail fitted from the bench's shared latent statistics (DSG,
the ungated SAE clamps).

The statistics pass is the expensive part and does not depend on the selection settings, so the bench measures
it once (`bench.latent_stats`) and every configuration reuses it; each configuration's cost counts it in full.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..eval.prompt_level import PROMPT_LEVEL_MAX_LOSS, settle_prompt_level
from ..guard.fit import FitConfig, fit
from ..guard.guardrail import Guardrail
from .base import Fitted, UnlearningMethod
from .cost import forward_params


class GuardrailMethod(UnlearningMethod):
    """A guardrail fitted with dsg.fit from the bench's shared statistics."""

    kind = "guardrail"

    def fit_config(self, bench, cfg: dict) -> FitConfig:
        raise NotImplementedError

    def settings(self, bench, cfg: dict) -> dict:
        config = self.fit_config(bench, cfg)
        settled = {}
        if config.gate_prompt_percentile is not None:  # settled after the fit on the validation questions
            settled = {
                "prompt_level_check": {
                    "max_loss": PROMPT_LEVEL_MAX_LOSS,
                    "questions": "validation",
                    "normalized": bench.norm,
                }
            }
        return {**cfg, "fit_config": dataclasses.asdict(config), **settled}

    def calibration(self, bench) -> list[str] | None:
        return bench.calibration

    def fit(self, bench, cfg: dict, run_dir: Path, progress: bool) -> Fitted:
        stats, shared = bench.latent_stats(progress)
        memo = stats.windows
        if memo is not None:
            memo.take()  # start this configuration's account of the detector windows it reads
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
        # a prompt level is judged on the forget domain's validation questions (eval/prompt_level.py), with the base
        # model's results on them where this process scored them already
        settle_prompt_level(bench.model, bench.tokenizer, guard, bench.questions["validation"][bench.forget_task],
                            batch_size=bench.batch_size, norm=bench.norm, progress=progress,
                            base=bench.unguarded.get(bench.scores_key("validation", bench.forget_task)))  # fmt: skip
        own = time.perf_counter() - t
        if memo is not None:  # detector windows computed by an earlier configuration count in full, like the statistics
            used, computed = memo.take()
            own += used - computed
        calib_tokens = guard.info["data"]["calibration"]["positions"]  # what the calibration forwards read
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
            "note": "forward passes only: latent statistics (shared by all DSG/clamp configurations, counted in "
            "full for each; seconds also count the detector's window features in full) + gate calibration; seconds "
            "also count the prompt level's check on the validation questions, where there is one",
        }
        record = {k: getattr(guard, k) for k in ("hook", "features", "threshold", "clamp", "clamp_mode", "gated")}
        record |= {"window": guard.window, "hold": guard.hold, "latch": guard.latch, "prompt_level": guard.prompt_level}
        if guard.latch_run is not None:
            record["latch_run"] = guard.latch_run
        if "prompt_level_check" in guard.info:
            record["prompt_level_check"] = guard.info["prompt_level_check"]
        if guard.detector is not None:
            record["detector"] = [[j, w] for j, w in guard.detector.named_weights()]
            record["detector_floor"] = guard.detector.floor
            record["detector_context"] = guard.info.get("detector_fit", {}).get("context", 0)
        return Fitted(guard, cost, record)

    def restore(self, bench, run: dict, run_dir: Path) -> Fitted | None:
        """The stored guardrail rebuilt from its record; None (fit again, deterministically from the shared
        statistics) for a windowed or detector gate, whose record does not carry every tensor it reads."""
        r = run["record"]
        if r.get("window") is not None or r.get("detector"):
            return None
        guard = Guardrail(
            bench.sae, r["hook"], r["features"], r["threshold"], r["clamp"], r["clamp_mode"], r["gated"], name=self.name
        )
        return Fitted(guard, run["cost"], r)
