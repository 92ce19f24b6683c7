"""NPO, negative preference optimization (Zhang et al. 2024; open-unlearning `NPO`): GradDiff with the forget
term replaced by

    -(2/β) · mean_b log σ(-β · (log π_θ(x_f,b) - log π_ref(x_f,b)))

whose value at θ = ref is (2/β)·log 2. The reference's log π(x) is cached once per forget sequence of the batches
the run visits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DSGError
from .base import METHODS, budget_level
from .ga import likelihood_grid_base
from .graddiff import GradDiff, GradDiffConfig
from .losses import npo_loss, sequence_logprob, target_logprobs
from .trained import batch_tokens, reference_outputs


@dataclass
class NPOConfig(GradDiffConfig):
    """NPO hyperparameters."""

    beta: float = 0.1
    """β: NPO temperature."""

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise DSGError(f"beta must be > 0, got {self.beta}.")


@METHODS.register("npo")
class NPO(GradDiff):
    name = "npo"
    label = "NPO"
    config_class = NPOConfig
    fixed = {"method": "npo"}

    def grid(self, bench, budget: float) -> list[dict]:
        pts = {
            "smoke": [(1e-4, 1.0, 0.1, "nll")],
            "default": [(5e-5, 1.0, 0.1, "nll"), (1e-4, 1.0, 0.1, "nll"), (1e-4, 1.0, 0.1, "kl")],
            "wide": [
                (lr, a, b, r)
                for lr in (5e-5, 1e-4, 2e-4)
                for a in (0.1, 1.0)
                for b in (0.1, 1.0)
                for r in ("nll", "kl")
            ],
        }
        base = likelihood_grid_base(self.name, budget)
        return [base | {"lr": lr, "alpha": a, "beta": b, "retain_loss": r} for lr, a, b, r in pts[budget_level(budget)]]

    def prepare(self, model, w, config, cost, p_fwd) -> dict:
        used = w.forget_batches[: config.steps]
        refs = reference_outputs(model, w.forget, used, w.pad_id, _sequence_logprob)
        cost.forward(p_fwd, batch_tokens(w.forget, used), "reference forget log-probs")
        return {"forget_ref": refs, **super().prepare(model, w, config, cost, p_fwd)}

    def forget_term(self, model, ids, mask, batch, state, config) -> torch.Tensor:
        logp, tmask = target_logprobs(model, ids, mask)
        return npo_loss(sequence_logprob(logp, ids, tmask), state["forget_ref"][batch], config.beta)


def _sequence_logprob(model, ids, mask):
    logp, tmask = target_logprobs(model, ids, mask)
    return sequence_logprob(logp, ids, tmask)
