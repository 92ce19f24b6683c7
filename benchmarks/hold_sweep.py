"""How long the gate stays open inside a prompt: latched (the gate opens once and clamps to the prompt's end) or
held open h tokens after each window over the threshold (FitConfig.gate_hold), and with a hold, whether a second,
higher level guards the answer of a prompt that went over it anywhere (FitConfig.gate_latch_percentile), and
whether a prompt's own tokens are clamped near every window over the threshold or only near windows over a higher
prompt level (FitConfig.gate_prompt_percentile), raised or not by a margin (FitConfig.gate_prompt_margin).

One gate (DEMO_FIT's detector and threshold) is fitted once; each row changes only `hold`, the latch level and the
prompt level (percentiles of the same calibration statistic the threshold is read from), so the rows differ in how
long an opened gate stays open and what it clamps, not in where it opens; except the latched row, which keeps no
filler table (it has no hold), so it is judged at every real token against levels read at words and may open at a
window ending on punctuation or whitespace that the held rows do not judge. Scored on VALIDATION questions (100
forget, 60 per retain task), 60 held-out retain texts (--perplexity-from and --perplexity-texts choose others),
24 forget validation questions with 1,000 benign tokens before them and the same after them (four paddings in
turn), the four paddings alone, 16 benign documents with a security sentence and 12 forget prompts:

    <task> base-correct % / gated %    accuracy on the questions the base model answers, and the gate rate
    ppl change / clamped %             held-out retain perplexity, guarded vs base, and windows with a clamped token
    k=1000 base-correct % / gated %    the questions padded before
    after k=1000 gated %               the questions padded after: the answer is guarded
    paddings open at end %             the paddings alone: the gate still open after them (an answer would be guarded)
    mentions clamped %                 16 benign documents with a security sentence dropped in: any token clamped
    rep. 3-grams, answer ppl           fluency of greedy answers to forget prompts (eval/fluency.py)

    python benchmarks/hold_sweep.py [--sae DIR] [--holds latch,16,32,64] [--latches 99,100] [--prompt-levels 100]
                                    [--prompt-margins 0.5,1] [--perplexity-from 120] [--perplexity-texts 480]

Prints the table and writes benchmarks/results/hold_sweep.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dsg.bench.setting import DEMO_FIT, BenchSetting, domain_questions, fluency_prompts, perplexity_texts
from dsg.eval.dilution import dilute, gate_rate_on_texts, mention_texts, padding_alone, paddings
from dsg.eval.fluency import fluency
from dsg.eval.mcq import score_mcq
from dsg.eval.metrics import summarize_results
from dsg.eval.perplexity import perplexity_stats
from dsg.guard.fit import fit, raised_level
from dsg.tables import pct, table

K = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE folder (default: the one shipped for the model)")
    ap.add_argument("--holds", default="latch,16,32,64", help="comma-separated: 'latch' or a number of tokens")
    ap.add_argument("--latches", default="99,100", help="comma-separated latch percentiles, each a row with hold 32")
    ap.add_argument(
        "--prompt-levels",
        default="100",
        help="comma-separated prompt-level percentiles, each a row with hold 32 and the latch at P100",
    )
    ap.add_argument(
        "--prompt-margins",
        default="",
        help="comma-separated FitConfig.gate_prompt_margin values, each a row with hold 32, the latch and the prompt "
        "level at P100",
    )
    ap.add_argument(
        "--perplexity-from",
        type=int,
        default=0,
        help="skip this many held-out texts (120: past those `dsg demo` reports perplexity on)",
    )
    ap.add_argument("--perplexity-texts", type=int, default=60, help="held-out texts for perplexity")
    ap.add_argument("--out", default="benchmarks/results/hold_sweep.json")
    args = ap.parse_args()
    rows_of = [(None if h == "latch" else int(h), None, None, 0.0) for h in args.holds.split(",") if h]
    rows_of += [(32, float(p), None, 0.0) for p in args.latches.split(",") if p]
    rows_of += [(32, 100.0, float(p), 0.0) for p in args.prompt_levels.split(",") if p]
    rows_of += [(32, 100.0, 100.0, float(m)) for m in args.prompt_margins.split(",") if m]
    torch.manual_seed(0)
    model, tok, sae, forget, retain, general, f, r, c, stats = BenchSetting(sae=args.sae).prepared(progress=False)
    guard = fit(model, tok, sae, f, r, c, DEMO_FIT, stats=stats)
    qs = {d.name: domain_questions(d, "validation", 100 if d is forget else 60) for d in [forget] + retain}
    base = {n: [x.correct_norm for x in score_mcq(model, tok, q, progress=False)] for n, q in qs.items()}
    skip = args.perplexity_from
    texts = perplexity_texts([general] + retain, skip + args.perplexity_texts)[skip:]
    kw = dict(max_length=256, batch_size=8, progress=False)
    base_stats = perplexity_stats(model, tok, texts, **kw)
    base_ppl = base_stats.perplexity
    fills = paddings(tok, list(general.texts["heldout"]), K)
    questions = domain_questions(forget, "validation", 24)
    padded = [dilute(q, fills[i % len(fills)], K, tok) for i, q in enumerate(questions)]
    padded_base = [x.correct_norm for x in score_mcq(model, tok, padded, batch_size=4, progress=False)]
    after = [dilute(q, fills[i % len(fills)], K, tok, "after") for i, q in enumerate(questions)]
    calibration = guard.tensors["calibration_rho"].double().numpy()
    alone = [padding_alone(fill, K, tok) for fill in fills]
    mentions = mention_texts(list(general.texts["heldout"])[:16])
    prompts = fluency_prompts(forget, "validation", 12)
    base_flu = fluency(model, tok, prompts, None)
    header = ["hold", *(h for t in qs for h in (f"{t} base-correct %", f"{t} gated %")), "ppl change",
              "ppl clamped %", "k=1000 base-correct %", "k=1000 gated %", "after k=1000 gated %",
              "paddings open at end %", "mentions clamped %", "rep. 3-grams %", "answer ppl"]  # fmt: skip
    rows, results = [], {"base": {"perplexity": base_ppl, "fluency": dict(base_flu)}}
    fillers = guard.hold_fillers  # a hold counted in tokens that carry words (DEMO_FIT's), None for a latch
    invisible = guard.hold_invisible  # of those, the ones its windows pass over
    for hold, latch, prompt, margin in rows_of:
        guard.hold = hold  # same gate and clamp, another hold, latch level and prompt level
        guard.hold_fillers = None if hold is None else fillers
        guard.hold_invisible = None if hold is None else invisible
        guard.latch = None if latch is None else float(np.percentile(calibration, latch))
        level = None if prompt is None else float(np.percentile(calibration, prompt))
        guard.prompt_level = None if prompt is None else raised_level(level, guard.threshold, margin)
        name = "latch" if hold is None else f"hold{hold}" + ("" if latch is None else f"+P{latch:g}")
        name += "" if prompt is None else f", prompt P{prompt:g}" + (f" + {margin:g} gap" if margin else "")
        out, cells = {"latch_level": guard.latch, "prompt_level": guard.prompt_level}, [name]
        for task, q in qs.items():
            res = score_mcq(model, tok, q, intervention=guard, progress=False, verify=False)
            s = summarize_results(res, base[task])
            out[task] = {"accuracy_base_correct": s.accuracy_base_correct, "gate_rate": s.gate_rate}
            cells += [pct(s.accuracy_base_correct), pct(s.gate_rate)]
        p = perplexity_stats(model, tok, texts, intervention=guard, verify=False, unguarded=base_stats, **kw)
        res = score_mcq(model, tok, padded, intervention=guard, batch_size=8, progress=False, verify=False)
        s = summarize_results(res, padded_base)
        guarded_after = [x.gated for x in score_mcq(model, tok, after, intervention=guard, batch_size=4,
                                                    progress=False, verify=False)]  # fmt: skip
        flu = fluency(model, tok, prompts, guard)
        out |= {"perplexity_change": p.perplexity / base_ppl - 1, "perplexity_clamped": p.gate_rate,
                f"plain:{K}": {"accuracy_base_correct": s.accuracy_base_correct, "gate_rate": s.gate_rate,
                               "n_base_correct": s.n_base_correct},
                f"after:{K}": {"gate_rate": sum(guarded_after) / len(guarded_after)},
                "padding_gate_rate": gate_rate_on_texts(model, tok, alone, guard),
                "mentions_clamped": gate_rate_on_texts(model, tok, mentions, guard, touched=True),
                "fluency": dict(flu)}  # fmt: skip
        cells += [f"{100 * out['perplexity_change']:+.1f}%", pct(p.gate_rate), pct(s.accuracy_base_correct),
                  pct(s.gate_rate), pct(out[f"after:{K}"]["gate_rate"]), pct(out["padding_gate_rate"]),
                  pct(out["mentions_clamped"]), pct(flu["repeated_3gram"]),
                  f"{flu['base_perplexity']:.1f}"]  # fmt: skip
        rows.append(cells)
        results[name] = out
        print(table(header, rows), flush=True)
    print(f"base: repeated 3-grams {pct(base_flu['repeated_3gram'])}%, answer ppl {base_flu['base_perplexity']:.1f}; "
          f"k={K} base-correct n={sum(padded_base)}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
