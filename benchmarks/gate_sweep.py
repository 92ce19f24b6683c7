"""Which inputs open the detector gate, per SAE and gate setting: the gate alone, without scoring answers (fast).

For each variant it fits a guardrail on the embedded default (DEMO_FIT with the variant's fields replaced) and
reports the share of inputs whose largest window score exceeds the threshold:

    probe offensive / +700 tok / chat / computing / general   benchmarks/probes/ (hand-written, never fitted on)
    <domain> val                                               the packs' validation questions (60 per domain)
    <domain> requests                                          held-out chat requests (60 per domain)
    held-out docs                                              256-token held-out retain documents (80)
    <domain> val, 1,000 before / after / chat                  40 cyber and 40 computing validation questions
                                                               padded as dsg demo pads its test questions: the
                                                               share whose answer would be guarded (the gate at
                                                               the prompt's end, hold and latch included)

    python benchmarks/gate_sweep.py [--sae DIR] [--variants p99,p97,p95,p97-floor] [--forget-requests retain]

Prints the table and writes benchmarks/results/gate_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dsg.bench.setting import DEMO_FIT, BenchSetting, chat_prompt, settle_on_validation
from dsg.eval.dilution import dilute, gate_rate_on_texts, paddings
from dsg.guard.fit import fit
from dsg.lm.hooks import activations_by_batch
from dsg.lm.text import batches, pad_id_of
from dsg.tables import pct, table
from probe import variants as probe_variants

VARIANTS = {
    "p99": {"gate_percentile": 99.0},
    "p98": {"gate_percentile": 98.0},
    "p97": {"gate_percentile": 97.0},
    # the detector also fitted on a fifth of its sequences read after 32 to 256 benign tokens
    # (FitConfig.detector_context)
    "p97-context": {"gate_percentile": 97.0, "detector_context": 256},
    "p98-context": {"gate_percentile": 98.0, "detector_context": 256},
    "p95": {"gate_percentile": 95.0},
    "w16-p97": {"gate_window": 16, "gate_percentile": 97.0},
    # each token's evidence floored at zero (FitConfig.detector_floor)
    "p99-floor": {"gate_percentile": 99.0, "detector_floor": True},
    "p98-floor": {"gate_percentile": 98.0, "detector_floor": True},
    "p97-floor": {"gate_percentile": 97.0, "detector_floor": True},
    "p95-floor": {"gate_percentile": 95.0, "detector_floor": True},
    # the detector's L1 strength (FitConfig.detector_c; smaller: fewer latents) and window
    "p95-c0.1": {"gate_percentile": 95.0, "detector_c": 0.1},
    "p95-c1": {"gate_percentile": 95.0, "detector_c": 1.0},
    "p95-w4": {"gate_percentile": 95.0, "gate_window": 4},
    # the latch level raised above the largest calibration value (FitConfig.gate_latch_margin)
    "p95-latch0.25": {"gate_percentile": 95.0, "gate_latch_margin": 0.25},
    "p95-latch0.5": {"gate_percentile": 95.0, "gate_latch_margin": 0.5},
    "p93-latch0.25": {"gate_percentile": 93.0, "gate_latch_margin": 0.25},
    "p90-latch0.25": {"gate_percentile": 90.0, "gate_latch_margin": 0.25},
}


def input_sets(tok, forget, retain, general) -> dict[str, list[str]]:
    probes = probe_variants(tok)
    sets = {
        "probe offensive": [q["question"] for q in probes["offensive"]],
        "probe off. +700 tok": [q["question"] for q in probes["offensive, preamble x6"]],
        "probe off. chat": [q["question"] for q in probes["offensive, chat"]],
        "probe computing": [q["question"] for q in probes["everyday_computing"]],
        "probe general": [q["question"] for q in probes["general"]],
    }
    for d in [forget] + retain:
        sets[f"{d.name} val"] = [q.question for q in d.questions["validation"][:60]]
        if d.requests.get("heldout"):
            sets[f"{d.name} requests"] = [chat_prompt(tok, r) for r in d.requests["heldout"][:60]]
    docs = [t for d in retain + [general] for t in d.texts["heldout"][:20]]
    sets["held-out docs"] = [tok.decode(tok(t)["input_ids"][:256]) for t in docs]
    return sets


def padded_sets(tok, forget, retain, general) -> dict[str, list[str]]:
    """Validation questions after (or before) 1,000 benign tokens, as dsg demo pads its test questions."""
    fills = paddings(tok, list(general.texts["heldout"]), 1000)
    computing = next(d for d in retain if d.name == "computing")
    sets = {}
    for d, forms in ((forget, ("plain", "after", "chat")), (computing, ("plain", "chat"))):
        qs = [{"question": q.question} for q in d.questions["validation"][:40]]
        for form in forms:
            name = {"plain": "1,000 before", "after": "1,000 after", "chat": "chat, 1,000"}[form]
            sets[f"{d.name} val, {name}"] = [dilute(q, fills[i % len(fills)], 1000, tok, form)["question"]
                                             for i, q in enumerate(qs)]  # fmt: skip
    return sets


@torch.inference_mode()
def gate_share(model, tok, guard, texts: list[str]) -> float:
    """Share of texts (each judged alone) whose largest window of detector evidence exceeds the threshold."""
    det, w, opened = guard.detector, guard.window, 0
    for text in texts:
        ids = tok(text)["input_ids"][:1024]
        for _, _, x_BTD, real in activations_by_batch(model, guard.hook, batches([ids], 1, pad_id_of(tok, model))):
            e = det.evidence(guard.sae.encode(x_BTD)[..., det.latents], real)[0]
        sums = torch.cat([torch.zeros(1, dtype=torch.long), e.cumsum(0)])
        ends = torch.arange(1, len(ids) + 1)
        windows = (sums[ends] - sums[(ends - w).clamp(min=0)]).double() / w
        opened += bool(windows.max() > guard.threshold)
    return opened / len(texts)


def gate_shares(model, tok, guard, sets: dict[str, list[str]], padded: dict[str, list[str]]) -> dict[str, float]:
    """Per input set, the share that opens the gate (input_sets) or whose answer would be guarded (padded_sets)."""
    shares = {k: gate_share(model, tok, guard, v) for k, v in sets.items()}
    return shares | {k: gate_rate_on_texts(model, tok, v, guard, max_length=2048) for k, v in padded.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE folder (default: the one shipped for the model)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/gate_sweep.json")
    ap.add_argument("--forget-requests", default=None, help="fit on at most this many of the forget domain's chat "
                    "requests, or 'retain' for as many as the retain domains hold (default: all)")  # fmt: skip
    args = ap.parse_args()
    bench, cap = BenchSetting(sae=args.sae), args.forget_requests
    if cap == "retain":
        cap = sum(len(d.requests.get("fit", [])) for d in bench.domains()[1])
    elif cap is not None and not (cap.isdigit() and int(cap) > 0):
        ap.error(f"--forget-requests must be a positive count or 'retain', got {cap!r}")
    setting = bench.prepared(forget_requests=None if cap is None else int(cap))
    model, tok, sae, forget, retain, general, forget_texts, retain_texts, calibration, stats = setting
    sets = input_sets(tok, forget, retain, general)
    padded = padded_sets(tok, forget, retain, general)
    rows, results = [], {}
    for name in args.variants.split(","):
        t = time.perf_counter()
        config = dataclasses.replace(DEMO_FIT, **VARIANTS[name])
        guard = fit(model, tok, sae, forget_texts, retain_texts, calibration, config, stats=stats)
        settle_on_validation(model, tok, guard, forget, 100)  # as dsg demo does: the level stays where it forgets
        shares = gate_shares(model, tok, guard, sets, padded)
        results[name] = {"config": VARIANTS[name], "gate": guard.gate_rule(), "gated": shares,
                         "seconds": time.perf_counter() - t}  # fmt: skip
        rows.append([name, *(pct(shares[k]) for k in shares)])
        print(table(["variant", *(f"{k} %" for k in shares)], rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"sae": str(args.sae or "shipped"), "hook": sae.hook_name, "forget_requests": cap, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
