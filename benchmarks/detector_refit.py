"""Does refitting the detector on the windows its first fit gets wrong sharpen the gate? (gate rates only)

The detector is an L1 logistic regression over every fitted window, each weighted alike within its class
(guard/detector.py). The gate, though, reads only a sequence's highest windows: τ and the latch level are
percentiles of the held-out benign sequences' largest window scores. Two refits aim the fit at that tail:

    hard-negatives   refit with the benign windows the first fit scores highest (the top `top` share) weighted
                     `boost` times, classes kept balanced: push the benign tail down
    drop-positives   refit without the forget windows the first fit scores lowest (the bottom `drop` share): the
                     generic stretches of forget documents (a manual's option list) that read like benign text

Every variant is fitted on the embedded default exactly as the shipped gate (bench.setting.DEMO_FIT), the prompt
level settled on validation as `dsg demo` does, and measured with benchmarks/gate_sweep.py's input sets.

    python benchmarks/detector_refit.py [--variants ships,hard1x10,hard0.3x30,drop20,drop40]

Prints the table and writes benchmarks/results/detector_refit.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import dsg.guard.fit  # noqa: F401  (the module, which dsg.guard's `fit` function shadows as an attribute)
from dsg.bench.setting import DEMO_FIT, BenchSetting, settle_on_validation
from dsg.guard import detector as detector_module
from dsg.tables import pct, table
from gate_sweep import gate_shares, input_sets, padded_sets

FIT_MODULE = sys.modules["dsg.guard.fit"]

VARIANTS = {
    "ships": None,
    "hard1x10": {"top": 0.01, "boost": 10.0, "drop": 0.0},
    "hard0.3x30": {"top": 0.003, "boost": 30.0, "drop": 0.0},
    "drop20": {"top": 0.0, "boost": 1.0, "drop": 0.2},
    "drop40": {"top": 0.0, "boost": 1.0, "drop": 0.4},
}


def refit(top: float, boost: float, drop: float):
    """A fit_weights that fits once, reweights as the variant says, and fits again."""

    def fit_weights(positive, negative, c: float, seed: int) -> dict[int, int]:
        from scipy import sparse
        from sklearn.linear_model import LogisticRegression

        X = sparse.vstack([positive, negative]).tocsr()
        n_pos, n_neg = positive.shape[0], negative.shape[0]
        y = np.concatenate([np.ones(n_pos), np.zeros(n_neg)])
        weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))

        def fitted():
            clf = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", max_iter=1000, random_state=seed)
            return clf.fit(X, y, sample_weight=weight).coef_[0]

        coef = fitted()
        if drop:
            pos = weight[:n_pos]
            score = positive @ coef
            pos[score < np.quantile(score, drop)] = 0.0
            pos *= 0.5 * n_pos / y.mean() / pos.sum()
        if top and boost != 1.0:
            neg = weight[n_pos:]
            score = negative @ coef
            neg[score >= np.quantile(score, 1 - top)] *= boost
            neg *= 0.5 * n_neg / (1 - y.mean()) / neg.sum()
        coef = fitted()
        q = np.clip(np.rint(coef * detector_module.SCALE), -detector_module.MAX_WEIGHT, detector_module.MAX_WEIGHT)
        return {int(j): int(q[j]) for j in np.flatnonzero(q)}

    return fit_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/detector_refit.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    model, tok, sae, forget, retain, general, forget_texts, retain_texts, calibration, stats = BenchSetting().prepared()
    sets = input_sets(tok, forget, retain, general)
    padded = padded_sets(tok, forget, retain, general)
    shipped_fit_weights = FIT_MODULE.fit_weights
    rows, results = [], {}
    for name in names:
        t = time.perf_counter()
        FIT_MODULE.fit_weights = shipped_fit_weights if VARIANTS[name] is None else refit(**VARIANTS[name])
        try:
            guard = FIT_MODULE.fit(model, tok, sae, forget_texts, retain_texts, calibration, DEMO_FIT, stats=stats)
        finally:
            FIT_MODULE.fit_weights = shipped_fit_weights
        settle_on_validation(model, tok, guard, forget, 100)
        shares = gate_shares(model, tok, guard, sets, padded)
        results[name] = {"refit": VARIANTS[name], "gate": guard.gate_rule(), "latents": len(guard.detector),
                         "gated": shares, "seconds": time.perf_counter() - t}  # fmt: skip
        rows.append([name, *(pct(shares[k]) for k in shares)])
        print(table(["variant", *(f"{k} %" for k in shares)], rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"hook": sae.hook_name, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
