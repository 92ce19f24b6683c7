"""Multiple-choice scoring and perplexity: cached scoring equals naive full-sequence scoring, results do not
depend on batching, and the gate judges the prompt alone."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import dsg
from dsg.eval import (
    PerplexityResult,
    accuracy,
    base_correct_subset,
    evaluate_files,
    gate_rate,
    letter_prompt,
    mcq,
    perplexity,
    perplexity_stats,
    read_questions,
    score_mcq,
)
from dsg.eval.mcq import choice_orderings
from dsg.guard import rule
from dsg.lm.hooks import hooked
from dsg.lm.text import real_token_mask

from tiny import tiny_model

WORDS = [f"w{i}" for i in range(240)] + ["paris", "london", "rome", "Answer", "A", "B", "C", "D", "E", "user", "model"]
PUNCT = [":", ".", "(", "?", "<", ">", "</", ",", "!"]
CHAT = (
    "{% for m in messages %}< user > {{ m['content'] }} </ user >{% endfor %}"
    "{% if add_generation_prompt %} < model > {% endif %}"
)


# ---- tiny model, tokenizer, guardrail (private: built from configs in code) -----------------------------------


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *WORDS, *PUNCT])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2", "bloom"])  # gemma2: eager attention, a float
# 4D mask; bloom: ALiBi, built from the 2D mask (no 4D mask, no position ids)
def model(request, tok):
    return tiny_model(request.param, seed=0, vocab=len(tok), positions=256)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_model("llama", seed=0, vocab=len(tok))


def make_questions(n: int, seed: int = 0, n_choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    qs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS[:240]) for _ in range(rng.randint(3, 14)))
        choices = [" ".join(rng.choice(WORDS[:240]) for _ in range(rng.randint(1, 4))) for _ in range(n_choices)]
        qs.append({"id": f"q{i}", "question": words + " ?", "choices": choices, "answer": rng.randrange(n_choices)})
    return qs


def make_sae(seed: int = 0) -> dsg.SAE:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(64, 32, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    b_enc = torch.full((64,), -0.02)  # residuals here have norm ~0.1: each latent fires on roughly 1 token in 5
    return dsg.SAE(
        W_dec.T.clone(), W_dec, b_enc, torch.zeros(32), architecture="standard", hook_name="blocks.0.hook_resid_post"
    )


def prompt_rho(model, tok, guard: dsg.Guardrail, prompt: str) -> float:
    """rho of one prompt, from the hooked activations (the rule in guardrail.py's docstring)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    seen = {}
    with hooked(model, guard.hook, lambda x: seen.setdefault("x", x)):
        model(input_ids=ids)
    real = real_token_mask(ids, None, [0, 1, 2])
    _, a, _ = guard.flags(seen["x"], real)
    return float(rule.rho(a, real)[0])


@pytest.fixture(scope="module")
def questions():
    return make_questions(10)


@pytest.fixture(scope="module")
def guard(llama, tok, questions):
    """A guardrail whose threshold is the median prompt rho, so about half the questions are gated."""
    sae = make_sae()
    probe = dsg.Guardrail(sae, features=[3, 17, 40, 51], threshold=0.0, clamp=2.0)
    rhos = sorted(prompt_rho(llama, tok, probe, q["question"]) for q in questions)
    threshold = (rhos[len(rhos) // 2 - 1] + rhos[len(rhos) // 2]) / 2
    return dsg.Guardrail(sae, features=[3, 17, 40, 51], threshold=threshold, clamp=2.0)


# ---- naive references -----------------------------------------------------------------------------------------


def naive_choice_logprob(model, tok, prompt: str, choice: str) -> float:
    """log P(" " + choice | prompt) from one full forward of prompt + choice, no cache, no padding."""
    ctx = tok(prompt)["input_ids"]
    whole = tok(prompt + " " + choice)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    lp = logits.log_softmax(-1)
    return sum(float(lp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def gated_alone(model, tok, guard, prompt: str) -> bool:
    with dsg.attach(model, guard) as session, torch.no_grad():
        model(input_ids=torch.tensor([tok(prompt)["input_ids"]]))
    return bool(session.gated[0])


# ---- reading questions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', ["line 2", "'answer'", "0..1"]),
        ('{"question": "q", "choices": ["a"], "answer": 0}', ["line 2", "'choices'", "at least 2"]),
        ('{"choices": ["a", "b"], "answer": 0}', ["line 2", "'question'"]),
        ('{"question": "q", "answer": 0}', ["line 2", "'choices'"]),
        ('{"question": "q", "choices": ["a", "b"]}', ["line 2", "'answer'"]),
        ('{"question": "q", "choices": ["a", "b"], "answer": true}', ["line 2", "'answer'"]),
        ('{"question": "q", "choices": ["a", 3], "answer": 0}', ["line 2", "'choices'"]),
        ('{"question": "q", "choices": ', ["line 2", "not valid JSON"]),
        ('["q"]', ["line 2", "JSON object"]),
    ],
)
def test_read_questions_rejects_bad_lines(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["x", "y"], "answer": 1, "id": 7}\n' + line + "\n")
    with pytest.raises(dsg.DSGError) as e:
        read_questions(path)
    msg = str(e.value)
    assert "bad.jsonl" in msg and all(w in msg for w in words), msg


def test_read_questions_keeps_extra_fields_and_rejects_empty(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"question": "q", "choices": ["x", "y"], "answer": 1, "id": 7, "subject": "s"}\n\n')
    assert read_questions(path) == [{"question": "q", "choices": ["x", "y"], "answer": 1, "id": 7, "subject": "s"}]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(dsg.DSGError, match="no questions"):
        read_questions(tmp_path / "empty.jsonl")
    with pytest.raises(dsg.DSGError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")


def test_files_as_editors_and_json_dumps_write_them_are_read_whole(tmp_path):
    """A byte-order mark, CRLF line ends, U+2028/U+2029/U+0085 inside JSON strings (json.dumps with
    ensure_ascii=False writes them raw) and blank lines holding spaces or tabs: each read as the user meant."""
    from dsg.lm.text import read_corpus

    q = {"question": "Line\u2028separated\u2029and\x85next?", "choices": ["a\u2028b", "c"], "answer": 0}
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(q, ensure_ascii=False) + "\r\n").encode() * 2)
    assert read_questions(path) == [q, q]
    docs = [{"text": "first\u2028still first"}, {"text": "second"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    assert read_corpus(tmp_path / "c.jsonl") == ["first\u2028still first", "second"]
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfone\r\nstill one\r\n \t\r\ntwo\n  \nthree\n\n\nfour")
    assert read_corpus(tmp_path / "c.txt") == ["one\nstill one", "two", "three", "four"]


# ---- likelihood mode ------------------------------------------------------------------------------------------


def test_likelihood_equals_naive_full_sequence(model, tok, questions):
    questions = questions[:7]
    with warnings.catch_warnings():  # the prompt's KV cache goes in under the forward's own name for it
        warnings.simplefilter("error", FutureWarning)
        results = score_mcq(model, tok, questions, batch_size=3, progress=False)
    for q, r in zip(questions, results):
        naive = [naive_choice_logprob(model, tok, q["question"], c) for c in q["choices"]]
        assert r.scores == pytest.approx(naive, abs=1e-4)
        assert r.prediction == max(range(4), key=lambda i: naive[i])
        assert r.scores_norm == pytest.approx([s / len(c) for s, c in zip(naive, q["choices"])], abs=1e-4)
        assert r.correct == (r.prediction == q["answer"]) and r.gated is None and r.id == q["id"]


@pytest.mark.parametrize("guarded", [False, True])
def test_choices_side_by_side_score_as_one_row_per_choice(llama, tok, questions, guard, guarded, monkeypatch):
    """A question's choices scored side by side in one row (a 4D mask) equal one row per choice over a repeated
    cache (the path for attention kernels that take no custom mask)."""
    guards = (guard,) if guarded else ()
    assert mcq._mask_dtype(llama) is torch.bool
    with monkeypatch.context() as m:  # a custom mask would bypass a sliding window: longer rows take the other path
        m.setattr(llama.config, "sliding_window", 8, raising=False)
        assert mcq._mask_dtype(llama, 9) is None and mcq._mask_dtype(llama, 8) is torch.bool
    grouped = score_mcq(llama, tok, questions, intervention=guards, batch_size=4, progress=False)
    monkeypatch.setattr(mcq, "_mask_dtype", lambda model, length=0: None)
    repeated = score_mcq(llama, tok, questions, intervention=guards, batch_size=4, progress=False)
    for a, b in zip(grouped, repeated):
        assert a.scores == pytest.approx(b.scores, abs=1e-4) and a.gated == b.gated


@pytest.mark.parametrize("guarded", [False, True])
def test_batch_size_invariance(llama, tok, questions, guard, guarded):
    guards = (guard,) if guarded else ()
    runs = [score_mcq(llama, tok, questions, intervention=guards, batch_size=bs, progress=False) for bs in (1, 3, 4)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.scores == pytest.approx(b.scores, abs=1e-4)
            assert (a.prediction, a.gated) == (b.prediction, b.gated)
    if guarded:
        assert 0 < gate_rate(runs[0]) < 1  # the threshold splits the questions, so both paths are exercised


def test_gate_decision_is_the_prompt_alone(llama, tok, questions, guard):
    results = score_mcq(llama, tok, questions, intervention=[guard], batch_size=4, progress=False)
    assert [r.gated for r in results] == [gated_alone(llama, tok, guard, q["question"]) for q in questions]


def test_guarded_scores_hold_the_prompt_decision_fixed(llama, tok, questions, guard):
    """Gated question: every flagged token of prompt and choice clamped (a static guardrail on the full sequence);
    ungated question: the plain model."""
    static = dsg.Guardrail(guard.sae, features=guard.features, clamp=guard.clamp, gated=False)
    results = score_mcq(llama, tok, questions, intervention=[guard], batch_size=4, progress=False)
    plain = score_mcq(llama, tok, questions, batch_size=4, progress=False)
    for q, r, p in zip(questions, results, plain):
        if r.gated:
            with dsg.attach(llama, static):
                naive = [naive_choice_logprob(llama, tok, q["question"], c) for c in q["choices"]]
            assert max(abs(x - y) for x, y in zip(r.scores, p.scores)) > 1e-3  # the clamp did something
        else:
            naive = [naive_choice_logprob(llama, tok, q["question"], c) for c in q["choices"]]
        assert r.scores == pytest.approx(naive, abs=1e-4)


def test_two_guardrails_each_keep_their_prompt_decision(tok, questions):
    """Guardrails on two layers: each clamps the choices exactly when it gated the prompt (under attach, where
    the later layer judges the prompt as the earlier one edited it)."""
    model = tiny_model("gpt2", seed=0, vocab=len(tok), positions=256)
    g0 = dsg.Guardrail(make_sae(0), features=[3, 17, 40, 51], threshold=0.0, clamp=2.0)
    g1 = dsg.Guardrail(make_sae(1), hook="blocks.1.hook_resid_post", features=[1, 2, 5, 9], threshold=0.0, clamp=2.0)
    for g in (g0, g1):
        rhos = sorted(prompt_rho(model, tok, g, q["question"]) for q in questions)
        g.threshold = (rhos[4] + rhos[5]) / 2
    results = score_mcq(model, tok, questions, intervention=[g0, g1], batch_size=4, progress=False)
    patterns = set()
    for q, r in zip(questions, results):
        with dsg.attach(model, g0, g1) as session, torch.no_grad():
            model(input_ids=torch.tensor([tok(q["question"])["input_ids"]]))
        on = [bool(x) for x in session.decisions()[0]]
        patterns.add(tuple(on))
        assert r.gated == any(on)
        static = [
            dsg.Guardrail(g.sae, hook=g.hook, features=g.features, clamp=g.clamp, gated=False)
            for g, gated in zip((g0, g1), on)
            if gated
        ]
        with dsg.attach(model, *static) if static else torch.no_grad():
            naive = [naive_choice_logprob(model, tok, q["question"], c) for c in q["choices"]]
        assert r.scores == pytest.approx(naive, abs=1e-4)
    assert len(patterns) >= 3  # gated by neither, by one only, by both


def test_prompt_format_uses_question_fields(llama, tok):
    q = {"question": "w1 w2", "choices": ["w3", "w4"], "answer": 0, "subject": "w9"}
    r = score_mcq(llama, tok, [q], prompt_format="{subject} : {question}", progress=False)[0]
    assert r.scores[0] == pytest.approx(naive_choice_logprob(llama, tok, "w9 : w1 w2", "w3"), abs=1e-4)
    with pytest.raises(dsg.DSGError, match="prompt_format"):
        score_mcq(llama, tok, [q], prompt_format="{topic} {question}", progress=False)


# ---- letter mode ----------------------------------------------------------------------------------------------


def test_letter_mode_picks_the_highest_letter_logit(llama, tok, questions):
    results = score_mcq(llama, tok, questions, mode="letter", description="w5 w6 .\n\n", progress=False, batch_size=4)
    letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    for q, r in zip(questions, results):
        prompt = letter_prompt(q, "w5 w6 .\n\n")
        assert prompt.endswith("\nD. " + q["choices"][3] + "\nAnswer:") and prompt.startswith("w5 w6 .\n\n")
        with torch.no_grad():
            last = llama(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
        assert r.prediction == int(last[letters].argmax())
        assert r.scores == pytest.approx(last.log_softmax(-1)[letters].tolist(), abs=1e-4)


def test_chat_letter_mode_uses_the_template(llama, tok, questions):
    results = score_mcq(llama, tok, questions[:4], mode="letter", chat=True, progress=False)
    q = questions[0]
    text = letter_prompt(q, chat=True, tokenizer=tok)
    assert text.startswith("< user > " + q["question"]) and text.endswith(" < model > Answer: (")
    with torch.no_grad():
        last = llama(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    assert results[0].scores == pytest.approx(last.log_softmax(-1)[letters].tolist(), abs=1e-4)
    with pytest.raises(dsg.DSGError, match="letter"):
        score_mcq(llama, tok, questions, chat=True, progress=False)


# ---- base-correct subset --------------------------------------------------------------------------------------


class Picker(torch.nn.Module):
    """A stand-in LM for letter mode: it answers the letter whose choice is "paris", else "A"."""

    def __init__(self, tok):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.tok = len(tok), tok
        self.paris, self.dot = tok.convert_tokens_to_ids("paris"), tok.convert_tokens_to_ids(".")

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0, **_):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            pick = "A"
            for t in range(2, len(row)):
                if row[t] == self.paris and row[t - 1] == self.dot:
                    pick = self.tok.convert_ids_to_tokens(row[t - 2])
            logits[b, 0, self.tok.convert_tokens_to_ids(pick)] = 5.0
        return tf.modeling_outputs.CausalLMOutputWithPast(logits=logits, past_key_values=None)


def test_base_correct_subset_with_permutations(tok):
    qs = [
        {"question": "w1 ?", "choices": ["london", "paris", "rome", "w2"], "answer": 1},  # always right
        {"question": "w1 ?", "choices": ["london", "paris", "rome", "w2"], "answer": 0},  # never right
        {"question": "w1 ?", "choices": ["london", "rome", "w2", "w3"], "answer": 0},  # right only as "A"
        {"question": "w1 ?", "choices": ["paris", "rome", "w3"], "answer": 0},  # 3 choices: 6 orderings
    ]
    picker = Picker(tok)
    assert base_correct_subset(picker, tok, qs, mode="letter", progress=False) == [0, 2, 3]
    assert base_correct_subset(picker, tok, qs, mode="letter", permutations=True, progress=False) == [0, 3]
    assert len(choice_orderings(4)) == 24 and len(choice_orderings(3)) == 6
    with pytest.raises(dsg.DSGError, match="120 orderings"):
        choice_orderings(5)


def test_accuracy_and_gate_rate_over_subsets(llama, tok, questions, guard):
    results = score_mcq(llama, tok, questions, intervention=[guard], progress=False)
    assert accuracy(results) == sum(r.correct for r in results) / len(results)
    assert accuracy(results, [0, 1]) == (results[0].correct + results[1].correct) / 2
    assert gate_rate(results, [0]) == float(results[0].gated)
    assert gate_rate(score_mcq(llama, tok, questions[:2], progress=False)) is None
    with pytest.raises(dsg.DSGError):
        accuracy(results, [])
    with pytest.raises(dsg.DSGError):
        accuracy(results, [99])


# ---- perplexity -----------------------------------------------------------------------------------------------


def test_perplexity_equals_naive(model, tok):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS[:240]) for _ in range(rng.randint(2, 30))) for _ in range(7)]
    got = perplexity_stats(model, tok, texts, max_length=12, batch_size=3, progress=False)
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        for s in range(0, len(ids), 12):
            w = ids[s : s + 12]
            if len(w) < 2:
                continue
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([w])).logits[0].float().log_softmax(-1)
            nll -= sum(float(lp[t - 1, w[t]]) for t in range(1, len(w)))
            n += len(w) - 1
    assert isinstance(got, PerplexityResult) and got.n_tokens == n and got.gate_rate is None
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert perplexity(model, tok, texts, max_length=12, batch_size=1, progress=False) == pytest.approx(
        got.perplexity, rel=1e-5
    )


def test_guarded_perplexity_is_batch_invariant(llama, tok, guard):
    texts = [q["question"] for q in make_questions(9, seed=3)]
    a = perplexity_stats(llama, tok, texts, intervention=[guard], batch_size=1, progress=False)
    b = perplexity_stats(llama, tok, texts, intervention=[guard], batch_size=4, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5) and a.gate_rate == b.gate_rate
    assert 0 < a.gate_rate < 1


# ---- files ----------------------------------------------------------------------------------------------------


def test_evaluate_files_summary(tmp_path, llama, tok, guard):
    files = []
    for name, seed in (("bio", 0), ("mmlu_geo", 5)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(q) + "\n" for q in make_questions(6, seed=seed)))
        files.append(path)
    out = evaluate_files(llama, tok, files, intervention=[guard], base_correct=True, progress=False, batch_size=4)
    json.dumps(out)
    assert set(out["tasks"]) == {"bio", "mmlu_geo"} and out["all"]["n"] == 12
    bio = out["tasks"]["bio"]
    direct = score_mcq(llama, tok, make_questions(6, seed=0), intervention=[guard], progress=False)
    base = score_mcq(llama, tok, make_questions(6, seed=0), progress=False)
    assert bio["accuracy"] == accuracy(direct) and bio["gate_rate"] == gate_rate(direct)
    assert bio["base_accuracy"] == accuracy(base)
    assert bio["base_correct"]["indices"] == [r.index for r in base if r.correct]
    # the length-normalised subset and accuracy, as dsg demo and dsg compare report them
    norm = [r.index for r in base if r.correct_norm]
    assert bio["base_correct_norm"]["indices"] == norm and bio["base_correct_norm"]["n"] == len(norm)
    kept = [direct[i].correct_norm for i in norm]
    assert bio["base_correct_norm"]["accuracy"] == (sum(kept) / len(kept) if kept else None)
    pooled = [t["base_correct_norm"] for t in out["tasks"].values()]
    assert out["all"]["base_correct_norm"]["n"] == sum(t["n"] for t in pooled)
    given = evaluate_files(llama, tok, files[:1], base_subsets={"bio": [0, 1]}, progress=False)
    assert given["tasks"]["bio"]["base_correct"]["n"] == 2 and given["tasks"]["bio"]["gate_rate"] is None
    for bad, words in (({"bio": [0.9]}, "question indices"), ({"bio": [True]}, "question indices"),
                       ({"bio": "12"}, "question indices"), ({"boi": [0]}, "no question file has")):  # fmt: skip
        with pytest.raises(dsg.DSGError, match=words):  # not question 0, question 1, questions 1 and 2, or ignored
            evaluate_files(llama, tok, files[:1], base_subsets=bad, progress=False)
    import numpy as np  # indices from numpy or torch are integers too

    for indices in (np.flatnonzero([1, 1, 0]), torch.tensor([0, 1])):
        again = evaluate_files(llama, tok, files[:1], base_subsets={"bio": indices}, progress=False)
        assert again["tasks"]["bio"]["base_correct"] == given["tasks"]["bio"]["base_correct"]
    with pytest.raises(dsg.DSGError, match="distinct"):
        evaluate_files(llama, tok, [files[0], files[0]], progress=False)


def test_two_guardrails_and_a_weight_edit_score_as_one_intervention(tok, questions):
    """A list mixing guardrails and an edit: the guardrails are attached together inside the edit, so each keeps its
    prompt decision over the choices, exactly as attaching them to the edited model."""
    from dsg.runtime import Edit, as_intervention, edited

    model = tiny_model("gpt2", seed=0, vocab=len(tok), positions=256)
    g0 = dsg.Guardrail(make_sae(0), features=[3, 17, 40, 51], threshold=0.0, clamp=2.0)
    g1 = dsg.Guardrail(make_sae(1), hook="blocks.1.hook_resid_post", features=[1, 2, 5, 9], threshold=0.0, clamp=2.0)
    head = model.get_output_embeddings().weight
    edit = Edit({next(n for n, p in model.named_parameters() if p is head): head.detach() * 0.5})
    mixed = score_mcq(model, tok, questions, intervention=[g0, edit, g1], batch_size=4, progress=False)
    with edited(model, edit):
        separate = score_mcq(model, tok, questions, intervention=[g0, g1], batch_size=4, progress=False)
    assert [r.scores for r in mixed] == [r.scores for r in separate]
    assert [r.gated for r in mixed] == [r.gated for r in separate] and any(r.gated for r in mixed)
    assert repr(as_intervention([g0, edit, g1])).startswith("<dsg.runtime.intervention.Stack")


# ---- batches the gates leave alone ----------------------------------------------------------------------------


def _head_calls(model):
    """A counter of forwards that reach the output head (hooks removed by the caller)."""
    calls = []
    return calls, model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batches_the_gates_leave_alone_take_the_unguarded_results(llama, tok, guard, batch_size):
    """With the base model's results given, a batch no gate opens on stops at the gate's layer and takes them: the
    results are exactly those of finishing every guarded forward, and fewer forwards reach the output head."""
    qs = make_questions(16, seed=3)
    base = score_mcq(llama, tok, qs, batch_size=batch_size, progress=False)
    counted = {}
    for name, unguarded in (("full", None), ("fast", base)):
        calls, handle = _head_calls(llama)
        try:
            res = score_mcq(llama, tok, qs, intervention=guard, batch_size=batch_size, progress=False,
                            unguarded=unguarded)  # fmt: skip
        finally:
            handle.remove()
        counted[name] = (res, len(calls))
    (full, n_full), (fast, n_fast) = counted["full"], counted["fast"]
    assert fast == full  # bit for bit, scores and gate decisions
    assert 0 < sum(bool(r.gated) for r in full) < len(qs)
    if batch_size == 1:  # every ungated question is a batch of its own: its prefill and choices forwards are saved
        assert n_fast < n_full
    # a weight edit beside the guardrail changes every answer: its results are never replaced by the base model's
    from dsg.runtime import Edit

    head = llama.get_output_embeddings().weight
    edit = Edit({next(n for n, p in llama.named_parameters() if p is head): head.detach() * 0.5})
    edited_runs = [score_mcq(llama, tok, qs, intervention=[guard, edit], batch_size=batch_size, progress=False,
                             unguarded=u) for u in (None, base)]  # fmt: skip
    assert edited_runs[0] == edited_runs[1] and edited_runs[1] != full


def test_unguarded_results_of_other_questions_are_refused(llama, tok, guard):
    qs = make_questions(6, seed=4)
    base = score_mcq(llama, tok, qs, batch_size=2, progress=False)
    guarded = score_mcq(llama, tok, qs, intervention=guard, batch_size=2, progress=False)
    for wrong, words in ((base[:-1], "5 results for 6"), (base[::-1], "another question"),
                         (guarded, "without an intervention")):  # fmt: skip
        with pytest.raises(dsg.DSGError, match=words):
            score_mcq(llama, tok, qs, intervention=guard, batch_size=2, progress=False, unguarded=wrong)


def test_unguarded_results_of_another_run_are_refused(llama, tok, guard):
    """Base results whose questions, order, options, batch size or weights differ from the guarded run's match it
    question by question (same ids, answers and choice counts), and were taken for every batch the gates left
    alone; each is refused now. Without verify the weights are not compared."""
    from dsg.runtime import Edit

    qs = make_questions(6, seed=4)
    base = score_mcq(llama, tok, qs, batch_size=2, progress=False)
    other_model = tiny_model("llama", seed=1, vocab=len(tok))
    head = next(n for n, p in llama.named_parameters() if p is llama.get_output_embeddings().weight)
    edit = Edit({head: llama.get_output_embeddings().weight.detach() * 0.5})
    no_ids = [{k: v for k, v in q.items() if k != "id"} for q in qs]
    rotated = [{k: v for k, v in q.items() if k != "id"} for q in qs[1:] + qs[:1]]
    for i, q in enumerate(rotated):  # each rotated question keeps its place's answer and choice count
        q["answer"] = no_ids[i]["answer"]
    wrong = {
        "other model": (score_mcq(other_model, tok, qs, batch_size=2, progress=False), qs, "model weights"),
        "weight-edited run": (score_mcq(llama, tok, qs, intervention=edit, batch_size=2, progress=False), qs,
                              "without an intervention"),
        "other prompt format": (score_mcq(llama, tok, qs, prompt_format="Q: {question}", batch_size=2,
                                          progress=False), qs, "other inputs"),
        "letter mode": (score_mcq(llama, tok, qs, mode="letter", batch_size=2, progress=False), qs, "other inputs"),
        "choices reversed": (score_mcq(llama, tok, [{**q, "choices": q["choices"][::-1]} for q in qs],
                                       batch_size=2, progress=False), qs, "other inputs"),
        "batch size": (score_mcq(llama, tok, qs, batch_size=3, progress=False), qs, "other inputs"),
        "another order": (score_mcq(llama, tok, rotated, batch_size=2, progress=False), no_ids, "other inputs"),
        "a rebuilt list": (list(base), qs, "as it returned it"),
    }  # fmt: skip
    for name in wrong:
        unguarded, questions, words = wrong[name]
        with pytest.raises(dsg.DSGError, match=words):
            score_mcq(llama, tok, questions, intervention=guard, batch_size=2, progress=False, unguarded=unguarded)
    full = score_mcq(llama, tok, qs, intervention=guard, batch_size=2, progress=False)
    assert score_mcq(llama, tok, qs, intervention=guard, batch_size=2, progress=False, unguarded=base) == full
    mine = score_mcq(other_model, tok, qs, batch_size=2, progress=False)
    other = score_mcq(other_model, tok, qs, intervention=guard, batch_size=2, progress=False, verify=False)
    assert score_mcq(other_model, tok, qs, intervention=guard, batch_size=2, progress=False, verify=False,
                     unguarded=mine) == other  # fmt: skip


def test_perplexity_of_another_run_is_refused_as_unguarded(llama, tok, guard):
    texts = [q["question"] for q in make_questions(8, seed=3)]
    same_lengths = [" ".join(reversed(t.split())) for t in texts]  # other tokens, the same windows' lengths
    other_model = tiny_model("llama", seed=1, vocab=len(tok))
    for unguarded, words in (
        (perplexity_stats(other_model, tok, texts, batch_size=2, progress=False), "weights"),
        (perplexity_stats(llama, tok, same_lengths, batch_size=2, progress=False), "inputs"),
    ):
        with pytest.raises(dsg.DSGError, match=words):
            perplexity_stats(llama, tok, texts, intervention=guard, batch_size=2, progress=False, unguarded=unguarded)


def test_inputs_past_the_models_context_are_refused_and_a_choice_that_just_fits_is_scored(tok):
    """perplexity_stats read windows past the model's positions (llama: silently; gpt2: an IndexError); score_mcq
    counted the last token of a choice, which is scored but never fed, and refused a question that fits."""
    for arch in ("llama", "gpt2"):
        short = tiny_model(arch, seed=0, vocab=len(tok), positions=16)  # gpt2: 16 learned positions
        short.config.max_position_embeddings = 16  # llama: rotary, with a context of 16 in its config
        with pytest.raises(dsg.DSGError, match="at most 16"):
            perplexity_stats(short, tok, [" ".join(WORDS[:40])], max_length=64, progress=False)
        assert perplexity_stats(short, tok, [" ".join(WORDS[:40])], max_length=16, progress=False).n_windows > 1
        for words, fits in ((14, True), (15, False)):  # BOS + words, then a 2-token choice whose last is not fed
            q = {"question": " ".join(WORDS[:words]), "choices": ["w1 w2", "w3 w4"], "answer": 0}
            if fits:
                assert len(score_mcq(short, tok, [q], progress=False)) == 1
            else:
                with pytest.raises(dsg.DSGError, match="needs 17 positions"):
                    score_mcq(short, tok, [q], progress=False)


def test_perplexity_batches_the_gates_leave_alone_take_the_unguarded_sums(llama, tok, guard):
    texts = [q["question"] for q in make_questions(12, seed=3)]
    base = perplexity_stats(llama, tok, texts, batch_size=1, progress=False)
    calls, handle = _head_calls(llama)
    try:
        full = perplexity_stats(llama, tok, texts, intervention=guard, batch_size=1, progress=False)
        n_full = len(calls)
        fast = perplexity_stats(llama, tok, texts, intervention=guard, batch_size=1, progress=False, unguarded=base)
    finally:
        handle.remove()
    assert fast == full and 0 < full.gate_rate < 1  # bit for bit, gate rate included
    assert len(calls) - n_full == round(full.gate_rate * len(texts))  # only the touched windows went to the head
    assert base.batches != full.batches  # the clamp changed some batch
    with pytest.raises(dsg.DSGError, match="batch size"):
        perplexity_stats(llama, tok, texts, intervention=guard, batch_size=3, progress=False, unguarded=base)
    with pytest.raises(dsg.DSGError, match="without an intervention"):
        perplexity_stats(llama, tok, texts, intervention=guard, batch_size=1, progress=False, unguarded=full)


def test_a_question_clamped_mid_prompt_is_reported_clamped_though_not_gated(llama, tok):
    """A gate held open for a while can clamp part of a prompt and close before its end: the question is then not
    gated, yet its scores change. `clamped` says so, for questions alone and for questions behind a prefix they
    share (prefilled once); a question it calls untouched scores exactly as without the guardrail."""
    sae = make_sae()
    held = dsg.Guardrail(sae, features=[3, 17, 40, 51], threshold=0.75, clamp=2.0, window=2, hold=1)
    qs = make_questions(24, seed=3)
    shared = " ".join(WORDS[:40])
    for batch in (qs, [{**q, "question": f"{shared} {q['question']}"} for q in qs]):
        base = score_mcq(llama, tok, batch, progress=False, batch_size=4)
        guarded = score_mcq(llama, tok, batch, intervention=held, progress=False, batch_size=4)
        assert all(r.clamped or not r.gated for r in guarded)
        assert all(g.scores == b.scores for g, b in zip(guarded, base) if not g.clamped)
        mid = [i for i, r in enumerate(guarded) if r.clamped and not r.gated]
        assert mid and all(guarded[i].scores != base[i].scores for i in mid)


def test_alibi_is_read_from_the_config_which_a_compiled_model_keeps():
    """A compiled model's forward takes (*args, **kwargs): read from its signature it looked like ALiBi, and its
    choices left the custom 4D mask. BLOOM and Falcon with `alibi` are ALiBi; Llama compiled or not is not."""
    import transformers as tf

    from dsg.eval.mcq import _alibi

    llama = tiny_model("llama", seed=0)
    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, alibi=True))  # fmt: skip
    assert [_alibi(m) for m in (llama, torch.compile(llama), tiny_model("bloom"), falcon)] == [False, False, True, True]
