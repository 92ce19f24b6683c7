"""What a fit costs: wall time and an estimate of FLOPs, accumulated as a run goes.

FLOPs (an estimate; attention-score FLOPs and optimizer updates are ignored). With P_fwd the parameters a forward
pass multiplies by (decoder layers it runs, plus the output embedding when logits are computed), P_bwd the
parameters between the loss and the earliest trainable tensor (gradients must flow back through them), P_train
the trainable parameters, and T the token positions processed (padding included, since it is computed):

    forward only        2 · P_fwd · T
    forward + backward  2 · P_fwd · T + 2 · P_bwd · T (activation gradients) + 2 · P_train · T (weight gradients)

which is the usual 6·P·T when everything trains. Embedding lookups are free.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from ..lm.hooks import decoder_layers


def layer_params(model: torch.nn.Module, layers: Iterable[int]) -> int:
    _, mods = decoder_layers(model)
    return sum(p.numel() for i in layers for p in mods[i].parameters())


def forward_params(model: torch.nn.Module, upto_layer: int | None = None) -> int:
    """P_fwd: parameters a forward pass multiplies by. Up to decoder layer `upto_layer` (stopped there), or the
    whole model with logits: everything but embedding lookups, plus the output embedding even when it is tied."""
    if upto_layer is not None:
        return layer_params(model, range(upto_layer + 1))
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:
        n += head.weight.numel()
    return n


class Cost:
    """Wall time and a FLOPs estimate, accumulated as a run goes (see the module docstring for the formula)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.flops = 0.0
        self.forward_tokens = 0
        self.train_tokens = 0
        self.parts: dict[str, float] = {}

    def forward(self, p_fwd: int, tokens: int, what: str) -> None:
        f = 2.0 * p_fwd * tokens
        self.flops += f
        self.forward_tokens += tokens
        self.parts[what] = self.parts.get(what, 0.0) + f

    def train(self, p_fwd: int, p_bwd: int, p_train: int, tokens: int, what: str = "train") -> None:
        f = 2.0 * (p_fwd + p_bwd + p_train) * tokens
        self.flops += f
        self.train_tokens += tokens
        self.parts[what] = self.parts.get(what, 0.0) + f

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    def record(self, **counts) -> dict:
        return {
            "seconds": self.seconds(),
            "flops": self.flops,
            "flops_by_part": self.parts,
            "train_tokens": self.train_tokens,
            "forward_only_tokens": self.forward_tokens,
            **counts,
        }
