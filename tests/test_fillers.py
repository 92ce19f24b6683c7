"""A held gate counted in tokens that carry words (lm.text.filler_token_ids, Guardrail.hold_fillers): which tokens
are fillers, how the table is fitted, saved and checked, and that padding of fillers after a forget prompt does not
close the gate through the HF runtime while the same number of words does."""

from __future__ import annotations

import json

import pytest
import torch

import dsg
from dsg.files import read_safetensors
from dsg.guard.integrity import FILLERS_TENSOR
from dsg.lm.text import _carries_word, filler_token_ids

from tiny import (
    FORGET_TEXTS,
    RETAIN_TEXTS,
    ByteVocabulary,
    SentencePieceVocabulary,
    held_fits,
    refuses_edit,
    saved_and_loaded,
    sparse_sae,
)


@pytest.mark.parametrize(
    "raw,word",
    [
        (b"the", True),
        (b" 42", True),
        (b"?", False),
        (b" .", False),
        (b"\n\n", False),
        (b" " * 16, False),
        ("\u00a0".encode(), False),  # a no-break space, whole in one token
        ("\u200b".encode()[:2], False),  # the first two bytes of a zero-width space: U+2000..U+203F, no letter
        ("\u200b".encode()[:1], False),  # its lead byte alone: U+2000..U+2FFF holds symbols too
        ("\u200b".encode()[2:], False),  # a continuation byte finishes a character counted where it began
        ("\u2060".encode()[:2], False),  # a word joiner's (U+2040..U+207F: ⁱ and ⁿ are letters, ⁄ is not)
        ("\ufeff".encode()[:1], False),  # a byte-order mark's
        ("\ufeff".encode()[:2], False),
        ("\u00ad".encode()[:1], False),  # a soft hyphen's (U+0080..U+00BF: µ is a letter, § is not)
        ("😀".encode()[:2], False),  # an emoji's, split where SmolLM2's tokenizer splits it
        ("\u3164".encode(), False),  # the Hangul filler: a letter by category, blank on screen
        ("é".encode(), True),
        ("Ж".encode()[:1], True),  # every character starting with 0xD0 is a Cyrillic letter
        ("日".encode()[:2], True),  # starts a CJK ideograph: counted once, where it starts
        ("日".encode()[2:], False),
        (b"\xff", True),  # bytes that are not UTF-8 count as a word (nothing is skipped on a guess)
    ],
)
def test_a_token_carries_a_word_when_it_holds_or_starts_a_letter_or_digit(raw, word):
    assert _carries_word(raw) is word


def test_the_filler_table_of_a_byte_level_tokenizer(tiny_llama):
    _, tok = tiny_llama
    fillers = set(filler_token_ids(tok))
    assert set(tok.all_special_ids) <= fillers
    for text in ("exploit", "payload", "2024"):
        assert not any(i in fillers for i in tok(text, add_special_tokens=False)["input_ids"]), text
    for text in ("?", " . . .", "\n\n", " -- "):
        assert all(i in fillers for i in tok(text, add_special_tokens=False)["input_ids"]), text
    zwsp = tok("\u200b" * 3, add_special_tokens=False)["input_ids"]  # byte tokens: lead, continuation, continuation
    assert len(zwsp) > 3 and not any(i not in fillers for i in zwsp)  # its byte tokens count as no word


def test_the_filler_table_of_a_sentencepiece_vocabulary():
    fillers = filler_token_ids(SentencePieceVocabulary())
    # specials, a bare space, " .", "?", and the bytes of a zero-width space; not "▁the", "42" or a Cyrillic lead
    assert fillers == [0, 1, 2, 4, 5, 6, 8, 9, 10]


@pytest.fixture(scope="module")
def held(tiny_llama):
    model, tok = tiny_llama
    # windows that hold the spacing tokens and line breaks in both fits: they then differ only in where the gate is
    # judged
    sae, words, every = held_fits(model, tok, dict(gate_hold_words=False), gate_skip_spacing=False,
                                  gate_skip_short_lines=False)  # fmt: skip
    return model, tok, sae, words, every


