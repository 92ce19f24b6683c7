"""Sparse autoencoders: the math, and readers/writers for the formats SAEs are published in.

One class, `SAE`, holds the weights in the SAELens orientation (`W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in]) and
implements the three architectures DSG meets in practice:

    standard   f = relu(pre)                      pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc
    jumprelu   f = relu(pre) · (pre > threshold)
    topk       f = relu(pre) kept only at its k largest entries

`decode(f) = f @ W_dec + b_dec` is linear, which is what lets a guardrail edit a few latents as a delta on the
residual stream without decoding the rest (see guardrail.py).

Formats read by `SAE.load`: SAELens folders (`cfg.json` + `sae_weights.safetensors`, both the v6 nested
`metadata` config and the older flat one), EleutherAI sparsify folders (`cfg.json` + `sae.safetensors`, encoder
stored transposed) and Gemma Scope `params.npz`. `SAE.save` always writes the SAELens v6 layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import DSGError
from .files import atomic_directory, read_json, read_safetensors, write_json
from .identity import tensor_digest

ARCHITECTURES = ("standard", "jumprelu", "topk")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


class SAE(torch.nn.Module):
    """A sparse autoencoder on one hook point of a language model."""

    def __init__(
        self,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        architecture: str = "standard",
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        hook_name: str | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise DSGError(f"SAE architecture {architecture!r} is not supported; expected one of {ARCHITECTURES}.")
        d_in, d_sae = W_enc.shape
        expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        given = {"W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        if architecture == "jumprelu":
            if threshold is None:
                raise DSGError("A jumprelu SAE needs a 'threshold' tensor of shape [d_sae], and none was given.")
            expected["threshold"], given["threshold"] = (d_sae,), threshold
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise DSGError(
                    f"SAE tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                    f"for W_enc of shape {(d_in, d_sae)}."
                )
        if architecture == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
            raise DSGError(f"A topk SAE needs an integer k in [1, {d_sae}], got {k!r}.")
        for name, tensor in {"W_enc": W_enc, **given}.items():
            if not tensor.is_floating_point():
                raise DSGError(f"SAE tensor {name!r} has dtype {tensor.dtype}; expected a floating-point dtype.")
        self.W_enc = torch.nn.Parameter(W_enc, requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec, requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc, requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec, requires_grad=False)
        self.threshold = torch.nn.Parameter(threshold, requires_grad=False) if threshold is not None else None
        self.architecture = architecture
        self.k = k if architecture == "topk" else None
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.hook_name = hook_name
        self.model_name = model_name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    # ---- the math -------------------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., d_sae]."""
        return self._input(x) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Turn pre-activations into latent activations f >= 0."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        values, indices = self._top(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _top(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre.topk(self.k, dim=-1)
        return torch.relu(top.values), top.indices

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK SAEs only: the k activations and their latent ids, ([..., k], [..., k]), without the dense f."""
        return self._top(self.encode_pre(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f [..., d_sae] for inputs x [..., d_in]."""
        return self.activate(self.encode_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] from latents f [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def encodes_latents_independently(self) -> bool:
        """True when a latent's activation depends only on its own encoder column (not TopK)."""
        return self.architecture != "topk"

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

    def config(self) -> dict:
        """SAELens v6 `cfg.json` content."""
        cfg = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"hook_name": self.hook_name, "model_name": self.model_name},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """Write the SAELens layout (`cfg.json` + `sae_weights.safetensors`) atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            write_json(tmp / "cfg.json", self.config())
            save_file({n: t.detach().cpu().contiguous() for n, t in self.tensors().items()}, str(tmp / SAELENS_WEIGHTS))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        hook_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "SAE":
        """Read an SAE from a SAELens folder, a sparsify folder or a Gemma Scope `params.npz`.

        `hook_name` overrides (or, for Gemma Scope files, supplies) the hook point the SAE was trained on.
        """
        path = Path(path)
        if not path.exists():
            raise DSGError(f"SAE path {str(path)!r} does not exist.")
        if path.is_file() and path.suffix == ".npz":
            sae = _load_gemma_scope(path, hook_name)
        elif path.is_dir() and (path / "params.npz").exists():
            sae = _load_gemma_scope(path / "params.npz", hook_name)
        elif path.is_dir() and (path / "cfg.json").exists() and (path / SAELENS_WEIGHTS).exists():
            sae = _load_saelens(path)
        elif path.is_dir() and (path / "cfg.json").exists() and (path / SPARSIFY_WEIGHTS).exists():
            sae = _load_sparsify(path)
        else:
            inner = sorted(p.name for p in path.iterdir() if (p / "cfg.json").exists()) if path.is_dir() else []
            hint = f" It contains SAE folders {inner}; pass one of them." if inner else ""
            raise DSGError(
                f"{str(path)!r} is not an SAE: expected a SAELens folder (cfg.json + {SAELENS_WEIGHTS}), a sparsify "
                f"folder (cfg.json + {SPARSIFY_WEIGHTS}) or a Gemma Scope params.npz.{hint}"
            )
        if hook_name is not None:
            sae.hook_name = hook_name
        return sae.to(device=device, dtype=dtype)


# ---- readers ------------------------------------------------------------------------------------------------


def _check_dims(cfg: dict, sae: SAE, path: Path) -> SAE:
    for key in ("d_in", "d_sae"):
        if key in cfg and cfg[key] is not None and int(cfg[key]) != getattr(sae, key):
            raise DSGError(
                f"{str(path)!r} says {key}={cfg[key]} but the weights have {key}={getattr(sae, key)}."
            )
    return sae


def _load_saelens(path: Path) -> SAE:
    cfg = read_json(path / "cfg.json")
    meta = cfg.get("metadata") or {}
    # v6 nests model facts under "metadata"; pre-6 configs are flat and name the hook "hook_point" or "hook_name".
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    model_name = meta.get("model_name") or cfg.get("model_name")
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    act_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if act_fn == "topk" or (arch == "standard" and act_fn == "topk"):
        arch = "topk"
        k = k or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise DSGError(f"{str(path / 'cfg.json')!r}: rescale_acts_by_decoder_norm=true TopK SAEs are not supported.")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise DSGError(
            f"{str(path / 'cfg.json')!r}: normalize_activations={norm!r} is not supported; expected 'none'."
        )
    if arch not in ARCHITECTURES:
        raise DSGError(f"{str(path / 'cfg.json')!r}: architecture {arch!r} is not supported; expected one of {ARCHITECTURES}.")
    required = ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
    t = read_safetensors(path / SAELENS_WEIGHTS, required)
    sae = SAE(
        t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], architecture=arch, threshold=t.get("threshold"),
        k=int(k) if k is not None else None, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        hook_name=hook, model_name=model_name,
    )
    return _check_dims(cfg, sae, path / "cfg.json")


def _load_sparsify(path: Path) -> SAE:
    cfg = read_json(path / "cfg.json")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise DSGError(f"{str(path)!r} is a sparsify transcoder or has a skip connection; only plain SAEs are supported.")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise DSGError(f"{str(path / 'cfg.json')!r}: sparsify activation {activation!r} is not supported; expected 'topk'.")
    t = read_safetensors(path / SPARSIFY_WEIGHTS, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    sae = SAE(
        t["encoder.weight"].T.contiguous(), t["W_dec"], t["encoder.bias"], t["b_dec"], architecture="topk",
        k=int(cfg["k"]) if "k" in cfg else None, apply_b_dec_to_input=True,
        hook_name=cfg.get("hookpoint") or path.name,
    )
    if "num_latents" in cfg and cfg["num_latents"] and int(cfg["num_latents"]) != sae.d_sae:
        raise DSGError(f"{str(path / 'cfg.json')!r} says num_latents={cfg['num_latents']} but the weights have {sae.d_sae}.")
    return _check_dims(cfg, sae, path / "cfg.json")


def _load_gemma_scope(path: Path, hook_name: str | None) -> SAE:
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
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if n not in arrays]
    if missing:
        raise DSGError(f"{str(path)!r} lacks array(s) {missing}; it holds {sorted(arrays)}.")
    return SAE(
        arrays["W_enc"], arrays["W_dec"], arrays["b_enc"], arrays["b_dec"], architecture="jumprelu",
        threshold=arrays["threshold"], apply_b_dec_to_input=False, hook_name=hook_name,
    )
