"""Evaluation: multiple-choice scoring (`mcq`), perplexity, the metrics and task summary every report uses
(`metrics`), question files (`files`, `dsg eval`), and the suites the comparison bench runs (`suites`)."""

from .files import evaluate_files
from .mcq import base_correct_subset, check_question, letter_prompt, read_questions, score_mcq
from .metrics import QuestionResult, TaskSummary, accuracy, correct_indices, gate_rate, summarize_task
from .perplexity import PerplexityResult, perplexity, perplexity_stats

__all__ = [
    "PerplexityResult",
    "QuestionResult",
    "TaskSummary",
    "accuracy",
    "base_correct_subset",
    "check_question",
    "correct_indices",
    "evaluate_files",
    "gate_rate",
    "letter_prompt",
    "perplexity",
    "perplexity_stats",
    "read_questions",
    "score_mcq",
    "summarize_task",
]
