"""Windows that pass over blank tokens (lm.text.invisible_token_ids and spacing_token_ids, Guardrail.hold_invisible):
which tokens show nothing or only spacing within a line, that zero-width characters, doubled spaces or tabs between
the words of a request no longer thin out its windows while text without them reads as before, and how the table is
fitted, saved and checked."""

from __future__ import annotations

import json

import pytest
import torch

import dsg
from dsg.files import read_safetensors
from dsg.guard import rule
from dsg.guard.integrity import FILLERS_TENSOR, INVISIBLE_TENSOR
from dsg.lm.text import _shows_nothing, filler_token_ids, invisible_token_ids, spacing_token_ids

from tiny import ByteVocabulary, SentencePieceVocabulary, held_fits, refuses_edit, saved_and_loaded


@pytest.mark.parametrize(
    "raw,invisible",
    [
        ("\u200b".encode(), True),  # a zero-width space, whole
        ("\u200b".encode()[:2], True),  # its first two bytes, as SmolLM2 splits it
        ("\u200b".encode()[:1], True),  # its lead byte: U+2000..U+2FFF holds invisible characters too
        ("\u200b".encode()[2:], True),  # a continuation byte finishes a character begun earlier
        ("\u2060".encode()[:2], True),  # a word joiner's
        ("\ufeff".encode()[:1], True),  # a byte-order mark's
        ("\u00ad".encode()[:1], True),  # a soft hyphen's lead byte (0xC2 also starts visible symbols)
        ("\u200d\u200c".encode(), True),  # joiners
        ("\ufe0f".encode(), True),  # a variation selector
        ("\u3164".encode(), True),  # the Hangul filler
        (b" ", False),
        (b"\n", False),
        (b" .", False),
        (b"?", False),
        ("\u00a0".encode(), False),  # a no-break space shows as a space
        (" \u200b".encode(), False),  # a space, then an invisible character: the space shows
        ("—".encode(), False),
        ("😀".encode()[:2], False),  # an emoji's first bytes: U+1F000..U+1FFFF holds no invisible character
        ("é".encode(), False),
        (b"the", False),
        (b"\xff", False),  # bytes that are not UTF-8 are not passed over on a guess
    ],
)
def test_a_token_shows_nothing_when_it_holds_or_may_start_only_invisible_characters(raw, invisible):
    assert _shows_nothing(raw) is invisible


@pytest.mark.parametrize(
    "raw,blank",
    [
        (b" ", True),
        (b"\t", True),
        (b"    ", True),  # an indent inside a line
        ("\u00a0".encode(), True),  # a no-break space
        ("\u3000".encode(), True),  # an ideographic space
        ("\u2009".encode()[:2], True),  # a thin space's first bytes
        (" \u200b".encode(), True),  # a space, then an invisible character
        ("\u200b".encode(), True),  # what shows nothing shows no more than spacing
        (b"\n", False),  # line breaks shape prompts, chat turns and code: the windows keep them
        (b" \n", False),
        (b"\r\n", False),
        ("\u2028".encode(), False),  # the line separator
        (b"\x0c", False),  # a form feed breaks the line too
        (b" .", False),
        (b" -", False),
        ("—".encode(), False),
        (b" the", False),
        (b"\xff", False),
    ],
)
def test_a_token_shows_only_spacing_when_it_holds_no_more_than_gaps_within_a_line(raw, blank):
    assert _shows_nothing(raw, spacing=True) is blank


def test_the_spacing_table_of_a_byte_level_tokenizer(tiny_llama):
    _, tok = tiny_llama
    fillers, invisible, spacing = (set(f(tok)) for f in (filler_token_ids, invisible_token_ids, spacing_token_ids))
    assert spacing and spacing <= fillers and not spacing & invisible and not spacing & set(tok.all_special_ids)
    for text in ("  ", "\t\t", "\t \t"):
        assert all(i in spacing for i in tok(text, add_special_tokens=False)["input_ids"]), text
    for text in ("\u00a0", "\u3000"):  # split into bytes here: the pieces are the invisible table's
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(i in spacing | invisible for i in ids), text
    for text in ("exploit", " . ?", "\n\n", " \n", " -- "):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        shown = [tok.decode([i]) for i in ids if i not in spacing]  # a space may be a token of its own here
        assert "".join(shown).replace(" ", "") == text.replace(" ", ""), text


def test_the_spacing_tables_of_other_vocabularies():
    assert spacing_token_ids(SentencePieceVocabulary()) == [4]  # "▁" alone; not "▁the", "▁." or the byte tokens
    assert spacing_token_ids(ByteVocabulary()) == [5, 6]  # a no-break space and two tabs; not " ." or " \n"


