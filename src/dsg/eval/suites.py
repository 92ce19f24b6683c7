"""What the comparison bench measures for an intervention, one registered suite per kind of measurement.

    scores       multiple-choice questions of every task: per question correct / correct_norm / gated
    perplexity   held-out retain text (test split only)
    generations  greedy completions of fixed open-ended prompts (test split only; shown, not scored)
    dilution     forget questions padded with k benign tokens (k = 0, 100, 1000; plain and chat) and benign text
                 that mentions a security term (test split only; see eval/dilution.py)

A suite has a `name` (the key its results are stored under), the `splits` it runs on, and
`run(bench, split, intervention, progress) -> JSON`. A new suite is one class with one registration line (here,
or in a module imported by dsg/eval/__init__.py); `dsg compare` then runs and stores it for every configuration
(on a resumed run, for the finished ones too) and puts its test results under each method's "suites" in
compare.json.
"""

from __future__ import annotations

from typing import ClassVar

from ..registry import Registry
from ..runtime.generation import generate
from .dilution import run_dilution
from .mcq import score_mcq
from .perplexity import perplexity_stats

SUITES: Registry[type] = Registry("evaluation suite")


class Suite:
    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("validation", "test")

    @staticmethod
    def run(bench, split: str, intervention, progress: bool):
        raise NotImplementedError


@SUITES.register("scores")
class MultipleChoice(Suite):
    name = "scores"

    @staticmethod
    def run(bench, split, intervention, progress) -> dict:
        """{task: {"correct": [bool], "correct_norm": [bool], "gated": [bool | None]}}."""
        out = {}
        for task, qs in bench.questions[split].items():
            base = bench.unguarded.get(bench.scores_key(split, task)) if intervention is not None else None
            res = score_mcq(
                bench.model,
                bench.tokenizer,
                qs,
                intervention=intervention,
                batch_size=bench.batch_size,
                progress=progress,
                verify=False,
                unguarded=base,
            )
            if intervention is None:  # kept for the guarded runs of this process (score_mcq's unguarded)
                bench.unguarded[bench.scores_key(split, task)] = res
            out[task] = {
                "correct": [bool(r.correct) for r in res],
                "correct_norm": [bool(r.correct_norm) for r in res],
                "gated": [r.gated for r in res],
            }
        return out


@SUITES.register("perplexity")
class Perplexity(Suite):
    name = "perplexity"
    splits = ("test",)

    @staticmethod
    def run(bench, split, intervention, progress) -> dict | None:
        if not bench.perplexity_texts:
            return None
        batch_size = max(1, bench.batch_size // 2)
        key = ("perplexity", batch_size)
        result = perplexity_stats(
            bench.model,
            bench.tokenizer,
            bench.perplexity_texts,
            max_length=256,
            intervention=intervention,
            batch_size=batch_size,
            progress=progress,
            verify=False,
            unguarded=bench.unguarded.get(key) if intervention is not None else None,
        )
        if intervention is None:  # kept for the guarded runs of this process (perplexity_stats' unguarded)
            bench.unguarded[key] = result
        return {k: v for k, v in result._asdict().items() if k not in ("batches", "base_run")}


@SUITES.register("generations")
class Generations(Suite):
    name = "generations"
    splits = ("test",)

    @staticmethod
    def run(bench, split, intervention, progress) -> list[dict]:
        if not bench.prompts or bench.generation_tokens < 1:
            return []
        rows = generate(
            bench.model,
            bench.tokenizer,
            [p["prompt"] for p in bench.prompts],
            intervention,
            max_new_tokens=bench.generation_tokens,
            chat=True,
            verify=False,
        )
        return [{**p, "completion": r["completion"], "gated": r["gated"]} for p, r in zip(bench.prompts, rows)]


@SUITES.register("dilution")
class Dilution(Suite):
    name = "dilution"
    splits = ("test",)

    @staticmethod
    def run(bench, split, intervention, progress) -> dict | None:
        questions = bench.questions[split][bench.forget_task][:24]  # a prompt of 1,000 tokens is slow on a CPU
        return run_dilution(bench.model, bench.tokenizer, questions, bench.perplexity_texts, intervention, progress,
                            batch_size=bench.batch_size)  # fmt: skip


def run_suites(bench, split: str, intervention, progress: bool, only: list[str] | None = None) -> dict:
    """Every registered suite that runs on `split` (or those named in `only`), keyed by its name."""
    return {
        name: suite.run(bench, split, intervention, progress)
        for name, suite in SUITES.items()
        if split in suite.splits and (only is None or name in only)
    }


def missing_suites(stored: dict, split: str) -> list[str]:
    """The registered suites for `split` whose results `stored` lacks (a suite registered after a run)."""
    return [name for name, suite in SUITES.items() if split in suite.splits and name not in stored]
