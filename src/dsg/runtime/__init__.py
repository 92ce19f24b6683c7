"""Applying interventions to a model: the `Intervention` protocol that guardrails and weight edits implement,
the HuggingFace hook runtime (`attach`), weight edits, generation with the no-cache reference, and lm-eval."""

from .edit import Edit, apply_edit, edited
from .generation import generate, reference_generate
from .hf import Attachment, Guardrails, attach
from .intervention import Intervention, Session, Stack, Ungated, as_intervention

__all__ = [
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
    "edited",
    "generate",
    "reference_generate",
]
