"""Multiple-choice scoring of a model, with or without an intervention (guardrails, a weight edit) applied.

Questions come in the WMDP/MMLU JSONL shape `{"question": str, "choices": [str, ...], "answer": int}`; other
fields ("id", "subject", ...) pass through. Two scoring conventions:

  likelihood  (default; what the embedded benchmark uses) the log-probability of each choice as the continuation
              `" " + choice` of the prompt `prompt_format.format(**question)`, tokenized the lm-eval way (encode
              prompt + continuation together, take the tokens past the prompt's). `prediction` is the argmax of the
              summed log-probabilities (lm-eval `acc`); `prediction_norm` the argmax of the sum divided by the
              choice's length in characters (lm-eval `acc_norm`).
  letter      lm-eval's `wmdp_*`/`mmlu` prompt: description + question + "\\nA. c0\\nB. c1 ...\\nAnswer:", scored by
              log P(" A"), log P(" B"), ... (one forward: single-token continuations need no second pass).
              With chat=True, the SAEBench/DSG-paper prompt instead: description + question + the lettered choices
              as the user turn of the tokenizer's chat template, then "Answer: (", and each letter scored by
              max(log P("A"), log P(" A")) at the last position.

Every score is a log-probability. Each question's prompt is computed once: the prompts of a batch are prefilled
(left padding, position ids from the attention mask, so results do not depend on batch size or padding), and all
choices' remaining tokens are then scored in one batched forward that reuses the prompt's KV cache (a question's
choices side by side in its row under a 4D attention mask, where the attention kernel takes one). Prompts of a
batch that share a long prefix (questions padded with the same benign text) prefill it once, its cache and gate
state forked to each (only under a prefix-causal intervention and an attention-only model; equal up to float
rounding).

With a gated intervention (guardrails), the gate judges the prompt alone, so one decision holds for all of a
question's choices (as in lm-eval's shared forward for single-token choices). The prefill runs inside
`intervention.applied(...)`, which decides the gate and clamps the prompt; the choice tokens are then scored with
those decisions held fixed (`session.hold`): in a gated question every flagged token of every choice is clamped, in
an ungated one nothing is. Holding it fixed is deliberate: under the generation rule the running rho of a
continuation can still switch the gate on inside a choice, and sibling continuations forked from one prefill would
share (and advance) one per-row gate state, making a choice's score depend on the choices scored before it.

Given the base model's results (`unguarded=`), a guarded run skips the rest of every batch its gates leave alone:
the forward stops at the last gate's layer and the batch takes the base results, which are exactly what the rest
of the forward would compute (guardrails pass untouched activations through bit for bit). The demo, `dsg eval`
and the comparison bench score the base model first and pass its results.

`base_correct_subset` gives the paper's question subset: the questions the base model answers correctly,
optionally under every ordering of the choices (24 for four choices); accuracy on it is 100 % for the base model
by construction.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
import string
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from tqdm.auto import tqdm

from ..errors import DSGError
from ..files import is_text, jsonl_records, missing, read_user_text
from ..lm.hooks import stopped_after
from ..lm.models import check_fits_context, context_length, evaluating, model_device
from ..lm.text import pad_batch, pad_id_of, position_ids
from ..runtime.intervention import (
    Intervention,
    acted_on,
    as_intervention,
    gates_decided,
    left_alone,
    only_guardrails,
    prefix_causal,
)
from .metrics import BaseRun, QuestionResult, QuestionResults, argmax, check_base_run, correct_indices, inputs_digest

MODES = ("likelihood", "letter")
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
LETTERS = string.ascii_uppercase
MAX_PERMUTATIONS = 24  # all orderings of 4 choices, the paper's check


# ---- questions ------------------------------------------------------------------------------------------------


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Questions from a JSONL file, one `{"question", "choices", "answer"}` object a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else missing(path)
        raise DSGError(f"Question file {str(path)!r} {what}.")
    questions = [check_question(obj, f"{str(path)!r} line {lineno}")
                 for lineno, obj in jsonl_records(read_user_text(path, "question file"), path)]  # fmt: skip
    if not questions:
        raise DSGError(f"Question file {str(path)!r} holds no questions.")
    return questions


def check_question(q: Any, where: str = "question") -> dict:
    """`q` itself if it is a well-formed question, else a DSGError naming `where` and the field."""
    if not isinstance(q, dict):
        raise DSGError(
            f"{where} must be a JSON object with 'question', 'choices' and 'answer', got {type(q).__name__}."
        )
    if not isinstance(q.get("question"), str):
        raise DSGError(f"{where} needs a string field 'question'.")
    if "answer" not in q:
        raise DSGError(f"{where} has no field 'answer'; expected the integer index of the correct choice.")
    choices = q.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DSGError(f"{where} needs a field 'choices' that is a list of strings.")
    if not all(c.strip() for c in choices):
        raise DSGError(f"{where} has an empty choice in 'choices'; an empty continuation scores as no answer.")
    if len(choices) < 2:
        raise DSGError(f"{where} has {len(choices)} choice(s) in 'choices'; a question needs at least 2.")
    if len(choices) > len(LETTERS):
        raise DSGError(f"{where} has {len(choices)} choices; at most {len(LETTERS)} are supported.")
    if any("\x00" in t for t in [q["question"], *choices]):
        raise DSGError(f"{where} holds a NUL character; it looks like binary data, not text.")
    if not is_text([q["question"], *choices]):
        raise DSGError(f"{where} holds an unpaired surrogate (bytes that are not UTF-8, or half of an escaped pair): "
                       "it is not text a tokenizer can read.")  # fmt: skip
    if len({c.strip() for c in choices}) != len(choices):  # "Paris" and "Paris ": the same answer
        raise DSGError(
            f"{where} repeats a choice in 'choices'; identical choices score alike and make the answer ambiguous."
        )
    answer = q.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DSGError(
            f"{where} has 'answer' {answer!r}; expected an integer index into its {len(choices)} choices "
            f"(0..{len(choices) - 1})."
        )
    return q


def permute_choices(q: dict, order: Sequence[int]) -> dict:
    """A copy of `q` whose choices are `[choices[i] for i in order]`, with the answer index moved along."""
    return {**q, "choices": [q["choices"][i] for i in order], "answer": list(order).index(q["answer"])}


def choice_orderings(n: int) -> list[tuple[int, ...]]:
    """All n! orderings of n choices (the identity first); refused beyond 24."""
    if math.factorial(n) > MAX_PERMUTATIONS:
        raise DSGError(
            f"Checking every ordering of {n} choices means {math.factorial(n)} orderings; "
            f"at most {MAX_PERMUTATIONS} (4 choices) are supported."
        )
    return list(itertools.permutations(range(n)))


# ---- prompts --------------------------------------------------------------------------------------------------


_INDEXED = re.compile(r"[A-Za-z_]\w*(\[\d+\])*")  # a field by name, or an item of it by number: {choices[0]}


def _fill(template: str, q: dict, what: str) -> str:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DSGError(
            f"The {what} {template!r} is not a valid format string ({e}); write fields as {{question}}."
        ) from None
    for field in fields:
        name = field.split("[", 1)[0].split(".", 1)[0]
        if name == "answer":
            raise DSGError(f"The {what} {template!r} writes the question's answer into its prompt; scores would read "
                           "the label.")  # fmt: skip
        if "." in field or field.isdigit() or not _INDEXED.fullmatch(field):
            raise DSGError(f"The {what} {template!r} reaches into a field ({{{field}}}); write fields by name, such "
                           "as {question}, or an item by number, such as {choices[0]}.")  # fmt: skip
    try:
        return template.format(**q)
    except (KeyError, IndexError, TypeError) as e:
        raise DSGError(f"The {what} {template!r} refers to {e}, which the question does not have.") from None
    except (ValueError, AttributeError) as e:
        raise DSGError(
            f"The {what} {template!r} is not a valid format string ({e}); write fields as {{question}}."
        ) from None


def letter_prompt(q: dict, description: str = "", chat: bool = False, tokenizer=None) -> str:
    """The letter-mode prompt text. `description` may use the question's fields, e.g. "... about {subject}.\\n\\n".

    chat=False (lm-eval): `description + question.strip() + "\\nA. c0 ...\\nAnswer:"`.
    chat=True (SAEBench/DSG): the user turn `description + question + "\\nA. c0 ..."` in the tokenizer's chat
    template with the generation prompt, followed by `"Answer: ("`.
    """
    lines = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"]))
    pre = _fill(description, q, "description")
    if not chat:
        return f"{pre}{q['question'].strip()}{lines}\nAnswer:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DSGError("chat=True needs a tokenizer with a chat template, and this one has none.")
    user = [{"role": "user", "content": f"{pre}{q['question']}{lines}"}]
    return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) + "Answer: ("


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(tokenizer, context: str, continuation: str, special: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context move to the
    continuation, and the continuation is the tail of the jointly encoded text."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    bare = _encode(tokenizer, context, False)
    whole = _encode(tokenizer, context + continuation, False)
    return _encode(tokenizer, context, special), whole[len(bare) :]


# ---- the scoring engine ---------------------------------------------------------------------------------------


class _Request(NamedTuple):
    prompt: list[int]
    candidates: list[list[int]]  # token ids of each scored continuation (non-empty)


def _keeps_last_logits(model: torch.nn.Module) -> dict:
    """`logits_to_keep=1` where the model takes it: a prefill needs only its last position's logits."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _cache_name(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument (and output field): `cache` from transformers 5.24, `past_key_values`
    before (the old name still works there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _select_rows(cache, rows: torch.Tensor):
    """The KV cache with batch rows `rows` (repeats allowed), for DynamicCache and legacy tuples alike."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)
        return cache
    return tuple(tuple(t[rows] for t in layer) for layer in cache)


SHARED_PREFIX_MIN = 32  # tokens: shorter common prefixes are prefilled with each prompt


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all of `seqs` share."""
    return len(os.path.commonprefix([list(x) for x in seqs])) if seqs else 0


def _shared_prefix(prompts: Sequence[list[int]], share: bool) -> int:
    """The length of the prefix `_prefill` runs once for the whole batch: 0 for none."""
    P = common_prefix_length(prompts) if share and len(prompts) > 1 else 0
    P = min(P, min(len(p) for p in prompts) - 1)
    return P if P >= SHARED_PREFIX_MIN else 0


def _prefill(model, prompts: Sequence[list[int]], pad_id: int, session, share: bool, keep: dict, cache_name: str):
    """(the prefill's output, its attention mask [B, T], whether the shared prefix had a clamped token: [1], None
    for no shared prefix or no gate) for a batch of prompts, inside the intervention's session.

    Prompts that share a long prefix (padded questions: the same benign text before each) have it prefilled once
    and its KV cache and gate state forked to every row, which then continues with its own tokens, left-padded
    after the prefix. Allowed only where the caller says so (`share`: a prefix-causal intervention, since a
    whole-input gate judges each prompt as one piece, on an attention-only model with the prompts inside any
    sliding window, which mid-sequence padding would take slots of). Each row keeps at least one token of its
    own, so its last logits come from its own forward."""
    device = model_device(model)
    P = _shared_prefix(prompts, share)
    if not P:
        ids, mask = (x.to(device) for x in pad_batch(prompts, pad_id, side="left"))
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, **keep)
        return out, mask, None
    head = torch.tensor([prompts[0][:P]], device=device)
    ones = torch.ones_like(head)
    first = model(input_ids=head, attention_mask=ones, position_ids=position_ids(ones), use_cache=True, **keep)
    shared = acted_on(session)  # [1] the shared prefix clamped somewhere
    fork = torch.zeros(len(prompts), dtype=torch.long, device=device)
    cache = _select_rows(getattr(first, cache_name), fork)
    if session is not None:
        session.fork(fork)
    ids, tail = (x.to(device) for x in pad_batch([p[P:] for p in prompts], pad_id, side="left"))
    mask = torch.cat([ones.expand(len(prompts), -1), tail], 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, P:], use_cache=True,
                **{cache_name: cache}, **keep)  # fmt: skip
    return out, mask, shared


