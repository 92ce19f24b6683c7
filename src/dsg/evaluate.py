"""Multiple-choice accuracy and perplexity of a model, with or without guardrails attached.

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
choices' remaining tokens are then scored in one batched forward that reuses the prompt's KV cache.

With guardrails, the gate judges the prompt alone, so one decision holds for all of a question's choices (as in
lm-eval's shared forward for single-token choices). The prefill runs inside `dsg.attach`, which decides the gate
and clamps the prompt; the choice tokens are then scored with that decision held fixed: in a gated question every
flagged token of every choice is clamped, in an ungated one nothing is. Holding it fixed is deliberate: under
`attach`'s generation rule the running rho of a continuation can still switch the gate on inside a choice, and
sibling continuations forked from one prefill would share (and advance) one per-row gate state, making a choice's
score depend on the choices scored before it.

`base_correct_subset` gives the paper's question subset: the questions the unguarded model answers correctly,
optionally under every ordering of the choices (24 for four choices); accuracy on it is 100 % for the base model
by construction. `perplexity` measures held-out text, token-weighted, with each window judged as one prompt.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .corpus import batches, pad_batch, pad_id_of, tokenize
from .errors import DSGError
from .guardrail import Guardrail, attach

MODES = ("likelihood", "letter")
LETTERS = string.ascii_uppercase
MAX_PERMUTATIONS = 24  # all orderings of 4 choices, the paper's check


# ---- questions ------------------------------------------------------------------------------------------------


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Questions from a JSONL file, one `{"question", "choices", "answer"}` object a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DSGError(f"Question file {str(path)!r} does not exist.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DSGError(f"Cannot read question file {str(path)!r} as UTF-8 text: {e}.") from None
    questions = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DSGError(f"{where} is not valid JSON: {e.msg}.") from None
        questions.append(check_question(obj, where))
    if not questions:
        raise DSGError(f"Question file {str(path)!r} holds no questions.")
    return questions


def check_question(q: Any, where: str = "question") -> dict:
    """`q` itself if it is a well-formed question, else a DSGError naming `where` and the field."""
    if not isinstance(q, dict):
        raise DSGError(f"{where} must be a JSON object with 'question', 'choices' and 'answer', got {type(q).__name__}.")
    if not isinstance(q.get("question"), str):
        raise DSGError(f"{where} needs a string field 'question'.")
    choices = q.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DSGError(f"{where} needs a field 'choices' that is a list of strings.")
    if len(choices) < 2:
        raise DSGError(f"{where} has {len(choices)} choice(s) in 'choices'; a question needs at least 2.")
    if len(choices) > len(LETTERS):
        raise DSGError(f"{where} has {len(choices)} choices; at most {len(LETTERS)} are supported.")
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


def _fill(template: str, q: dict, what: str) -> str:
    try:
        return template.format(**q)
    except (KeyError, IndexError) as e:
        raise DSGError(f"The {what} {template!r} refers to {e}, which the question does not have.") from None


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
    return _encode(tokenizer, context, special), whole[len(bare):]


# ---- results --------------------------------------------------------------------------------------------------


class QuestionResult(NamedTuple):
    """One question's scores. All scores are log-probabilities, one per choice."""

    index: int  # position in the question list
    id: Any  # the question's "id" field, None if it has none
    answer: int
    prediction: int  # argmax of `scores` (lm-eval acc)
    correct: bool
    scores: tuple[float, ...]
    prediction_norm: int  # argmax of `scores_norm` (lm-eval acc_norm)
    correct_norm: bool
    scores_norm: tuple[float, ...]  # likelihood: score per character of the choice; letter: = scores
    gated: bool | None  # whether any guardrail gated the prompt; None without guardrails


class PerplexityResult(NamedTuple):
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    n_tokens: int  # predicted tokens
    n_windows: int
    gate_rate: float | None  # share of windows the guardrails gated; None without guardrails


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, as numpy's argmax


def accuracy(results: Sequence[QuestionResult], subset: Iterable[int] | None = None, *, norm: bool = False) -> float:
    """Share of questions answered correctly, over all results or over the question indices in `subset`."""
    chosen = _subset(results, subset)
    if not chosen:
        raise DSGError("Accuracy over an empty set of questions is undefined.")
    return sum(r.correct_norm if norm else r.correct for r in chosen) / len(chosen)


