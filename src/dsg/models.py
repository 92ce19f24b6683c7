"""`dsg.models.load_model`, the documented import path for model loading (implemented in `dsg.lm.models`)."""

from .lm.models import KNOWN_MODELS, cache_root, conversion_record, load_model, model_cache_dir

__all__ = ["KNOWN_MODELS", "cache_root", "conversion_record", "load_model", "model_cache_dir"]
