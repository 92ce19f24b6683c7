"""Dilution: forget questions padded with benign text, and benign text that mentions a security term."""

from types import SimpleNamespace

import pytest

import dsg
from dsg.eval import mcq
from dsg.eval.dilution import (
    DILUTIONS,
    dilute,
    dilution_batch_size,
    filler_ids,
    gate_rate_on_texts,
    gate_rates_on_texts,
    mention_texts,
    padding_alone,
    paddings,
    run_dilution,
    summarize_dilution,
)
from dsg.eval.mcq import score_mcq
from dsg.guard.stats import gate_rates
from dsg.runtime.intervention import prefix_causal

from tiny import FORGET_TEXTS, RETAIN_TEXTS, features_firing_about, sparse_sae, tiny_sae


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
    after = dilute(q, filler, 60, tok, "after")
    assert (
        after["question"].startswith(q["question"] + "\n\n")
        and after["question"].split("\n\n", 1)[1] in plain["question"]
    )  # the same padding, after the stem: the answer is read past it
    chat = dilute(q, filler, 60, tok, "chat")
    assert chat["question"].endswith(q["question"]) and "assistant" in chat["question"]  # the answer is the reply
    with pytest.raises(ValueError, match="form"):
        dilute(q, filler, 60, tok, "sideways")
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
    assert guarded["plain:1000"]["padding_gate_rate"] == 1.0 and "padding_gate_rate" not in guarded["plain:0"]
    assert base["plain:100"]["padding_gate_rate"] is None
    for rate in ("padding_gate_rate", "padding_touched_rate"):  # the same paddings, measured once
        assert guarded["after:1000"][rate] == guarded["plain:1000"][rate]
    summary = summarize_dilution(guarded, base)
    assert summary["plain:1000"]["gate_rate"] == 1.0 and summary["mentions_gate_rate"] == 1.0
    assert summary["plain:1000"]["padding_gate_rate"] == 1.0
    assert summary["plain:0"]["n_base_correct"] == sum(base["plain:0"]["correct_norm"])
    assert run_dilution(model, tok, qs, [], static, progress=False) is None  # no benign text: nothing to pad with


def _padded_setting(model, tok, window, hold=None):
    """Padded questions (the same benign text before stems of different lengths) and a guardrail whose threshold
    lies between the prompts' two lowest gate statistics, so some prompts are gated and some not."""
    filler = filler_ids(tok, RETAIN_TEXTS, 60)
    stems = [t.rsplit(" ", 1)[0] for t in FORGET_TEXTS + RETAIN_TEXTS]
    qs = [dilute({"question": s, "choices": ["payload", "city", "metal hash", "pond"], "answer": i % 4}, filler, 60,
                 tok) for i, s in enumerate(stems)]  # fmt: skip
    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.15)
    seqs = [tok(q["question"])["input_ids"] for q in qs]
    guard = dsg.Guardrail(sae, features=features_firing_about(model, sae, seqs, 0.05, 1), clamp=4.0, window=window,
                          hold=hold)  # fmt: skip
    values = sorted(set(gate_rates(model, guard, seqs, progress=False).tolist()))
    guard.threshold = (values[0] + values[1]) / 2
    return qs, guard


def test_paddings_past_a_short_context_are_left_out_not_an_error(tiny_gpt2):
    """GPT-2 style models stop at their learned positions (256 here; the real one at 1,024): the dilutions that fit
    are measured, those that do not are left out as the chat form is without a template, and the benign texts are
    read as far as the model can."""
    model, tok = tiny_gpt2
    static = dsg.Guardrail(tiny_sae(d_in=model.config.hidden_size), features=[0, 1, 2], gated=False, clamp=5.0)
    long_benign = [" ".join(RETAIN_TEXTS * 20)] * 4  # mention texts past 256 tokens
    out = run_dilution(model, tok, _questions(), long_benign, static, progress=False)
    assert {"plain:0", "plain:100"} <= set(out) and not {"plain:1000", "after:1000"} & set(out)
    assert out["plain:100"]["padding_gate_rate"] == 1.0 and out["mentions"] == 1.0
    summary = summarize_dilution(out, run_dilution(model, tok, _questions(), long_benign, None, progress=False))
    assert set(summary) >= {"plain:0", "plain:100"} and "plain:1000" not in summary


def test_one_pass_gives_the_gated_and_the_touched_share_of_benign_texts(tiny_llama):
    model, tok = tiny_llama
    qs, guard = _padded_setting(model, tok, window=12, hold=6)
    texts = [q["question"] for q in qs]
    gated, touched = gate_rates_on_texts(model, tok, texts, guard)
    assert gated == gate_rate_on_texts(model, tok, texts, guard)
    assert touched == gate_rate_on_texts(model, tok, texts, guard, touched=True)
    assert 0 < gated <= touched <= 1  # a clamped token in every gated text, and maybe in some that closed again
    assert gate_rates_on_texts(model, tok, texts, None) is None and gate_rates_on_texts(model, tok, [], guard) is None


def _forward_shapes(model):
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, handle


