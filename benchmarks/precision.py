"""Precision where it is hard: forget offensive cyber, keep neighbouring computing knowledge, and hold the gate
under benign padding. One row per guardrail variant, fitted on the embedded default and scored on VALIDATION
questions (the demo and `dsg compare` report test questions):

    forget base-correct %   accuracy on the cyber questions the base model answers (lower is better)
    <task> %  / gated %     accuracy relative to the base model, and the share of questions gated, per retain task
                            (computing is the neighbour domain)
    k=0/100/1000 gated %    gate recall on forget questions after k benign tokens (eval/dilution.py)
    benign mentions clamped % benign text that mentions a security term in passing (false positives)
    held-out text gated %   256-token windows of held-out retain documents (false positives on long text)
    ppl change              held-out retain perplexity, guarded vs base
    requests gated %        held-out chat requests ("How does <technique / tool / module> work in practice?") per
                            domain: recall on the forget domain's, false positives on computing's
    probe: ... gated %      benchmarks/probes/, questions written apart from the packs (benchmarks/probe.py):
                            plain-words offensive questions, the same behind a ~700-token benign preamble, everyday
                            computing questions; "probe off. kept %" is accuracy on the base-correct offensive ones
    rep. 3-grams, answer ppl  fluency of greedy answers to forget prompts (eval/fluency.py): repeated 3-gram share
                            (base -> guarded) and the guarded answers' perplexity under the base model

    python benchmarks/precision.py [--questions 100] [--variants paper,ships,detector-p99] [--sae DIR]

Prints the table and writes benchmarks/results/precision.json.
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
from dsg.eval.mcq import score_mcq
from dsg.guard.fit import fit
from dsg.methods.dsg import PAPER_RULE
from dsg.tables import pct, table
from probe import evaluate as evaluate_probe
from probe import variants as probe_variants

# Each variant is DEMO_FIT (what ships) with these fields replaced; "paper" is the paper's rule on the same data.
VARIANTS = {
    "paper": PAPER_RULE | {"n_features": 50},
    "ships": {},
    "hold-every-token": {"gate_hold_words": False},  # judged at and counting every real token, as before fillers
    "detector-p99": {"gate_percentile": 99.0},
    "detector-p97": {"gate_percentile": 97.0},  # the threshold before the prompt level was settled by forgetting
    "detector-c50": {"clamp": 50.0},
    "detector-layer3-clamp": {"n_features": 150, "clamp": 500.0, "clamp_mode": "active"},
    # a prompt with more windows in a row over the threshold than any calibration sequence gets a guarded answer
    "run-latch": {"gate_latch_run_percentile": 100.0},
}


def columns(retain) -> list[str]:
    """The table's header: what `row` fills, per retain domain where it says so."""
    header = ["variant", "forget base-correct %", "forget gated %"]
    header += [h for d in retain for h in (f"{d.name} % of base", f"{d.name} gated %")]
    header += ["k=0 gated %", "k=100 gated %", "k=1000 gated %", "after k=1000 gated %", "forget base-correct % k=1000",
               "benign mentions clamped %", "held-out text gated %", "ppl change", "rep. 3-grams % base -> guarded",
               "answer ppl", "cyber requests gated %", "computing requests gated %", "probe off. gated %",
               "probe off. +700 tok gated %", "probe computing gated %", "probe off. kept %"]  # fmt: skip
    return header


def row(name: str, ev: dict) -> tuple[list[str], dict]:
    forget = ev["forget"][0]
    cells = [name, pct(forget["guarded_accuracy_base_correct"]), pct(forget["gate_rate"])]
    out = {"forget_base_correct": forget["guarded_accuracy_base_correct"], "forget_gate": forget["gate_rate"]}
    for t in ev["retain"]:
        rel = t["guarded_accuracy"] / t["base_accuracy"] if t["base_accuracy"] else None
        cells += [pct(rel), pct(t["gate_rate"])]
        out[f"{t['task']}_relative"], out[f"{t['task']}_gate"] = rel, t["gate_rate"]
    d = ev["dilution"]
    for key in ("plain:0", "plain:100", "plain:1000", "after:1000"):
        cells.append(pct(d[key]["gate_rate"]) if key in d else "-")
        out[f"gate_{key}"] = d.get(key, {}).get("gate_rate")
    out["forget_base_correct_k1000"] = d.get("plain:1000", {}).get("accuracy_base_correct")
    out["mentions_gate"], out["perplexity_gate"] = d.get("mentions_gate_rate"), ev["perplexity"]["gate_rate"]
    cells += [pct(out["forget_base_correct_k1000"]), pct(out["mentions_gate"]), pct(out["perplexity_gate"])]
    cells.append(f"{100 * ev['perplexity']['relative_change']:+.2f}%")
    out["perplexity_change"] = ev["perplexity"]["relative_change"]
    flu = ev["fluency"]
    cells += [f"{pct(flu['base']['repeated_3gram'])} -> {pct(flu['guarded']['repeated_3gram'])}",
              f"{flu['guarded']['base_perplexity']:.1f}"]  # fmt: skip
    out["fluency"] = {k: dict(flu[k]) for k in ("base", "guarded")}
    req = ev.get("requests_gate_rate") or {}
    cells += [pct(req.get("cyber")), pct(req.get("computing"))]
    out["requests_gate"] = req
    pr = ev.get("probe") or {}
    for key in ("offensive", "offensive, preamble x6", "everyday_computing"):
        cells.append(pct(pr.get(key, {}).get("gate_rate")))
    cells.append(pct(pr.get("offensive", {}).get("accuracy_base_correct")))
    out["probe"] = pr
    return cells, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=100, help="validation questions per task")
    ap.add_argument("--perplexity-texts", type=int, default=40)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--sae", default=None, help="SAE folder (default: the one shipped for the model)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    setting = BenchSetting(sae=args.sae).prepared()
    model, tok, sae, forget, retain, general, forget_texts, retain_texts, calibration, stats = setting
    header = columns(retain)
    probes = probe_variants(tok)
    probe_base = {n: [r.correct_norm for r in score_mcq(model, tok, qs, progress=False)] for n, qs in probes.items()}
    rows, results, cache = [], {}, {}
    for name in args.variants.split(","):
        t = time.perf_counter()
        config = dataclasses.replace(DEMO_FIT, **VARIANTS[name])
        guard = fit(model, tok, sae, forget_texts, retain_texts, calibration, config, stats=stats)
        settle_on_validation(model, tok, guard, forget, args.questions)  # as dsg demo does
        ev = evaluate_guardrail(model, tok, guard, forget, retain, general, "validation", args.questions,
                                args.perplexity_texts, 16, base_cache=cache)  # fmt: skip
        ev["probe"] = evaluate_probe(model, tok, guard, probes, probe_base)
        cells, out = row(name, ev)
        rows.append(cells)
        results[name] = out | {
            "config": VARIANTS[name],
            "threshold": guard.threshold,
            "detector_latents": len(guard.detector) if guard.detector is not None else None,
            "seconds": time.perf_counter() - t,
        }
        print(table(header, rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"split": "validation", "questions": args.questions, "results": results},
                                         indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
