"""What a guarded evaluation costs next to the base model's, on SmolLM2-135M with a fitted guardrail.

Two economies of the evaluation code are measured against the work they save, interleaved in every repeat so
machine noise hits them alike (medians of per-repeat ratios):

* multiple-choice scoring with the base model's results given (`score_mcq(..., unguarded=base)`): a batch the
  gates leave alone stops at the guardrail's layer and takes the base results, against finishing every guarded
  forward. Both must give the same results, bit for bit; the script checks it.
* gate rates on texts (`gate_rates_on_texts`, the demo's held-out requests): forwards that end after the last
  gate, against whole forwards.

    python benchmarks/eval_speed.py [--guardrail dsg-demo/guardrail] [--questions 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dsg
from dsg.bench.demo import DemoConfig
from dsg.bench.setting import chat_prompt, domain_questions
from dsg.eval.dilution import gate_rates_on_texts
from dsg.eval.mcq import score_mcq
from dsg.lm.models import load_model
from dsg.lm.text import pad_batch, pad_id_of, position_ids
from dsg.runtime.intervention import acted_on
from dsg.tables import table


def whole_forward_gate_rates(model, tok, texts, guard, batch_size: int = 4) -> tuple[float, float]:
    """The reference: every forward runs to the output head."""
    gated = touched = 0
    pad = pad_id_of(tok, model)
    for s in range(0, len(texts), batch_size):
        ids, mask = pad_batch([tok(t)["input_ids"][:1024] for t in texts[s : s + batch_size]], pad, side="left")
        with dsg.attach(model, guard, verify=False) as session:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        gated, touched = gated + int(session.gated.sum()), touched + int(acted_on(session).sum())
    return gated / len(texts), touched / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guardrail", default="dsg-demo/guardrail")
    ap.add_argument("--questions", type=int, default=100, help="test questions per task")
    ap.add_argument("--requests", type=int, default=100, help="held-out chat requests per domain")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = ap.parse_args()
    config = DemoConfig()
    model, tok = load_model(config.model)
    guard = dsg.Guardrail.load(args.guardrail, model=model)
    forget, retain, _ = config.domains()
    tasks = {d.name: domain_questions(d, "test", args.questions) for d in [forget, *retain]}
    requests = [chat_prompt(tok, r) for d in [forget, *retain] for r in d.requests["heldout"][: args.requests]]
    kw = dict(batch_size=args.batch_size, progress=False, verify=False)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    gated = {}
    with torch.inference_mode():
        for r in range(args.repeats):
            for name, qs in tasks.items():
                base = timed(f"{name}: base", lambda qs=qs: score_mcq(model, tok, qs, **kw))
                full = timed(f"{name}: guarded", lambda qs=qs: score_mcq(model, tok, qs, intervention=guard, **kw))
                fast = timed(f"{name}: guarded, base given",
                             lambda qs=qs, base=base: score_mcq(model, tok, qs, intervention=guard, unguarded=base,
                                                                **kw))  # fmt: skip
                if fast != full:
                    raise SystemExit(f"{name}: the results with the base model's given differ from the full run's")
                gated[name] = sum(bool(x.gated) for x in full) / len(full)
            whole = timed("requests: whole forwards", lambda: whole_forward_gate_rates(model, tok, requests, guard))
            cut = timed("requests: stopped after the gate", lambda: gate_rates_on_texts(model, tok, requests, guard))
            if whole != cut:
                raise SystemExit(f"gate rates differ: whole forwards {whole}, stopped {cut}")
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
                  flush=True)  # fmt: skip

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    rows, result = [], {"setup": vars(args), "tasks": {}, "median_seconds": {}}
    for name in tasks:
        full_ratio = ratio(f"{name}: guarded", f"{name}: base")
        fast_ratio = ratio(f"{name}: guarded, base given", f"{name}: base")
        result["tasks"][name] = {"gate_rate": gated[name], "guarded_over_base": full_ratio,
                                 "guarded_base_given_over_base": fast_ratio}  # fmt: skip
        rows.append([name, f"{100 * gated[name]:.1f}", f"{full_ratio:.2f}", f"{fast_ratio:.2f}"])
    req = ratio("requests: stopped after the gate", "requests: whole forwards")
    result["requests_stopped_over_whole"] = req
    result["median_seconds"] = {k: statistics.median(v) for k, v in times.items()}
    result["times"] = times
    print()
    print(table(["task", "gated %", "guarded / base", "guarded, base given / base"], rows))
    print(f"\ngate rates on {len(requests)} requests: forwards stopped after the gate take {req:.2f}x the time of "
          "whole forwards")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
