"""Windows that pass over the line breaks ending short lines (lm.text.line_break_token_ids, Guardrail.hold_breaks,
rule.SHORT_LINE): which tokens are line breaks, that a request typed one or two words to a line no longer thins out
its windows while prose, code and chat turns keep their line breaks in them, whole or in chunks, and how the table
is fitted, saved and checked."""

from __future__ import annotations

import json

import pytest
import torch

import dsg
from dsg.files import read_safetensors
from dsg.guard import rule
from dsg.guard.integrity import BREAKS_TENSOR, INVISIBLE_TENSOR
from dsg.lm.text import _shows_nothing, filler_token_ids, invisible_token_ids, line_break_token_ids, spacing_token_ids

from tiny import ByteVocabulary, SentencePieceVocabulary, held_fits, refuses_edit, saved_and_loaded

W, F, V, K = rule.WORD, rule.FILLER, rule.INVISIBLE, rule.BREAK  # V: invisible


@pytest.mark.parametrize(
    "raw,gaps_and_breaks",
    [
        (b"\n", True),
        (b"\n\n", True),
        (b" \n", True),
        (b"\r\n", True),
        (b"\n    ", True),  # a line break and the next line's indent
        (b"\n\t\t", True),
        ("\u2028".encode(), True),  # the line separator
        ("\u2028".encode()[:2], True),  # its first bytes may start a line separator
        (b"\x0c", True),
        (b" ", True),  # what shows only spacing shows no more than gaps and line breaks
        (b"\n.", False),
        (b" the", False),
        ("\n—".encode(), False),
        (b"\xff", False),
    ],
)
def test_a_token_shows_only_gaps_and_line_breaks(raw, gaps_and_breaks):
    assert _shows_nothing(raw, breaks=True) is gaps_and_breaks


def test_the_line_break_table_of_a_byte_level_tokenizer(tiny_llama):
    _, tok = tiny_llama
    fillers, invisible, spacing, breaks = (
        set(f(tok)) for f in (filler_token_ids, invisible_token_ids, spacing_token_ids, line_break_token_ids)
    )
    assert breaks and breaks <= fillers and not breaks & (invisible | spacing | set(tok.all_special_ids))
    for text in ("\n", "\n\n", "\r\n"):
        assert all(i in breaks for i in tok(text, add_special_tokens=False)["input_ids"]), repr(text)
    for text in ("exploit", " . ?", "  ", "\t"):
        assert not any(i in breaks for i in tok(text, add_special_tokens=False)["input_ids"]), repr(text)


def test_the_line_break_tables_of_other_vocabularies():
    assert line_break_token_ids(ByteVocabulary()) == [7]  # " \n"; not the no-break space or the tabs
    assert line_break_token_ids(SentencePieceVocabulary()) == []  # "▁" is spacing, and it holds no line break


def _breaks(roles: list[int], line=None):
    roles_BT = torch.tensor([roles], dtype=torch.int8)
    line = torch.full((1,), rule._OTHER) if line is None else line
    ended, after = rule._short_line_breaks(torch.ones_like(roles_BT, dtype=torch.bool), roles_BT, line)
    return ended[0].int().tolist(), after