def gate_rate(results: Sequence[QuestionResult], subset: Iterable[int] | None = None) -> float | None:
    """Share of questions whose prompt the guardrails gated; None when the results were made without guardrails."""
    chosen = _subset(results, subset)
    if not chosen or any(r.gated is None for r in chosen):
        return None
    return sum(bool(r.gated) for r in chosen) / len(chosen)


def correct_indices(results: Sequence[QuestionResult], *, norm: bool = False) -> list[int]:
    """Indices of the questions answered correctly."""
    return [r.index for r in results if (r.correct_norm if norm else r.correct)]


def _subset(results: Sequence[QuestionResult], subset: Iterable[int] | None) -> list[QuestionResult]:
    if subset is None:
        return list(results)
    by_index = {r.index: r for r in results}
    wanted = list(subset)
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise DSGError(f"Question indices {missing[:5]} of the subset are not among the {len(results)} results.")
    return [by_index[i] for i in wanted]


# ---- the scoring engine ---------------------------------------------------------------------------------------


class _Request(NamedTuple):
    prompt: list[int]
    candidates: list[list[int]]  # token ids of each scored continuation (non-empty)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _keeps_last_logits(model: torch.nn.Module) -> dict:
    """`logits_to_keep=1` where the model takes it: a prefill needs only its last position's logits."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _select_rows(cache, rows: torch.Tensor):
    """The KV cache with batch rows `rows` (repeats allowed), for DynamicCache and legacy tuples alike."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)
        return cache
    return tuple(tuple(t[rows] for t in layer) for layer in cache)


def _loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[_Request],
    pad_id: int,
    guardrails: Sequence[Guardrail],
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[list[list[float]], list[bool | None]]:
    """Summed log-probability of every candidate continuation of every prompt, and each prompt's gate decision.

    Prompts are prefilled once, longest first, `batch_size` at a time; the candidates' tokens after their first
    are scored in one forward over the repeated prompt cache.
    """
    if batch_size < 1:
        raise DSGError(f"batch_size must be at least 1, got {batch_size}.")
    device = _device(model)
    keep = _keeps_last_logits(model)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), i))
    scores: list[list[float]] = [[0.0] * len(r.candidates) for r in requests]
    gated: list[bool | None] = [None] * len(requests)
    starts = range(0, len(order), batch_size)
    with _eval_mode(model):
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            rows = order[start : start + batch_size]
            ids, mask = pad_batch([requests[i].prompt for i in rows], pad_id, side="left")
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with attach(model, *guardrails, verify=False) if guardrails else nullcontext() as session:
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
                gated_BG = None
                if session is not None:
                    gated_BG = torch.stack([g.to(device) for g in session.gated_by], 1)  # [B, G]
                    for b, i in enumerate(rows):
                        gated[i] = bool(gated_BG[b].any())
                first_BV = out.logits[:, -1].float().log_softmax(-1)
                for b, i in enumerate(rows):
                    for k, cand in enumerate(requests[i].candidates):
                        scores[i][k] = float(first_BV[b, cand[0]])

                pairs = [(b, k) for b, i in enumerate(rows) for k, c in enumerate(requests[i].candidates) if len(c) > 1]
                if not pairs:
                    continue
                row_P = torch.tensor([b for b, _ in pairs], device=device)
                cands = [requests[rows[b]].candidates[k] for b, k in pairs]
                cids, cmask = pad_batch([c[:-1] for c in cands], pad_id, side="right")
                tgt, _ = pad_batch([c[1:] for c in cands], pad_id, side="right")
                cids, cmask, tgt = cids.to(device), cmask.to(device), tgt.to(device)
                full_mask = torch.cat([mask[row_P], cmask], 1)
                cpos = mask.sum(1)[row_P, None] + torch.arange(cids.shape[1], device=device)
                cache = _select_rows(out.past_key_values, row_P)
                if session is not None:
                    # Every choice of a question is scored under its prompt's gate decision (see module docstring).
                    session.fixed_gates = gated_BG[row_P]
                logits = model(input_ids=cids, attention_mask=full_mask, position_ids=cpos, past_key_values=cache,
                               use_cache=True).logits
            lp_PL = logits.float().log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
            sums = (lp_PL * cmask).sum(1).tolist()
            for (b, k), s in zip(pairs, sums):
                scores[rows[b]][k] += s
            del out, cache, logits
    return scores, gated


