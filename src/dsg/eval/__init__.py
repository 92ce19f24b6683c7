"""Evaluation: multiple-choice scoring (`mcq`), perplexity, the metrics and task summary every report uses
(`metrics`), question files (`files`, `dsg eval`), the suites the comparison bench runs (`suites`), and the check
that keeps or drops a guardrail's prompt level by the forgetting it costs on held-out forget questions
(`prompt_level`)."""

from .files import evaluate_files
from .mcq import base_correct_subset, check_question, letter_prompt, read_questions, score_mcq
from .metrics import QuestionResult, TaskSummary, accuracy, correct_indices, gate_rate, summarize_task
from .perplexity import PerplexityResult, perplexity, perplexity_stats
from .prompt_level import settle_prompt_level

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
    "settle_prompt_level",
    "summarize_task",
]
