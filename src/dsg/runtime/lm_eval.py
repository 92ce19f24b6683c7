"""The lm-eval route: a guarded (or edited) model wrapped as lm-eval's `HFLM`.

    with lm_eval_model(model, tokenizer, guard) as lm:
        lm_eval.simple_evaluate(model=lm, tasks=[...])

lm-eval scores each (context, continuation) pair in one forward, so the gate judges the question *and* the
scored choice together (dsg.eval.mcq judges the prompt alone). Needs `pip install lm-eval`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from ..errors import DSGError
from .intervention import Intervention, as_intervention


@contextmanager
def lm_eval_model(
    model: torch.nn.Module, tokenizer, intervention: Intervention | Sequence | None = None, **hflm_kwargs
) -> Iterator:
    """An lm-eval `HFLM` over `model` with `intervention` applied for the block."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise DSGError("lm_eval_model needs lm-eval: pip install lm-eval.") from None
    intervention = as_intervention(intervention)
    with intervention.applied(model, verify=False) if intervention is not None else nullcontext():
        yield HFLM(pretrained=model, tokenizer=tokenizer, **hflm_kwargs)