def test_the_invisible_table_of_a_byte_level_tokenizer(tiny_llama):
    _, tok = tiny_llama
    fillers, invisible = set(filler_token_ids(tok)), set(invisible_token_ids(tok))
    assert invisible and invisible <= fillers and not invisible & set(tok.all_special_ids)
    for text in ("\u200b", "\u2060", "\ufeff", "\u200d"):
        ids = tok(text * 3, add_special_tokens=False)["input_ids"]
        assert all(i in invisible for i in ids), text
    for text in ("exploit", " . ?", "\n\n", "  ", " -- "):
        assert not any(i in invisible for i in tok(text, add_special_tokens=False)["input_ids"]), text


def test_the_invisible_tables_of_other_vocabularies():
    # SentencePiece byte fallback: the three bytes of a zero-width space; not "▁", the specials or a Cyrillic lead
    assert invisible_token_ids(SentencePieceVocabulary()) == [8, 9, 10]
    assert invisible_token_ids(ByteVocabulary()) == [3]


def _interleave(values: list, between) -> list:
    out = []
    for v in values:
        out += [v, *between]
    return out


def test_invisible_tokens_between_words_do_not_thin_out_the_windows():
    """A request of 10 words, 6 of them flagged, judged with windows of 4: as written its windows open the gate.
    With two invisible tokens after every word its windows hold a third as many words, and they open nothing when
    the windows hold every real token; passing over the invisible tokens gives every word's window its value as
    written, and the same decision and peak, whole or one token at a time."""
    words = [False, True, True, True, False, True, True, False, True, False]
    plain = torch.tensor([words])
    spread = torch.tensor([_interleave(words, [False, False])])
    roles = torch.tensor([_interleave([rule.WORD] * len(words), [rule.INVISIBLE] * 2)], dtype=torch.int8)
    kept = roles == rule.WORD
    args = (0.5, 4, None, 8, None)
    _, written = rule.window_gate(plain, torch.ones_like(plain), None, *args, counted_BT=torch.ones_like(plain))
    _, thinned = rule.window_gate(spread, torch.ones_like(spread), None, *args, counted_BT=kept)
    clamp, passed = rule.window_gate(spread, torch.ones_like(spread), None, *args, counted_BT=roles)
    assert written.gated.tolist() == [True] and float(written.peak[0]) == 0.75
    assert thinned.gated.tolist() == [False] and float(thinned.peak[0]) <= 0.5
    assert passed.gated.tolist() == [True] and float(passed.peak[0]) == float(written.peak[0])
    state, pieces = None, []
    for t in range(spread.shape[1]):
        sl = slice(t, t + 1)
        c, state = rule.window_gate(
            spread[:, sl], torch.ones_like(spread[:, sl]), state, *args, counted_BT=roles[:, sl]
        )
        pieces.append(c)
    assert torch.equal(torch.cat(pieces, 1), clamp) and torch.equal(state.recent, passed.recent)
    assert state.gated.tolist() == passed.gated.tolist() and float(state.peak[0]) == float(passed.peak[0])
    # roles without an invisible token read exactly as the bool table does
    same = torch.where(kept, rule.WORD, rule.FILLER).to(torch.int8)
    as_bool = rule.window_gate(spread, torch.ones_like(spread), None, *args, counted_BT=kept)
    as_roles = rule.window_gate(spread, torch.ones_like(spread), None, *args, counted_BT=same)
    assert torch.equal(as_bool[0], as_roles[0]) and all(
        torch.equal(x, y) for x, y in zip(as_bool[1], as_roles[1], strict=True)
    )


@pytest.fixture(scope="module")
def fits(tiny_llama):
    """(model, tok, sae, the default fit: windows pass over invisible and spacing tokens, the same over invisible
    ones only, the same over neither)."""
    model, tok = tiny_llama
    no_spacing, neither = dict(gate_skip_spacing=False), dict(gate_skip_spacing=False, gate_skip_invisible=False)
    # line breaks stay in the windows of all three (tests/test_lines.py fits the table of those)
    return model, tok, *held_fits(model, tok, no_spacing, neither, gate_skip_short_lines=False)


@pytest.fixture(scope="module")
def fitted(fits):
    model, tok, sae, _, skips, keeps = fits
    return model, tok, sae, skips, keeps