def _attention_layout(model: torch.nn.Module) -> tuple[bool, int | None]:
    """(whether every layer is plain full or sliding-window attention, the sliding window in tokens or None).

    Both shortcuts below lean on it: padding in mid-sequence and a custom 4D mask are exact for softmax attention
    over explicit positions, but a sliding window counts pads as positions and a recurrent layer (Mamba, linear
    attention) reads tokens in order whatever the mask says."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    return kinds <= {"full_attention", "sliding_attention"}, window


ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})  # ALiBi always; Falcon and others say so with `alibi`


def _alibi(model: torch.nn.Module) -> bool:
    """Whether the model places tokens by ALiBi, from its 2D attention mask (BLOOM, MPT, Falcon with `alibi`): it
    builds its biases from that mask, so it takes no custom 4D mask, and no explicit positions. Read from the
    config, which a compiled or wrapped model keeps."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "model_type", None) in ALIBI_MODEL_TYPES or getattr(config, "alibi", False)
                or getattr(getattr(config, "attn_config", None), "alibi", False))  # fmt: skip


def _mask_dtype(model: torch.nn.Module, length: int = 0) -> torch.dtype | None:
    """The dtype of a custom 4D attention mask the model's attention takes as it is (transformers 5 passes a 4D
    mask through): bool for SDPA, additive float for eager attention; None for other kernels, older transformers,
    layers other than attention, ALiBi models, and where `length` keys exceed a sliding window (the mask would
    bypass it)."""
    attention_only, window = _attention_layout(model)
    if not attention_only or (window is not None and length > window) or _TRANSFORMERS_MAJOR < 5 or _alibi(model):
        return None
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return torch.bool
    if impl == "eager":
        dtype = getattr(model, "dtype", torch.float32)
        return dtype if dtype.is_floating_point else torch.float32
    return None