def test_a_line_break_is_passed_over_where_it_ends_a_short_line_of_words():
    """A line of one to SHORT_LINE word tokens (invisible ones count nothing) ends in a passed-over break; a longer
    line, one that shows punctuation or a special token, an empty one and a sequence's first line keep theirs."""
    assert rule.SHORT_LINE == 3
    roles = [W, K, W, K, W, W, K, W, W, W, K, W, W, W, W, K, W, F, K, K, W, V, W, K]
    passed = [0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert _breaks(roles)[0] == passed
    assert _breaks([W, K])[0] == [0, 0]  # the first line: what came before the sequence is unseen
    assert _breaks([W, K], torch.zeros(1, dtype=torch.long))[0] == [0, 1]  # a chunk that continues a fresh line
    # a token that is not real (a chat template's special token, padding) makes its line not short
    roles_BT = torch.tensor([[F, K, W, W, K]], dtype=torch.int8)
    real = torch.tensor([[True, True, False, True, True]])
    assert rule._short_line_breaks(real, roles_BT, torch.zeros(1, dtype=torch.long))[0].int().tolist() == [[0] * 5]
    # without roles (bool or None) no break is passed over
    assert not rule._short_line_breaks(real, roles_BT == W, torch.zeros(1, dtype=torch.long))[0].any()


def test_the_line_state_carries_across_chunks():
    roles = [F, K, W, W, K, W, V, K, W, W, W, W, K, W, K, K, W]
    whole, line = _breaks(roles)
    assert int(line[0]) == 1
    for cut in range(len(roles) + 1):
        first, between = _breaks(roles[:cut])
        second, end = _breaks(roles[cut:], between)
        assert first + second == whole and torch.equal(end, line), cut


def test_a_request_one_word_to_a_line_reads_as_written():
    """A request of 10 words, 6 of them flagged, judged with windows of 4: as written its windows open the gate.
    One word to a line, the line breaks take half of every window and open nothing when the windows hold them;
    passing over them gives every word's window its value as written, whole or one token at a time. Two words to
    a line read the same; five thin the windows as before."""
    words = [False, True, True, True, False, True, True, False, True, False]
    args = (0.5, 4, None, 8, None)
    plain = torch.tensor([words])
    _, written = rule.window_gate(plain, torch.ones_like(plain), None, *args, counted_BT=torch.ones_like(plain))

    def split(every: int):
        flags, roles = [False], [F]  # the turn's opening line: not short
        for j, f in enumerate(words):
            flags, roles = flags + [f], roles + [W]
            if (j + 1) % every == 0:
                flags, roles = flags + [False], roles + [K]
        return torch.tensor([flags]), torch.tensor([roles], dtype=torch.int8)

    spread, roles = split(1)
    real = torch.ones_like(spread)
    clamp, passed = rule.window_gate(spread, real, None, *args, counted_BT=roles)
    kept = torch.where(roles == K, F, roles).to(torch.int8)  # the same tokens, the breaks plain fillers
    _, thinned = rule.window_gate(spread, real, None, *args, counted_BT=kept)
    assert written.gated.tolist() == [True] and float(written.peak[0]) == 0.75
    assert thinned.gated.tolist() == [False] and float(thinned.peak[0]) <= 0.5
    assert passed.gated.tolist() == [True] and float(passed.peak[0]) == float(written.peak[0])
    state, pieces = None, []
    for t in range(spread.shape[1]):
        c, state = rule.window_gate(spread[:, t : t + 1], real[:, t : t + 1], state, *args,
                                    counted_BT=roles[:, t : t + 1])  # fmt: skip
        pieces.append(c)
    assert torch.equal(torch.cat(pieces, 1), clamp) and torch.equal(state.recent, passed.recent)
    assert float(state.peak[0]) == float(passed.peak[0]) and torch.equal(state.line, passed.line)
    two = rule.window_gate(*split(2)[:1], torch.ones_like(split(2)[0]), None, *args, counted_BT=split(2)[1])[1]
    assert float(two.peak[0]) == float(written.peak[0])
    five = rule.window_gate(*split(5)[:1], torch.ones_like(split(5)[0]), None, *args, counted_BT=split(5)[1])[1]
    five_kept = torch.where(split(5)[1] == K, F, split(5)[1]).to(torch.int8)
    assert float(five.peak[0]) == float(
        rule.window_gate(split(5)[0], torch.ones_like(split(5)[0]), None, *args, counted_BT=five_kept)[1].peak[0]
    )


@pytest.fixture(scope="module")
def fits(tiny_llama):
    """(model, tok, sae, the default fit: windows pass over the line breaks of short lines, the same without)."""
    model, tok = tiny_llama
    return model, tok, *held_fits(model, tok, dict(gate_skip_short_lines=False))


def test_a_fitted_gate_holds_the_line_break_table_and_names_its_roles(fits):
    model, tok, _, lines, plain = fits
    assert plain.hold_breaks is None and lines.hold_breaks.tolist() == line_break_token_ids(tok)
    assert "line breaks after lines of at most 3 word tokens" in lines.gate_rule()
    assert "line breaks" not in plain.gate_rule() and "lines" in repr(lines) and "lines" not in repr(plain)
    ids = torch.tensor([tok("scan\nthe\nports.\n", add_special_tokens=False)["input_ids"]])
    real = torch.ones_like(ids, dtype=torch.bool)
    roles, before = lines.counted(real, ids), plain.counted(real, ids)
    at_breaks = torch.isin(ids, lines.hold_breaks)
    assert at_breaks.sum() == 3 and (roles[at_breaks] == rule.BREAK).all() and (before[at_breaks] == rule.FILLER).all()
    assert torch.equal(roles == rule.WORD, before == rule.WORD)


def test_one_word_to_a_line_leaves_a_fitted_gates_windows_the_words_written(fits):
    """How many tokens the windows hold of a request typed one word to a line, after the turn's first line: as many
    as of the request written in one line, and one more for a break that ends a long line."""
    _, tok, _, lines, plain = fits
    words = "The symbol of the capital is with an"  # one token a word in the tiny vocabulary

    def held(guard, text):
        ids = torch.tensor([tok(f"Question:\n{text}", add_special_tokens=False)["input_ids"]])
        real = torch.ones_like(ids, dtype=torch.bool)
        roles = guard.counted(real, ids)
        return int(rule.in_windows(real, roles, torch.full((1,), rule._OTHER))[0].sum())

    written = held(lines, words)
    assert held(lines, words.replace(" ", "\n ")) == written  # a line break before every space
    assert held(plain, words.replace(" ", "\n ")) == written + words.count(" ")
    # a line of five words keeps the break that ends it
    assert held(lines, words.replace("capital ", "capital\n")) == written + 1


def test_the_line_break_table_is_saved_as_format_8_and_checked(fits, tmp_path):
    _, _, sae, lines, plain = fits
    meta, loaded = saved_and_loaded(lines, tmp_path / "g", sae)
    assert meta["format_version"] == 8 and meta["hold_breaks"] == len(lines.hold_breaks)
    assert torch.equal(loaded.hold_breaks, lines.hold_breaks) and loaded.gate_rule() == lines.gate_rule()
    assert saved_and_loaded(plain, tmp_path / "p", sae)[0]["format_version"] == 7
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")

    def refused(edit_meta=None, edit_tensors=None, match="") -> None:
        m, t = json.loads(json.dumps(meta)), dict(tensors)
        (edit_meta or (lambda m: None))(m)
        (edit_tensors or (lambda t: None))(t)
        refuses_edit(tmp_path, m, t, sae, match)

    refused(lambda m: m.update(format_version=7), match="format_version")  # an older dsg would let breaks thin
    refused(lambda m: m.update(hold_breaks=len(lines.hold_breaks) + 1), match="shape")
    refused(lambda m: m.update(hold_breaks="all"), match="count")
    refused(edit_tensors=lambda t: t.update({BREAKS_TENSOR: t[BREAKS_TENSOR].flip(0)}), match="ascending")

    def swapped_in(i: torch.Tensor):  # the table with its first id replaced by `i`
        return lambda t: t.update({BREAKS_TENSOR: torch.cat([i, t[BREAKS_TENSOR][1:]]).sort().values})

    refused(edit_tensors=swapped_in(tensors[INVISIBLE_TENSOR][:1]), match="invisible")
    word = torch.tensor([i for i in range(1000) if i not in set(tensors["hold.fillers"].tolist())][:1])
    refused(edit_tensors=swapped_in(word), match="filler")
    with pytest.raises(dsg.DSGError, match="hold_fillers"):
        dsg.Guardrail(sae, lines.hook, lines.features, 0.5, window=4, hold=2, hold_breaks=[1])
    with pytest.raises(dsg.DSGError, match="invisible"):
        dsg.Guardrail(sae, lines.hook, lines.features, 0.5, window=4, hold=2, hold_fillers=[1, 2], hold_invisible=[2],
                      hold_breaks=[2])  # fmt: skip


def test_padding_is_no_line_to_the_gate_while_a_special_token_ends_one():
    """A continuation left-padded beside longer rows (a shared prefix forked to several prompts, a decoding step
    beside a longer chunk) reads as the same tokens unpadded: padding, which the runtimes mark INVISIBLE, weighs
    nothing in a line, while a special token that is not real makes its line not short."""
    args = (0.5, 4, None, 8, None)
    prefix_roles = torch.tensor([[F, K, W]], dtype=torch.int8)  # a line of one word so far
    prefix = torch.tensor([[False, False, True]])
    _, after_prefix = rule.window_gate(prefix, torch.ones_like(prefix), None, *args, counted_BT=prefix_roles)
    assert int(after_prefix.line[0]) == 1
    roles = torch.tensor([[K, W, K, W, W]], dtype=torch.int8)
    flags = torch.tensor([[False, True, False, True, True]])
    plain = rule.window_gate(flags, torch.ones_like(flags), after_prefix, *args, counted_BT=roles)
    pad_roles = torch.cat([torch.full((1, 2), V, dtype=torch.int8), roles], 1)
    pad_flags = torch.cat([torch.zeros(1, 2, dtype=torch.bool), flags], 1)
    real = torch.cat([torch.zeros(1, 2, dtype=torch.bool), torch.ones_like(flags)], 1)
    padded = rule.window_gate(pad_flags, real, after_prefix, *args, counted_BT=pad_roles)
    assert torch.equal(padded[0][:, 2:], plain[0])
    assert all(torch.equal(x, y) for x, y in zip(padded[1], plain[1], strict=True))
    # the same two positions as a special token (FILLER, not real): the line the prefix left is not short any more
    special = rule.window_gate(pad_flags, real, after_prefix, *args,
                               counted_BT=torch.cat([torch.full((1, 2), F, dtype=torch.int8), roles], 1))  # fmt: skip
    assert not torch.equal(special[1].recent, plain[1].recent)
    # a chunk that arrives without roles (a forward given embeddings) leaves the line unseen
    _, unseen = rule.window_gate(flags, torch.ones_like(flags), after_prefix, *args, counted_BT=None)
    assert int(unseen.line[0]) >= rule._OTHER


def test_counted_marks_padding_invisible_and_the_runtime_finds_it(fits):
    from dsg.lm.text import attended_tokens

    _, tok, _, lines, _ = fits
    ids = torch.tensor([tok("a\nb\n", add_special_tokens=False)["input_ids"]] * 2)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, :2] = False
    padding = torch.zeros_like(real)
    padding[1, :2] = True
    roles = lines.counted(real, ids, padding)
    assert (roles[1, :2] == rule.INVISIBLE).all() and torch.equal(roles[0, 2:], roles[1, 2:])
    assert torch.equal(lines.counted(real, ids)[0], roles[0])
    # a 2D mask over cached and new positions: the new tokens' own columns; a 4D mask: where a token sees itself
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]])
    assert attended_tokens(mask, (2, 3)).tolist() == [[True, True, True], [False, False, True]]
    four = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    four[0, 0, 1, 3] = True
    assert attended_tokens(four, (1, 2)).tolist() == [[False, True]]
    assert attended_tokens(None, (1, 2)).tolist() == [[True, True]]
