"""What a guardrail removes, in a form a reviewer can read: `dsg inspect DIR`.

For each selected latent: its statistics on forget and retain text (mean activation, firing frequency), its
score under the scorer used, and its rank; then the gate threshold against the calibration rho distribution,
and where the guardrail came from (model and SAE hashes, corpora, config).
"""

from __future__ import annotations

import os

import torch

from ..errors import DSGError
from ..tables import printable, table
from .guardrail import Guardrail


def latent_rows(guard: Guardrail, latents: list[int]) -> list[list]:
    t = guard.tensors

    def get(key: str, j: int) -> float:
        return float(t[key][j]) if key in t else float("nan")

    return [
        [
            j,
            f"{get('forget_mean', j):.4f}",
            f"{get('retain_mean', j):.4f}",
            f"{get('forget_frequency', j):.3f}",
            f"{get('retain_frequency', j):.3f}",
            f"{get('score_ratio', j):.3g}",
        ]
        for j in latents
    ]


def describe(path: str | os.PathLike, top: int | None = None) -> str:
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
        raise DSGError(f"top must be a non-negative number of latents, got {top!r}.")
    guard = Guardrail.load(path, allow_missing_model=True)  # reading it applies it to nothing
    info = guard.info
    header = ["latent", "forget mean", "retain mean", "forget freq", "retain freq", "score ratio"]
    out = [
        f"Guardrail {path}" + (f" ({guard.name})" if guard.name else ""),
        f"  hook       {guard.hook}",
        f"  gate       {guard.gate_rule()}",
        f"  clamp      -{guard.clamp:g} on {'all' if guard.clamp_mode == 'all' else 'active'} selected latents at "
        "flagged tokens",
        f"  SAE        {guard.sae_record['architecture']} d_sae={guard.sae_record['d_sae']} "
        f"sha256={guard.sae_sha256[:16]}",
    ]
    model = info.get("model") or {}
    if model:
        out.append(
            f"  model      {model.get('class')} {model.get('name_or_path')!r} "
            f"sha256={model.get('weights_sha256', '')[:16]}"
        )
    config = info.get("config") or {}
    if config:
        out.append(
            f"  selection  scorer={config.get('scorer')} N={config.get('n_features')} "
            f"p_ratio={config.get('ratio_percentile')} p_dyn={config.get('gate_percentile')} seed={info.get('seed')}"
        )
    for label, d in (info.get("data") or {}).items():
        out.append(f"  {label:<10} " + ", ".join(f"{k}={v if k != 'sha256' else v[:12]}" for k, v in d.items()))
    rho = guard.tensors.get("calibration_rho")
    if rho is not None and rho.numel():
        unit = guard.gate_unit()  # in the units the gate line above prints
        q = torch.quantile(rho.double() / unit, torch.tensor([0.5, 0.9, 0.95, 0.99], dtype=torch.double)).tolist()
        gated = float((rho > guard.threshold).float().mean()) if guard.gated else 1.0  # a static rule clamps all
        latched = "" if guard.latch is None else f", {float((rho > guard.latch).float().mean()):.1%} over the latch"
        if guard.prompt_level is not None:
            latched += f", {float((rho > guard.prompt_level).float().mean()):.1%} over the prompt level"
        out.append(
            f"  calibration rho: median {q[0]:.3f}, p90 {q[1]:.3f}, p95 {q[2]:.3f}, p99 {q[3]:.3f}; "
            f"{gated:.1%} of calibration inputs gated{latched}"
        )
    runs = guard.tensors.get("calibration_runs")
    if runs is not None and runs.numel():
        latch = f"; the run latch at {guard.latch_run}" if guard.latch_run is not None else ""
        out.append(f"  calibration runs of windows over the threshold: longest {int(runs.max())}, "
                   f"{float((runs > 0).float().mean()):.1%} of inputs with one{latch}")  # fmt: skip
    check = info.get("prompt_level_check")
    if check:
        from ..eval.prompt_level import describe  # eval builds on guard: imported where it is needed

        out.append(f"  {describe(check)}")
    out += ["", f"Selected latents ({len(guard.features)}):", table(header, latent_rows(guard, guard.features))]
    if top and "score_forget" in guard.tensors:
        chosen = set(guard.features)
        order = guard.tensors["score_forget"].argsort(descending=True).tolist()
        others = [j for j in order if j not in chosen][:top]
        out += [
            "",
            f"Highest forget-score latents not selected ({len(others)}):",
            table(header, latent_rows(guard, others)),
        ]
    return printable("\n".join(out))
