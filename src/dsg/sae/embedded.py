"""SAEs that ship with dsg, one per embedded model, trained by `dsg train-sae` (see each folder's training.json
for the exact config, seed and metrics, and the README for the command that reproduces it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DSGError
from ..lm.models import KNOWN_MODELS

ASSETS = Path(__file__).parent.parent / "assets" / "saes"
EMBEDDED_SAES = {"smollm2-135m-instruct": "smollm2-135m-instruct"}
"""Canonical model name -> folder under dsg/assets/saes."""


def embedded_sae(model: str) -> Path:
    """The shipped SAE folder for an embedded model name (e.g. 'smollm2-135m')."""
    spec = KNOWN_MODELS.get(model.strip().lower())
    folder = EMBEDDED_SAES.get(spec.name) if spec else None
    if folder is None or not (ASSETS / folder / "cfg.json").is_file():
        raise DSGError(
            f"No SAE ships for model {model!r}; pass --sae with a SAELens/sparsify folder, or train one with "
            "`dsg train-sae`."
        )
    return ASSETS / folder