def _repeated_choices(model, cache, mask, pairs, cands, pad_id, session, decisions_BG, cache_name) -> list[float]:
    """Summed log-probabilities of the candidates' tokens after their first: one row per candidate, each over its
    prompt's KV cache repeated (any attention kernel)."""
    device = mask.device
    row_P = torch.tensor([b for b, _ in pairs], device=device)
    cids, cmask = pad_batch([c[:-1] for c in cands], pad_id, side="right")
    tgt, _ = pad_batch([c[1:] for c in cands], pad_id, side="right")
    cids, cmask, tgt = cids.to(device), cmask.to(device), tgt.to(device)
    full_mask = torch.cat([mask[row_P], cmask], 1)
    cpos = mask.sum(1)[row_P, None] + torch.arange(cids.shape[1], device=device)
    cache = _select_rows(cache, row_P)
    if decisions_BG is not None:
        # Every choice of a question is scored under its prompt's gate decision (see module docstring).
        session.hold(decisions_BG[row_P])
    logits = model(
        input_ids=cids, attention_mask=full_mask, position_ids=cpos, use_cache=True, **{cache_name: cache}
    ).logits
    lp_PL = logits.float().log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
    return (lp_PL * cmask).sum(1).tolist()


def _grouped_choices(model, cache, mask, pairs, cands, pad_id, session, decisions_BG, cache_name,
                     dtype: torch.dtype) -> list[float]:  # fmt: skip
    """The same sums with all of a question's candidates side by side in its own row, over its prompt's cache as
    it is (no copy per candidate): a 4D attention mask lets each candidate's tokens see the prompt and the tokens
    of the same candidate before them, nothing else; positions restart after the prompt for each candidate.
    Padding queries look at the prompt's last token only (an all-masked row would give NaN). `dtype`: the mask's
    (`_mask_dtype`)."""
    device, B = mask.device, mask.shape[0]
    segments: list[list[tuple[int, list[int]]]] = [[] for _ in range(B)]
    for p, ((b, _), c) in enumerate(zip(pairs, cands)):
        segments[b].append((p, c))
    L = max(sum(len(c) - 1 for _, c in seg) for seg in segments)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    tgt = torch.full((B, L), pad_id, dtype=torch.long)
    owner = torch.full((B, L), -1, dtype=torch.long)  # the pair each position belongs to (-1: padding)
    offset = torch.zeros(B, L, dtype=torch.long)
    for b, seg in enumerate(segments):
        at = 0
        for p, c in seg:
            n = len(c) - 1
            ids[b, at : at + n], tgt[b, at : at + n] = torch.tensor(c[:-1]), torch.tensor(c[1:])
            owner[b, at : at + n], offset[b, at : at + n] = p, torch.arange(n)
            at += n
    ids, tgt, owner, offset = ids.to(device), tgt.to(device), owner.to(device), offset.to(device)
    real = owner >= 0
    q, k = torch.arange(L, device=device)[:, None], torch.arange(L, device=device)[None, :]
    own = (owner[:, :, None] == owner[:, None, :]) & (k <= q) & real[:, :, None]  # [B, L, L]
    past = mask.bool()[:, None, :] & real[:, :, None]  # [B, L, K]
    past[:, :, -1] |= ~real  # padding queries
    allowed = torch.cat([past, own], 2)[:, None]  # [B, 1, L, K + L]
    if dtype != torch.bool:
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if decisions_BG is not None:
        session.hold(decisions_BG)  # every choice under its prompt's gate decision (see module docstring)
    positions = mask.sum(1)[:, None] + offset
    logits = model(input_ids=ids, attention_mask=allowed, position_ids=positions, use_cache=True,
                   **{cache_name: cache}).logits  # fmt: skip
    lp_BL = logits.float().log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
    sums = torch.zeros(len(pairs), device=device).index_add_(0, owner[real], lp_BL[real])
    return sums.tolist()


