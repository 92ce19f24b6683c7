"""SAELens folders: `cfg.json` + `sae_weights.safetensors`, v6 (model facts nested under "metadata") or older
flat configs (hook named "hook_point" or "hook_name"; TopK given as activation_fn "topk")."""

from __future__ import annotations

from pathlib import Path

from ...errors import DSGError
from ...files import read_json, read_safetensors, save_tensors, write_json
from ..base import ARCHITECTURES, SAE
from . import FORMATS, check_dims, config_int, recorded_hook

WEIGHTS = "sae_weights.safetensors"


@FORMATS.register("saelens")
class SAELens:
    name = "saelens"
    description = f"a SAELens folder (cfg.json + {WEIGHTS})"

    @staticmethod
    def detect(path: Path) -> bool:
        return path.is_dir() and (path / "cfg.json").exists() and (path / WEIGHTS).exists()

    @staticmethod
    def read(path: Path, hook_name: str | None = None) -> SAE:
        cfg_path = path / "cfg.json"
        cfg = read_json(cfg_path)
        meta = cfg.get("metadata") or {}
        hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        recorded_hook(hook, hook_name, cfg_path)
        arch, k = cfg.get("architecture", "standard"), config_int(cfg, "k", cfg_path)
        act_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn")
        if act_fn not in (None, "relu", "topk"):
            raise DSGError(f"{str(cfg_path)!r}: activation function {act_fn!r} is not supported; expected 'relu' or "
                           "'topk' (its codes would be read as another function's).")  # fmt: skip
        if act_fn == "topk" and arch not in ("standard", "topk"):
            raise DSGError(f"{str(cfg_path)!r}: architecture {arch!r} with activation function 'topk' is not "
                           "supported: one of the two would be ignored.")  # fmt: skip
        if act_fn == "topk":
            arch = "topk"
            kwargs = cfg.get("activation_fn_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise DSGError(f"{str(cfg_path)!r}: activation_fn_kwargs must be an object, got {kwargs!r}.")
            k = k or config_int(kwargs, "k", cfg_path, "activation_fn_kwargs.")
        if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            raise DSGError(f"{str(cfg_path)!r}: rescale_acts_by_decoder_norm=true TopK SAEs are not supported.")
        if cfg.get("finetuning_scaling_factor"):
            raise DSGError(f"{str(cfg_path)!r}: finetuning_scaling_factor=true SAEs (codes scaled by a fine-tuned "
                           "factor) are not supported.")  # fmt: skip
        norm = cfg.get("normalize_activations", "none") or "none"
        if norm != "none":
            raise DSGError(f"{str(cfg_path)!r}: normalize_activations={norm!r} is not supported; expected 'none'.")
        if arch not in ARCHITECTURES:
            raise DSGError(
                f"{str(cfg_path)!r}: architecture {arch!r} is not supported; expected one of {ARCHITECTURES.names()}."
            )
        t = read_safetensors(path / WEIGHTS, ("W_enc", "W_dec", "b_enc", "b_dec") + ARCHITECTURES[arch].extra_tensors)
        apply_b_dec = cfg.get("apply_b_dec_to_input", True)
        if not isinstance(apply_b_dec, bool):
            raise DSGError(f"{str(cfg_path)!r}: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}.")
        sae = SAE(
            t["W_enc"],
            t["W_dec"],
            t["b_enc"],
            t["b_dec"],
            architecture=arch,
            threshold=t.get("threshold"),
            k=k,
            apply_b_dec_to_input=apply_b_dec,
            hook_name=hook,
            model_name=meta.get("model_name") or cfg.get("model_name"),
        )
        return check_dims(cfg, sae, cfg_path)

    @staticmethod
    def write(sae: SAE, folder: Path) -> None:
        """The SAELens v6 layout."""
        write_json(folder / "cfg.json", saelens_config(sae))
        save_tensors({n: t.detach().cpu().contiguous() for n, t in sae.tensors().items()}, folder / WEIGHTS)


def saelens_config(sae: SAE) -> dict:
    """SAELens v6 `cfg.json` content."""
    return {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": sae.hook_name, "model_name": sae.model_name},
        **sae.config_extra(),
    }
