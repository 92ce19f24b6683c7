"""What every training baseline shares: token batches on a fixed schedule, a trainable subset of parameters that is
always put back, and a cost record (wall time and an estimate of FLOPs).

Batches. Each corpus is tokenized into windows (dsg.corpus.tokenize), shuffled once with the seed and cut into
fixed batches; step s uses batch s mod (number of batches), i.e. epochs without reshuffling. Fixed batches let a
method cache the frozen/reference model's outputs per batch up front (exactly what it would compute at that
step, same padding, same numerics) instead of holding a second model.

FLOPs (an estimate; attention-score FLOPs and optimizer updates are ignored). With P_fwd the parameters a forward
pass multiplies by (decoder layers it runs, plus the output embedding when logits are computed), P_bwd the
parameters between the loss and the earliest trainable tensor (gradients must flow back through them), P_train
the trainable parameters, and T the token positions processed (padding included, since it is computed):

    forward only        2 · P_fwd · T
    forward + backward  2 · P_fwd · T + 2 · P_bwd · T (activation gradients) + 2 · P_train · T (weight gradients)

which is the usual 6·P·T when everything trains. Embedding lookups are free.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ..corpus import pad_batch, pad_id_of, tokenize
from ..errors import DSGError
from ..hooks import decoder_layers

MLP_NAMES = ("mlp", "feed_forward", "ffn")


def as_sequences(tokenizer, data: Sequence, max_length: int) -> list[list[int]]:
    """Token windows from texts (tokenized) or from token-id lists (split into windows of `max_length`)."""
    if not data:
        return []
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise DSGError("Texts need a tokenizer; pass one, or pass token-id lists.")
        return tokenize(tokenizer, data, max_length)
    out = []
    for d in data:
        ids = [int(i) for i in d]
        out += [ids[s : s + max_length] for s in range(0, len(ids), max_length) if len(ids[s : s + max_length]) >= 2]
    return out


def fixed_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The n items shuffled once with `seed` and cut into batches of `batch_size` (the last may be smaller)."""
    if n == 0:
        raise DSGError("A training corpus holds no sequence of two or more tokens.")
    if batch_size < 1:
        raise DSGError(f"batch_size must be at least 1, got {batch_size}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


class Windows(NamedTuple):
    """Both corpora as token windows, with their fixed batch orders and the id that pads them."""

    pad_id: int
    forget: list[list[int]]
    retain: list[list[int]]
    forget_batches: list[list[int]]
    retain_batches: list[list[int]]


def training_windows(model: torch.nn.Module, tokenizer, forget: Sequence, retain: Sequence, max_length: int,
                     batch_size: int, seed: int, use_retain: bool = True) -> Windows:
    """What every training baseline and its diagnostic objective read: forget and retain windows (texts or token-id
    lists), each batch order from its own seed (forget seed+1, retain seed+2); no retain windows if not use_retain."""
    pad_id = pad_id_of(tokenizer, model) if tokenizer is not None else (model.config.pad_token_id or 0)
    f_seqs = as_sequences(tokenizer, forget, max_length)
    r_seqs = as_sequences(tokenizer, retain, max_length) if use_retain else []
    return Windows(pad_id, f_seqs, r_seqs, fixed_batches(len(f_seqs), batch_size, seed + 1),
                   fixed_batches(len(r_seqs), batch_size, seed + 2) if use_retain else [])


def batch_tensors(seqs: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([seqs[i] for i in idx], pad_id, side="right")
    return ids.to(device), mask.to(device)


# ---- parameters -----------------------------------------------------------------------------------------------


def mlp_parameter_names(model: torch.nn.Module) -> list[str]:
    """Every parameter inside the MLP block of every decoder layer (weights and biases)."""
    prefix, layers = decoder_layers(model)
    names = []
    for i, layer in enumerate(layers):
        for n, _ in layer.named_parameters():
            if any(part in MLP_NAMES for part in n.split(".")[:-1]):
                names.append(f"{prefix}.{i}.{n}")
    if not names:
        raise DSGError(f"Found no MLP block (a submodule named {MLP_NAMES}) in the decoder layers of "
                       f"{type(model).__name__}; pass params='all' or a regular expression.")
    return names


def layer_of(model: torch.nn.Module, name: str) -> int | None:
    """The decoder layer a parameter belongs to, None outside the decoder layers."""
    prefix, _ = decoder_layers(model)
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".")[0])


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


@contextmanager
def training(model: torch.nn.Module, names: Sequence[str]):
    """Make exactly `names` trainable (eval mode: no dropout, so runs are deterministic); yields (params,
    originals). On exit every original value, requires_grad flag, grad and the train/eval mode are restored."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise DSGError(f"{type(model).__name__} has no parameters {missing[:3]}.")
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    originals = {n: params[n].detach().clone() for n in names}
    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in originals)
        yield [params[n] for n in names], originals
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(originals[n])
                params[n].grad = None
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


# ---- cost -----------------------------------------------------------------------------------------------------


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

    def record(self, **counts) -> dict:
        return {
            "seconds": round(time.perf_counter() - self.start, 3),
            "flops": self.flops,
            "flops_by_part": self.parts,
            "train_tokens": self.train_tokens,
            "forward_only_tokens": self.forward_tokens,
            **counts,
        }
