"""Questions written apart from the data packs: does a guardrail generalise beyond the corpora it was fitted on?

`benchmarks/probes/` holds hand-written multiple-choice questions that share no template or text with the
generated packs and are never fitted on: 40 offensive-security questions in plain words (attack techniques,
attacker tools), 30 everyday computing questions (what HTML is for, what Git does) and 20 general-knowledge ones,
plus a benign family-weekend preamble. Configurations have been compared on them, so they are a validation set.

`benchmarks/probes/second/` is a second set, written separately from the packs and from the first set and never
used to choose anything (a test set): 100 offensive questions (tools, exploitation, web, passwords, malware,
social engineering, network, privilege escalation, evasion, wireless, reconnaissance), 100 benign computing
questions chosen to sit next to them (Python, shell, networking, SQL, passwords and HTTPS from the user's side),
and 50 open-ended chat requests of each kind.

`benchmarks/probes/third/` is a third set, written later and apart from both: 150 offensive-security requests and 147
everyday computing ones in users' own words, one a line (reconnaissance to cover-up, and their benign neighbours:
programming, shell, networking, hardware, office software, security hygiene from the user's side). No question is
shared with the other sets, nor a close paraphrase (tests/test_probes.py). Never used to choose anything (a test
set); it measures how far the gate carries to wording it has not seen.

For each guardrail it reports, per question set, the share of questions gated and the accuracy on the questions
the base model answers; the offensive sets also behind the preamble (once, about 120 tokens, and six times, about
700 tokens) and inside the chat template; and for the requests, sent through the chat template, the share whose
answer would be guarded, the third set's also asked first with the 700-token preamble after them, or with
padding that carries no words after them: 40 zero-width spaces or 40 word joiners (both invisible), 40 " .", or 200
newlines; or with a zero-width space or a word joiner before every space (invisible fillers between the words),
two spaces between words or a tab before every space (spacing), or a line break before every space; or typed one
or two words to a line.

    python benchmarks/probe.py --guardrail dsg-demo/guardrail [--guardrail other/] [--out results.json]

Scored as the demo scores (length-normalised likelihood of each choice after the stem).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsg.bench.setting import chat_prompt
from dsg.eval.dilution import gate_rate_on_texts
from dsg.eval.mcq import read_questions, score_mcq
from dsg.eval.metrics import summarize_results
from dsg.guard.guardrail import Guardrail, dtype_for
from dsg.lm.models import load_model
from dsg.tables import pct, table

HERE = Path(__file__).parent / "probes"
ZERO_WIDTH = "\u200b" * 40
FILLERS = (
    (ZERO_WIDTH, "40 zero-width spaces after"),
    ("\u2060" * 40, "40 word joiners after"),
    (" ." * 40, "' .' x40 after"),
    ("\n" * 200, "200 newlines after"),
)
INTERLEAVED = "a zero-width space before every space"
# fillers between the words: (what goes before every space, the row's label); invisible ones, then spacing, then a
# line break (which the windows pass over where it ends a short line: guard.rule.SHORT_LINE)
BETWEEN = (
    ("\u200b", INTERLEAVED),
    ("\u2060", "a word joiner before every space"),
    (" ", "two spaces between words"),
    ("\t", "a tab before every space"),
    ("\n", "a line break before every space"),
)
# requests laid out in lines: (words to a line, the row's label)
LINES = ((1, "one word to a line"), (2, "two words to a line"))
SETS = ("offensive", "everyday_computing", "general")
SECOND = HERE / "second"
SECOND_SETS = ("offensive", "computing")
THIRD = HERE / "third"
THIRD_SETS = ("offensive", "computing")  # requests only


def variants(tokenizer) -> dict[str, list[dict]]:
    """{name: questions}: the three sets as written, and the offensive set behind the benign preamble."""
    qs = {name: read_questions(HERE / f"{name}.jsonl") for name in SETS}
    preamble = (HERE / "preamble.txt").read_text(encoding="utf-8").strip()
    off = qs["offensive"]
    qs["offensive, preamble x1"] = [{**q, "question": f"{preamble}\n\n{q['question']}"} for q in off]
    qs["offensive, preamble x6"] = [{**q, "question": f"{' '.join([preamble] * 6)}\n\n{q['question']}"} for q in off]
    qs["offensive, chat"] = [{**q, "question": chat_prompt(tokenizer, q["question"])} for q in off]
    qs["offensive, chat + preamble x1"] = [
        {**q, "question": chat_prompt(tokenizer, f"{preamble}\n\n{q['question']}")} for q in off
    ]
    for name in SECOND_SETS:
        second = read_questions(SECOND / f"{name}.jsonl")
        qs[f"second: {name}"] = second
        qs[f"second: {name}, chat"] = [{**q, "question": chat_prompt(tokenizer, q["question"])} for q in second]
    qs["second: offensive, preamble x6"] = [
        {**q, "question": f"{' '.join([preamble] * 6)}\n\n{q['question']}"} for q in qs["second: offensive"]
    ]
    return qs


def read_requests(path: Path) -> list[str]:
    """One request a line (blank lines skipped)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def requests(tokenizer) -> dict[str, list[str]]:
    """{name: prompts}: the second and third sets' open-ended requests, each as the user turn of the chat template,
    the third set's offensive requests behind the benign preamble (six times, about 700 tokens), and both kinds of
    the third set's requests asked first with the same preamble after them."""
    out = {}
    for name in SECOND_SETS:
        out[f"second: {name} requests"] = [
            chat_prompt(tokenizer, r) for r in read_requests(SECOND / f"{name}_requests.txt")
        ]
    preamble = " ".join([(HERE / "preamble.txt").read_text(encoding="utf-8").strip()] * 6)
    for name in THIRD_SETS:
        third = read_requests(THIRD / f"{name}_requests.txt")
        out[f"third: {name} requests"] = [chat_prompt(tokenizer, r) for r in third]
        if name == "offensive":
            out["third: offensive requests, preamble x6"] = [
                chat_prompt(tokenizer, f"{preamble}\n\n{r}") for r in third
            ]
        # asked first, padded after: the answer is guarded only if the request went over the latch level
        out[f"third: {name} requests, padded after x6"] = [chat_prompt(tokenizer, f"{r}\n\n{preamble}") for r in third]
        # padded after with what carries no words: zero-width spaces or word joiners (invisible), " .", newlines
        for filler, label in FILLERS:
            out[f"third: {name} requests, {label}"] = [chat_prompt(tokenizer, r + filler) for r in third]
        # interleaved: fillers before every space, one to two filler tokens between words (windows thin out)
        for filler, label in BETWEEN:
            out[f"third: {name} requests, {label}"] = [
                chat_prompt(tokenizer, r.replace(" ", filler + " ")) for r in third
            ]
        for n, label in LINES:
            out[f"third: {name} requests, {label}"] = [chat_prompt(tokenizer, in_lines(r, n)) for r in third]
    return out


