"""SAE file formats: one module per format, each registered in `FORMATS` with how to recognise it.

    saelens      cfg.json + sae_weights.safetensors (SAELens v6 nested `metadata` config, or the older flat one);
                 read and written
    sparsify     cfg.json + sae.safetensors (EleutherAI sparsify; encoder stored transposed); read
    gemma_scope  params.npz (Gemma Scope JumpReLU); read, with the hook point given by the caller

A format is a class with `name`, `description`, `detect(path) -> bool`, `read(path, hook_name) -> SAE` and,
optionally, `write(sae, folder)`. `read_sae` takes the named format, or the first registered one that detects
the path. A new format is one file here plus its import below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ...errors import DSGError
from ...files import atomic_directory, missing
from ...registry import Registry
from ..base import SAE


class SAEFormat(Protocol):
    name: str
    description: str

    @staticmethod
    def detect(path: Path) -> bool: ...

    @staticmethod
    def read(path: Path, hook_name: str | None) -> SAE: ...


FORMATS: Registry[type[SAEFormat]] = Registry("SAE file format")


def recorded_hook(recorded, given: str | None, where: Path):
    """The hook point an SAE file records, after checking that a name the caller gives for it (`--sae-hook`, for
    files that record none) is not another one: an SAE read at another point than it was trained at encodes
    nothing it learnt, and the guardrail would record the caller's name as the SAE's own."""
    if recorded is not None and given is not None and given != recorded:
        raise DSGError(f"{str(where)!r} records its hook point {recorded!r}, not {given!r} (--sae-hook, hook_name, "
                       "is for SAE files that record none). To read the SAE under another name for the same point "
                       "of the model, pass that name as --hook.")  # fmt: skip
    return recorded


def read_sae(path: str | os.PathLike, hook_name: str | None = None, format: str | None = None) -> SAE:
    path = Path(path)
    if not path.exists():
        raise DSGError(f"SAE path {str(path)!r} {missing(path)}.")
    if format is not None:
        return FORMATS[format].read(path, hook_name)
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.read(path, hook_name)
    inner = sorted(p.name for p in path.iterdir() if (p / "cfg.json").exists()) if path.is_dir() else []
    hint = f" It contains SAE folders {inner}; pass one of them." if inner else ""
    expected = ", ".join(f.description for f in FORMATS.values())
    raise DSGError(f"{str(path)!r} is not an SAE: expected one of: {expected}.{hint}")


def write_sae(sae: SAE, path: str | os.PathLike, format: str = "saelens") -> Path:
    fmt = FORMATS[format]
    if not hasattr(fmt, "write"):
        raise DSGError(f"SAE file format {format!r} is read-only.")
    path = Path(path)
    with atomic_directory(path, "SAE") as tmp:
        fmt.write(sae, tmp)
    return path


def config_int(cfg: dict, key: str, path: Path, within: str = "") -> int | None:
    """`cfg[key]` as an int (None where absent or null). A whole number written as a float (32.0) is read as one;
    anything else (8.9, true, "32") is refused rather than truncated or coerced."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DSGError(f"{str(path)!r}: {within}{key} must be an integer, got {value!r}.")
    return value


def check_dims(cfg: dict, sae: SAE, path: Path) -> SAE:
    """Refuse a config whose d_in/d_sae disagree with the weights."""
    for key in ("d_in", "d_sae"):
        value = config_int(cfg, key, path)
        if value is not None and value != getattr(sae, key):
            raise DSGError(f"{str(path)!r} says {key}={value} but the weights have {key}={getattr(sae, key)}.")
    return sae


# Registration order is detection order.
from . import gemma_scope, saelens, sparsify  # noqa: E402,F401