def _loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[_Request],
    pad_id: int,
    intervention: Intervention | None,
    batch_size: int,
    progress: bool,
    desc: str,
    skip_untouched: bool = False,
) -> tuple[list[list[float]], list[bool | None], list[bool], list[bool | None]]:
    """Summed log-probability of every candidate continuation of every prompt, each prompt's gate decision (None
    where the intervention has no gate), which prompts were skipped, and which had any token clamped (prompt or
    choices; None where the intervention has no gate).

    Prompts are prefilled once, longest first, `batch_size` at a time (a prefix they all share once, see
    `_prefill`); the candidates' tokens after their first are scored in one forward over the prompt cache
    (`_grouped_choices`, or `_repeated_choices` where a custom mask cannot be used).

    With `skip_untouched` (guardrails only), a batch that shares no prefix and that the gates leave alone (none
    gated, no token clamped) stops at the last gate's hook: its prompts are marked skipped, their scores left at
    0, for the caller to take from a run without the intervention, which computed exactly the same batch.
    """
    if batch_size < 1:
        raise DSGError(f"batch_size must be at least 1, got {batch_size}.")
    keep, cache_name = _keeps_last_logits(model), _cache_name(model)
    attention_only, window = _attention_layout(model)
    share = prefix_causal(intervention) and attention_only
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), i))
    scores: list[list[float]] = [[0.0] * len(r.candidates) for r in requests]
    gated: list[bool | None] = [None] * len(requests)
    clamped: list[bool | None] = [None] * len(requests)
    skipped = [False] * len(requests)
    stop_at = gates_decided(model, intervention) if skip_untouched and only_guardrails(intervention) else None
    starts = range(0, len(order), batch_size)
    with evaluating(model):
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            rows = order[start : start + batch_size]
            prompts = [requests[i].prompt for i in rows]
            applied = intervention.applied(model, verify=False) if intervention is not None else nullcontext()
            with applied as session:
                inside = window is None or max(len(p) for p in prompts) <= window
                # a run without the intervention shares a prefix wherever the model allows (attention_only)
                unshared = not _shared_prefix(prompts, attention_only and inside)
                left = stop_at is not None and unshared
                with stopped_after(model, stop_at, lambda _x: left_alone(session)) if left else nullcontext():
                    out, mask, shared = _prefill(model, prompts, pad_id, session, share and inside, keep, cache_name)
                    left = False
                if left:  # stopped: the gates left every prompt of the batch alone
                    for i in rows:
                        gated[i], clamped[i], skipped[i] = False, False, True
                    continue
                decisions_BG = session.decisions() if session is not None else None
                for i, g, c in zip(rows, *_acted(session, decisions_BG, shared, len(rows))):
                    gated[i], clamped[i] = g, c
                first_BV = out.logits[:, -1].float().log_softmax(-1)
                for b, i in enumerate(rows):
                    for k, cand in enumerate(requests[i].candidates):
                        scores[i][k] = float(first_BV[b, cand[0]])
                rest = _rest_of_choices(model, out, mask, [requests[i] for i in rows], pad_id, session, decisions_BG,
                                        cache_name)  # fmt: skip
            for (b, k), s in rest:
                scores[rows[b]][k] += s
            del out
            _check_finite([scores[i] for i in rows], rows)
    return scores, gated, skipped, clamped


