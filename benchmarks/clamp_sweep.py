"""How hard to clamp: forgetting, retention, perplexity and fluency per clamp setting, one gate for all (fast).

The gate (DEMO_FIT's detector) is fitted once per number of selected latents N; each variant then changes only
the clamp (value c and mode), so the rows differ in what the clamp does, not in which inputs it touches. Scored on
VALIDATION questions (100 forget, 60 per retain task), 40 held-out retain texts and 12 forget prompts:

    <task> base-correct % / gated %    accuracy on the questions the base model answers, and the gate rate
    ppl change / gated %               held-out retain perplexity, guarded vs base, and windows gated
    rep. 3-grams, answer ppl           fluency of greedy answers to forget prompts (eval/fluency.py)

    python benchmarks/clamp_sweep.py [--sae DIR] [--variants 150:500:active,50:100:all:1,50:100:all:-:off:off]

A fourth, fifth and sixth field are experiments the library does not ship. The fourth caps each clamped token's edit
at that multiple of the token's residual-stream norm (the edit keeps its direction), by wrapping
guard.rule.apply_delta for the row. The fifth gives the answer's tokens (generated, or a scored choice's) a clamp
of their own, "off" for none or a value c in the row's mode, while the prompt's tokens keep the row's clamp: it
tells which of the two does the forgetting and which breaks the text. The sixth, "off", drops the fitted prompt
level for the row, so every flagged prompt token near a window over the threshold is clamped. "-" leaves a field
as the library has it.

Prints the table and writes benchmarks/results/clamp_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from dsg.bench.setting import (
    DEMO_FIT,
    BenchSetting,
    domain_questions,
    fluency_prompts,
    perplexity_texts,
    settle_on_validation,
)
from dsg.eval.fluency import fluency
from dsg.eval.mcq import score_mcq
from dsg.eval.metrics import summarize_results
from dsg.eval.perplexity import perplexity_stats
from dsg.guard import rule
from dsg.guard.fit import fit
from dsg.guard.guardrail import Guardrail
from dsg.tables import pct, table

# N:c:mode[:edit cap[:answer clamp[:prompt level]]]
VARIANTS = "150:500:active,150:100:active,150:20:active,150:100:all,150:20:all,50:100:all,50:50:all,20:100:all"

_apply_delta = rule.apply_delta
PERPLEXITY = dict(max_length=256, batch_size=8, progress=False)  # held-out windows, as the demo's


@contextmanager
def edit_capped(cap: float | None):
    """Inside: each clamped token's residual edit is scaled down to at most `cap` x that token's residual norm."""

    def capped(x_BTD, pos, delta, out):
        norm = x_BTD[pos[:, 0], pos[:, 1]].norm(dim=-1, keepdim=True)
        scale = (cap * norm / delta.norm(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
        return _apply_delta(x_BTD, pos, delta * scale.to(delta.dtype), out)

    rule.apply_delta = capped if cap is not None else _apply_delta
    try:
        yield
    finally:
        rule.apply_delta = _apply_delta


@contextmanager
def answer_clamped(value: str | None):
    """Inside: clamped tokens past the prompt (generated ones, and a scored choice's, whose decision is held) get
    clamp `value` ("off": none; a number: -value in the guardrail's mode) instead of the guardrail's clamp. Reads
    which positions are the prompt's from the gate call that precedes each delta in the HF runtime."""
    if value is None:
        yield
        return
    held, gate, delta = rule.held, Guardrail.gate, Guardrail.delta
    seen = {"n_prompt": None}

    def held_answer(*args, **kwargs):
        seen["n_prompt"] = 0  # a held decision scores continuations only
        return held(*args, **kwargs)

    def gate_seen(self, a_BT, real_BT, n_prompt, state, evidence_BT=None, counted_BT=None):
        seen["n_prompt"] = n_prompt
        return gate(self, a_BT, real_BT, n_prompt, state, evidence_BT, counted_BT)

    def split_delta(self, f_BTS, clamp_BT):
        n_p = clamp_BT.shape[1] if seen["n_prompt"] is None else seen["n_prompt"]
        answer = torch.arange(clamp_BT.shape[1], device=clamp_BT.device)[None, :] >= n_p
        pos, d = rule.clamp_delta(f_BTS, clamp_BT & ~answer, self.latents.W_dec, self.clamp, self.clamp_mode)
        if value == "off":
            return pos, d
        pos2, d2 = rule.clamp_delta(f_BTS, clamp_BT & answer, self.latents.W_dec, float(value), self.clamp_mode)
        return torch.cat([pos, pos2]), torch.cat([d, d2])

    rule.held, Guardrail.gate, Guardrail.delta = held_answer, gate_seen, split_delta
    try:
        yield
    finally:
        rule.held, Guardrail.gate, Guardrail.delta = held, gate, delta


class Validation(NamedTuple):
    """What every variant of a clamp-side sweep is scored on (validation questions, held-out texts, forget
    prompts), with the base model's scores there; steer_sweep.py scores its variants the same way."""

    questions: dict[str, list[dict]]
    base_correct: dict[str, list[bool]]
    texts: list[str]
    base_perplexity: float
    prompts: list[str]
    base_fluency: dict

    @classmethod
    def of(cls, model, tok, forget, retain, general) -> Validation:
        qs = {d.name: domain_questions(d, "validation", 100 if d is forget else 60) for d in [forget] + retain}
        base = {n: [x.correct_norm for x in score_mcq(model, tok, q, progress=False)] for n, q in qs.items()}
        texts = perplexity_texts([general] + retain, 40)
        prompts = fluency_prompts(forget, "validation", 12)
        return cls(qs, base, texts, perplexity_stats(model, tok, texts, **PERPLEXITY).perplexity, prompts,
                   dict(fluency(model, tok, prompts, None)))  # fmt: skip

    def headers(self) -> list[str]:
        return [h for t in self.questions for h in (f"{t} base-correct %", f"{t} gated %")]

    def score(self, model, tok, guard) -> tuple[dict, list[str]]:
        """One variant's results ({task: accuracy and gate rate}, perplexity change and gate, fluency) and its
        per-task table cells."""
        out, cells = {}, []
        for task, q in self.questions.items():
            res = score_mcq(model, tok, q, intervention=guard, progress=False, verify=False)
            s = summarize_results(res, self.base_correct[task])
            out[task] = {"accuracy_base_correct": s.accuracy_base_correct, "gate_rate": s.gate_rate}
            cells += [pct(s.accuracy_base_correct), pct(s.gate_rate)]
        p = perplexity_stats(model, tok, self.texts, intervention=guard, verify=False, **PERPLEXITY)
        flu = fluency(model, tok, self.prompts, guard)
        out |= {"perplexity_change": p.perplexity / self.base_perplexity - 1, "perplexity_gate": p.gate_rate,
                "fluency": dict(flu)}  # fmt: skip
        return out, cells

    def finish(self, results: dict, out: str) -> None:
        """Print the base model's fluency and write `results` as JSON to `out`."""
        flu = self.base_fluency
        print(f"base: repeated 3-grams {pct(flu['repeated_3gram'])}%, answer ppl {flu['base_perplexity']:.1f}")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE folder (default: the one shipped for the model)")
    ap.add_argument(
        "--variants", default=VARIANTS, help='comma-separated N:c:mode[:cap[:answer[:prompt level]]]; "-" keeps a field'
    )
    ap.add_argument("--out", default="benchmarks/results/clamp_sweep.json")
    args = ap.parse_args()
    variants = []
    for v in args.variants.split(","):
        n, c, mode, *extra = v.split(":") + ["-", "-", "-"]
        cap, answer, level = (None if x == "-" else x for x in extra[:3])
        if level not in (None, "off"):
            raise SystemExit(f"variant {v!r}: the sixth field is '-' or 'off', got {level!r}")
        variants.append((int(n), float(c), mode, None if cap is None else float(cap), answer, level))
    torch.manual_seed(0)
    model, tok, sae, forget, retain, general, f, r, c, stats = BenchSetting(sae=args.sae).prepared(progress=False)
    val = Validation.of(model, tok, forget, retain, general)
    guards = {n: fit(model, tok, sae, f, r, c, dataclasses.replace(DEMO_FIT, n_features=n), stats=stats)
              for n in sorted({v[0] for v in variants})}  # fmt: skip
    for guard in guards.values():  # as dsg demo does: the prompt level stays only where it still forgets
        settle_on_validation(model, tok, guard, forget, 100)
    header = ["N, c, mode, cap, answer, prompt level", *val.headers(), "ppl change", "ppl gated %", "rep. 3-grams %",
              "answer ppl"]  # fmt: skip
    rows, results = [], {"base": {"perplexity": val.base_perplexity, "fluency": val.base_fluency}}
    for n, clamp, mode, cap, answer, level in variants:
        g = guards[n]
        g.clamp, g.clamp_mode = clamp, mode  # same gate and latents, another clamp
        fitted, g.prompt_level = g.prompt_level, None if level == "off" else g.prompt_level
        with edit_capped(cap), answer_clamped(answer):
            out, cells = val.score(model, tok, g)
        g.prompt_level = fitted
        flu = out["fluency"]
        name = f"{n}, {clamp:g}, {mode}, {'-' if cap is None else f'{cap:g}'}, {answer or '-'}, {level or '-'}"
        rows.append([name, *cells,
                     f"{100 * out['perplexity_change']:+.1f}%", pct(out["perplexity_gate"]),
                     pct(flu["repeated_3gram"]), f"{flu['base_perplexity']:.1f}"])  # fmt: skip
        key = f"n{n}-{mode}-c{clamp:g}" + ("" if cap is None else f"-cap{cap:g}")
        key += ("" if answer is None else f"-answer-{answer}") + ("" if level is None else "-no-prompt-level")
        results[key] = out
        print(table(header, rows), flush=True)
    val.finish(results, args.out)


if __name__ == "__main__":
    main()
