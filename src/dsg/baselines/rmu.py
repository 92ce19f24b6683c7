"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark", `rmu/unlearn.py`).

With h_ℓ the output of decoder layer ℓ, u a fixed random unit vector (u ~ U[0,1)^d, normalised once, seeded), c the
steering coefficient and α the retain weight, each step minimises

    L = mean over real forget tokens of ||h_ℓ(x_f) - c·u||²  +  α · mean over real retain tokens of ||h_ℓ(x_r) - h_ℓ^frozen(x_r)||²

with AdamW, updating only the MLP down-projection weights of layers ℓ-2, ℓ-1, ℓ (`down_proj`, GPT-2 `mlp.c_proj`,
GPT-NeoX `dense_4h_to_h`, ...: found by name inside each decoder layer's MLP). "Real" tokens are dsg's usual ones
(no padding, no special tokens, not a sequence's first position). The original code uses an element-wise mean
MSE, which is this loss divided by d: the ratio of the two terms, and so α, mean the same.

CPU economies, none of which changes the loss: every forward stops at layer ℓ (hooks.StopForward), so later
layers and the output embedding are never run; the frozen model's retain activations are computed once up front
for the fixed retain batches (see baselines.common) instead of holding a second model; the model is trained in
eval mode (no dropout, as in the Zephyr/Llama models RMU was published on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..corpus import real_token_mask, special_token_ids
from ..errors import DSGError
from ..hooks import decoder_layers, forward_to_hook, hidden_size, resolve
from .common import (
    Cost,
    batch_tensors,
    forward_params,
    layer_params,
    seed_everything,
    training,
    training_windows,
)
from .weights import Edit, make_edit, whole_model_fingerprint

DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class RMUConfig:
    """RMU hyperparameters. Defaults are the WMDP script's CLI defaults (not its published Zephyr run)."""

    layer: int | None = None
    """Layer ℓ whose output is steered; the MLP down-projections of layers ℓ-2..ℓ train. Default: a quarter of the way up."""
    steering_coeff: float = 20.0
    """c: forget activations are pushed towards c·u."""
    alpha: float = 100.0
    """α: weight of the retain term (keep retain activations equal to the frozen model's)."""
    lr: float = 5e-5
    """AdamW learning rate."""
    steps: int = 80
    """Optimizer steps (one forget and one retain batch each)."""
    batch_size: int = 4
    """Sequences per forget batch and per retain batch."""
    max_length: int = 128
    """Tokens per sequence; longer documents are split into windows."""
    seed: int = 0
    """Seed for the random direction u and the batch order."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise DSGError("RMU needs steps >= 1, batch_size >= 1 and max_length >= 2.")
        if self.lr <= 0 or self.alpha < 0:
            raise DSGError(f"RMU needs lr > 0 and alpha >= 0, got lr={self.lr}, alpha={self.alpha}.")


def default_layer(model: torch.nn.Module) -> int:
    _, layers = decoder_layers(model)
    return max(0, len(layers) // 4)


def down_projection_names(model: torch.nn.Module, layers: Sequence[int]) -> list[str]:
    """Parameter names of the MLP down-projection weights of the given decoder layers."""
    prefix, mods = decoder_layers(model)
    names = []
    for i in layers:
        found = [
            n for n, _ in mods[i].named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in DOWN_PROJECTIONS
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


@torch.no_grad()
def frozen_activations(model, point, seqs, batches, pad_id: int, specials, device) -> list[torch.Tensor]:
    """Per fixed batch, the layer-ℓ activations at its real tokens [N_real, D] under the current weights."""
    out = []
    for idx in batches:
        ids, mask = batch_tensors(seqs, idx, pad_id, device)
        real = real_token_mask(ids, mask, specials)
        out.append(forward_to_hook(model, point, input_ids=ids, attention_mask=mask)[real].detach().clone())
    return out


def steering_vector(d: int, coeff: float, seed: int) -> torch.Tensor:
    """c·u with u ~ U[0,1)^d normalised to unit length (the WMDP script's `rand(1,1,d)`), from its own generator."""
    u = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (coeff * u / u.norm()).float()


class _Setup(NamedTuple):
    layer: int
    point: Any
    device: torch.device
    pad_id: int
    specials: Any
    f_seqs: list
    r_seqs: list
    f_batches: list
    r_batches: list


def _setup(model, tokenizer, forget, retain, config: RMUConfig) -> _Setup:
    """What training and the objective share: the steered layer, its hook, the token windows and the fixed batch
    orders (forget and retain, each from its own seed)."""
    layer = default_layer(model) if config.layer is None else config.layer
    point = resolve(model, f"blocks.{layer}.hook_resid_post")
    w = training_windows(model, tokenizer, forget, retain, config.max_length, config.batch_size, config.seed)
    return _Setup(layer, point, next(model.parameters()).device, w.pad_id, special_token_ids(model),
                  w.forget, w.retain, w.forget_batches, w.retain_batches)


def rmu(
    model: torch.nn.Module,
    tokenizer,
    forget: Sequence,
    retain: Sequence,
    config: RMUConfig | None = None,
    *,
    progress: bool = True,
) -> Edit:
    """Train RMU on `model` (texts or token-id lists) and return the edit; the model itself is left unchanged."""
    config = config or RMUConfig()
    s = _setup(model, tokenizer, forget, retain, config)
    layer, point, device, pad_id, specials = s.layer, s.point, s.device, s.pad_id, s.specials
    f_seqs, r_seqs, f_batches, r_batches = s.f_seqs, s.r_seqs, s.f_batches, s.r_batches
    layers = updated_layers(model, layer)
    names = down_projection_names(model, layers)
    base_fp = whole_model_fingerprint(model)
    seed_everything(config.seed)
    cost = Cost()
    p_fwd = forward_params(model, layer)
    p_bwd = layer_params(model, layers)
    p_train = sum(p.numel() for n, p in model.named_parameters() if n in names)

    used_r = r_batches[: min(config.steps, len(r_batches))]
    frozen = frozen_activations(model, point, r_seqs, used_r, pad_id, specials, device)
    cost.forward(p_fwd, sum(len(b) * max(len(r_seqs[i]) for i in b) for b in used_r), "frozen retain activations")
    control = steering_vector(hidden_size(model), config.steering_coeff, config.seed).to(device)

    log = []
    with training(model, names) as (params, originals):
        opt = torch.optim.AdamW(params, lr=config.lr)
        for step in tqdm(range(config.steps), desc="rmu", disable=not progress, unit="step"):
            fi, ri = step % len(f_batches), step % len(r_batches)
            ids, mask = batch_tensors(f_seqs, f_batches[fi], pad_id, device)
            real = real_token_mask(ids, mask, specials)
            h_f = forward_to_hook(model, point, input_ids=ids, attention_mask=mask)[real]
            forget_loss = (h_f - control.to(h_f.dtype)).square().sum(-1).mean()
            tokens = ids.numel()

            ids, mask = batch_tensors(r_seqs, r_batches[ri], pad_id, device)
            real = real_token_mask(ids, mask, specials)
            h_r = forward_to_hook(model, point, input_ids=ids, attention_mask=mask)[real]
            retain_loss = (h_r - frozen[ri]).square().sum(-1).mean()
            tokens += ids.numel()

            loss = forget_loss + config.alpha * retain_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cost.train(p_fwd, p_bwd, p_train, tokens)
            log.append({"step": step, "loss": float(loss.detach()), "forget": float(forget_loss.detach()), "retain": float(retain_loss.detach())})
        edit = make_edit(model, originals, {
            "method": "rmu",
            "config": dataclasses.asdict(config) | {"layer": layer},
            "seed": config.seed,
            "updated": names,
            "base": {"model": base_fp},
            "cost": cost.record(p_fwd=p_fwd, p_bwd=p_bwd, p_train=p_train),
            "log": log,
        })
    edit.info["cost"]["seconds"] = cost.record()["seconds"]  # including putting the originals back
    return edit


def rmu_loss(model, tokenizer, forget, retain, config: RMUConfig, edit: Edit | None = None) -> dict:
    """The RMU objective over every fixed batch the run visits (frozen = the model without `edit`), under `edit`.
    For tests and diagnostics."""
    from .weights import edited

    s = _setup(model, tokenizer, forget, retain, config)
    f_batches, r_batches = s.f_batches[: config.steps], s.r_batches[: config.steps]
    args = (s.pad_id, s.specials, s.device)
    frozen = frozen_activations(model, s.point, s.r_seqs, r_batches, *args)
    with edited(model, edit if edit is not None else {}, verify=edit is not None):
        h_f = frozen_activations(model, s.point, s.f_seqs, f_batches, *args)
        h_r = frozen_activations(model, s.point, s.r_seqs, r_batches, *args)
    control = steering_vector(h_f[0].shape[-1], config.steering_coeff, config.seed).to(s.device)
    forget_loss = torch.cat([(h - control).square().sum(-1) for h in h_f]).mean()
    retain_loss = torch.cat([(h - z).square().sum(-1) for h, z in zip(h_r, frozen)]).mean()
    return {"loss": float(forget_loss + config.alpha * retain_loss), "forget": float(forget_loss),
            "retain": float(retain_loss)}
