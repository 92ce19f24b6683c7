"""Sparse autoencoders: the base class, one class per architecture (standard/ReLU, JumpReLU, TopK), one reader
or writer per file format, the SAEs that ship with dsg, and the trainer (`dsg.sae.train`)."""

from . import jumprelu, standard, topk  # noqa: F401  (each registers its architecture)
from .base import ARCHITECTURES, SAE
from .formats import FORMATS, read_sae, write_sae

__all__ = ["ARCHITECTURES", "FORMATS", "SAE", "read_sae", "write_sae"]
