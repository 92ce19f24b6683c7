"""dsg: precision unlearning for language models with Dynamic SAE Guardrails."""

__version__ = "0.1.0"

from .errors import DSGError  # noqa: E402
from .guard import (  # noqa: E402  # noqa: E402
    FitConfig,
    Guardrail,
    LatentSums,
    collect_stats,
    fit,
    gate_rates,
    select_by_frequency,
    select_features,
)
from .lm.models import KNOWN_MODELS, load_model  # noqa: E402
from .runtime import attach  # noqa: E402
from .sae import SAE  # noqa: E402

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