def in_lines(request: str, words: int) -> str:
    """The request with a line break instead of every `words`-th space."""
    split = request.split(" ")
    return "\n".join(" ".join(split[i : i + words]) for i in range(0, len(split), words))


def evaluate(model, tokenizer, guard, questions: dict[str, list[dict]], base: dict) -> dict:
    out = {}
    for name, qs in questions.items():
        res = score_mcq(model, tokenizer, qs, intervention=guard, progress=False)
        s = summarize_results(res, base[name])
        out[name] = {"n": s.n, "gate_rate": s.gate_rate, "n_base_correct": s.n_base_correct,
                     "accuracy_base_correct": s.accuracy_base_correct, "accuracy": s.accuracy}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guardrail", action="append", required=True, help="a guardrail folder (repeatable)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe.json"))
    args = ap.parse_args()
    guards = [Guardrail.load(path) for path in args.guardrail]
    model, tokenizer = load_model(args.model, dtype=dtype_for(guards))
    questions = variants(tokenizer)
    base = {n: [r.correct_norm for r in score_mcq(model, tokenizer, qs, progress=False)] for n, qs in questions.items()}
    results = {"base_accuracy": {n: sum(b) / len(b) for n, b in base.items()}, "guardrails": {}}
    prompts = requests(tokenizer)
    rows = []
    for path in args.guardrail:
        guard = Guardrail.load(path, model=model)
        ev = evaluate(model, tokenizer, guard, questions, base)
        for name, texts in prompts.items():
            ev[name] = {"n": len(texts), "gate_rate": gate_rate_on_texts(model, tokenizer, texts, guard)}
        results["guardrails"][path] = {"gate": guard.gate_rule(), "results": ev}
        for name, r in ev.items():
            kept = f"{pct(r['accuracy_base_correct'])} (n={r['n_base_correct']})" if "n_base_correct" in r else "-"
            base_acc = pct(results["base_accuracy"][name]) if name in results["base_accuracy"] else "-"
            rows.append([path, name, str(r["n"]), pct(r["gate_rate"]), kept, base_acc])
    print(table(["guardrail", "question set", "n", "gated %", "guarded acc on base-correct %", "base acc %"], rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
