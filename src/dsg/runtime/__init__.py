"""Applying interventions to a model: the `Intervention` protocol that guardrails and weight edits implement,
the runtime registry and `attach`, the HuggingFace hook runtime (`hf`), weight edits, generation with the no-cache
reference, and lm-eval."""

from . import hf  # noqa: F401  (registers the HuggingFace runtime)
from .edit import Edit, apply_edit, edited
from .generation import generate, reference_generate
from .hf import Attachment
from .intervention import (
    RUNTIMES,
    Guardrails,
    Intervention,
    Session,
    Stack,
    Ungated,
    as_intervention,
    attach,
    guardrails_in,
)

__all__ = [
    "RUNTIMES",
    "Attachment",
    "Edit",
    "Guardrails",
    "Intervention",
    "Session",
    "Stack",
    "Ungated",
    "apply_edit",
    "as_intervention",
    "attach",
    "guardrails_in",
    "edited",
    "generate",
    "reference_generate",
]
