"""Gemma Scope `params.npz` (JumpReLU, no input bias subtraction). The file does not record its hook point, so
the caller names it (`--sae-hook blocks.3.hook_resid_post`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import DSGError
from ..base import SAE
from . import FORMATS

ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


@FORMATS.register("gemma_scope")
class GemmaScope:
    name = "gemma_scope"
    description = "a Gemma Scope params.npz"

    @staticmethod
    def detect(path: Path) -> bool:
        return (path.is_file() and path.suffix == ".npz") or (path.is_dir() and (path / "params.npz").exists())

    @staticmethod
    def read(path: Path, hook_name: str | None = None) -> SAE:
        if path.is_dir():
            path = path / "params.npz"
        if hook_name is None:
            raise DSGError(
                f"{str(path)!r} is a Gemma Scope params.npz, which does not record its hook point; pass hook_name "
                "(e.g. 'blocks.3.hook_resid_post')."
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {n: torch.from_numpy(np.array(z[n], dtype=np.float32)) for n in z.files}
        except Exception as e:
            raise DSGError(f"Cannot read {str(path)!r} as an .npz file: {e}.") from None
        missing = [n for n in ARRAYS if n not in arrays]
        if missing:
            raise DSGError(f"{str(path)!r} lacks array(s) {missing}; it holds {sorted(arrays)}.")
        return SAE(
            arrays["W_enc"],
            arrays["W_dec"],
            arrays["b_enc"],
            arrays["b_dec"],
            architecture="jumprelu",
            threshold=arrays["threshold"],
            apply_b_dec_to_input=False,
            hook_name=hook_name,
        )
