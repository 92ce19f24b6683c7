"""Unlearning baselines that DSG is compared against, on the same model and data (see `dsg compare`).

    weights     Edit, apply_edit, edited: weight-editing methods save only the tensors they changed
    rmu         RMU (Li et al. 2024): steer layer-ℓ activations on forget text, update MLP down-projections ℓ-2..ℓ
    gradient    gradient ascent, GradDiff, NPO (open-unlearning formulas), reference outputs cached up front
    sae_clamp   static and conditional SAE clamping without a gate (SAEBench / Farrell / Khoriaty), via dsg.fit
"""

from .gradient import GradientConfig, unlearn_gradient
from .rmu import RMUConfig, rmu
from .sae_clamp import ClampConfig, fit_clamp
from .weights import Edit, apply_edit, edited

__all__ = [
           "ClampConfig",
           "Edit",
           "GradientConfig",
           "RMUConfig",
           "apply_edit",
           "edited",
           "fit_clamp",
           "rmu",
           "unlearn_gradient",
]
