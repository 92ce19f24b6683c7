"""The SAE base class: weights in the SAELens orientation and the math every architecture shares.

    pre = (x - b_dec · apply_b_dec_to_input) @ W_enc + b_enc        encode_pre
    f   = activate(pre)                                              one rule per architecture (its own file)
    x̂   = f @ W_dec + b_dec                                          decode

`decode` is linear, which is what lets a guardrail edit a few latents as a delta on the residual stream without
decoding the rest (see guard/rule.py). `W_enc` is [d_in, d_sae], `W_dec` [d_sae, d_in].

`SAE(..., architecture="topk", k=32)` builds the registered class for that architecture (`ARCHITECTURES`); a new
architecture is one file with a subclass that defines `activate` and registers itself, plus one import in
`dsg/sae/__init__.py`. Files are read and written by the format registry (`dsg.sae.formats`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import DSGError
from ..lm.fingerprint import tensor_digest
from ..registry import Registry

MAX_DECODER = 1e6  # |W_dec| entries: an SAE decodes into the residual stream's scale (units), and a clamp (at most
# guard.integrity.MAX_CLAMP) times this stays far inside float32

ARCHITECTURES: Registry[type[SAE]] = Registry("SAE architecture")


class SAE(torch.nn.Module):
    """A sparse autoencoder on one hook point of a language model."""

    architecture: ClassVar[str] = ""
    extra_tensors: ClassVar[tuple[str, ...]] = ()
    """Per-latent tensors [d_sae] this architecture needs besides W_enc, W_dec, b_enc, b_dec (JumpReLU: threshold)."""
    encodes_latents_independently: ClassVar[bool] = True
    """True when a latent's activation depends only on its own encoder column (ReLU, JumpReLU; not TopK)."""

    def __new__(cls, *args, **kwargs):
        if cls is SAE:  # SAE(..., architecture=name) builds the registered subclass
            name = kwargs.get("architecture", args[4] if len(args) > 4 else "standard")
            if name not in ARCHITECTURES:
                raise DSGError(f"SAE architecture {name!r} is not supported; expected one of {ARCHITECTURES.names()}.")
            cls = ARCHITECTURES[name]
        return super().__new__(cls)

    def __init__(
        self,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        architecture: str | None = None,
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        hook_name: str | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        if architecture is not None and architecture != self.architecture:
            raise DSGError(f"{type(self).__name__} is the {self.architecture!r} architecture, not {architecture!r}.")
        d_in, d_sae = W_enc.shape
        if "threshold" in self.extra_tensors and threshold is None:
            raise DSGError(
                f"A {self.architecture} SAE needs a 'threshold' tensor of shape [d_sae], and none was given."
            )
        given = {"W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        if threshold is not None:
            given["threshold"] = threshold
        expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise DSGError(
                    f"SAE tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                    f"for W_enc of shape {(d_in, d_sae)}."
                )
        for name, tensor in {"W_enc": W_enc, **given}.items():
            if not tensor.is_floating_point():
                raise DSGError(f"SAE tensor {name!r} has dtype {tensor.dtype}; expected a floating-point dtype.")
            if not torch.isfinite(tensor.float()).all():  # float8 has no isfinite of its own
                raise DSGError(f"SAE tensor {name!r} holds NaN or infinite values.")
        if not (W_dec.double().abs() <= MAX_DECODER).all():
            raise DSGError(f"SAE tensor 'W_dec' holds values past {MAX_DECODER:g}: no SAE decodes that way, and a "
                           "clamp times such a row overflows the residual stream.")  # fmt: skip
        self.W_enc = torch.nn.Parameter(W_enc, requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec, requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc, requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec, requires_grad=False)
        # A threshold given to an architecture that does not use it is kept (it is part of the SAE's identity).
        self.threshold = torch.nn.Parameter(threshold, requires_grad=False) if threshold is not None else None
        self.k = self._check_k(k, d_sae)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.hook_name = hook_name
        self.model_name = model_name

    # ---- what an architecture defines ----------------------------------------------------------------------

    def _check_k(self, k: int | None, d_sae: int) -> int | None:
        """The k this architecture keeps (TopK), None for the others."""
        return None

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Turn pre-activations into latent activations f >= 0."""
        raise NotImplementedError

    def config_extra(self) -> dict:
        """Architecture-specific SAELens `cfg.json` fields."""
        return {}

    def config(self) -> dict:
        """The SAELens v6 `cfg.json` content for this SAE."""
        from .formats.saelens import saelens_config  # the formats import this module

        return saelens_config(self)

    # ---- the math -------------------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f [..., d_sae] for inputs x [..., d_in]."""
        return self.activate(self.encode_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] from latents f [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def restricted(self, features: Sequence[int]) -> SAE:
        """An SAE of the same architecture over only `features` (in that order): for architectures that encode
        latents independently its activations equal the full SAE's at those latents."""
        if not self.encodes_latents_independently:
            raise DSGError(f"A {self.architecture} SAE cannot be cut to a subset of its latents.")
        idx = torch.tensor(list(features), dtype=torch.long, device=self.W_enc.device)
        t = self.tensors()
        return type(self)(
            t["W_enc"][:, idx].clone(),
            t["W_dec"][idx].clone(),
            t["b_enc"][idx].clone(),
            t["b_dec"].clone(),
            threshold=t["threshold"][idx].clone() if "threshold" in t else None,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            hook_name=self.hook_name,
            model_name=self.model_name,
        )

    # ---- identity -------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc.data, "W_dec": self.W_dec.data, "b_enc": self.b_enc.data, "b_dec": self.b_dec.data}
        if self.threshold is not None:
            out["threshold"] = self.threshold.data
        return out

    def sha256(self) -> str:
        """Hash of everything that determines encode/decode: weights, architecture, k, input-bias flag.

        Independent of the file format the SAE was read from, so a sparsify SAE and its SAELens export match.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.architecture, self.k, self.apply_b_dec_to_input]).encode())
        for name, t in sorted(self.tensors().items()):
            tensor_digest(h, name, t)
        return h.hexdigest()

    # ---- files ----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, format: str = "saelens") -> Path:
        """Write the SAE in `format` (the SAELens layout, `cfg.json` + `sae_weights.safetensors`) atomically."""
        from .formats import write_sae  # the formats import this module

        return write_sae(self, path, format)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        hook_name: str | None = None,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        format: str | None = None,
    ) -> SAE:
        """Read an SAE from a SAELens folder, a sparsify folder or a Gemma Scope `params.npz` (any registered
        format; `format` names one instead of recognising it from the files).

        `hook_name` overrides (or, for Gemma Scope files, supplies) the hook point the SAE was trained on;
        `dtype=None` keeps the dtype the weights were saved in.
        """
        from .formats import read_sae  # the formats import this module

        try:
            sae = read_sae(path, hook_name, format)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # a field of the wrong kind
            detail = " ".join(str(e).split())[:200]
            raise DSGError(f"Cannot read the SAE at {str(path)!r}: a file there is malformed ({type(e).__name__}: "
                           f"{detail}).") from None  # fmt: skip
        if hook_name is not None:
            sae.hook_name = hook_name
        if sae.hook_name is not None and not isinstance(sae.hook_name, str):
            raise DSGError(f"The SAE at {str(path)!r} names its hook point {sae.hook_name!r}; a hook is a name such "
                           "as 'blocks.12.hook_resid_post'.")  # fmt: skip
        if dtype is None:
            return sae.to(device=device)
        sae = sae.to(device=device, dtype=dtype)
        if not all(torch.isfinite(t).all() for t in sae.tensors().values()):
            raise DSGError(f"The SAE at {str(path)!r} holds values past the range of {dtype} (they read as "
                           "infinite); load it in a wider dtype.")  # fmt: skip
        return sae