def score_mcq(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[dict],
    *,
    mode: str = "likelihood",
    prompt_format: str = "{question}",
    description: str = "",
    chat: bool = False,
    guardrails: Sequence[Guardrail] = (),
    batch_size: int = 8,
    progress: bool = True,
    verify: bool = True,
) -> list[QuestionResult]:
    """Score multiple-choice questions; see the module docstring for the two modes.

    prompt_format (likelihood mode) and description (letter mode) are filled with the question's fields.
    With verify=True each guardrail first checks that `model` is the model it was fitted on.
    """
    if mode not in MODES:
        raise DSGError(f"mode must be one of {MODES}, got {mode!r}.")
    if chat and mode != "letter":
        raise DSGError("chat=True applies to mode='letter' only.")
    questions = [check_question(q, f"questions[{i}]") for i, q in enumerate(questions)]
    guardrails = tuple(guardrails)
    if verify:
        for g in guardrails:
            g.check_model(model)

    requests, owners = [], []  # owners[i][k]: the choice candidate k of question i stands for
    for q in questions:
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
        requests.append(_Request(ids, cands))
        owners.append(owner)

    desc = f"mcq ({mode}{', chat' if chat else ''}{', guarded' if guardrails else ''})"
    lls, gated = _loglikelihoods(model, requests, pad_id_of(tokenizer, model), guardrails, batch_size, progress, desc)

    results = []
    for i, q in enumerate(questions):
        n = len(q["choices"])
        scores = [-math.inf] * n
        for k, c in enumerate(owners[i]):
            scores[c] = max(scores[c], lls[i][k])  # chat mode: max(log P("A"), log P(" A"))
        if mode == "likelihood":
            norm = [s / max(len(c), 1) for s, c in zip(scores, q["choices"])]
        else:
            norm = list(scores)  # lm-eval's acc_norm divides by len("A") = 1
        pred, pred_norm = _argmax(scores), _argmax(norm)
        results.append(QuestionResult(
            i, q.get("id"), q["answer"], pred, pred == q["answer"], tuple(scores), pred_norm,
            pred_norm == q["answer"], tuple(norm), gated[i],
        ))
    return results


