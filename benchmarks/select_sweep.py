"""Which latents the clamp takes: the paper's ratio against the pooled retain corpus, against a separate neighbour
term, and the detector's own latents; one gate for all (DEMO_FIT's), so the rows differ only in what a clamp
removes. Scored on VALIDATION questions like clamp_sweep.py, plus each selection clamped on every input (the gate
switched off), which shows what the clamp would take from a neighbour question whenever a gate errs:

    <task> base-correct % / gated %    as in clamp_sweep.py, with the shipped gate
    always: cyber / computing          base-correct % kept with the clamp on every input, no gate

Selections (each N latents, ties by lower id):
    ratio       the paper's rule, R = m_f² / (m_r² + 1e-21) over the pooled retain corpus (ships)
    neighbour   the same with the neighbour domain as a separate term: m_f² / (max(m_r², m_n²) + 1e-21), where
                m_n is the mean over the neighbour's own fit texts and requests (a three-way score)
    detector    the N latents with the largest positive detector weights (the gate's own evidence)

    python benchmarks/select_sweep.py [--selections ratio,neighbour,detector] [--neighbour computing] [--n 50]

Prints the table and writes benchmarks/results/select_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from clamp_sweep import Validation
from dsg.bench.setting import DEMO_FIT, BenchSetting, settle_on_validation
from dsg.eval.mcq import score_mcq
from dsg.eval.metrics import summarize_results
from dsg.guard.fit import _checked_hook, _sequences, fit
from dsg.guard.guardrail import SelectedLatents
from dsg.guard.scorers import _top_n, select_features
from dsg.guard.stats import collect_stats
from dsg.lm.text import pad_id_of
from dsg.tables import pct, table


def three_way(forget, retain, neighbour, n: int, ratio_percentile: float, min_forget_percentile: float) -> list[int]:
    """The paper's rule with the neighbour as its own term: a latent must stand out against the pooled retain
    corpus and against the neighbour domain alone. The rule squares non-negative means, so dividing by the larger
    square is the rule with the larger mean as the retain side."""
    m_r = torch.maximum(retain.mean, neighbour.mean)
    return select_features(forget.mean, m_r, n, ratio_percentile, min_forget_percentile)


def by_detector(guard, n: int) -> list[int]:
    det = guard.detector
    w = det.weights.double().numpy()
    key = np.zeros(guard.sae.d_sae)
    key[det.latents.numpy()] = w
    return _top_n(key, key > 0, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selections", default="ratio,neighbour,detector")
    ap.add_argument("--neighbour", default="computing", help="retain domain measured as the neighbour term")
    ap.add_argument("--n", type=int, default=DEMO_FIT.n_features, help="latents per selection")
    ap.add_argument("--out", default="benchmarks/results/select_sweep.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    p = BenchSetting().prepared(progress=False)
    model, tok, sae = p.model, p.tokenizer, p.sae
    val = Validation.of(model, tok, p.forget, p.retain, p.general)
    cfg = dataclasses.replace(DEMO_FIT, n_features=args.n)
    guard = fit(model, tok, sae, p.forget_texts, p.retain_texts, p.calibration, cfg, stats=p.stats)
    settle_on_validation(model, tok, guard, p.forget, 100)
    near = next(d for d in p.retain if d.name == args.neighbour)
    seqs = _sequences(tok, list(near.texts["fit"]) + list(near.requests.get("fit", [])), DEMO_FIT, 3)
    neighbour = collect_stats(
        model, sae, _checked_hook(model, sae, DEMO_FIT)[0], seqs, pad_id=pad_id_of(tok, model), progress=False
    )
    picks = {
        "ratio": guard.features,
        "neighbour": three_way(
            p.stats.forget, p.stats.retain, neighbour, args.n, cfg.ratio_percentile, cfg.min_forget_percentile
        ),  # fmt: skip
        "detector": by_detector(guard, args.n),
    }
    always_tasks = [p.forget.name, args.neighbour]
    header = ["selection", "shared with ratio", *val.headers(), "ppl change", "rep. 3-grams %", "answer ppl",
              *(f"always: {t} %" for t in always_tasks)]  # fmt: skip
    rows, results = [], {"base": {"perplexity": val.base_perplexity, "fluency": val.base_fluency}}
    for name in args.selections.split(","):
        features = picks[name][: args.n]
        if len(features) < args.n:
            print(f"{name}: only {len(features)} latents qualify", flush=True)
        guard.latents, guard.features = SelectedLatents.of(sae, features), list(features)
        out, cells = val.score(model, tok, guard)
        guard.gated, always = False, {}
        for task in always_tasks:
            res = score_mcq(model, tok, val.questions[task], intervention=guard, progress=False, verify=False)
            always[task] = summarize_results(res, val.base_correct[task]).accuracy_base_correct
        guard.gated = True
        shared = len(set(features) & set(picks["ratio"]))
        out |= {"features": features, "always_clamped": always, "shared_with_ratio": shared}
        results[name] = out
        flu = out["fluency"]
        rows.append([name, str(shared), *cells, f"{100 * out['perplexity_change']:+.1f}%",
                     pct(flu["repeated_3gram"]), f"{flu['base_perplexity']:.1f}",
                     *(pct(always[t]) for t in always_tasks)])  # fmt: skip
        print(table(header, rows), flush=True)
    val.finish(results, args.out)


if __name__ == "__main__":
    main()
