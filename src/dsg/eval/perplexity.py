"""Perplexity of held-out text under an intervention, token-weighted, with each window judged as one prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

from tqdm.auto import tqdm

from ..errors import DSGError
from ..lm.hooks import stopped_after
from ..lm.models import check_fits_context, evaluating, model_device
from ..lm.text import batches, pad_id_of, position_ids, tokenize
from ..runtime.intervention import Intervention, acted_on, as_intervention, gates_decided, left_alone, only_guardrails
from .metrics import BaseRun, check_base_run, inputs_digest


class PerplexityResult(NamedTuple):
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    n_tokens: int  # predicted tokens
    n_windows: int
    gate_rate: float | None  # share of windows with a token the intervention clamped; None without a gated one
    batches: tuple[tuple[float, int], ...] = ()  # per batch of windows: (summed NLL, predicted tokens)
    base_run: BaseRun | None = None  # without an intervention: what it was computed from (checked as `unguarded`)


def perplexity_stats(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    intervention: Intervention | Sequence | None = None,
    batch_size: int = 8,
    progress: bool = True,
    verify: bool = True,
    unguarded: PerplexityResult | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of `texts`, split into windows of `max_length` tokens.

    Each window predicts its tokens 1..T-1 from the ones before (padding excluded), so the first token of every
    window is context only.

    `unguarded`: this function's result for the same model, texts and options without the intervention (it
    records what it was computed from; another run's is refused, its weights compared only with verify=True). Where
    the intervention is guardrails only, a batch of windows its gates leave alone (none gated, no token clamped)
    then stops at the last gate's layer and takes that result's sums for the batch, which are bit for bit what
    finishing its forward would give (see eval.mcq).
    """
    windows = tokenize(tokenizer, texts, max_length)
    if not windows:
        raise DSGError("No text window has the 2 tokens perplexity needs.")
    check_fits_context(model, max(len(w) for w in windows), f"A text window of up to max_length={max_length} tokens")
    intervention = as_intervention(intervention)
    if verify and intervention is not None:
        intervention.check_model(model)
    device = model_device(model)
    nll, n_tokens, n_gated = 0.0, 0, None
    n_batches = math.ceil(len(windows) / batch_size)
    inputs = inputs_digest("perplexity", batch_size, windows)
    if unguarded is not None and (len(unguarded.batches) != n_batches or unguarded.gate_rate is not None
                                  or unguarded.n_windows != len(windows)):  # fmt: skip
        raise DSGError("unguarded is not this function's result for the same texts and batch size without an "
                       "intervention.")  # fmt: skip
    if unguarded is not None:
        check_base_run(unguarded.base_run, model, inputs, verify, "perplexity_stats' result")
    stop_at = gates_decided(model, intervention) if unguarded is not None and only_guardrails(intervention) else None
    sums: list[tuple[float, int]] = []
    with evaluating(model):
        for b, (_, ids, mask) in enumerate(
            tqdm(
                batches(windows, batch_size, pad_id_of(tokenizer, model)),
                total=n_batches,
                desc="perplexity",
                disable=not progress,
                unit="batch",
            )
        ):
            ids, mask = ids.to(device), mask.to(device)
            if unguarded is not None and unguarded.batches[b][1] != int(mask[:, 1:].sum()):
                raise DSGError(f"unguarded's batch {b} predicted another number of tokens: another text or batch size.")
            applied = intervention.applied(model, verify=False) if intervention is not None else nullcontext()
            logits = None
            with applied as session:
                stop = stopped_after(model, stop_at, lambda _x: left_alone(session)) if stop_at else nullcontext()
                with stop:
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            touched = acted_on(session)  # windows the intervention changed
            if touched is not None:
                n_gated = (n_gated or 0) + int(touched.sum())
            if logits is None:  # stopped: the gates left every window of the batch alone
                sums.append(unguarded.batches[b])
            else:
                lp_BT = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                target = mask[:, 1:].bool()
                sums.append((-float(lp_BT[target].double().sum()), int(target.sum())))
                if not math.isfinite(sums[-1][0]):
                    raise DSGError(f"The model gave a text window of batch {b} a log-probability that is not a finite "
                                   "number: its weights or activations hold NaN or infinite values (a damaged model "
                                   "folder, or a clamp too large for its dtype).")  # fmt: skip
            nll, n_tokens = nll + sums[-1][0], n_tokens + sums[-1][1]
    mean = nll / n_tokens
    rate = n_gated / len(windows) if n_gated is not None else None
    run = BaseRun.of(model, inputs) if intervention is None else None
    return PerplexityResult(math.exp(mean), mean, n_tokens, len(windows), rate, tuple(sums), run)


def perplexity(model, tokenizer, texts: Sequence[str], **options) -> float:
    """exp(mean NLL per predicted token) of `texts`; options as `perplexity_stats`."""
    return perplexity_stats(model, tokenizer, texts, **options).perplexity