@pytest.mark.parametrize("fixture,hold", [("tiny_llama", None), ("tiny_gpt2", None), ("tiny_llama", 6)])
def test_padded_questions_prefill_their_shared_prefix_once_with_the_same_scores_and_gates(fixture, hold, request,
                                                                                          monkeypatch):  # fmt: skip
    model, tok = request.getfixturevalue(fixture)
    qs, guard = _padded_setting(model, tok, window=12, hold=hold)
    for intervention in (None, guard):
        shapes, handle = _forward_shapes(model)
        try:
            shared = score_mcq(model, tok, qs, intervention=intervention, batch_size=4, progress=False)
        finally:
            handle.remove()
        prefix = [s for s in shapes if s[0] == 1]
        assert len(prefix) == -(-len(qs) // 4) and all(s[1] >= mcq.SHARED_PREFIX_MIN for s in prefix)
        with monkeypatch.context() as m:
            m.setattr(mcq, "SHARED_PREFIX_MIN", 10**9)
            whole = score_mcq(model, tok, qs, intervention=intervention, batch_size=4, progress=False)
        assert [r.gated for r in shared] == [r.gated for r in whole]
        for a, b in zip(shared, whole):
            assert a.scores == pytest.approx(b.scores, abs=1e-4)
    gated = [r.gated for r in shared]
    assert 0 < sum(gated) < len(gated), "the test needs gated and ungated prompts"
    base = score_mcq(model, tok, qs, progress=False)
    assert any(r.scores != b.scores for r, b in zip(shared, base) if r.gated), "the clamp should change scores"


def test_a_whole_input_gate_prefills_each_padded_prompt_whole(tiny_llama):
    model, tok = tiny_llama
    qs, guard = _padded_setting(model, tok, window=None)
    assert not prefix_causal(guard) and prefix_causal(None) and prefix_causal(dsg.Guardrail(guard.sae, features=[0],
                                                                                             gated=False))  # fmt: skip
    shapes, handle = _forward_shapes(model)
    try:
        score_mcq(model, tok, qs, intervention=guard, batch_size=4, progress=False)
    finally:
        handle.remove()
    assert not any(s[0] == 1 for s in shapes)  # rho of the whole prompt decides: no prefix run on its own


def test_padding_mid_sequence_is_left_to_attention_only_models_inside_their_window(tiny_llama, monkeypatch):
    """A sliding window counts pads as positions and a recurrent layer reads tokens in order: there each padded
    prompt is prefilled whole, and a question's choices get one row each."""
    model, tok = tiny_llama
    hybrid = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", "linear_attention"]))
    assert mcq._attention_layout(hybrid) == (False, None) and mcq._mask_dtype(hybrid) is None
    assert mcq._attention_layout(model) == (True, None)
    qs, _ = _padded_setting(model, tok, window=12)
    shortest = min(len(tok(q["question"])["input_ids"]) for q in qs)
    for name, patch in (("sliding window", ("config.sliding_window", shortest - 1)),
                        ("recurrent layers", ("layout", (False, None)))):  # fmt: skip
        with monkeypatch.context() as m:
            if patch[0] == "layout":
                m.setattr(mcq, "_attention_layout", lambda model, layout=patch[1]: layout)
            else:
                m.setattr(model.config, "sliding_window", patch[1], raising=False)
            shapes, handle = _forward_shapes(model)
            try:
                score_mcq(model, tok, qs, batch_size=4, progress=False)
            finally:
                handle.remove()
            assert not any(s[0] == 1 for s in shapes), name
    assert dilution_batch_size(16) == 8 and dilution_batch_size(16, _padded_setting(model, tok, None)[1]) == 4


def test_questions_take_different_paddings_in_turn_and_the_paddings_alone_are_judged(tiny_llama):
    model, tok = tiny_llama
    fills = paddings(tok, RETAIN_TEXTS, 40, 3)
    assert len(fills) == 3 and len({tuple(f) for f in fills}) == 3 and all(len(f) == 40 for f in fills)
    q = _questions(1)[0]
    for form in ("plain", "after", "chat"):
        alone, padded = padding_alone(fills[1], 40, tok, form), dilute(q, fills[1], 40, tok, form)["question"]
        assert q["question"] not in alone and alone.split("\n\n")[0] in padded
    shapes, handle = _forward_shapes(model)
    try:
        run_dilution(model, tok, _questions(8), RETAIN_TEXTS, None, progress=False)
    finally:
        handle.remove()
    # each padding's questions are scored together: 4 paddings x 2 questions, one shared prefix each
    assert sum(1 for s in shapes if s[0] == 1) >= 4


def test_gate_rates_on_texts_stop_at_the_gate_and_agree_with_whole_forwards(tiny_llama):
    """Only the gates' decisions are read, so the forwards end at the guardrail's layer; the rates are those of
    whole forwards under the attached guardrail."""
    import torch

    from dsg.runtime.intervention import acted_on

    model, tok = tiny_llama
    qs, guard = _padded_setting(model, tok, window=12, hold=6)
    texts = [q["question"] for q in qs]
    gated = touched = 0
    for t in texts:
        with dsg.attach(model, guard) as session, torch.no_grad():
            model(input_ids=torch.tensor([tok(t)["input_ids"]]))
        gated, touched = gated + int(session.gated[0]), touched + int(acted_on(session)[0])
    heads = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    try:
        rates = gate_rates_on_texts(model, tok, texts, guard)
    finally:
        handle.remove()
    assert rates == (gated / len(texts), touched / len(texts)) and 0 < gated < len(texts)
    assert not heads  # no forward went past the guardrail's layer