def _acted(session, decisions_BG, shared, B: int) -> tuple[list[bool | None], list[bool | None]]:
    """(gated, clamped) for each of a batch's B prompts, None without a gate: gated when the gate is open at the
    prompt's end (its choices are clamped wherever their latents fire), clamped when that or any token of the prompt
    was clamped (near a window the gate opened on and closed after, or in the shared prefix)."""
    if decisions_BG is None:
        return [None] * B, [None] * B
    touched = acted_on(session)
    in_prefix = shared is not None and bool(shared.any())
    gated = [bool(decisions_BG[b].any()) for b in range(B)]
    return gated, [g or in_prefix or bool(touched is not None and touched[b]) for b, g in enumerate(gated)]


def _rest_of_choices(model, out, mask, requests, pad_id, session, decisions_BG, cache_name) -> list:
    """((row, candidate), summed log-probability) of every candidate's tokens after its first, scored over the
    prompts' cache in one forward (`_grouped_choices`) or one per candidate (`_repeated_choices`)."""
    pairs = [(b, k) for b, r in enumerate(requests) for k, c in enumerate(r.candidates) if len(c) > 1]
    if not pairs:
        return []
    cands = [requests[b].candidates[k] for b, k in pairs]
    row = [0] * len(requests)  # the tokens side by side in each question's row
    for (b, _), c in zip(pairs, cands):
        row[b] += len(c) - 1
    dtype = _mask_dtype(model, mask.shape[1] + max(row))
    args = (model, getattr(out, cache_name), mask, pairs, cands, pad_id, session, decisions_BG, cache_name)
    return list(zip(pairs, _grouped_choices(*args, dtype) if dtype is not None else _repeated_choices(*args)))


