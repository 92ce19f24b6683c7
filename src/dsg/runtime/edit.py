"""Weight edits: the tensors an unlearning run changed, saved on their own and applied back onto the base model.
An `Edit` is an Intervention (runtime/intervention.py): `edit.applied(model)` swaps it in for a block.

A training baseline (RMU, gradient ascent, GradDiff, NPO) edits a few parameter tensors in place and then puts the
originals back, handing out an `Edit`: the new values of exactly the tensors that changed, plus a record (method,
config, seed, cost) and the identity of the base they apply to:

    changed_sha256   sha256 over the *original* values of the changed tensors (names, dtypes, shapes, bytes)
    model            dsg.lm.fingerprint.model_fingerprint of the whole base model (every parameter)

So one base model in memory serves every configuration of a sweep:

    with edited(model, edit):          # swap the new tensors in
        ...                            # evaluate the unlearned model
    # here the base weights are back, bit for bit

`apply_edit(model, path)` writes an edit permanently. Both refuse a model whose tensors have other names or shapes,
or (verify=True) whose original values do not hash to the recorded base: an edit made for another model, or one
already applied.

On disk: `edit.json` (format "dsg-edit") + `edit.safetensors` (the changed tensors under their parameter names).
`edit.json` records the new tensors' names, shapes and `tensors_sha256` (format 2); a load whose tensors differ
(replaced by another run's, re-saved in another dtype, cut short) is refused, as is a format-1 file, which has no
such hash to check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import DSGError
from ..files import atomic_directory, read_artifact_json, read_safetensors, save_tensors, write_json
from ..lm.fingerprint import config_differences, tensor_digest, whole_model_fingerprint
from .intervention import Ungated

FORMAT = "dsg-edit"
FORMAT_VERSION = 2  # 2: edit.json records the new tensors' sha256
JSON_NAME = "edit.json"
TENSORS_NAME = "edit.safetensors"


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor_digest(h, name, tensors[name])
    return h.hexdigest()


@dataclass
class Edit:
    """New values for some of a model's parameters, and what they were made from."""

    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    """method, config, seed, base ({changed_sha256, model}), cost, log, dsg_version."""

    prefix_causal = True  # new weights act on every token alike (runtime.intervention.prefix_causal)

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, path: str | os.PathLike) -> Path:
        """Write `edit.json` + `edit.safetensors` atomically."""
        path = Path(path)
        with atomic_directory(path, "weight edit") as tmp:
            write_json(
                tmp / JSON_NAME,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    **self.info,
                    "tensors": {n: list(t.shape) for n, t in sorted(self.tensors.items())},
                    "tensors_sha256": tensors_sha256(self.tensors),
                },
            )
            save_tensors({n: t.detach().cpu().contiguous() for n, t in self.tensors.items()}, tmp / TENSORS_NAME)
        return path

    @contextmanager
    def applied(self, model: torch.nn.Module, verify: bool = True) -> Iterator[Ungated]:
        """The Intervention protocol: the edit is in the model for the block (see `edited`)."""
        with edited(model, self, verify=verify):
            yield Ungated()

    def check_model(self, model: torch.nn.Module) -> None:
        check_base(model, self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        path = Path(path)
        meta = read_artifact_json(path, JSON_NAME, FORMAT, FORMAT_VERSION, "weight-edit")
        if meta.get("format_version") != FORMAT_VERSION or not isinstance(meta.get("tensors_sha256"), str):
            raise DSGError(f"{str(path / JSON_NAME)!r} records no hash of its tensors (written by an older dsg, or "
                           "edited): its tensors cannot be checked; train the edit again.")  # fmt: skip
        tensors = read_safetensors(path / TENSORS_NAME)
        if meta.get("tensors") != {n: list(t.shape) for n, t in sorted(tensors.items())}:
            raise DSGError(f"{str(path / TENSORS_NAME)!r} holds other tensors, or other shapes, than {JSON_NAME} "
                           "declares.")  # fmt: skip
        if tensors_sha256(tensors) != meta["tensors_sha256"]:
            raise DSGError(f"{str(path / TENSORS_NAME)!r} does not hash to the tensors_sha256 that {JSON_NAME} "
                           "records: the tensors were replaced or changed after the edit was saved.")  # fmt: skip
        info = {k: v for k, v in meta.items() if k not in ("format", "format_version", "tensors", "tensors_sha256")}
        return cls(tensors, info)


def make_edit(model: torch.nn.Module, originals: Mapping[str, torch.Tensor], info: dict) -> Edit:
    """The Edit holding the current values of those `originals` that changed, with the base identity recorded.

    Call it while the trained values are in the model, before restoring the originals. The changed tensors' base
    hash is computed from `originals`; pass the whole base model's fingerprint, taken before training, as
    info["base"]["model"].
    """
    params = dict(model.named_parameters())
    changed = {n: params[n].detach().clone() for n, t in originals.items() if not torch.equal(params[n].detach(), t)}
    base = {"changed_sha256": tensors_sha256({n: originals[n] for n in changed})}
    return Edit(changed, {"dsg_version": __version__, **info, "base": {**base, **info.get("base", {})}})


def _parameters(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise DSGError(
            f"The weight edit {where} names parameters {missing[:3]} that {type(model).__name__} does not have."
        )
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise DSGError(
                f"The weight edit {where} holds {n!r} with shape {tuple(t.shape)}, but the model's has "
                f"shape {tuple(params[n].shape)}."
            )
    return {n: params[n] for n in tensors}


def _as_edit(edit: Edit | Mapping[str, torch.Tensor] | str | os.PathLike) -> tuple[Edit, str]:
    if isinstance(edit, Edit):
        return edit, "given"
    if isinstance(edit, Mapping):
        return Edit(dict(edit), {}), "given"
    return Edit.load(edit), f"in {str(edit)!r}"


def check_base(model: torch.nn.Module, edit: Edit, where: str = "given") -> None:
    """Refuse a model whose tensors are not the ones the edit was made from (DSGError)."""
    params = _parameters(model, edit.tensors, where)
    base = edit.info.get("base", {})
    expected = base.get("changed_sha256")
    if expected:
        got = tensors_sha256({n: p.detach() for n, p in params.items()})
        if got != expected:
            raise DSGError(
                f"The weight edit {where} was made from other values of {len(params)} tensor(s) "
                f"({expected[:12]}... expected, {got[:12]}... found): the model is not its base, or the edit is "
                "already applied."
            )
    expected_model = base.get("model", {}).get("weights_sha256")
    if expected_model:
        got = whole_model_fingerprint(model)["weights_sha256"]
        if got != expected_model:
            raise DSGError(
                f"The weight edit {where} was made for model weights {expected_model[:12]}..., but the "
                f"given model's hash to {got[:12]}...."
            )
    changed = config_differences(base.get("model", {}).get("config"), model)
    if changed:
        raise DSGError(f"The weight edit {where} was made for the same weights with another config: "
                       f"{'; '.join(changed[:5])}.")  # fmt: skip


@torch.no_grad()
def apply_edit(
    model: torch.nn.Module, edit: Edit | Mapping[str, torch.Tensor] | str | os.PathLike, verify: bool = True
) -> torch.nn.Module:
    """Write the edit's tensors into `model` in place (permanently) and return it."""
    edit, where = _as_edit(edit)
    params = _parameters(model, edit.tensors, where)
    if verify:
        check_base(model, edit, where)
    for n, p in params.items():
        p.copy_(edit.tensors[n].to(device=p.device, dtype=p.dtype))
    return model


@contextmanager
def edited(
    model: torch.nn.Module, edit: Edit | Mapping[str, torch.Tensor] | str | os.PathLike, verify: bool = True
) -> Iterator[torch.nn.Module]:
    """Inside the block the model carries the edit; on exit the original tensors are restored bit for bit."""
    edit, where = _as_edit(edit)
    params = _parameters(model, edit.tensors, where)
    if verify:
        check_base(model, edit, where)
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(edit.tensors[n].to(device=p.device, dtype=p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
