"""`dsg eval`: question files scored with and without an intervention, summarised per file and pooled."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import is_index
from ..errors import DSGError
from ..runtime.intervention import Intervention, as_intervention, guardrails_in
from .mcq import base_correct_subset, check_questions_fit, choice_orderings, read_questions, score_mcq
from .metrics import accuracy, correct_indices, share, summarize_task


def _task_names(paths: list[Path], base_correct: bool, permutations: bool) -> list[str]:
    """The task name of each question file (its stem), once the files and options are checked to make sense."""
    if not paths:
        raise DSGError("No question files were given.")
    if permutations and not base_correct:
        raise DSGError("permutations (--permutations) refines the base-correct subset; it needs base_correct "
                       "(--base-correct) too.")  # fmt: skip
    names = [p.stem for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DSGError(f"Question files must have distinct names (the task name is the file stem); {dupes} repeat.")
    return names


def evaluate_files(
    model,
    tokenizer,
    question_files: Sequence[str | os.PathLike],
    *,
    intervention: Intervention | Sequence | None = None,
    mode: str = "likelihood",
    base_correct: bool = False,
    permutations: bool = False,
    base_subsets: Mapping[str, Sequence[int]] | None = None,
    details: bool = False,
    **score_options,
) -> dict:
    """A JSON-able summary per question file (task = file stem), plus "all" pooled over the tasks.

    Per task: n, accuracy (and accuracy_norm in likelihood mode), gate_rate (None without a gated intervention).
    With base_correct=True the base model is scored too (base_accuracy) and its correctly answered questions
    (under every ordering with permutations=True) form the base-correct subset, scored by summed log-probability
    (lm-eval's acc); in likelihood mode without permutations, base_correct_norm is the same by length-normalised
    log-probability (acc_norm, what dsg demo and dsg compare report); `base_subsets` gives such subsets
    instead, by task name (e.g. cached from an earlier run). On the subset: its size, the accuracy and gate rate
    there. details=True adds every question's result.
    """
    paths = [Path(p) for p in question_files]
    names = _task_names(paths, base_correct, permutations)
    if base_subsets is not None:
        unknown = sorted(set(base_subsets) - set(names))
        if unknown:
            raise DSGError(f"base_subsets names tasks that no question file has: {unknown} (tasks: {names}).")
    intervention = as_intervention(intervention)
    if score_options.pop("verify", True) and intervention is not None:
        intervention.check_model(model)
    options = {"mode": mode, "verify": False, **score_options}

    read = [read_questions(path) for path in paths]  # every file checked before the first is scored
    for path, questions in zip(paths, read):
        check_questions_fit(model, tokenizer, questions, f"{str(path)!r} question", first=1, **options)
    if permutations:  # refused before the base pass, naming the file
        for name, path, questions in zip(names, paths, read):
            if base_subsets is not None and name in base_subsets:
                continue
            for i, q in enumerate(questions, 1):
                try:
                    choice_orderings(len(q["choices"]))
                except DSGError as e:
                    raise DSGError(f"{str(path)!r} question {i}: {e}") from None

    tasks, scored = {}, []  # scored: per task, (results, base-correct subset, length-normalised one)
    for name, path, questions in zip(names, paths, read):
        given = base_subsets is not None and name in base_subsets
        base = score_mcq(model, tokenizer, questions, **options) if base_correct and not given else None
        if intervention is None:
            results = base if base is not None else score_mcq(model, tokenizer, questions, **options)
        else:  # batches the gates leave alone take the base model's results (score_mcq's unguarded)
            results = score_mcq(model, tokenizer, questions, intervention=intervention, unguarded=base, **options)
        subset, source = None, None
        if given:
            subset, source = _given_subset(name, base_subsets[name], len(questions)), "given"
        elif base_correct:
            subset, source = correct_indices(base), "computed"
            if permutations:
                subset = base_correct_subset(model, tokenizer, questions, permutations=True, **options)
        tasks[name] = _task_entry(path, results, subset, source, permutations, mode, details)
        norm_subset = None
        if source == "computed":
            tasks[name]["base_accuracy"] = accuracy(base)
            if mode == "likelihood" and not permutations:  # what dsg demo and dsg compare report
                norm_subset = [i for i, r in enumerate(base) if r.correct_norm]
                # the questions the base model answers by length-normalised scoring, and the share still answered
                tasks[name]["base_correct_norm"] = _on_subset([r.correct_norm for r in results],
                                                              [r.gated for r in results], norm_subset)  # fmt: skip
        scored.append((results, subset, norm_subset))
    gate_known = all(t["gate_rate"] is not None for t in tasks.values())
    return {
        "mode": mode,
        "options": {k: v for k, v in score_options.items() if k in ("prompt_format", "description", "chat")},
        "guardrails": [repr(g) for g in guardrails_in(intervention)],
        "tasks": tasks,
        "all": _pooled(scored, gate_known),
    }


def _pooled(scored: list[tuple[list, list[int] | None, list[int] | None]], gate_known: bool) -> dict[str, Any]:
    """The summary over every task's questions: accuracy and gate rate, and on the base-correct subsets (summed
    and length-normalised scoring, where the tasks have them) their size and accuracy."""
    results = [r for rs, _, _ in scored for r in rs]
    out: dict[str, Any] = {
        "n": len(results),
        "accuracy": sum(r.correct for r in results) / len(results),
        "gate_rate": sum(bool(r.gated) for r in results) / len(results) if gate_known else None,
    }
    for key, at, field in (("base_correct", 1, "correct"), ("base_correct_norm", 2, "correct_norm")):
        parts = [(task[0], task[at]) for task in scored if task[at] is not None]
        if parts:
            n = sum(len(subset) for _, subset in parts)
            hits = sum(getattr(rs[i], field) for rs, subset in parts for i in subset)
            out[key] = {"n": n, "accuracy": hits / n if n else None}
    return out


def _given_subset(name: str, indices: Sequence[int], n: int) -> list[int]:
    """A task's given base-correct subset: question indices (integers, not bools, floats or a string of digits)."""
    if isinstance(indices, (str, bytes)) or not all(is_index(i) for i in indices):
        raise DSGError(f"The base-correct subset for task {name!r} must be a list of question indices (integers), "
                       f"got {indices!r}.")  # fmt: skip
    subset = sorted({int(i) for i in indices})
    if subset and not 0 <= subset[0] <= subset[-1] < n:
        raise DSGError(f"The base-correct subset for task {name!r} names questions outside 0..{n - 1}.")
    return subset