def test_a_fitted_hold_counts_words_and_its_table_is_saved_and_checked(held, tmp_path):
    model, tok, sae, words, every = held
    assert every.hold_fillers is None and words.hold_fillers.tolist() == filler_token_ids(tok)
    # the levels are read at words only: a window ending at a filler is not judged, so no peak is higher
    words_rho, every_rho = words.tensors["calibration_rho"], every.tensors["calibration_rho"]
    assert words_rho.shape == every_rho.shape and (words_rho <= every_rho).all()
    assert words.threshold <= every.threshold and (words.latch is None) == (every.latch is None)
    assert "tokens that carry words" in words.gate_rule() and "tokens that carry" not in every.gate_rule()
    meta, loaded = saved_and_loaded(words, tmp_path / "g", sae)
    assert meta["format_version"] == 7 and meta["hold_fillers"] == len(words.hold_fillers)
    assert torch.equal(loaded.hold_fillers, words.hold_fillers)
    every.save(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "guardrail.json").read_text())["format_version"] < 5
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")

    def refused(meta_edit: dict, tensor_edit=None, match="fillers|format_version|hold"):
        t = dict(tensors)
        if tensor_edit is not None:
            t[FILLERS_TENSOR] = tensor_edit
        refuses_edit(tmp_path, meta | meta_edit, t, sae, match)

    ids = tensors[FILLERS_TENSOR]
    refused({"format_version": 4})  # a dsg before the table would read the hold as every token
    refused({"format_version": 5}, match="judges words only")  # its fillers opened the gate and set the levels
    refused({"hold_fillers": len(ids) + 1})  # the count disagrees with the tensor
    refused({}, ids.flip(0))  # not ascending
    refused({}, torch.cat([ids[:1], ids]))  # an id twice
    refused({"hold_fillers": len(ids) + 1}, torch.cat([torch.tensor([-1]), ids]))  # a negative id
    refused({}, ids.int())  # not int64
    refused({"hold_fillers": len(ids), "hold": None})  # fillers without a hold
    with pytest.raises(dsg.DSGError, match="hold_fillers"):
        dsg.Guardrail(sae, words.hook, words.features, 0.5, window=4, hold_fillers=[1, 2])
    with pytest.raises(dsg.DSGError, match="token ids"):
        dsg.Guardrail(sae, words.hook, words.features, 0.5, window=4, hold=2, hold_fillers=["a"])


def _gated(model, tok, guard, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with guard.applied(model) as session:
        model(**enc)
        return session.gated.tolist()


def test_filler_padding_after_a_gated_prompt_keeps_the_answer_guarded_through_the_runtime(held):
    """Prompts the gate holds open at their end, then padding longer than the hold: words close it under both
    tables; fillers (" ." and "?") close it only when every real token counts and is judged."""
    model, tok, _, words, every = held
    opened = [t for t in FORGET_TEXTS if all(_gated(model, tok, g, [t])[0] for g in (words, every))]
    assert opened, "the setting needs a forget text gated at its end"
    fill, prose = " ." * 12 + " ?" * 4, " " + RETAIN_TEXTS[1]
    assert len(tok(fill)["input_ids"]) > words.hold and len(tok(prose)["input_ids"]) > words.hold
    for t in opened:
        assert _gated(model, tok, words, [t + fill]) == [True]
        assert _gated(model, tok, every, [t + fill]) == [False] or every.latch is not None
        assert _gated(model, tok, words, [t + prose]) == _gated(model, tok, every, [t + prose]) == [False]


def test_a_vocabulary_of_byte_strings_is_read_as_bytes():
    assert filler_token_ids(ByteVocabulary()) == [0, 2, 3, 5, 6, 7]


def test_a_static_fit_stores_no_filler_table(tiny_llama):
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.1)
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, gate_window=6, gate_hold=4, gated=False)
    static = dsg.fit(model, tok, sae, FORGET_TEXTS * 3, RETAIN_TEXTS * 3, config=config, progress=False)
    assert not static.gated and static.hold_fillers is None


def test_a_calibration_text_without_words_is_left_out_of_a_gate_judged_at_words(held):
    """A text of punctuation alone has real tokens but nothing a gate judged at words reads: counted as none, so
    that its peak of 0 is not taken for a benign text's (guard.fit drops such texts before reading the levels)."""
    from dsg.guard.fit import _token_counts

    model, tok, _, words, every = held
    seqs = [tok(t)["input_ids"] for t in (" . . . ? !", "The exploit runs.")]
    real, judged_by_every = _token_counts(model, seqs, every)
    same_real, judged = _token_counts(model, seqs, words)
    assert torch.equal(real, same_real) and torch.equal(judged_by_every, real)
    assert real[0] > 0 and judged[0] == 0 and 0 < judged[1] < real[1]
    with pytest.raises(dsg.DSGError, match="carries a word"):
        _token_counts(model, seqs[:1], words)
