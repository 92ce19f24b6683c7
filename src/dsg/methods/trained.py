"""The base of every weight-editing method (RMU, gradient ascent, GradDiff, NPO): one training loop, in the
manner of open-unlearning's `UnlearnTrainer`, with each method a small subclass that says what trains, what it
caches from the frozen model, and its forget and retain terms.

    loss(step) = combine(forget_term(forget batch), retain_term(retain batch))         AdamW on `trainable`

Batches. Each corpus is tokenized into windows (lm.text.tokenize), shuffled once with the seed and cut into
fixed batches; step s uses batch s mod (number of batches), i.e. epochs without reshuffling. Fixed batches let a
method cache the frozen/reference model's outputs per batch up front (`prepare`: exactly what it would compute
at that step, same padding, same numerics) instead of holding a second model.

The model is trained in eval mode (no dropout, so runs are deterministic) and handed back unchanged: the result
is an Edit holding only the tensors that changed (runtime/edit.py). `objective` evaluates the same terms over
every batch a run visits, for tests and diagnostics.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..config import check_types
from ..errors import DSGError
from ..lm.fingerprint import whole_model_fingerprint
from ..lm.hooks import decoder_layers
from ..lm.text import pad_batch, pad_id_of, tokenize
from ..runtime.edit import Edit, edited, make_edit
from .base import Fitted, UnlearningMethod
from .cost import Cost

MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class TrainingConfig:
    """What every trained method shares."""

    lr: float = 1e-5
    """AdamW learning rate."""
    steps: int = 80
    """Optimizer steps (one forget batch, plus one retain batch where the method has a retain term)."""
    batch_size: int = 4
    """Sequences per batch."""
    max_length: int = 128
    """Tokens per sequence; longer documents are split into windows."""
    seed: int = 0
    """Seed for the batch order (and any random direction the method draws)."""

    def __post_init__(self):
        check_types(self)  # a grid file's "fast" or true is refused here, not deep in training
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise DSGError("Training needs steps >= 1, batch_size >= 1 and max_length >= 2.")
        if not self.lr > 0:
            raise DSGError(f"Training needs lr > 0, got {self.lr}.")


# ---- batches --------------------------------------------------------------------------------------------------


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


def training_windows(
    model: torch.nn.Module,
    tokenizer,
    forget: Sequence,
    retain: Sequence,
    max_length: int,
    batch_size: int,
    seed: int,
    use_retain: bool = True,
) -> Windows:
    """Forget and retain windows (texts or token-id lists), each batch order from its own seed (forget seed+1,
    retain seed+2); no retain windows if not use_retain."""
    pad_id = pad_id_of(tokenizer, model) if tokenizer is not None else (model.config.pad_token_id or 0)
    f_seqs = as_sequences(tokenizer, forget, max_length)
    r_seqs = as_sequences(tokenizer, retain, max_length) if use_retain else []
    return Windows(
        pad_id,
        f_seqs,
        r_seqs,
        fixed_batches(len(f_seqs), batch_size, seed + 1),
        fixed_batches(len(r_seqs), batch_size, seed + 2) if use_retain else [],
    )


def batch_tensors(
    seqs: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([seqs[i] for i in idx], pad_id, side="right")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def reference_outputs(model: torch.nn.Module, seqs, batches, pad_id: int, fn) -> list:
    """`fn(model, ids, mask)` for each fixed batch, under the current (frozen) weights: what a method caches up
    front instead of holding a reference model."""
    device = next(model.parameters()).device
    return [fn(model, *batch_tensors(seqs, idx, pad_id, device)) for idx in batches]


def batch_tokens(seqs: Sequence[Sequence[int]], batches: Sequence[Sequence[int]]) -> int:
    """Token positions the padded batches hold (what a forward over them computes)."""
    return sum(len(b) * max(len(seqs[i]) for i in b) for b in batches)


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
        raise DSGError(
            f"Found no MLP block (a submodule named {MLP_NAMES}) in the decoder layers of "
            f"{type(model).__name__}; pass params='all' or a regular expression."
        )
    return names


def layer_of(model: torch.nn.Module, name: str) -> int | None:
    """The decoder layer a parameter belongs to, None outside the decoder layers."""
    prefix, _ = decoder_layers(model)
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".")[0])


@contextmanager
def training(model: torch.nn.Module, names: Sequence[str]):
    """Make exactly `names` trainable (eval mode: no dropout); yields (params, originals). On exit every original
    value, requires_grad flag, grad and the train/eval mode are restored."""
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


# ---- the method base ------------------------------------------------------------------------------------------


class TrainedEdit(UnlearningMethod):
    """A weight edit trained on the forget and retain corpora; subclasses define the terms."""

    kind = "edit"
    seeded = True
    uses_retain: bool = True

    # -- what a subclass defines

    def resolve(self, model: torch.nn.Module, config):
        """The config with every model-dependent default filled in."""
        return config

    def trainable(self, model: torch.nn.Module, config) -> list[str]:
        raise NotImplementedError

    def cost_params(self, model: torch.nn.Module, names: list[str], config) -> tuple[int, int, int]:
        """(P_fwd, P_bwd, P_train) of one training forward/backward (see methods/cost.py)."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, w: Windows, config, cost: Cost, p_fwd: int) -> Any:
        """What the terms need from the frozen model, computed once for the batches the run visits."""
        return None

    def forget_term(self, model, ids, mask, batch: int, state, config) -> torch.Tensor:
        raise NotImplementedError

    def retain_term(self, model, ids, mask, batch: int, state, config) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, forget: torch.Tensor, retain: torch.Tensor | None, config) -> torch.Tensor:
        raise NotImplementedError

    def updated(self, names: list[str], config) -> Any:
        """How the edit's record describes the trained tensors."""
        return f"{len(names)} tensors"

    # -- the loop

    def windows(self, model, tokenizer, forget, retain, config) -> Windows:
        return training_windows(
            model,
            tokenizer,
            forget,
            retain,
            config.max_length,
            config.batch_size,
            config.seed,
            use_retain=self.uses_retain,
        )

    def train(
        self,
        model: torch.nn.Module,
        tokenizer,
        forget: Sequence,
        retain: Sequence = (),
        config=None,
        *,
        progress: bool = True,
    ) -> Edit:
        """Train on `model` (texts or token-id lists) and return the edit; the model itself is left unchanged."""
        config = self.resolve(model, config if config is not None else self.config_class())
        names = self.trainable(model, config)
        device = next(model.parameters()).device
        w = self.windows(model, tokenizer, forget, retain, config)
        base_fp = whole_model_fingerprint(model)
        seed_everything(config.seed)
        cost = Cost()
        p_fwd, p_bwd, p_train = self.cost_params(model, names, config)
        state = self.prepare(model, w, config, cost, p_fwd)

        log = []
        with training(model, names) as (params, originals):
            opt = torch.optim.AdamW(params, lr=config.lr)
            for step in tqdm(range(config.steps), desc=self.name, disable=not progress, unit="step"):
                fi = step % len(w.forget_batches)
                ids, mask = batch_tensors(w.forget, w.forget_batches[fi], w.pad_id, device)
                forget_term = self.forget_term(model, ids, mask, fi, state, config)
                tokens = ids.numel()
                retain_term = None
                if self.uses_retain:
                    ri = step % len(w.retain_batches)
                    ids, mask = batch_tensors(w.retain, w.retain_batches[ri], w.pad_id, device)
                    retain_term = self.retain_term(model, ids, mask, ri, state, config)
                    tokens += ids.numel()
                loss = self.combine(forget_term, retain_term, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                cost.train(p_fwd, p_bwd, p_train, tokens)
                value = float(loss.detach())
                log.append(
                    {
                        "step": step,
                        "loss": value,
                        "forget": float(forget_term.detach()),
                        "retain": 0.0 if retain_term is None else float(retain_term.detach()),
                    }
                )
                if not math.isfinite(value):
                    raise DSGError(f"{self.name} diverged at step {step} (loss {value}); lower lr.")
            edit = make_edit(
                model,
                originals,
                {
                    "method": self.name,
                    "config": dataclasses.asdict(config),
                    "seed": config.seed,
                    "updated": self.updated(names, config),
                    "base": {"model": base_fp},
                    "cost": cost.record(p_fwd=p_fwd, p_bwd=p_bwd, p_train=p_train),
                    "log": log,
                },
            )
        edit.info["cost"]["seconds"] = cost.seconds()  # including putting the originals back
        return edit

    @torch.no_grad()
    def objective(self, model, tokenizer, forget, retain, config, edit: Edit | None = None) -> dict:
        """The terms over every fixed batch a run visits, each batch weighted equally, under `edit` (frozen and
        reference outputs: the model without it)."""
        config = self.resolve(model, config)
        device = next(model.parameters()).device
        w = self.windows(model, tokenizer, forget, retain, config)
        w = w._replace(forget_batches=w.forget_batches[: config.steps], retain_batches=w.retain_batches[: config.steps])
        state = self.prepare(model, w, config, Cost(), 0)
        terms = {"forget": [], "retain": []}
        with edited(model, edit if edit is not None else {}, verify=edit is not None):
            for kind, seqs, batches, term in (
                ("forget", w.forget, w.forget_batches, self.forget_term),
                ("retain", w.retain, w.retain_batches, self.retain_term),
            ):
                for b, idx in enumerate(batches):
                    ids, mask = batch_tensors(seqs, idx, w.pad_id, device)
                    terms[kind].append(float(term(model, ids, mask, b, state, config)))
        forget_term = sum(terms["forget"]) / len(terms["forget"])
        retain_term = sum(terms["retain"]) / len(terms["retain"]) if terms["retain"] else None
        loss = self.combine(
            torch.tensor(forget_term, dtype=torch.float64),
            None if retain_term is None else torch.tensor(retain_term, dtype=torch.float64),
            config,
        )
        return {"loss": float(loss), "forget": forget_term, "retain": retain_term or 0.0}

    # -- as a compare method

    def settings(self, bench, cfg: dict) -> dict:
        """The entry with every default of the method's config filled in, so that a changed default is a new run.
        RMU's steering coefficient stays a multiple of the residual norm: the norm is measured on the bench's retain
        text (a forward pass), which the run key already holds through the bench."""
        return {**cfg, "config": dataclasses.asdict(self.config(cfg))}

    def make_config(self, bench, cfg: dict) -> tuple[Any, dict]:
        """(config, notes recorded with the edit's config) for one grid entry."""
        return self.config(cfg), {}

    def fit(self, bench, cfg: dict, run_dir: Path, progress: bool) -> Fitted:
        cost = Cost()
        config, notes = self.make_config(bench, cfg)
        edit = self.train(
            bench.model, bench.tokenizer, bench.forget_texts, bench.retain_texts, config, progress=progress
        )
        edit.info["config"].update(notes)
        spent = dict(edit.info["cost"])
        spent["seconds"] = cost.seconds()
        spent["note"] = "training steps (forward + backward) plus cached frozen/reference forward passes"
        edit.save(run_dir)
        log = edit.info.get("log", [])
        record = {
            "edit": run_dir.name,
            "config": edit.info["config"],
            "tensors": len(edit.tensors),
            "parameters": edit.numel(),
            "first_loss": log[0] if log else None,
            "last_loss": log[-1] if log else None,
        }
        return Fitted(edit, spent, record)

    def restore(self, bench, run: dict, run_dir: Path) -> Fitted | None:
        """The stored edit, if it is this run's: one that cannot be read, or that another configuration or seed
        trained (a folder copied over, a store put together from several runs), is trained again instead."""
        if not (run_dir / "edit.json").is_file():
            return None
        try:
            edit = Edit.load(run_dir)
        except DSGError as e:
            print(f"[{self.name}] the stored edit in {str(run_dir)!r} cannot be read ({e}); training it again",
                  file=sys.stderr)  # fmt: skip
            return None
        record = run.get("record") or {}
        if edit.info.get("config") != record.get("config") or edit.info.get("seed") != run["config"].get("seed"):
            print(f"[{self.name}] the stored edit in {str(run_dir)!r} was trained with another configuration or "
                  "seed than this run's; training it again", file=sys.stderr)  # fmt: skip
            return None
        return Fitted(edit, run["cost"], run["record"])
