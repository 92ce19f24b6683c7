"""Gradient ascent on the forget NLL (open-unlearning `GradAscent`): L = -γ · NLL(x_f).

Also the base of GradDiff and NPO: the likelihood-based methods share its batches, trainable parameters and cost
(full forward passes with logits). Trainable parameters: by default every parameter of the MLP blocks of all
decoder layers ("mlp"), which keeps the optimizer state and the weight gradients to about 60% of a Llama-style
model's non-embedding parameters and the saved edit to those tensors; "all" trains everything, anything else is
a regular expression over parameter names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import DSGError
from .base import METHODS, budget_level, scaled_steps
from .cost import forward_params, layer_params
from .losses import mean_nll, target_logprobs
from .trained import TrainedEdit, TrainingConfig, layer_of, mlp_parameter_names


@dataclass
class GAConfig(TrainingConfig):
    """Gradient ascent hyperparameters (open-unlearning's defaults where it has them)."""

    gamma: float = 1.0
    """γ: weight of the forget term."""
    params: str = "mlp"
    """Trainable parameters: mlp (all MLP blocks), all, or a regular expression over parameter names."""


def trainable_names(model: torch.nn.Module, params: str) -> list[str]:
    if params == "mlp":
        return mlp_parameter_names(model)
    if params == "all":
        return [n for n, _ in model.named_parameters()]
    try:
        pattern = re.compile(params)
    except re.error as e:
        raise DSGError(f"params must be 'mlp', 'all' or a regular expression; {params!r} is not one: {e}.") from None
    names = [n for n, _ in model.named_parameters() if pattern.search(n)]
    if not names:
        raise DSGError(f"The params pattern {params!r} matches no parameter of {type(model).__name__}.")
    return names


# Step counts and learning rates are scaled for a CPU budget: the paper trains 400-800 steps at lr 5e-6 to 5e-5 on
# a 2B model; here ~20 steps at larger rates, which probes on the embedded default showed to be the range between
# "no effect" (GA at 2e-5: forget accuracy unchanged) and collapse (GA at 1e-4: perplexity +430 %).
def likelihood_grid_base(name: str, budget: float) -> dict:
    return {"method": name, "steps": scaled_steps(20, budget), "batch_size": 4, "max_length": 64, "params": "mlp"}


@METHODS.register("ga")
class GradientAscent(TrainedEdit):
    name = "ga"
    label = "gradient ascent"
    config_class = GAConfig
    fixed = {"method": "ga"}
    uses_retain = False

    def grid(self, bench, budget: float) -> list[dict]:
        lrs = {"smoke": (5e-5,), "default": (3e-5, 5e-5, 7e-5), "wide": (2e-5, 3e-5, 5e-5, 7e-5, 1e-4)}
        return [likelihood_grid_base(self.name, budget) | {"lr": lr} for lr in lrs[budget_level(budget)]]

    def trainable(self, model, config) -> list[str]:
        return trainable_names(model, config.params)

    def cost_params(self, model, names, config) -> tuple[int, int, int]:
        p_fwd = forward_params(model)
        layers = [layer_of(model, n) for n in names]
        first = min((i for i in layers if i is not None), default=None)
        p_bwd = p_fwd - (layer_params(model, range(first)) if first is not None else 0)
        if any(i is None for i in layers):  # embeddings or head train: gradients flow through everything
            p_bwd = p_fwd
        wanted = set(names)
        return p_fwd, p_bwd, sum(p.numel() for n, p in model.named_parameters() if n in wanted)

    def updated(self, names, config) -> str:
        return f"{len(names)} tensors ({config.params})"

    def forget_term(self, model, ids, mask, batch, state, config) -> torch.Tensor:
        logp, tmask = target_logprobs(model, ids, mask)
        return -mean_nll(logp, ids, tmask)

    def combine(self, forget, retain, config) -> torch.Tensor:
        loss = config.gamma * forget
        return loss if retain is None else loss + config.alpha * retain