def _check_finite(scores: Sequence[Sequence[float]], rows: Sequence[int]) -> None:
    """Refuse log-probabilities that are NaN or infinite: every choice would tie at -inf (or compare as NaN), the
    first would win, and a model whose weights hold NaN would score every question whose answer is A correct."""
    for i, row in zip(rows, scores):
        if not all(math.isfinite(s) for s in row):
            raise DSGError(f"The model gave question {i} a log-probability that is not a finite number: its weights "
                           "or activations hold NaN or infinite values (a damaged model folder, or a clamp too large "
                           "for its dtype).")  # fmt: skip


def score_mcq(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    *,
    mode: str = "likelihood",
    prompt_format: str = "{question}",
    description: str = "",
    chat: bool = False,
    intervention: Intervention | Sequence | None = None,
    batch_size: int = 8,
    progress: bool = True,
    verify: bool = True,
    unguarded: Sequence[QuestionResult] | None = None,
) -> list[QuestionResult]:
    """Score multiple-choice questions; see the module docstring for the two modes.

    prompt_format (likelihood mode) and description (letter mode) are filled with the question's fields.
    `intervention`: a guardrail, a list of guardrails, a weight edit, or None. With verify=True it first checks
    that `model` is the model it was made for.

    `unguarded`: this function's results for the same model, questions and options (batch size included)
    without the intervention, as it returned them: they record what they were computed from, and results of other
    questions, options or weights are refused (with verify=False the weights are not compared). Where the
    intervention is guardrails only, a batch whose prompts its gates leave alone (none gated, no token clamped)
    then stops at the last gate's hook and takes those results, which are bit for bit what finishing its forward
    would give: on traffic the gates rarely open (retain questions), a guarded evaluation costs little more than
    the gates.
    """
    if mode not in MODES:
        raise DSGError(f"mode must be one of {MODES}, got {mode!r}.")
    if chat and mode != "letter":
        raise DSGError("chat=True applies to mode='letter' only.")
    if description and mode != "letter":
        raise DSGError("description applies to mode='letter' only; in likelihood mode use prompt_format.")
    if prompt_format != "{question}" and mode != "likelihood":
        raise DSGError("prompt_format applies to mode='likelihood' only; in letter mode use description.")
    questions = [check_question(q, f"questions[{i}]") for i, q in enumerate(questions)]
    intervention = as_intervention(intervention)
    if verify and intervention is not None:
        intervention.check_model(model)

    built = [_request(model, tokenizer, q, mode, prompt_format, description, chat) for q in questions]
    requests, owners = [r for r, _ in built], [o for _, o in built]
    for i, r in enumerate(requests):
        check_fits_context(model, positions_needed(r), f"Question {i} with its longest choice")
    desc = f"mcq ({mode}{', chat' if chat else ''}{', guarded' if intervention is not None else ''})"
    inputs = inputs_digest("mcq", mode, batch_size, [tuple(r) for r in requests], owners,
                           [(q.get("id"), q["answer"]) for q in questions])  # fmt: skip
    if unguarded is not None:
        check_unguarded(unguarded, questions)
        check_base_run(getattr(unguarded, "base_run", None), model, inputs, verify, "score_mcq's results")
    skip = unguarded is not None
    lls, gated, skipped, clamped = _loglikelihoods(model, requests, pad_id_of(tokenizer, model), intervention,
                                                   batch_size, progress, desc, skip_untouched=skip)  # fmt: skip
    results = QuestionResults(
        unguarded[i]._replace(gated=False, clamped=False) if skipped[i]
        else _result(i, q, lls[i], owners[i], gated[i], clamped[i], mode)
        for i, q in enumerate(questions)
    )  # fmt: skip
    if intervention is None:  # what a guarded run given these as `unguarded` checks it against
        results.base_run = BaseRun.of(model, inputs)
    return results


