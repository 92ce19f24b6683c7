"""Text corpora: reading files, tokenizing into model-sized windows, batching, and deciding which tokens count.

A corpus file is `.txt` (one document per blank-line-separated block) or `.jsonl` (one JSON object per line with a
`"text"` field). A document longer than `max_length` tokens is split into consecutive windows, so statistics use
all the text without ever building a sequence the model cannot take.

"Real" tokens are the ones statistics and the gate look at: attended (not padding), not a special token (BOS,
EOS, PAD of the model's config), and not the first attended position of a sequence, which is an attention sink
with outsized norm whether or not the tokenizer put a BOS there.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import operator
import os
import random
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..config import is_index
from ..errors import DSGError
from ..files import jsonl_records, missing, read_user_text


def read_corpus(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Documents from a `.txt` file (blocks split by blank lines) or a `.jsonl` file: each line's `field`, or, for a
    line without it, a multiple-choice question's stem (`{"question": ..., "choices": [...], "answer": 0}`, as `dsg
    data export` writes question files), so that a question file can be a corpus: the gate is calibrated on
    prompts shaped like the traffic it judges."""
    path = Path(path)
    if path.is_dir():
        raise DSGError(f"Corpus {str(path)!r} is a directory; pass a .txt or .jsonl file.")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else missing(path)
        raise DSGError(f"Corpus file {str(path)!r} {what}.")
    raw = read_user_text(path, "corpus file")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, obj in jsonl_records(raw, path):
            text = obj.get(field, _question_stem(obj)) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                answer = obj.get("answer") if isinstance(obj, dict) else None
                if field not in obj and "choices" in obj and answer is not None and type(answer) is not int:
                    raise DSGError(f"{str(path)!r} line {lineno} is a multiple-choice question whose 'answer' is "
                                   f"{answer!r}, not a choice's index (0, 1, ...); a question is read as its "
                                   "stem only with an index.")  # fmt: skip
                raise DSGError(f"{str(path)!r} line {lineno} has no string field {field!r} (or 'question').")
            docs.append(text)
    elif path.suffix == ".txt":
        # a byte-order mark opening a line is a joined file's (cat a b); a blank line may hold spaces or tabs
        raw = raw.replace("\n\ufeff", "\n")
        docs = [block.strip() for block in re.split(r"\n[^\S\n]*\n", raw)]
    else:
        raise DSGError(f"Corpus file {str(path)!r} must end in .txt or .jsonl.")
    nul = next((i for i, d in enumerate(docs) if "\x00" in d), None)
    if nul is not None:
        raise DSGError(
            f"Corpus file {str(path)!r} holds a NUL byte (document {nul + 1}); it looks like a binary file, not text."
        )
    docs = [d for d in docs if not all(c.isspace() or _is_invisible(c) for c in d)]  # nothing shows: blank
    if not docs:
        raise DSGError(f"Corpus file {str(path)!r} holds no documents.")
    return docs


def corpus_sha256(texts: Sequence[str]) -> str:
    """One hash of a list of texts, in their order (a lone surrogate, which JSON can carry, is hashed as written)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def _question_stem(record: dict) -> str | None:
    """A multiple-choice question record's stem (a string question, a list of choices, an integer answer), else
    None: a question-and-answer pair is not read as its question alone."""
    answer, choices = record.get("answer"), record.get("choices")
    if isinstance(choices, list) and isinstance(answer, int) and not isinstance(answer, bool):
        return record.get("question")
    return None


def special_token_ids(model: torch.nn.Module) -> list[int]:
    """BOS, EOS and PAD ids from the model's config and generation config."""
    return special_ids_in(getattr(model, "config", None), getattr(model, "generation_config", None))


def special_ids_in(*configs) -> list[int]:
    """BOS, EOS and PAD ids named by configs (objects with those attributes, or dicts; None is skipped)."""
    ids: set[int] = set()
    for cfg in configs:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    return sorted(ids)


