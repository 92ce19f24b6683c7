"""Fingerprints that tie an artifact to the exact model it was made for.

A guardrail depends on the activations at its hook, and those depend only on the weights upstream of it, so the
fingerprint hashes exactly those (all parameters but the later decoder layers). Hashing a 135M-parameter model
takes about a second; the result is cached per model and invalidated when any parameter is replaced or edited
in place: tracked through each tensor's data pointer and version counter, and, since writes through `.data` (as
PEFT's adapter merges make them) leave the version counter alone, through a checksum of every value (the sum of
the tensor's bits read as integers: any single edited value changes it; 0.1 s for SmolLM2 on 2 cores) and a
strided sample of _SAMPLE values (which a permutation of rows changes).
"""

from __future__ import annotations

import hashlib

import torch

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


def model_fingerprint(model: torch.nn.Module, hook: HookPoint) -> dict:
    """{'class', 'name_or_path', 'weights_sha256', 'hashed'} for the weights that feed `hook`."""
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
