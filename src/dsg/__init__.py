"""dsg: precision unlearning for language models with Dynamic SAE Guardrails.

The public names load on first use (PEP 562), so that `import dsg.entry` (the `dsg` command) costs nothing before
it can turn a Ctrl-C during the heavy imports into a clean exit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

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
    if name not in _WHERE:
        raise AttributeError(f"module 'dsg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
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