def special_token_strings(tokenizer) -> list[str]:
    """The text of the tokenizer's special tokens (those it lists, and added tokens marked special that it does not
    list, such as Llama 3's header tokens), longest first: what a chat template reads as its own markup if a user's
    text holds it. Added tokens marked non-special (some templates use them as tags) are not among them."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    specials |= {str(getattr(t, "content", t)) for t in added.values() if getattr(t, "special", False)}
    return sorted((t for t in specials if t.strip()), key=lambda t: (-len(t), t))


def special_token_in(text: str, specials: Sequence[str]) -> str | None:
    """The special token (one of `specials`: special_token_strings) that `text` holds first, the longest where
    several start there; None for none. One regular-expression pass over the text."""
    if not specials:
        return None
    found = _alternation(tuple(specials)).search(text)
    return found.group(0) if found else None


@functools.lru_cache(maxsize=8)
def _alternation(specials: tuple[str, ...]) -> re.Pattern:
    """The strings as one pattern, longest first, so a match is the longest of those starting at its place."""
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def real_token_mask(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    special_ids: Sequence[int],
    shape: tuple[int, int] | None = None,
    continuation: bool = False,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [B, T]: attended, non-special tokens, excluding each sequence's first attended position.

    With `continuation=True` (a forward that continues a KV cache) a sequence's first attended position is found
    in a 2D mask over the cached and new positions (HF's convention): it lies among the new tokens only for a
    left-padded row whose first real token arrives in a later chunk of its prompt. Without such a mask the new
    tokens hold none. A 4D attention mask (several continuations side by side in one row, eval.mcq) marks a token
    attended where it may see itself: at column `columns[t]` for the t-th new token (its cache position: a static
    KV cache lays its mask over all of its slots), else at the last T columns.
    """
    if input_ids is not None:
        shape = tuple(input_ids.shape)
    T = shape[1]
    mask = attended_tokens(attention_mask, shape, columns, input_ids.device if input_ids is not None else None)
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = mask  # the new tokens' own: read below as a 2D mask over them
    if input_ids is not None and len(special_ids):
        mask = mask & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    if not continuation:
        attended = attention_mask[:, -T:].bool() if attention_mask is not None else torch.ones_like(mask)
    elif attention_mask is not None and attention_mask.shape[1] > T:  # 2D, over the cached and new positions
        attended = attention_mask.bool()
    else:  # no mask of the cached positions (a 4D one is read above as the new tokens' only)
        attended = None
    if attended is not None:  # each row's first attended position, where it is among these tokens
        mask = mask & ~((attended.int().cumsum(1) == 1) & attended)[:, -T:]
    return mask


