"""Scores of multiple-choice runs: per-question results, accuracy, gate rate, and the one task summary that the
demo, the comparison and `dsg eval` all report (accuracy, the base model's correctly answered subset, and how
often the gate opened)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ..errors import DSGError
from ..lm.fingerprint import weights_digest


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
    gated: bool | None  # whether the intervention gated the prompt; None without a gated intervention
    # whether the intervention acted on the question: gated (its choices guarded), or a token of its prompt clamped
    # (a gate held open for a while can clamp part of a prompt and close before its end); None without a gate
    clamped: bool | None = None


class BaseRun(NamedTuple):
    """What a run without an intervention was computed from, so that a guarded run given its results as
    `unguarded=` can refuse another run's: the model's weights (lm.fingerprint.weights_digest) and a digest of the
    inputs as the run encoded them, with every option that changes its numbers (`inputs_digest`)."""

    weights: str
    inputs: str

    @classmethod
    def of(cls, model, inputs: str) -> BaseRun:
        return cls(weights_digest(model), inputs)


def check_base_run(run: BaseRun | None, model, inputs: str, verify: bool, what: str) -> None:
    """Refuse the run recorded with some unguarded results (None: none recorded) unless it read these `inputs`
    and, with verify=True, `model`'s weights."""
    if run is None:
        raise DSGError(f"unguarded is not {what} without an intervention, as it returned it.")
    if run.inputs != inputs:
        raise DSGError(f"unguarded is {what} for other inputs or options (questions, texts, their order, the "
                       "scoring mode or format, the batch size or window length).")  # fmt: skip
    if verify and run.weights != weights_digest(model):
        raise DSGError(f"unguarded is {what} for other model weights than the model given.")


def inputs_digest(*inputs) -> str:
    """A digest of a run's inputs and options (their repr: token ids, strings, numbers)."""
    return hashlib.sha256(repr(inputs).encode()).hexdigest()


class QuestionResults(list):
    """score_mcq's results, one QuestionResult per question, with `base_run`: what they were computed from, when
    no intervention was applied (None otherwise)."""

    base_run: BaseRun | None = None


def argmax(xs: Sequence[float]) -> int:
    """The first maximum, as numpy's argmax."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def share(flags: Sequence[bool | None], idx: Iterable[int] | None = None) -> float | None:
    """The share of true flags (over the positions `idx`, default all); None for no flags or an unknown one."""
    chosen = list(flags) if idx is None else [flags[i] for i in idx]
    if not chosen or any(f is None for f in chosen):
        return None
    return sum(bool(f) for f in chosen) / len(chosen)


def _positions(results: Sequence[QuestionResult], subset: Iterable[int] | None) -> list[int]:
    """Positions in `results` of the question indices in `subset` (all positions when None)."""
    if subset is None:
        return list(range(len(results)))
    where = {r.index: k for k, r in enumerate(results)}
    wanted = list(subset)
    missing = [i for i in wanted if i not in where]
    if missing:
        raise DSGError(f"Question indices {missing[:5]} of the subset are not among the {len(results)} results.")
    return [where[i] for i in wanted]


def accuracy(results: Sequence[QuestionResult], subset: Iterable[int] | None = None, *, norm: bool = False) -> float:
    """Share of questions answered correctly, over all results or over the question indices in `subset`."""
    value = share([r.correct_norm if norm else r.correct for r in results], _positions(results, subset))
    if value is None:
        raise DSGError("Accuracy over an empty set of questions is undefined.")
    return value


def gate_rate(results: Sequence[QuestionResult], subset: Iterable[int] | None = None) -> float | None:
    """Share of questions whose prompt the intervention gated; None when the results were made without a gate."""
    return share([r.gated for r in results], _positions(results, subset))


def correct_indices(results: Sequence[QuestionResult], *, norm: bool = False) -> list[int]:
    """Indices of the questions answered correctly."""
    return [r.index for r in results if (r.correct_norm if norm else r.correct)]


class TaskSummary(NamedTuple):
    """One task under an intervention, against the base model on the same questions."""

    n: int
    accuracy: float
    base_accuracy: float
    n_base_correct: int
    accuracy_base_correct: float | None  # None when the base model answers nothing correctly
    gate_rate: float | None  # None without a gated intervention
    gate_rate_base_correct: float | None


def summarize_task(correct: Sequence[bool], gated: Sequence[bool | None], base_correct: Sequence[bool]) -> TaskSummary:
    """The summary of one task from per-question correctness (under the intervention and for the base model) and
    gate decisions."""
    if not correct or len(correct) != len(base_correct) or len(gated) != len(correct):
        raise DSGError(f"A task summary needs equally many results: {len(correct)}, {len(gated)}, {len(base_correct)}.")
    subset = [i for i, ok in enumerate(base_correct) if ok]
    everything = range(len(correct))
    return TaskSummary(
        len(correct),
        share(correct, everything),
        share(base_correct, everything),
        len(subset),
        share(correct, subset),
        share(gated, everything),
        share(gated, subset),
    )


def summarize_results(
    results: Sequence[QuestionResult], base_correct: Sequence[bool], *, norm: bool = True
) -> TaskSummary:
    """summarize_task of scored questions (eval.mcq): their correctness (length-normalised unless `norm` is
    False) and gate decisions, against the base model's correctness on the same questions."""
    return summarize_task([r.correct_norm if norm else r.correct for r in results], [r.gated for r in results],
                          base_correct)  # fmt: skip
