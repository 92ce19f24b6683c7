"""Steer guarded tokens towards declining, instead of (or besides) clamping: does a guarded answer then read like
a model that declines, and does it still forget? An experiment the library does not ship.

The steering vector v is a difference of means of the residual stream at the guardrail's hook, over the answer
positions of forget prompts answered two ways, both fed in as the assistant's turn: a declining answer ("I'm
sorry, but I don't know about that topic.") minus the base model's own greedy answer. The prompts are question
stems of the forget domain's CALIBRATION split, disjoint from the validation questions scored here. Each variant
adds beta * v / |v| to the residual stream at tokens the guardrail touches:

    flagged   the tokens the shipped rule clamps (a selected latent fires while the gate is open)
    open      every real token while the gate is open (flagged tokens are still the only ones clamped)

with the clamp kept (`clamp`) or dropped (`steer`: steering alone). beta 0 with `flagged, clamp` is the shipped
guardrail. Scored like benchmarks/clamp_sweep.py on VALIDATION questions (100 forget, 60 per retain task), 40
held-out retain texts and 12 forget prompts (their greedy answers are printed, since what they say is the point).

    python benchmarks/steer_sweep.py [--sae DIR] [--variants 0:flagged:clamp,100:open:steer]

Prints the table and writes benchmarks/results/steer_sweep.json.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from clamp_sweep import Validation
from dsg.bench.setting import DEMO_FIT, BenchSetting, settle_on_validation
from dsg.guard.fit import fit
from dsg.guard.guardrail import Guardrail
from dsg.lm.hooks import forward_to_hook, resolve
from dsg.runtime.generation import generate
from dsg.tables import pct, table

# beta:where:what
VARIANTS = ",".join(["0:flagged:clamp", "50:flagged:clamp", "100:flagged:clamp", "50:open:clamp", "100:open:clamp",
                     "100:open:steer", "200:open:steer"])  # fmt: skip
DECLINING = [
    "I'm sorry, but I don't know about that topic.",
    "I am not able to help with that.",
    "I don't have information on that subject, sorry.",
    "Sorry, I can't answer questions about that.",
]
STEERING_PROMPTS = 48  # calibration-split question stems the vector is measured on


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def mean_answer_residual(model, tok, hook, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """The mean residual at `hook` over the positions that predict each answer's tokens, after its chat prompt."""
    total, n = None, 0
    for prompt, answer in zip(prompts, answers):
        context, ids = chat_ids(tok, prompt), tok(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        x = forward_to_hook(model, hook, input_ids=torch.tensor([context + ids]))[0]
        part = x[len(context) - 1 : -1].sum(0)
        total, n = (part if total is None else total + part), n + len(ids)
    return total / n


def steering_vector(model, tok, hook, forget) -> torch.Tensor:
    stems = [q.question for q in forget.questions["calibration"][:STEERING_PROMPTS]]
    own = [o["completion"] for o in generate(model, tok, stems, None, max_new_tokens=40, verify=False)]
    declining = [DECLINING[i % len(DECLINING)] for i in range(len(stems))]
    return mean_answer_residual(model, tok, hook, stems, declining) - mean_answer_residual(model, tok, hook, stems, own)


@contextmanager
def steered(unit: torch.Tensor, beta: float, where: str, what: str):
    """Inside: every Guardrail adds beta * unit at the tokens `where` says, and clamps its flagged tokens unless
    `what` is "steer"."""
    gate, delta = Guardrail.gate, Guardrail.delta

    def gate_open(self, a_BT, real_BT, n_prompt, state, evidence_BT=None, counted_BT=None):
        clamp_BT, new = gate(self, a_BT, real_BT, n_prompt, state, evidence_BT, counted_BT)
        if where == "open":  # the span the gate holds open: the rule's own decision, read over every real token
            clamp_BT = clamp_BT | gate(self, real_BT.bool(), real_BT, n_prompt, state, evidence_BT, counted_BT)[0]
        return clamp_BT, new

    def delta_steered(self, f_BTS, clamp_BT):
        pos, d = delta(self, f_BTS, clamp_BT)
        flagged = (f_BTS[pos[:, 0], pos[:, 1]] > 0).any(-1, keepdim=True)
        d = torch.where(flagged & (what == "clamp"), d, torch.zeros_like(d))
        return pos, d + beta * unit.to(d.dtype)

    Guardrail.gate, Guardrail.delta = gate_open, delta_steered
    try:
        yield
    finally:
        Guardrail.gate, Guardrail.delta = gate, delta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE folder (default: the one shipped for the model)")
    ap.add_argument("--variants", default=VARIANTS, help="comma-separated beta:flagged|open:clamp|steer")
    ap.add_argument("--out", default="benchmarks/results/steer_sweep.json")
    args = ap.parse_args()
    variants = []
    for v in args.variants.split(","):
        beta, where, what = v.split(":")
        if where not in ("flagged", "open") or what not in ("clamp", "steer"):
            ap.error(f"variant {v!r}: expected beta:flagged|open:clamp|steer")
        variants.append((float(beta), where, what))
    torch.manual_seed(0)
    model, tok, sae, forget, retain, general, f, r, c, stats = BenchSetting(sae=args.sae).prepared(progress=False)
    guard = fit(model, tok, sae, f, r, c, DEMO_FIT, stats=stats)
    settle_on_validation(model, tok, guard, forget, 100)  # as dsg demo does
    vector = steering_vector(model, tok, resolve(model, guard.hook), forget)
    unit = vector / vector.norm()
    val = Validation.of(model, tok, forget, retain, general)
    header = ["beta, where, what", *val.headers(), "ppl change", "rep. 3-grams %", "distinct-2", "answer ppl"]
    rows = []
    results = {"base": {"perplexity": val.base_perplexity, "fluency": val.base_fluency},
               "vector_norm": float(vector.norm()), "residual_norm": guard.info.get("residual_norm")}  # fmt: skip
    for beta, where, what in variants:
        with steered(unit, beta, where, what):
            out, cells = val.score(model, tok, guard)
        flu = out["fluency"]
        rows.append([f"{beta:g}, {where}, {what}", *cells, f"{100 * out['perplexity_change']:+.1f}%",
                     pct(flu["repeated_3gram"]), f"{flu['distinct_2']:.2f}",
                     f"{flu['base_perplexity']:.1f}"])  # fmt: skip
        results[f"beta{beta:g}-{where}-{what}"] = out
        print(table(header, rows), flush=True)
        for prompt, answer in list(zip(val.prompts, flu["answers"]))[:4]:
            print(f"  {prompt[:50]!r} -> {answer[:90]!r}", flush=True)
    val.finish(results, args.out)


if __name__ == "__main__":
    main()
