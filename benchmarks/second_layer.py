"""A guardrail at a deeper layer, alone and stacked with the shipped layer-12 one (validation questions).

The shipped guardrail clamps 50 latents of one SAE at layer 12, and its clamp, not its gate, limits forgetting:
it gates 95 % of the cyber validation questions yet keeps about a quarter of their base-correct answers. This
trains a second SAE with the shipped recipe at a deeper layer (`dsg train-sae`'s defaults and data), fits a
guardrail on it exactly as the shipped one is fitted (bench.setting.DEMO_FIT, its own detector, threshold and
levels, the prompt level settled on validation as `dsg demo` does), and scores three variants with
benchmarks/precision.py's columns:

    ships    the shipped layer-12 guardrail
    deep     the deeper layer's guardrail alone
    stack    both attached together (`dsg.attach(model, g12, g_deep)`: each keeps its own gate and clamp)

    python benchmarks/second_layer.py [--layer 18] [--variants ships,deep,stack] [--sae-dir DIR]

Prints the table and writes benchmarks/results/second_layer.json. The trained SAE is kept in --sae-dir and read
back on the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dsg.bench.demo import evaluate_guardrail
from dsg.bench.setting import DEMO_FIT, BenchSetting, settle_on_validation
from dsg.data import load_domain
from dsg.eval.mcq import score_mcq
from dsg.guard.fit import fit, measure
from dsg.sae import SAE
from dsg.sae.train import TrainConfig, save_trained_sae, train_sae
from dsg.tables import table
from precision import columns, row
from probe import evaluate as evaluate_probe
from probe import variants as probe_variants

SAE_DOMAINS = ("cyber", "hpo", "geography", "chemistry", "general")  # dsg train-sae's default --domains


def deep_sae(model, tok, layer: int, folder: Path) -> SAE:
    """The SAE at `layer`, trained with the shipped SAE's recipe, or read back from `folder`."""
    if (folder / "cfg.json").exists():
        return SAE.load(folder)
    texts = [t for name in SAE_DOMAINS for t in load_domain(name).texts["fit"]]
    config = TrainConfig(hook=f"blocks.{layer}.hook_resid_post", d_sae=4608, k=32, n_tokens=300_000,
                         unique_tokens=300_000, seed=0)  # fmt: skip
    sae, metrics = train_sae(model, tok, texts, config)
    save_trained_sae(folder, sae, metrics, model)
    return sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--variants", default="ships,deep,stack")
    ap.add_argument("--questions", type=int, default=100, help="validation questions per task")
    ap.add_argument("--perplexity-texts", type=int, default=40)
    ap.add_argument("--sae-dir", default=str(Path.home() / ".cache" / "dsg" / "second_layer"))
    ap.add_argument("--out", default="benchmarks/results/second_layer.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    setting = BenchSetting().prepared()
    model, tok, sae, forget, retain, general, forget_texts, retain_texts, calibration, stats = setting
    deep = deep_sae(model, tok, args.layer, Path(args.sae_dir) / f"layer{args.layer}")
    deep_config = dataclasses.replace(DEMO_FIT, hook=f"blocks.{args.layer}.hook_resid_post")
    deep_stats = measure(model, tok, deep, forget_texts, retain_texts, deep_config)
    guards = {
        "ships": fit(model, tok, sae, forget_texts, retain_texts, calibration, DEMO_FIT, stats=stats),
        "deep": fit(model, tok, deep, forget_texts, retain_texts, calibration, deep_config, stats=deep_stats),
    }
    for guard in guards.values():
        settle_on_validation(model, tok, guard, forget, args.questions)  # as dsg demo does
    guards["stack"] = [guards["ships"], guards["deep"]]
    probes = probe_variants(tok)
    probe_base = {n: [r.correct_norm for r in score_mcq(model, tok, qs, progress=False)] for n, qs in probes.items()}
    header = columns(retain)
    rows, results, cache = [], {}, {}
    for name in args.variants.split(","):
        t = time.perf_counter()
        guard = guards[name]
        ev = evaluate_guardrail(model, tok, guard, forget, retain, general, "validation", args.questions,
                                args.perplexity_texts, 16, base_cache=cache)  # fmt: skip
        ev["probe"] = evaluate_probe(model, tok, guard, probes, probe_base)
        cells, out = row(name, ev)
        rows.append(cells)
        results[name] = out | {"seconds": time.perf_counter() - t}
        print(table(header, rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"split": "validation", "layer": args.layer, "questions": args.questions,
                                          "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
