"""GradDiff (open-unlearning `GradDiff`): gradient ascent on forget text plus a retain term,

    L = -γ · NLL(x_f) + α · R(x_r),   R = NLL(x_r) (retain_loss="nll")  or  KL(π_ref ‖ π_θ) on x_r ("kl").

For KL, a full-vocabulary distribution per retain token would be too large on CPU, so the reference's top-k
log-probabilities (`kl_top_k`) are cached once for the batches the run visits (losses.topk_kl).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_choice
from ..errors import DSGError
from .base import METHODS, budget_level
from .ga import GAConfig, GradientAscent, likelihood_grid_base
from .losses import mean_nll, reference_topk, target_logprobs, topk_kl
from .trained import batch_tokens, reference_outputs

RETAIN_LOSSES = ("nll", "kl")


@dataclass
class GradDiffConfig(GAConfig):
    """GradDiff hyperparameters."""

    alpha: float = 1.0
    """α: weight of the retain term."""
    retain_loss: str = "nll"
    """Retain term: nll (retain NLL) or kl (KL from the frozen reference on retain text)."""
    kl_top_k: int = 64
    """retain_loss=kl: reference log-probs cached per token (0 = the full vocabulary, exact)."""

    def __post_init__(self):
        super().__post_init__()
        check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        if self.kl_top_k < 0:
            raise DSGError(f"kl_top_k must be >= 0, got {self.kl_top_k}.")


@METHODS.register("graddiff")
class GradDiff(GradientAscent):
    name = "graddiff"
    label = "GradDiff"
    config_class = GradDiffConfig
    fixed = {"method": "graddiff"}
    uses_retain = True

    def grid(self, bench, budget: float) -> list[dict]:
        pts = {
            "smoke": [(1e-4, 1.0, "nll")],
            "default": [(5e-5, 1.0, "nll"), (1e-4, 1.0, "nll"), (1e-4, 5.0, "nll")],
            "wide": [(lr, a, r) for lr in (5e-5, 1e-4, 2e-4) for a in (0.1, 1.0, 5.0, 10.0) for r in ("nll", "kl")],
        }
        base = likelihood_grid_base(self.name, budget)
        return [base | {"lr": lr, "alpha": a, "retain_loss": r} for lr, a, r in pts[budget_level(budget)]]

    def prepare(self, model, w, config, cost, p_fwd) -> dict:
        state = {}
        if config.retain_loss == "kl":

            def topk(model, ids, mask):
                logp, tmask = target_logprobs(model, ids, mask)
                return reference_topk(logp[tmask], config.kl_top_k)

            state["retain_ref"] = reference_outputs(model, w.retain, w.retain_batches[: config.steps], w.pad_id, topk)
            cost.forward(p_fwd, batch_tokens(w.retain, w.retain_batches[: config.steps]), "reference retain top-k")
        return state

    def retain_term(self, model, ids, mask, batch, state, config) -> torch.Tensor:
        logp, tmask = target_logprobs(model, ids, mask)
        if config.retain_loss == "nll":
            return mean_nll(logp, ids, tmask)
        return topk_kl(*state["retain_ref"][batch], logp[tmask])
