"""dsg: precision unlearning for language models with Dynamic SAE Guardrails."""

__version__ = "0.1.0"

from .errors import DSGError
from .sae import SAE
from .guardrail import Guardrail, attach

__all__ = ["DSGError", "SAE", "Guardrail", "attach", "__version__"]
from .fit import FitConfig, fit
from .selection import select_by_frequency, select_features
from .stats import LatentSums, collect_stats, gate_rates

__all__ += ["FitConfig", "fit", "select_features", "select_by_frequency", "LatentSums", "collect_stats", "gate_rates"]
from .models import KNOWN_MODELS, load_model

# The SAE trainer stays at dsg.train_sae (a function of the same name would shadow the module).
__all__ += ["KNOWN_MODELS", "load_model"]
