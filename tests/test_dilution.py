"""Dilution: forget questions padded with benign text, and benign text that mentions a security term."""

import dsg
from dsg.eval.dilution import DILUTIONS, dilute, filler_ids, mention_texts, run_dilution, summarize_dilution

from tiny import RETAIN_TEXTS, tiny_sae


def _questions(n=4):
    return [{"question": f"The exploit number {i} injects a", "choices": ["payload", "buffer", "packet", "hash"],
             "answer": i % 4} for i in range(n)]  # fmt: skip


def test_padding_puts_k_benign_tokens_before_the_stem_and_around_it_in_chat(tiny_llama):
    model, tok = tiny_llama
    filler = filler_ids(tok, RETAIN_TEXTS, 60)
    assert len(filler) == 60
    q = _questions(1)[0]
    plain = dilute(q, filler, 60, tok)
    assert plain["question"].endswith("\n\n" + q["question"]) and plain["choices"] == q["choices"]
    assert abs(len(tok(plain["question"].split("\n\n")[0], add_special_tokens=False)["input_ids"]) - 60) <= 3
    assert dilute(q, filler, 0, tok)["question"] == q["question"]
    chat = dilute(q, filler, 60, tok, chat=True)
    assert chat["question"].endswith(q["question"]) and "assistant" in chat["question"]  # the answer is the reply
    mentioned = mention_texts(["One. Two. Three. Four."], ["Injected term."])
    assert mentioned == ["One. Two. Injected term. Three. Four."]


def test_a_static_guardrail_is_not_diluted_and_a_summary_reads_each_padding(tiny_llama):
    model, tok = tiny_llama
    static = dsg.Guardrail(tiny_sae(d_in=model.config.hidden_size), features=[0, 1, 2], gated=False, clamp=5.0)
    qs = _questions()
    base = run_dilution(model, tok, qs, RETAIN_TEXTS, None, progress=False)
    guarded = run_dilution(model, tok, qs, RETAIN_TEXTS, static, progress=False)
    assert set(guarded) == {f"{f}:{k}" for f, k in DILUTIONS} | {"mentions"}
    assert all(len(guarded[key]["gated"]) == len(qs) for key in guarded if key != "mentions")
    assert base["mentions"] is None and guarded["mentions"] == 1.0  # a static guardrail acts on everything
    summary = summarize_dilution(guarded, base)
    assert summary["plain:1000"]["gate_rate"] == 1.0 and summary["mentions_gate_rate"] == 1.0
    assert summary["plain:0"]["n_base_correct"] == sum(base["plain:0"]["correct_norm"])
    assert run_dilution(model, tok, qs, [], static, progress=False) is None  # no benign text: nothing to pad with