def test_a_fitted_gate_passes_over_invisible_tokens_and_reads_plain_text_as_before(fitted):
    """The calibration texts hold no invisible token, so both fits read the same levels; the table is the
    tokenizer's, and the roles name each token."""
    model, tok, _, skips, keeps = fitted
    assert keeps.hold_invisible is None and skips.hold_invisible.tolist() == invisible_token_ids(tok)
    assert torch.equal(skips.tensors["calibration_rho"], keeps.tensors["calibration_rho"])
    assert (skips.threshold, skips.latch, skips.prompt_level) == (keeps.threshold, keeps.latch, keeps.prompt_level)
    assert f"pass over {len(skips.hold_invisible)} blank" in skips.gate_rule() and "blank" not in keeps.gate_rule()
    ids = torch.tensor([tok("The\u200b exploit .", add_special_tokens=False)["input_ids"]])
    real = torch.ones_like(ids, dtype=torch.bool)
    roles = skips.counted(real, ids)
    pieces = [tok.convert_ids_to_tokens(int(i)) for i in ids[0]]
    assert roles.dtype == torch.int8 and torch.equal(roles == rule.WORD, keeps.counted(real, ids)), pieces
    assert (roles == rule.INVISIBLE).sum() >= 1 and (roles == rule.FILLER).sum() >= 1, pieces


def test_the_invisible_table_is_saved_and_checked(fitted, tmp_path):
    model, tok, sae, skips, keeps = fitted
    meta, loaded = saved_and_loaded(skips, tmp_path / "g", sae)
    assert meta["format_version"] == 7 and meta["hold_invisible"] == len(skips.hold_invisible)
    assert torch.equal(loaded.hold_invisible, skips.hold_invisible)
    keeps.save(tmp_path / "k")
    assert json.loads((tmp_path / "k" / "guardrail.json").read_text())["format_version"] == 6
    assert dsg.Guardrail.load(tmp_path / "k", sae=sae).hold_invisible is None  # a format-6 file reads as before
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")
    ids = tensors[INVISIBLE_TENSOR]

    def refused(meta_edit: dict, tensor_edit=None, match="invisible|format_version"):
        t = dict(tensors)
        if tensor_edit is not None:
            t[INVISIBLE_TENSOR] = tensor_edit
        edited = {k: v for k, v in (meta | meta_edit).items() if v is not None}
        refuses_edit(tmp_path, edited, t, sae, match)

    word = next(i for i in range(len(tok)) if i not in set(tensors[FILLERS_TENSOR].tolist()))
    refused({"format_version": 6})  # a dsg of format 6 would let invisible tokens thin out the windows
    refused({"hold_invisible": len(ids) + 1})  # the count disagrees with the tensor
    refused({}, ids.flip(0))  # not ascending
    refused({}, torch.sort(torch.cat([ids[1:], torch.tensor([word])])).values)  # a token that carries a word
    refused({}, ids.int())  # not int64
    refused({"hold_fillers": None}, match="hold")  # invisible ids without the filler table
    with pytest.raises(dsg.DSGError, match="hold_fillers"):
        dsg.Guardrail(sae, skips.hook, skips.features, 0.5, window=4, hold=2, hold_invisible=[1])
    with pytest.raises(dsg.DSGError, match="filler"):
        dsg.Guardrail(sae, skips.hook, skips.features, 0.5, window=4, hold=2, hold_fillers=[1], hold_invisible=[2])


def test_a_fitted_gate_passes_over_spacing_between_words_as_over_invisible_tokens(fits):
    """By default the table holds both kinds; doubled spaces, tabs and no-break spaces between the words of a request
    leave its windows as many real tokens that show something as the request written with single spaces, while
    line breaks stay in them. --no-gate-skip-spacing keeps the invisible tokens' table as it was."""
    model, tok, _, both, invisible_only, _ = fits
    assert both.hold_invisible.tolist() == sorted(invisible_token_ids(tok) + spacing_token_ids(tok))
    assert invisible_only.hold_invisible.tolist() == invisible_token_ids(tok)
    assert f"pass over {len(both.hold_invisible)} blank" in both.gate_rule()
    assert len(both.hold_invisible) > len(invisible_only.hold_invisible)

    def shown(guard, text):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        roles = guard.counted(torch.ones_like(ids, dtype=torch.bool), ids)
        return int((roles != rule.INVISIBLE).sum()), int((roles == rule.WORD).sum())

    words = "The exploit injects a malicious payload"
    written = shown(both, words)
    for sep in ("  ", " \t", "\t", "\u00a0 ", "   "):
        assert shown(both, words.replace(" ", sep)) == written, repr(sep)
    # without the spacing table: thinned
    assert shown(invisible_only, words.replace(" ", "  "))[0] > shown(invisible_only, words)[0]
    assert shown(both, words.replace(" ", "\n"))[0] > written[0]  # a line break is not spacing


def test_the_table_with_spacing_is_saved_and_loaded_as_format_7(fits, tmp_path):
    """The wider table is the same tensor: a file with it is format 7, and loads with the same ids and rule."""
    _, _, sae, both, _, _ = fits
    meta, loaded = saved_and_loaded(both, tmp_path / "g", sae)
    assert meta["format_version"] == 7 and meta["hold_invisible"] == len(both.hold_invisible)
    assert torch.equal(loaded.hold_invisible, both.hold_invisible) and loaded.gate_rule() == both.gate_rule()
