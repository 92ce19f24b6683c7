"""Which statistic of a prompt's windows could guard the answer of a forget question asked first and padded after?

A held gate (`--gate-hold`) guards the answer when the gate is open at the prompt's last token, or when any window
of the prompt went over the latch level (the peak statistic that ships). A forget question followed by 1,000
benign tokens is past its hold by the end of the prompt, so only the latch can guard its answer. This measures how
the shipped peak latch and a second candidate, the longest run of consecutive judged windows over the threshold
(tokens the gate does not judge neither break nor extend a run), tell forget questions from benign text. The
questions are validation questions; the paddings and documents are held-out texts, which come from validation and
test records (data/common.py), so nothing here may choose a setting that is then reported on test:

  * cyber validation questions, each asked first with 1,000 benign tokens after it (the four paddings `dsg demo`
    uses, from the general domain's held-out texts), the positives;
  * geography, chemistry and computing validation questions padded the same way, and held-out computing and general
    documents (read as prompts, up to 1,024 tokens as `dsg demo` reads benign texts), the negatives.

For each set it reports the share the shipped latch guards (peak over the latch level), the share whose longest
run reaches R for each R given, and the share either guards. Nothing here is fitted or chosen.

    python benchmarks/latch_stats.py --guardrail dsg-demo/guardrail [--runs 6,8,10,12] [--out latch_stats.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsg.bench.demo import DemoConfig
from dsg.bench.setting import domain_questions
from dsg.eval.dilution import dilute, paddings
from dsg.guard import rule
from dsg.guard.guardrail import Guardrail
from dsg.guard.stats import judged_window_scores
from dsg.lm.hooks import activations_by_batch
from dsg.lm.models import context_length, load_model
from dsg.lm.text import batches, pad_id_of
from dsg.tables import pct, table

PADDING = 1000  # benign tokens after each question, as `dsg demo`'s "after" row
MAX_LENGTH = 1024  # tokens of a benign document read, as eval.dilution.gate_rates_on_texts reads them


@torch.inference_mode()
def window_statistics(model, tokenizer, guard: Guardrail, texts: list[str], batch_size: int = 4) -> list[dict]:
    """For each text, read whole as a prompt: its peak window (at judged tokens, as `rule.window_gate` keeps it in
    the gate state's `peak`) and its longest run of judged windows over the threshold."""
    limit = min(MAX_LENGTH, context_length(model) or MAX_LENGTH)
    seqs = [tokenizer(t)["input_ids"][:limit] for t in texts]
    out: list[dict] = [{}] * len(seqs)
    shard = list(batches(seqs, batch_size, pad_id_of(tokenizer, model)))
    for (idx, mask, x_BTD, real), (_, ids, _) in zip(activations_by_batch(model, guard.hook, iter(shard)), shard):
        _, a, e = guard.flags(x_BTD, real)
        counted = guard.counted(real, ids.to(real.device), ~mask.bool())
        scores = judged_window_scores(a if e is None else e, real, counted, guard.window)
        gate = rule.window_gate(a, real, None, guard.threshold, guard.window, e, guard.hold, None, guard.latch,
                                guard.prompt_level, counted)[1]  # fmt: skip
        runs = rule.longest_runs(scores, guard.threshold)
        for b, i in enumerate(idx):
            peak = max(float(scores[b].max()), 0.0) if len(scores[b]) else 0.0  # the state's peak starts at 0
            assert abs(peak - float(gate.peak[b])) <= 1e-6 * max(1.0, abs(peak)), "not the gate's own windows"
            assert int(runs[b]) == int(gate.longest[b]), "not the gate's own runs"
            out[i] = {"peak": peak, "run": int(runs[b])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guardrail", required=True)
    parser.add_argument("--runs", default="6,8,10,12", help="run lengths R to report, comma-separated")
    parser.add_argument("--questions", type=int, default=100, help="validation questions per domain")
    parser.add_argument("--documents", type=int, default=120, help="held-out documents per domain")
    parser.add_argument("--out", default="latch_stats.json")
    args = parser.parse_args()
    runs = [int(r) for r in args.runs.split(",")]

    model, tok = load_model("smollm2-135m")
    guard = Guardrail.load(args.guardrail, model=model)
    if guard.window is None or guard.latch is None:
        raise SystemExit("The guardrail has no windowed gate with a latch level (--gate-hold, --gate-latch-*).")
    forget, retain, general = DemoConfig().domains()
    fills = paddings(tok, list(general.texts["heldout"]), PADDING)

    def padded_after(domain) -> list[str]:
        qs = domain_questions(domain, "validation", args.questions)
        return [dilute(q, fills[i % len(fills)], PADDING, tok, "after")["question"] for i, q in enumerate(qs)]

    sets = {f"{forget.name} questions, padded after": padded_after(forget)}
    sets |= {f"{d.name} questions, padded after": padded_after(d) for d in retain}
    computing = next((d for d in retain if d.name == "computing"), None)
    if computing is not None:
        sets["computing held-out documents"] = list(computing.texts["heldout"])[: args.documents]
    sets["general held-out documents"] = list(general.texts["heldout"])[: args.documents]

    results, rows = {}, []
    for name, texts in sets.items():
        stats = window_statistics(model, tok, guard, texts)
        latched = [s["peak"] > guard.latch for s in stats]
        row = {"n": len(stats), "peak_latch": sum(latched) / len(stats), "stats": stats}
        for r in runs:
            row[f"run>={r}"] = sum(s["run"] >= r for s in stats) / len(stats)
            row[f"either, run>={r}"] = sum(x or s["run"] >= r for x, s in zip(latched, stats)) / len(stats)
        results[name] = row
        rows.append([name, len(stats), pct(row["peak_latch"])] + [pct(row[f"run>={r}"]) for r in runs]
                    + [pct(row[f"either, run>={r}"]) for r in runs])  # fmt: skip
        print(f"{name}: done", flush=True)
    header = ["set", "n", "peak > latch %"] + [f"run >= {r} %" for r in runs] + [f"either, R={r} %" for r in runs]
    print(f"\n{guard.gate_rule()}\n")
    print(table(header, rows))
    Path(args.out).write_text(json.dumps({"guardrail": args.guardrail, "runs": runs, "sets": results}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
