"""Fingerprints that tie an artifact to the exact model it was made for.

A guardrail depends on the activations at its hook, and those depend only on the weights upstream of it, so the
fingerprint hashes exactly those (all parameters but the later decoder layers). Hashing a 135M-parameter model
takes about a second; the result is cached per model and invalidated when any parameter is replaced or edited
in place: tracked through each tensor's data pointer and version counter, and, since writes through `.data` (as
PEFT's adapter merges make them) leave the version counter alone, through a checksum of every value (the sum of
the tensor's bits read as integers: any single edited value changes it; 0.1 s for SmolLM2 on 2 cores) and a
strided sample of _SAMPLE values (which a permutation of rows changes).

Activations depend on the model's config too (rope_theta, rms_norm_eps, hidden_act, heads, sliding window): the
fingerprint records the config's fields that change what the model computes from its weights, and
`config_differences` names those a model now sets otherwise.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..errors import DSGError
from .hooks import HookPoint, decoder_layers, resolve, upstream_parameters

_CACHE_ATTR = "_dsg_fingerprints"
_SAMPLE = 4096  # values per tensor in the cache key


_AS_INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sample(p: torch.Tensor) -> tuple[int, bytes]:
    """(checksum of all of `p`'s values, a strided sample of about _SAMPLE of them at fixed positions)."""
    flat = p.detach().reshape(-1)
    if flat.numel() == 0:
        return 0, b""
    bits = flat.view(_AS_INTEGERS[flat.element_size()]) if flat.element_size() in _AS_INTEGERS else flat
    checksum = int(bits.sum(dtype=torch.int64))
    step = max(1, flat.numel() // _SAMPLE)
    return checksum, flat[::step].to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def tensor_digest(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


# Config fields that do not change what the model computes from its weights at inference: bookkeeping, token ids,
# output switches, training-only settings and sizes the weights or the hook already check (a model cut after its
# hook layer still feeds the hook the same activations). Fields starting with "_" and generation defaults are
# skipped too.
_NOT_COMPUTATION = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "is_encoder_decoder",
    "tokenizer_class", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "initializer_factor", "tie_word_embeddings", "max_position_embeddings", "vocab_size",
    "num_hidden_layers", "chunk_size_feed_forward", "torchscript", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "finetuning_task", "prefix", "task_specific_params", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "gradient_checkpointing", "keys_to_ignore_at_inference",
})  # fmt: skip


def _generation_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def config_record(model: torch.nn.Module) -> dict:
    """The fields of `model.config` that change what it computes (see _NOT_COMPUTATION), as JSON values; nested
    configs (a multimodal model's text_config) are filtered alike."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    skip = _NOT_COMPUTATION | _generation_fields()

    def kept(d: dict) -> dict:
        return {k: kept(v) if isinstance(v, dict) else sorted(map(str, v)) if isinstance(v, (set, frozenset)) else v
                for k, v in d.items() if not _not_computation(str(k), skip)}  # fmt: skip

    return json.loads(json.dumps(kept(config.to_dict()), sort_keys=True, default=str))


def _not_computation(key: str, skip: frozenset[str]) -> bool:
    return key.startswith("_") or key in skip or "dropout" in key or key.endswith(_TOKEN_ID_SUFFIXES)


_TOKEN_ID_SUFFIXES = ("token_id", "token_ids", "token_index")  # unk_token_id, image_token_index, ...


def config_differences(recorded: dict | None, model: torch.nn.Module) -> list[str]:
    """'field: recorded -> now' for each config field `recorded` (config_record of the model a guardrail or edit
    was made with) that `model` sets to another value. Fields only one side has are not compared, in nested
    configs too: a newer transformers adds fields with their defaults."""

    def same(a, b) -> bool:
        if isinstance(a, list) and isinstance(b, list):  # per-layer lists (layer_types): a model cut after its
            n = min(len(a), len(b))  # hook layer, or grown past it, keeps the layers before it
            return all(same(x, y) for x, y in zip(a[:n], b[:n]))
        return a == b or (a != a and b != b)  # NaN equals itself here

    def differences(old: dict, new: dict, at: str) -> list[str]:
        out = []
        for k in sorted(old):
            if k not in new:
                continue
            if isinstance(old[k], dict) and isinstance(new[k], dict):
                out += differences(old[k], new[k], f"{at}{k}.")
            elif not same(old[k], new[k]):
                out.append(f"{at}{k}: {old[k]!r} -> {new[k]!r}")
        return out

    if recorded is not None and not isinstance(recorded, dict):
        raise DSGError(f"The recorded model config must be an object (the fitted model's config), got {recorded!r}.")
    return differences(recorded, config_record(model), "") if recorded else []


def model_fingerprint(model: torch.nn.Module, hook: HookPoint) -> dict:
    """{'class', 'name_or_path', 'weights_sha256', 'hashed', 'dtype', 'config'} for the weights that feed `hook`,
    their dtype, and the config fields that change what they compute (config_record)."""
    params = list(upstream_parameters(model, hook))
    key = (hook.name, tuple((n, p.data_ptr(), p._version, _sample(p)) for n, p in params))
    cache = model.__dict__.setdefault(_CACHE_ATTR, {})
    if key not in cache:
        h = hashlib.sha256()
        for name, p in params:
            tensor_digest(h, name, p)
        cache.clear()
        cache[key] = h.hexdigest()
    return {
        "class": type(model).__name__,
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "weights_sha256": cache[key],
        "hashed": f"{len(params)} parameter tensors upstream of {hook.name}",
        "dtype": str(params[0][1].dtype).removeprefix("torch.") if params else None,
        "config": config_record(model),
    }


def whole_model_fingerprint(model: torch.nn.Module) -> dict:
    """`model_fingerprint` over every parameter (the output of the last decoder layer depends on all of them)."""
    _, layers = decoder_layers(model)
    return model_fingerprint(model, resolve(model, f"blocks.{len(layers) - 1}.hook_resid_post"))


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter's name, dtype, shape, checksum and strided sample (see _sample), for telling
    apart results computed from other weights: any single edited value changes it, and it costs what a
    fingerprint lookup costs (0.1 s for SmolLM2 on 2 cores), not a full hash."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        checksum, sample = _sample(p)
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}:{checksum}:".encode())
        h.update(sample)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A digest of what a tokenizer makes of text: its vocabulary, special tokens, chat template, and its encoding
    of a fixed probe with and without special tokens (a BOS added or not, a normaliser, a merge changed). Scores
    depend on the tokenizer as much as on the weights."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    probe = "dsg: The quick brown fox, 2 × 3 = 6 — naïve café.\n  def f(x): return x"
    parts = [
        vocab,
        {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        getattr(tokenizer, "chat_template", None),
        tokenizer(probe)["input_ids"],
        tokenizer(probe, add_special_tokens=False)["input_ids"],
    ]
    for part in parts:
        h.update(repr(part).encode("utf-8", "backslashreplace"))
    return h.hexdigest()
