"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark", `rmu/unlearn.py`).

With h_ℓ the output of decoder layer ℓ, u a fixed random unit vector (u ~ U[0,1)^d, normalised once, seeded), c the
steering coefficient and α the retain weight, each step minimises

    L = mean over real forget tokens of ||h_ℓ(x_f) - c·u||²
        + α · mean over real retain tokens of ||h_ℓ(x_r) - h_ℓ^frozen(x_r)||²

with AdamW, updating only the MLP down-projection weights of layers ℓ-2, ℓ-1, ℓ (`down_proj`, GPT-2 `mlp.c_proj`,
GPT-NeoX `dense_4h_to_h`, ...: found by name inside each decoder layer's MLP). "Real" tokens are dsg's usual ones
(no padding, no special tokens, not a sequence's first position). The original code uses an element-wise mean
MSE, which is this loss divided by d: the ratio of the two terms, and so α, mean the same.

CPU economies, none of which changes the loss: every forward stops at layer ℓ (lm.hooks.StopForward), so later
layers and the output embedding are never run; the frozen model's retain activations are computed once up front
for the fixed retain batches (see methods/trained.py) instead of holding a second model.

In `dsg compare` the steering coefficient is given as a multiple of the mean residual norm at ℓ
(`steering_norm_multiple`): an absolute c transfers badly between models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import is_number
from ..errors import DSGError
from ..lm.hooks import activations_by_batch, decoder_layers, forward_to_hook, hidden_size, resolve
from ..lm.text import pad_id_of, real_token_mask, special_token_ids
from .base import METHODS, budget_level, scaled_steps
from .cost import forward_params, layer_params
from .losses import mean_sq_distance
from .trained import MLP_NAMES, TrainedEdit, TrainingConfig, as_sequences, batch_tensors, batch_tokens

DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")


@dataclass
class RMUConfig(TrainingConfig):
    """RMU hyperparameters. Defaults are the WMDP script's CLI defaults (not its published Zephyr run)."""

    lr: float = 5e-5
    """AdamW learning rate."""
    layer: int | None = None
    """Layer ℓ whose output is steered; the MLP down-projections of layers ℓ-2..ℓ train. Default: a quarter of the
    way up."""
    steering_coeff: float = 20.0
    """c: forget activations are pushed towards c·u."""
    alpha: float = 100.0
    """α: weight of the retain term (keep retain activations equal to the frozen model's)."""

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise DSGError(f"RMU needs alpha >= 0, got {self.alpha}.")


def default_layer(model: torch.nn.Module) -> int:
    _, layers = decoder_layers(model)
    return max(0, len(layers) // 4)


def down_projection_names(model: torch.nn.Module, layers: Sequence[int]) -> list[str]:
    """Parameter names of the MLP down-projection weights of the given decoder layers."""
    prefix, mods = decoder_layers(model)
    names = []
    for i in layers:
        found = [
            n
            for n, _ in mods[i].named_parameters()
            if n.endswith(".weight")
            and n.split(".")[-2] in DOWN_PROJECTIONS
            and any(part in MLP_NAMES for part in n.split(".")[:-2])
        ]
        if len(found) != 1:
            raise DSGError(
                f"Cannot find the one MLP down-projection of decoder layer {i} of {type(model).__name__} "
                f"(looked for {DOWN_PROJECTIONS} inside {MLP_NAMES}; found {found})."
            )
        names.append(f"{prefix}.{i}.{found[0]}")
    return names


def updated_layers(model: torch.nn.Module, layer: int) -> list[int]:
    _, mods = decoder_layers(model)
    if not 0 <= layer < len(mods):
        raise DSGError(f"RMU layer {layer} is out of range: {type(model).__name__} has layers 0..{len(mods) - 1}.")
    return list(range(max(0, layer - 2), layer + 1))


def layer_point(model: torch.nn.Module, layer: int):
    return resolve(model, f"blocks.{layer}.hook_resid_post")


@torch.no_grad()
def frozen_activations(model, point, seqs, batches, pad_id: int) -> list[torch.Tensor]:
    """Per fixed batch, the layer-ℓ activations at its real tokens [N_real, D] under the current weights."""
    padded = ((idx, *batch_tensors(seqs, idx, pad_id, "cpu")) for idx in batches)
    return [x[real].detach().clone() for _, _, x, real in activations_by_batch(model, point, padded)]


@torch.no_grad()
def mean_residual_norm(model, tokenizer, texts, layer: int, max_length: int, n: int = 32) -> float:
    """Mean L2 norm of layer `layer`'s output over the real tokens of the first `n` windows of `texts`."""
    seqs = as_sequences(tokenizer, texts, max_length)[:n]
    chunks = [list(range(s, min(s + 8, len(seqs)))) for s in range(0, len(seqs), 8)]
    total, count = 0.0, 0
    for h in frozen_activations(model, layer_point(model, layer), seqs, chunks, pad_id_of(tokenizer, model)):
        total += float(h.float().norm(dim=-1).sum())
        count += h.shape[0]
    return total / max(count, 1)


def steering_vector(d: int, coeff: float, seed: int) -> torch.Tensor:
    """c·u with u ~ U[0,1)^d normalised to unit length (the WMDP script's `rand(1,1,d)`), from its own generator."""
    u = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (coeff * u / u.norm()).float()


@METHODS.register("rmu")
class RMU(TrainedEdit):
    name = "rmu"
    label = "RMU"
    config_class = RMUConfig
    extra_fields = frozenset({"steering_norm_multiple"})

    def grid(self, bench, budget: float) -> list[dict]:
        # Scaled for a CPU budget (the paper: 400-800 steps): ~120 steps at lr 1e-3; at lr 1e-4 for 40 steps RMU
        # changed nothing on the embedded default.
        base = {"layer": bench.layer, "steps": scaled_steps(120, budget), "batch_size": 4, "max_length": 128}
        level = budget_level(budget)
        if level == "smoke":
            pts = [(3.0, 100.0, 1e-3)]
        elif level == "default":
            pts = [(m, a, 1e-3) for m, a in ((1.0, 100.0), (3.0, 100.0), (3.0, 300.0), (6.0, 100.0))]
        else:
            pts = [(m, a, lr) for m in (1.0, 3.0, 6.0) for a in (30.0, 100.0, 300.0, 1000.0) for lr in (5e-4, 1e-3)]
        return [base | {"steering_norm_multiple": m, "alpha": a, "lr": lr} for m, a, lr in pts]

    def config(self, cfg: dict) -> RMUConfig:
        multiple = cfg.get("steering_norm_multiple")
        if multiple is not None and not (is_number(multiple) and multiple > 0):
            raise DSGError(f"steering_norm_multiple must be a positive number (c as a multiple of the residual norm), "
                           f"got {multiple!r}.")  # fmt: skip
        return super().config(cfg)

    def make_config(self, bench, cfg: dict):
        cfg = {"layer": bench.layer} | dict(cfg)
        multiple = cfg.get("steering_norm_multiple")
        norm = None
        if multiple is not None:
            norm = mean_residual_norm(
                bench.model,
                bench.tokenizer,
                bench.retain_texts,
                cfg["layer"],
                cfg.get("max_length", RMUConfig.max_length),
            )
            cfg["steering_coeff"] = multiple * norm
        return self.config(cfg), {"steering_norm_multiple": multiple, "residual_norm": norm}

    def resolve(self, model, config: RMUConfig) -> RMUConfig:
        layer = default_layer(model) if config.layer is None else config.layer
        updated_layers(model, layer)  # refuses a layer out of range
        return dataclasses.replace(config, layer=layer)

    def trainable(self, model, config) -> list[str]:
        return down_projection_names(model, updated_layers(model, config.layer))

    def cost_params(self, model, names, config) -> tuple[int, int, int]:
        wanted = set(names)
        return (
            forward_params(model, config.layer),
            layer_params(model, updated_layers(model, config.layer)),
            sum(p.numel() for n, p in model.named_parameters() if n in wanted),
        )

    def updated(self, names, config) -> list[str]:
        return names

    def prepare(self, model, w, config, cost, p_fwd) -> dict:
        point = layer_point(model, config.layer)
        used = w.retain_batches[: config.steps]
        frozen = frozen_activations(model, point, w.retain, used, w.pad_id)
        cost.forward(p_fwd, batch_tokens(w.retain, used), "frozen retain activations")
        device = next(model.parameters()).device
        control = steering_vector(hidden_size(model), config.steering_coeff, config.seed).to(device)
        return {"point": point, "frozen": frozen, "control": control, "specials": special_token_ids(model)}

    def _activations(self, model, ids, mask, state) -> torch.Tensor:
        real = real_token_mask(ids, mask, state["specials"])
        return forward_to_hook(model, state["point"], input_ids=ids, attention_mask=mask)[real]

    def forget_term(self, model, ids, mask, batch, state, config) -> torch.Tensor:
        h = self._activations(model, ids, mask, state)
        return mean_sq_distance(h, state["control"].to(h.dtype))

    def retain_term(self, model, ids, mask, batch, state, config) -> torch.Tensor:
        return mean_sq_distance(self._activations(model, ids, mask, state), state["frozen"][batch])

    def combine(self, forget, retain, config) -> torch.Tensor:
        return forget + config.alpha * retain
