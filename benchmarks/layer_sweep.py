"""Which layer (and which guardrail settings) for the embedded default: train an SAE per layer, fit, evaluate.

Everything is chosen on the *validation* questions; the demo reports the *test* questions. Per layer:
  1. train a TopK SAE on the "fit" texts of every data domain (dsg.sae.train),
  2. measure latent statistics once (dsg.guard.fit.measure),
  3. fit guardrails over a small grid of (N, p_ratio, p_dyn, clamp) reusing those statistics,
  4. score base vs guarded on validation questions and held-out retain perplexity.

    python benchmarks/layer_sweep.py --layers 3,6,10 --n-tokens 300000 [--grid default|wide]

Prints a table and writes benchmarks/results/layer_sweep.json; trained SAEs go to --sae-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from dsg.bench.demo import evaluate_guardrail
from dsg.bench.setting import DEMO_FIT, fit_corpora, settle_on_validation
from dsg.data import load_domain
from dsg.guard.fit import fit, measure
from dsg.lm.models import load_model
from dsg.sae import SAE
from dsg.sae.train import TrainConfig, save_trained_sae, train_sae

GRIDS = {
    "default": [dict()],
    "n": [dict(n_features=n) for n in (20, 50, 100, 200)],  # the official code's Bio sweep over N
    "clamp": [dict(n_features=n, clamp=c) for n in (50, 100) for c in (100.0, 2000.0)],
    "wide": [
        dict(n_features=n, ratio_percentile=p, gate_percentile=g, clamp=c)
        for n, p, g, c in itertools.product([10, 20, 40], [95, 99], [95, 98], [50.0, 500.0])
    ],
}


def summarize(ev: dict) -> dict:
    f = ev["forget"][0]
    out = {
        "forget_base": f["base_accuracy"],
        "forget_guarded": f["guarded_accuracy"],
        "forget_base_correct": f["guarded_accuracy_base_correct"],
        "forget_gate": f["gate_rate"],
        "ppl_change": ev["perplexity"]["relative_change"],
        "ppl_gate": ev["perplexity"]["gate_rate"],
    }
    for t in ev["retain"]:
        out[f"{t['task']}_relative"] = t["guarded_accuracy"] / t["base_accuracy"] if t["base_accuracy"] else None
        out[f"{t['task']}_gate"] = t["gate_rate"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="3,6,10")
    ap.add_argument("--n-tokens", type=int, default=300_000)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--questions", type=int, default=150)
    ap.add_argument("--perplexity-texts", type=int, default=60)
    ap.add_argument("--sae-dir", default=str(Path.home() / ".cache" / "dsg" / "sweep"))
    ap.add_argument("--out", default="benchmarks/results/layer_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, tok = load_model(args.model)
    forget, retain, general = (
        load_domain("cyber"),
        [load_domain("geography"), load_domain("chemistry")],
        load_domain("general"),
    )
    train_texts = [
        t for name in ("cyber", "hpo", "geography", "chemistry", "general") for t in load_domain(name).texts["fit"]
    ]
    forget_texts, retain_texts, calibration = fit_corpora(forget, retain, general, tok)
    base_cache: dict = {}
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        hook = f"blocks.{layer}.hook_resid_post"
        sae_path = Path(args.sae_dir) / f"layer{layer}_k{args.k}_d{args.d_sae}_t{args.n_tokens}"
        if (sae_path / "cfg.json").exists():
            sae = SAE.load(sae_path)
            sae_metrics = json.loads((sae_path / "training.json").read_text())["metrics"]
        else:
            cfg = TrainConfig(
                hook=hook, d_sae=args.d_sae, k=args.k, n_tokens=args.n_tokens, unique_tokens=args.n_tokens
            )
            t = time.perf_counter()
            sae, sae_metrics = train_sae(model, tok, train_texts, cfg)
            save_trained_sae(sae_path, sae, sae_metrics, model)
            sae_metrics = {k: v for k, v in sae_metrics.items() if k != "config"} | {"seconds": time.perf_counter() - t}
        config = dataclasses.replace(DEMO_FIT, hook=hook)
        stats = measure(model, tok, sae, forget_texts, retain_texts, config)
        for overrides in GRIDS[args.grid]:
            cfg = dataclasses.replace(config, **overrides)
            guard = fit(model, tok, sae, forget_texts, retain_texts, calibration, cfg, stats=stats)
            settle_on_validation(model, tok, guard, forget, args.questions)  # as dsg demo does
            ev = evaluate_guardrail(
                model,
                tok,
                guard,
                forget,
                retain,
                general,
                "validation",
                args.questions,
                args.perplexity_texts,
                16,
                base_cache,
            )
            row = {
                "layer": layer,
                **overrides,
                "threshold": guard.threshold,
                "features": guard.features,
                "sae": {k: sae_metrics.get(k) for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered")},
                **summarize(ev),
            }
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "features"}
                ),
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")

    keys = [
        "layer",
        "n_features",
        "ratio_percentile",
        "gate_percentile",
        "clamp",
        "forget_base_correct",
        "forget_gate",
        "geography_relative",
        "chemistry_relative",
        "geography_gate",
        "chemistry_gate",
        "ppl_change",
    ]
    print("\n" + "  ".join(f"{k[:14]:>14}" for k in keys))
    for r in rows:
        vals = [r.get(k, DEMO_FIT.__dict__.get(k)) for k in keys]
        print("  ".join(f"{v:>14.3f}" if isinstance(v, float) else f"{str(v):>14}" for v in vals))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