def _on_subset(correct: list[bool], gated: list[bool | None], subset: list[int]) -> dict:
    """The size, accuracy and gate rate of the questions in `subset`, and their indices."""
    members = set(subset)
    on = summarize_task(correct, gated, [i in members for i in range(len(correct))])
    return {"n": len(subset), "accuracy": on.accuracy_base_correct, "gate_rate": on.gate_rate_base_correct,
            "indices": subset}  # fmt: skip


def _task_entry(path: Path, results, subset, source, permutations: bool, mode: str, details: bool) -> dict:
    correct, gated = [r.correct for r in results], [r.gated for r in results]
    whole = summarize_task(correct, gated, correct)
    entry: dict[str, Any] = {"file": str(path), "n": whole.n, "accuracy": whole.accuracy, "gate_rate": whole.gate_rate,
                             "clamped_rate": share([r.clamped for r in results])}  # fmt: skip
    if mode == "likelihood":
        entry["accuracy_norm"] = summarize_task([r.correct_norm for r in results], gated, correct).accuracy
    if subset is not None:
        entry["base_correct"] = _on_subset(correct, gated, subset) | {
            "source": source,
            "permutations": bool(permutations) if source == "computed" else None,
        }
    if details:
        entry["questions"] = [r._asdict() for r in results]
    return entry