def check_unguarded(unguarded: Sequence[QuestionResult], questions: Sequence[dict]) -> None:
    """Refuse results that cannot be the same questions' (another list, order or choice count); the run they
    record (QuestionResults.base_run) is checked next."""
    if len(unguarded) != len(questions):
        raise DSGError(f"unguarded holds {len(unguarded)} results for {len(questions)} questions.")
    for i, (r, q) in enumerate(zip(unguarded, questions)):
        if not isinstance(r, QuestionResult) or r.gated is not None:
            raise DSGError(f"unguarded[{i}] is not a result of score_mcq without an intervention.")
        if r.index != i or r.id != q.get("id") or r.answer != q["answer"] or len(r.scores) != len(q["choices"]):
            raise DSGError(f"unguarded[{i}] is the result of another question than questions[{i}].")


def positions_needed(request) -> int:
    """How many positions scoring a request reads: its prompt and longest candidate (whose last token is scored,
    never fed)."""
    return len(request.prompt) + max(len(c) for c in request.candidates) - 1


def check_questions_fit(
    model,
    tokenizer,
    questions,
    what: str = "Question",
    *,
    first: int = 0,
    mode: str = "likelihood",
    prompt_format: str = "{question}",
    description: str = "",
    chat: bool = False,
    **_,
) -> None:
    """Refuse, before any forward, a question that score_mcq with these options (by default: likelihood mode, as
    written) would refuse as too long for the model's context, named `what` and its number counted from `first`."""
    label = what[:1].lower() + what[1:]
    for i, q in enumerate(questions, first):
        request, _ = _request(model, tokenizer, check_question(q, f"{label} {i}"), mode, prompt_format, description,
                              chat)  # fmt: skip
        check_fits_context(model, positions_needed(request), f"{what} {i} with its longest choice")


def fits_context(model, tokenizer, questions) -> bool:
    """Whether every question, scored in likelihood mode as written, fits the model's context (score_mcq refuses
    one that does not)."""
    limit = context_length(model)
    return limit is None or all(positions_needed(_as_written(model, tokenizer, q)) <= limit for q in questions)


def _as_written(model, tokenizer, q: dict) -> _Request:
    """The request scoring `q` in likelihood mode with its question as the prompt (the default of score_mcq)."""
    return _request(model, tokenizer, q, "likelihood", "{question}", "", False)[0]


