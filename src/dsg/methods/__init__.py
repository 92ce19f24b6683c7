"""Unlearning methods compared by `dsg compare`, each registered by name in `METHODS`:

    dsg                 DSG: the gated clamp of a guardrail (methods/dsg.py)
    static_clamp        ungated SAE clamps, SAEBench / Farrell et al. latent selection (methods/sae_clamp.py)
    conditional_clamp
    rmu                 RMU (methods/rmu.py)
    ga, graddiff, npo   gradient ascent, GradDiff, NPO (methods/ga.py, graddiff.py, npo.py)

Guardrail methods return a Guardrail; trained methods share one training loop (methods/trained.py) and return a
weight Edit. Both are Interventions (dsg.runtime).
"""

from . import dsg, ga, graddiff, npo, rmu, sae_clamp  # noqa: F401  (each registers its methods)
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
