"""dsg: precision unlearning for language models with Dynamic SAE Guardrails.

The public names load on first use (PEP 562), so that `import dsg.entry` (the `dsg` command) costs nothing before
it can turn a Ctrl-C during the heavy imports into a clean exit.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# dsg never contacts a model hub (lm/models.py): default the offline switches before anything imports transformers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_WHERE = {
    "DSGError": ".errors",
    "FitConfig": ".guard",
    "Guardrail": ".guard",
    "LatentSums": ".guard",
    "collect_stats": ".guard",
    "fit": ".guard",
    "gate_rates": ".guard",
    "select_by_frequency": ".guard",
    "select_features": ".guard",
    "KNOWN_MODELS": ".lm.models",
    "load_model": ".lm.models",
    "attach": ".runtime",
    "SAE": ".sae",
}

__all__ = [
    "KNOWN_MODELS",
    "DSGError",
    "FitConfig",
    "Guardrail",
    "LatentSums",
    "SAE",
    "__version__",
    "attach",
    "collect_stats",
    "fit",
    "gate_rates",
    "load_model",
    "select_by_frequency",
    "select_features",
]


def __getattr__(name: str):
    """A public name (loaded on first use), or a submodule (`dsg.guard`, bound by importing it)."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'dsg' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'dsg' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .errors import DSGError
    from .guard import (
        FitConfig,
        Guardrail,
        LatentSums,
        collect_stats,
        fit,
        gate_rates,
        select_by_frequency,
        select_features,
    )
    from .lm.models import KNOWN_MODELS, load_model
    from .runtime import attach
    from .sae import SAE
