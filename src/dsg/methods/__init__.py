"""Unlearning methods compared by `dsg compare`, each registered by name in `METHODS`:

    dsg, dsg_paper      DSG: the gated clamp of a guardrail, with the detector gate that ships and with the
                        paper's whole-input gate (methods/dsg.py)
    static_clamp        ungated SAE clamps, SAEBench / Farrell et al. latent selection (methods/sae_clamp.py)
    conditional_clamp
    rmu                 RMU (methods/rmu.py)
    ga, graddiff, npo   gradient ascent, GradDiff, NPO (methods/ga.py, graddiff.py, npo.py)

Guardrail methods return a Guardrail; trained methods share one training loop (methods/trained.py) and return a
weight Edit. Both are Interventions (dsg.runtime).
"""

# Each module registers its methods; registration order is the order `dsg compare` runs and reports them.
from . import dsg  # noqa: F401  # isort: skip
from . import sae_clamp  # noqa: F401  # isort: skip
from . import rmu  # noqa: F401  # isort: skip
from . import ga  # noqa: F401  # isort: skip
from . import graddiff  # noqa: F401  # isort: skip
from . import npo  # noqa: F401  # isort: skip
from .base import METHODS, Fitted, UnlearningMethod
from .ga import GAConfig, GradientAscent
from .graddiff import GradDiff, GradDiffConfig
from .npo import NPO, NPOConfig
from .rmu import RMU, RMUConfig
from .sae_clamp import ClampConfig, fit_clamp
from .trained import TrainedEdit, TrainingConfig

__all__ = [
    "METHODS",
    "NPO",
    "RMU",
    "ClampConfig",
    "Fitted",
    "GAConfig",
    "GradDiff",
    "GradDiffConfig",
    "GradientAscent",
    "NPOConfig",
    "RMUConfig",
    "TrainedEdit",
    "TrainingConfig",
    "UnlearningMethod",
    "fit_clamp",
]