def _letter_tokens(tokenizer, letter: str) -> list[int]:
    """The single-token ids of "A" and " A" (the SAEBench candidates); a DSGError if neither is one token."""
    found = []
    for text in (letter, " " + letter):
        ids = _encode(tokenizer, text, False)
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
    if not found:
        raise DSGError(f"The tokenizer has no single token for {letter!r} or {' ' + letter!r}; chat letter mode needs one.")
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
    """Indices of the questions the model (without guardrails, unless passed in `score_options`) answers correctly.

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


# ---- perplexity -----------------------------------------------------------------------------------------------


def perplexity_stats(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    guardrails: Sequence[Guardrail] = (),
    batch_size: int = 8,
    progress: bool = True,
    verify: bool = True,
) -> PerplexityResult:
    """Token-weighted perplexity of `texts`, split into windows of `max_length` tokens.

    Each window predicts its tokens 1..T-1 from the ones before (padding excluded), so the first token of every
    window is context only. With guardrails, each window is judged as one prompt.
    """
    windows = tokenize(tokenizer, texts, max_length)
    if not windows:
        raise DSGError("No text window has the 2 tokens perplexity needs.")
    guardrails = tuple(guardrails)
    if verify:
        for g in guardrails:
            g.check_model(model)
    device = _device(model)
    nll, n_tokens, n_gated = 0.0, 0, 0
    n_batches = math.ceil(len(windows) / batch_size)
    with _eval_mode(model):
        for _, ids, mask in tqdm(batches(windows, batch_size, pad_id_of(tokenizer, model)), total=n_batches,
                                 desc="perplexity", disable=not progress, unit="batch"):
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with attach(model, *guardrails, verify=False) if guardrails else nullcontext() as session:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            if session is not None:
                n_gated += int(session.gated.sum())
            lp_BT = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            target = mask[:, 1:].bool()
            nll -= float(lp_BT[target].double().sum())
            n_tokens += int(target.sum())
    mean = nll / n_tokens
    rate = n_gated / len(windows) if guardrails else None
    return PerplexityResult(math.exp(mean), mean, n_tokens, len(windows), rate)


def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], **options) -> float:
    """exp(mean NLL per predicted token) of `texts`; options as `perplexity_stats`."""
    return perplexity_stats(model, tokenizer, texts, **options).perplexity


# ---- files ----------------------------------------------------------------------------------------------------


def evaluate_files(
    model: torch.nn.Module,
    tokenizer,
    question_files: Sequence[str | os.PathLike],
    *,
    guardrails: Sequence[Guardrail] = (),
    mode: str = "likelihood",
    base_correct: bool = False,
    permutations: bool = False,
    base_subsets: Mapping[str, Sequence[int]] | None = None,
    details: bool = False,
    **score_options,
) -> dict:
    """A JSON-able summary per question file (task = file stem), plus "all" pooled over the tasks.

    Per task: n, accuracy (and accuracy_norm in likelihood mode), gate_rate (None without guardrails). With
    base_correct=True the unguarded model is scored too (base_accuracy) and its correctly answered questions
    (under every ordering with permutations=True) form the base-correct subset; `base_subsets` gives such
    subsets instead, by task name (e.g. cached from an earlier run). On the subset: its size, the accuracy and
    gate rate there. details=True adds every question's result.
    """
    paths = [Path(p) for p in question_files]
    if not paths:
        raise DSGError("No question files were given.")
    names = [p.stem for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DSGError(f"Question files must have distinct names (the task name is the file stem); {dupes} repeat.")
    guardrails = tuple(guardrails)
    if score_options.pop("verify", True):
        for g in guardrails:
            g.check_model(model)
    options = {"mode": mode, "verify": False, **score_options}

    tasks: dict[str, dict] = {}
    pooled = {"n": 0, "correct": 0, "gated": 0, "subset_n": 0, "subset_correct": 0}
    for name, path in zip(names, paths):
        questions = read_questions(path)
        results = score_mcq(model, tokenizer, questions, guardrails=guardrails, **options)
        entry: dict[str, Any] = {"file": str(path), "n": len(results), "accuracy": accuracy(results),
                                 "gate_rate": gate_rate(results)}
        if mode == "likelihood":
            entry["accuracy_norm"] = accuracy(results, norm=True)
        subset, computed = None, False
        if base_subsets is not None and name in base_subsets:
            subset = sorted({int(i) for i in base_subsets[name]})
            if subset and not 0 <= subset[0] <= subset[-1] < len(questions):
                raise DSGError(
                    f"The base-correct subset for task {name!r} names questions outside 0..{len(questions) - 1}."
                )
        elif base_correct:
            base = score_mcq(model, tokenizer, questions, **options) if guardrails else results
            entry["base_accuracy"] = accuracy(base)
            subset, computed = correct_indices(base), True
            if permutations:
                subset = base_correct_subset(model, tokenizer, questions, permutations=True, **options)
        if subset is not None:
            entry["base_correct"] = {
                "n": len(subset),
                "source": "computed" if computed else "given",
                "permutations": bool(permutations) if computed else None,
                "accuracy": accuracy(results, subset) if subset else None,
                "gate_rate": gate_rate(results, subset) if subset else None,
                "indices": subset,
            }
            pooled["subset_n"] += len(subset)
            pooled["subset_correct"] += sum(results[i].correct for i in subset)
        if details:
            entry["questions"] = [r._asdict() for r in results]
        tasks[name] = entry
        pooled["n"] += len(results)
        pooled["correct"] += sum(r.correct for r in results)
        pooled["gated"] += sum(bool(r.gated) for r in results)

    summary_all: dict[str, Any] = {
        "n": pooled["n"],
        "accuracy": pooled["correct"] / pooled["n"],
        "gate_rate": pooled["gated"] / pooled["n"] if guardrails else None,
    }
    if any("base_correct" in t for t in tasks.values()):
        summary_all["base_correct"] = {
            "n": pooled["subset_n"],
            "accuracy": pooled["subset_correct"] / pooled["subset_n"] if pooled["subset_n"] else None,
        }
    return {
        "mode": mode,
        "options": {k: v for k, v in score_options.items() if k in ("prompt_format", "description", "chat")},
        "guardrails": [repr(g) for g in guardrails],
        "tasks": tasks,
        "all": summary_all,
    }
