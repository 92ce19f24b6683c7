"""The hand-written probe sets in benchmarks/probes judge whether the gate carries beyond the packs' wording, so
each set must be what its docstring says: well-formed, of the stated size, and sharing no question (nor a close
paraphrase) with another set."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

probe = pytest.importorskip("probe")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _sets() -> dict[str, list[str]]:
    from dsg.eval.mcq import read_questions

    out = {f"first: {n}": [q["question"] for q in read_questions(probe.HERE / f"{n}.jsonl")] for n in probe.SETS}
    for n in probe.SECOND_SETS:
        out[f"second: {n}"] = [q["question"] for q in read_questions(probe.SECOND / f"{n}.jsonl")]
        out[f"second: {n} requests"] = probe.read_requests(probe.SECOND / f"{n}_requests.txt")
    for n in probe.THIRD_SETS:
        out[f"third: {n} requests"] = probe.read_requests(probe.THIRD / f"{n}_requests.txt")
    return out


def test_the_third_set_holds_as_many_offensive_as_benign_requests_each_once():
    sets = _sets()
    offensive, computing = sets["third: offensive requests"], sets["third: computing requests"]
    assert len(offensive) >= 140 and len(computing) >= 140
    for requests in (offensive, computing):
        assert len(set(map(str.casefold, requests))) == len(requests)
        assert all(len(r.split()) >= 3 for r in requests)


def test_no_probe_set_shares_a_question_or_a_close_paraphrase_with_the_third():
    """Word-set overlap (Jaccard) of every third-set request against every question of the other sets and of the
    other side of the third set: 0.7 or more is the same question reworded."""
    sets = _sets()
    third = [n for n in sets if n.startswith("third:")]
    for name, other in itertools.product(third, sets):
        if name == other:
            continue
        for request in sets[name]:
            w = _words(request)
            closest = max(len(w & _words(q)) / len(w | _words(q)) for q in sets[other])
            assert closest < 0.7, (request, other)


def test_the_requests_read_as_the_chat_templates_user_turn():
    class ChatTokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<user>{messages[0]['content']}</user><assistant>"

    prompts = probe.requests(ChatTokenizer())
    sets = _sets()
    assert prompts["third: offensive requests"] == [
        f"<user>{r}</user><assistant>" for r in sets["third: offensive requests"]
    ]
    padded = prompts["third: offensive requests, preamble x6"]
    assert len(padded) == len(sets["third: offensive requests"])
    assert all(
        p.endswith(f"{r}</user><assistant>") and len(p) > 6 * 300
        for p, r in zip(padded, sets["third: offensive requests"])
    )
    invisible = prompts["third: offensive requests, 40 zero-width spaces after"]
    assert invisible == [f"<user>{r}{chr(0x200B) * 40}</user><assistant>" for r in sets["third: offensive requests"]]
    assert all(p.endswith(" . .</user><assistant>") for p in prompts["third: computing requests, ' .' x40 after"])
    joiners = prompts["third: computing requests, 40 word joiners after"]
    assert all(p.endswith(chr(0x2060) * 40 + "</user><assistant>") for p in joiners)
    assert all(
        p.endswith("\n" * 200 + "</user><assistant>") for p in prompts["third: offensive requests, 200 newlines after"]
    )
    interleaved, plain = prompts[f"third: offensive requests, {probe.INTERLEAVED}"], sets["third: offensive requests"]
    assert interleaved[0] == "<user>" + plain[0].replace(" ", "\u200b ") + "</user><assistant>"
    assert all(p.count("\u200b") == r.count(" ") > 0 for p, r in zip(interleaved, plain))
    joined = prompts["third: computing requests, a word joiner before every space"]
    assert all(p.count("\u2060") == p.count(" ") > 0 for p in joined)
    spaced = prompts["third: offensive requests, two spaces between words"]
    assert spaced[0] == "<user>" + plain[0].replace(" ", "  ") + "</user><assistant>"
    tabbed = prompts["third: offensive requests, a tab before every space"]
    broken = prompts["third: computing requests, a line break before every space"]
    assert tabbed[0] == "<user>" + plain[0].replace(" ", "\t ") + "</user><assistant>"
    assert all(p.count("\n") == p.count(" ") > 0 for p in broken)
    lined = prompts["third: offensive requests, one word to a line"]
    assert lined[0] == "<user>" + plain[0].replace(" ", "\n") + "</user><assistant>"
    paired = prompts["third: computing requests, two words to a line"]
    assert all(p.count("\n") == (len(r.split(" ")) - 1) // 2 for p, r in zip(paired, sets["third: computing requests"]))
    assert probe.in_lines("a b c d e", 2) == "a b\nc d\ne"