def _request(model, tokenizer, q: dict, mode: str, prompt_format: str, description: str, chat: bool):
    """(the question's prompt ids and candidate continuations, the choice each candidate stands for)."""
    n = len(q["choices"])
    if mode == "likelihood":
        prompt = _fill(prompt_format, q, "prompt_format")
        pairs = [_encode_pair(tokenizer, prompt, " " + c) for c in q["choices"]]
        ids, cands, owner = pairs[0][0], [p[1] for p in pairs], list(range(n))
    elif not chat:
        prompt = letter_prompt(q, description)
        pairs = [_encode_pair(tokenizer, prompt, " " + LETTERS[c]) for c in range(n)]
        ids, cands, owner = pairs[0][0], [p[1] for p in pairs], list(range(n))
    else:
        ids = _encode(tokenizer, letter_prompt(q, description, chat=True, tokenizer=tokenizer), False)
        cands, owner = [], []
        for c in range(n):
            for variant in _letter_tokens(tokenizer, LETTERS[c]):
                cands.append([variant])
                owner.append(c)
    if any(not c for c in cands):
        raise DSGError(f"A choice of question {q['question'][:60]!r} encodes to no tokens.")
    if not ids:  # lm-eval scores a continuation of nothing as a continuation of the end-of-text token
        ids = [pad_id_of(tokenizer, model) if tokenizer.eos_token_id is None else tokenizer.eos_token_id]
    return _Request(ids, cands), owner


def _result(
    i: int, q: dict, lls: list[float], owner: list[int], gated: bool | None, clamped: bool | None, mode: str
) -> QuestionResult:
    scores = [-math.inf] * len(q["choices"])
    for k, c in enumerate(owner):
        scores[c] = max(scores[c], lls[k])  # chat mode: max(log P("A"), log P(" A"))
    if mode == "likelihood":
        norm = [s / max(len(c), 1) for s, c in zip(scores, q["choices"])]
    else:
        norm = list(scores)  # lm-eval's acc_norm divides by len("A") = 1
    pred, pred_norm = argmax(scores), argmax(norm)
    answer = q["answer"]
    return QuestionResult(
        i,
        q.get("id"),
        answer,
        pred,
        pred == answer,
        tuple(scores),
        pred_norm,
        pred_norm == answer,
        tuple(norm),
        gated,
        clamped,
    )


def _letter_tokens(tokenizer, letter: str) -> list[int]:
    """The single-token ids of "A" and " A" (the SAEBench candidates); a DSGError if neither is one token."""
    found = []
    for text in (letter, " " + letter):
        ids = _encode(tokenizer, text, False)
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
    if not found:
        raise DSGError(
            f"The tokenizer has no single token for {letter!r} or {' ' + letter!r}; chat letter mode needs one."
        )
    return found


# ---- the base-correct subset ----------------------------------------------------------------------------------


def base_correct_subset(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    *,
    permutations: bool = False,
    norm: bool = False,
    **score_options,
) -> list[int]:
    """Indices of the questions the model (without an intervention, unless passed in `score_options`) answers
    correctly.

    With permutations=True a question counts only if it is answered correctly under every ordering of its
    choices (24 for four choices; the paper's subset). That matters in letter mode; in likelihood mode each
    choice is scored on its own, so the ordering changes nothing but the cost.
    """
    questions = [check_question(q, f"questions[{i}]") for i, q in enumerate(questions)]
    if not permutations:
        return correct_indices(score_mcq(model, tokenizer, questions, **score_options), norm=norm)
    expanded, owner = [], []
    for i, q in enumerate(questions):
        try:
            orderings = choice_orderings(len(q["choices"]))
        except DSGError as e:
            raise DSGError(f"Question {i}: {e}") from None
        for order in orderings:
            expanded.append(permute_choices(q, order))
            owner.append(i)
    results = score_mcq(model, tokenizer, expanded, **score_options)
    ok = [True] * len(questions)
    for r, i in zip(results, owner):
        ok[i] &= r.correct_norm if norm else r.correct
    return [i for i, good in enumerate(ok) if good]