def attended_tokens(
    attention_mask: torch.Tensor | None, shape: tuple[int, int], columns: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Bool [B, T]: the new tokens that are not padding. A 2D mask covers the cached and new positions (its last T
    columns are the new tokens'); a custom 4D [B, 1, T, past + T] mask (bool, or additive float) marks a token
    attended where it sees itself (see real_token_mask for `columns`); no mask: every token."""
    B, T = shape
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if attention_mask.ndim == 4:
        at = torch.arange(T, device=attention_mask.device)
        cols = attention_mask.shape[-1] - T + at if columns is None else columns.to(attention_mask.device).long()
        diag = attention_mask[:, 0, at, cols]
        return diag if diag.dtype == torch.bool else diag == 0
    return attention_mask[:, -T:].bool()


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token windows of at most `max_length` tokens; long documents become several windows."""
    if max_length < 2:
        raise DSGError(f"max_length must be at least 2 tokens, got {max_length}.")
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) >= 2:
                out.append(window)
    return out


def subsample(items: Sequence, n: int | None, seed: int) -> list:
    """At most `n` items, drawn with a fixed seed, in their original order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def batches(
    seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, model: torch.nn.Module | None = None
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted right-padded batches: (original indices, input_ids, attention_mask).

    Sorting by length keeps padding small; every consumer masks padding, so results do not depend on it. The
    arguments are checked before the first batch (with `model`, the ids against its vocabulary), so that a bad one
    is one clear error and never an empty or partial result.
    """
    check_token_sequences(seqs, batch_size, pad_id, model)
    return _batches(seqs, batch_size, pad_id)


def check_token_sequences(
    seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, model: torch.nn.Module | None = None
) -> None:
    """A DSGError for a batch size that is not a positive integer, a sequence that is text or empty, or a token
    id (pad_id included) that is not an integer in the model's vocabulary."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DSGError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__len__"):
        raise DSGError(f"The sequences must be a list of token-id lists, not a {type(seqs).__name__}.")
    try:
        embeddings = model.get_input_embeddings() if model is not None else None
    except (AttributeError, NotImplementedError):  # a model that does not say: the ids are not checked against it
        embeddings = None
    vocab = getattr(embeddings, "num_embeddings", None)
    where = f" to {vocab - 1} (the model's vocabulary)" if vocab else ""
    for i, seq in enumerate(seqs):
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
            raise DSGError(f"Sequence {i} is a {type(seq).__name__}, not a list of token ids; tokenize it first.")
        if len(seq) == 0:
            raise DSGError(f"Sequence {i} is empty: it holds no token for the model to read.")
        try:
            ids = torch.as_tensor(seq)
            exact = ids.ndim == 1 and not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool
            low, high = (int(ids.min()), int(ids.max())) if exact else (-1, -1)
        except (TypeError, ValueError, RuntimeError):
            low, high, exact = -1, -1, False
        if not exact or low < 0 or (vocab and high >= vocab):
            raise DSGError(f"Sequence {i} holds a token id that is not an integer from 0{where}: tokenize with "
                           "the model's tokenizer.")  # fmt: skip
    pad = operator.index(pad_id) if is_index(pad_id) else None
    padded = len({len(seq) for seq in seqs}) > 1  # the pad id is fed only where lengths differ
    if pad is None or pad < 0 or (padded and vocab and pad >= vocab):
        raise DSGError(f"pad_id must be an integer token id from 0{where}, not {pad_id!r}.")


def _batches(seqs, batch_size: int, pad_id: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        yield idx, ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each sequence's first attended token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_id_of(tokenizer, model: torch.nn.Module | None = None) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            if isinstance(value, int):
                return value
    return 0


# ---- which tokens carry words ------------------------------------------------------------------------------------

# letters by their Unicode category that show as blank space (Hangul fillers): counted as no word
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
_UTF8_LOWEST = {2: 0x80, 3: 0x800, 4: 0x10000}  # the lowest code point an n-byte UTF-8 sequence may encode


def filler_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that carry no letter or digit: whitespace, punctuation, symbols, invisible format
    characters (zero-width spaces and joiners, byte-order marks, soft hyphens), Hangul fillers, and the tokenizer's
    special tokens.

    Byte-level tokenizers (GPT-2's alphabet: SmolLM2, Llama 3, Qwen) split a character that is not in their
    vocabulary into byte tokens, and SentencePiece ones (`<0xE2>`) fall back to bytes the same way. A token that
    starts such a character carries a word only when every character starting with those bytes is a letter,
    digit or combining mark (so a CJK ideograph or a Cyrillic letter counts once, where it starts, while the first
    bytes of a zero-width space, a word joiner or an emoji never do); a token of continuation bytes only finishes a
    character and carries none. A token whose bytes are not UTF-8 counts as carrying a word."""
    return sorted({i for i, raw in _vocabulary_bytes(tokenizer) if raw is None or not _carries_word(raw)})


def invisible_token_ids(tokenizer) -> list[int]:
    """Ids of the fillers that show nothing: tokens made only of invisible characters (format characters such as
    zero-width spaces, joiners, direction marks, byte-order marks and soft hyphens; variation selectors; Hangul
    fillers), of continuation bytes that finish a character an earlier token started, or of the first bytes of a
    character that may be invisible (a zero-width space is two tokens in SmolLM2's vocabulary: "\xe2\x80" and
    "\x8b"). A windowed gate passes over them, so that invisible characters typed between the words of a request
    cannot thin out its windows, while text without them reads as before. Whitespace, punctuation and the
    tokenizer's special tokens are not among them."""
    return sorted(i for i, raw in _vocabulary_bytes(tokenizer) if _is_blank_filler(raw) and _shows_nothing(raw))


def spacing_token_ids(tokenizer) -> list[int]:
    """Ids of the fillers that show only spacing within a line: tokens made of spaces and tabs (and the other
    Unicode spaces that break no line: no-break, en, em, thin, ideographic), possibly beside invisible characters
    or the byte pieces of either, that invisible_token_ids does not already hold. A windowed gate passes over them
    too, so that two spaces or a tab typed between the words of a request cannot thin out its windows. A Unicode
    space that the vocabulary splits into bytes is passed over only with the invisible table beside this one: its
    pieces are there (in SmolLM2's vocabulary, those of the en, em and thin spaces). "\n" and "\r" are not among
    them: they shape prompts, chat turns and code, and the windows keep them (the rare Unicode line separators
    U+0085, U+2028 and U+2029 split into byte pieces that the invisible table holds)."""
    return sorted(
        i
        for i, raw in _vocabulary_bytes(tokenizer)
        if _is_blank_filler(raw) and not _shows_nothing(raw) and _shows_nothing(raw, spacing=True)
    )


def line_break_token_ids(tokenizer) -> list[int]:
    """Ids of the fillers that show only line breaks and spacing: tokens of whitespace (possibly beside invisible
    characters) that hold at least one "\n", "\r" or other line break, such as "\n", "\n\n" or a line break and
    the next line's indent. A windowed gate passes over one where it ends a short line of words (guard.rule), so
    that a request typed one or two words to a line cannot thin out its windows."""
    return sorted(
        i
        for i, raw in _vocabulary_bytes(tokenizer)
        if _is_blank_filler(raw) and not _shows_nothing(raw, spacing=True) and _shows_nothing(raw, breaks=True)
    )


def _is_blank_filler(raw: bytes | None) -> bool:
    """Whether a vocabulary entry (_vocabulary_bytes) may be in a table of blank tokens: a filler
    (filler_token_ids) that is not a special token."""
    return raw is not None and not _carries_word(raw)


def _vocabulary_bytes(tokenizer) -> Iterator[tuple[int, bytes | None]]:
    """(id, the token's bytes) for every token of the tokenizer's vocabulary; None for its special tokens."""
    vocab = tokenizer.get_vocab()
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    literal = {int(i) for i in added}  # added tokens are written as they read, not in a byte alphabet
    byte_of = _byte_level_alphabet(vocab, literal)
    for token, i in vocab.items():
        if i in special:
            yield i, None
            continue
        raw = _token_bytes(token, None if i in literal else byte_of)
        if raw is None:
            raw = tokenizer.convert_tokens_to_string([token]).encode("utf-8", "surrogatepass")
        yield i, raw


def _byte_level_alphabet(vocab: dict, literal: set) -> dict[str, int] | None:
    """GPT-2's byte-to-character table inverted, when nearly every token of the vocabulary is written in it (a
    SentencePiece vocabulary's "▁" is not)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    plain = [t for t, i in vocab.items() if i not in literal and isinstance(t, str)]
    inside = sum(all(c in byte_of for c in t) for t in plain)
    return byte_of if plain and inside >= 0.99 * len(plain) else None


_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(token, byte_of: dict[str, int] | None) -> bytes | None:
    """A token's bytes, or None when only the tokenizer can say (then it is decoded)."""
    if isinstance(token, bytes):  # a vocabulary of byte strings (tiktoken-style)
        return token
    if byte_of is not None and all(c in byte_of for c in token):
        return bytes(byte_of[c] for c in token)
    match = _SENTENCEPIECE_BYTE.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    if byte_of is None:  # SentencePiece pieces, and added tokens, read as written ("▁" is a space)
        return token.replace("\u2581", " ").encode("utf-8", "surrogatepass")
    return None


def _is_word_character(c: str) -> bool:
    return unicodedata.category(c)[0] in "LN" and c not in _BLANK_LETTERS


def _carries_word(raw: bytes) -> bool:
    """Whether a token's bytes hold (or start) a letter or digit; leading continuation bytes finish a character
    that an earlier token started and are skipped."""
    i = 0
    while i < len(raw) and 0x80 <= raw[i] < 0xC0:
        i += 1
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(raw[i:], final=False)
    if any(c == "\ufffd" or _is_word_character(c) for c in text):
        return True
    pending = decoder.getstate()[0]  # the bytes of a character the next token finishes
    return bool(pending) and _prefix_starts_word(pending)


@functools.cache
def _prefix_starts_word(prefix: bytes) -> bool:
    """Whether every assigned character whose UTF-8 encoding starts with `prefix` (a lead byte and fewer
    continuation bytes than it needs) is a letter, digit or combining mark: a fragment that may start a blank or
    invisible character counts as none."""
    chars = _characters_starting(prefix)
    return bool(chars) and all(_is_word_character(c) or unicodedata.category(c)[0] == "M" for c in chars)


def _is_invisible(c: str) -> bool:
    """A character that shows nothing: a format character (Cf), a variation selector, the combining grapheme
    joiner, or a Hangul filler."""
    o = ord(c)
    return (unicodedata.category(c) == "Cf" or c in _BLANK_LETTERS or o == 0x034F or 0xFE00 <= o <= 0xFE0F
            or 0xE0100 <= o <= 0xE01EF)  # fmt: skip


def _is_spacing(c: str) -> bool:
    """A character that shows only a gap within a line: whitespace that is not a line break (a space, a tab, a
    no-break, en, em, thin or ideographic space)."""
    return c.isspace() and len(f"a{c}b".splitlines()) == 1


def _shows_nothing(raw: bytes, spacing: bool = False, breaks: bool = False) -> bool:
    """Whether a token's bytes show nothing (with `spacing`: nothing but a gap within a line; with `breaks`, nothing
    but gaps and line breaks): leading continuation bytes (they finish a character an earlier token started), then
    only invisible (or spacing, or whitespace) characters, then at most the first bytes of a character that may
    be one."""
    i = 0
    while i < len(raw) and 0x80 <= raw[i] < 0xC0:
        i += 1
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    shown = decoder.decode(raw[i:], final=False)
    if not all(_is_invisible(c) or spacing and _is_spacing(c) or breaks and c.isspace() for c in shown):
        return False  # a visible character, or bytes that are not UTF-8 (U+FFFD)
    pending = decoder.getstate()[0]
    return not pending or _prefix_may_start_blank(pending, spacing or breaks)


@functools.cache
def _prefix_may_start_blank(prefix: bytes, spacing: bool = False) -> bool:
    """Whether some character whose UTF-8 encoding starts with `prefix` is invisible (_is_invisible), or with
    `spacing` a gap within a line (_is_spacing)."""
    return any(_is_invisible(c) or spacing and _is_spacing(c) for c in _characters_starting(prefix))


def _characters_starting(prefix: bytes) -> list[str]:
    """The assigned characters whose UTF-8 encoding starts with `prefix` (a lead byte and fewer continuation bytes
    than it needs)."""
    lead = prefix[0]
    n = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    code = lead & (0x7F >> n)
    for b in prefix[1:]:
        code = (code << 6) | (b & 0x3F)
    free = 6 * (n - len(prefix))
    lo, hi = max(code << free, _UTF8_LOWEST[n]), min((code + 1) << free, 0x110000)
    return [chr(c) for c in range(lo, hi) if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
