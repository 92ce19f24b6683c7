"""EleutherAI sparsify folders: `cfg.json` + `sae.safetensors` with the encoder stored as `encoder.weight`
[d_sae, d_in] (transposed) and `encoder.bias`; TopK only, no transcoders or skip connections."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DSGError
from ...files import read_json, read_safetensors
from ..base import SAE
from . import FORMATS, check_dims, config_int, recorded_hook

WEIGHTS = "sae.safetensors"

# sparsify names each SAE's folder after its hook point, a module path through a layer list ("layers.12",
# "gpt_neox.layers.3.mlp", "h.5"); a name such as "v1.2" or "checkpoint.1000" is a folder a user named
_HOOKPOINT = re.compile(r"([A-Za-z_]\w*\.)*(layers|layer|h|blocks|block)\.\d+(\.[A-Za-z_]\w*)*")


def _named_hook(path: Path) -> str | None:
    """The hook point a sparsify folder's name records (None for a folder a user renamed to something else)."""
    return path.name if _HOOKPOINT.fullmatch(path.name) else None


@FORMATS.register("sparsify")
class Sparsify:
    name = "sparsify"
    description = f"a sparsify folder (cfg.json + {WEIGHTS})"

    @staticmethod
    def detect(path: Path) -> bool:
        return path.is_dir() and (path / "cfg.json").exists() and (path / WEIGHTS).exists()

    @staticmethod
    def read(path: Path, hook_name: str | None = None) -> SAE:
        cfg_path = path / "cfg.json"
        cfg = read_json(cfg_path)
        if cfg.get("transcode") or cfg.get("skip_connection"):
            raise DSGError(
                f"{str(path)!r} is a sparsify transcoder or has a skip connection; only plain SAEs are supported."
            )
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise DSGError(f"{str(cfg_path)!r}: sparsify activation {activation!r} is not supported; expected 'topk'.")
        k, num_latents = config_int(cfg, "k", cfg_path), config_int(cfg, "num_latents", cfg_path)
        t = read_safetensors(path / WEIGHTS, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
        sae = SAE(
            t["encoder.weight"].T.contiguous(),
            t["W_dec"],
            t["encoder.bias"],
            t["b_dec"],
            architecture="topk",
            k=k,
            apply_b_dec_to_input=True,
            hook_name=recorded_hook(cfg.get("hookpoint") or _named_hook(path), hook_name, cfg_path) or path.name,
        )
        if num_latents and num_latents != sae.d_sae:
            raise DSGError(f"{str(cfg_path)!r} says num_latents={num_latents} but the weights have {sae.d_sae}.")
        return check_dims(cfg, sae, cfg_path)
