"""Does guarded text still read like language? Greedy answers to forget-domain prompts, scored three ways, next to
the base model's answers to the same prompts:

    repeated 3-grams   share of the answer's token 3-grams that repeat an earlier one in it ("off off off ...")
    distinct-2         distinct token bigrams over all bigrams (low: degenerate loops)
    base perplexity    perplexity of the answer under the unguarded model, given the prompt (high: broken text)

A guarded model should read like one that never learned the domain: fluent, vague or declining, never broken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..lm.models import evaluating, model_device
from ..runtime.generation import generate


def repeated_ngram_share(ids: Sequence[int], n: int = 3) -> float | None:
    """Share of the n-grams of `ids` that already occurred earlier in it (None when it has no n-gram)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return None
    return 1 - len(set(grams)) / len(grams)


def distinct_n(ids: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams over all n-grams of `ids` (None when it has no n-gram)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@torch.no_grad()
def answer_nll(model, tokenizer, prompt: str, answer_ids: Sequence[int]) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of `answer_ids` after the chat-formatted `prompt`, under `model`."""
    if not answer_ids:
        return 0.0, 0
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    context = tokenizer(chat, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + list(answer_ids)], device=model_device(model))
    with evaluating(model):
        logits = model(input_ids=ids, use_cache=False).logits[0, len(context) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, len(context) :], reduction="sum")
    return float(nll), len(answer_ids)


def fluency(model, tokenizer, prompts: Sequence[str], intervention=None, max_new_tokens: int = 40) -> dict:
    """Greedy answers to `prompts` under `intervention`, with their mean repeated-3-gram share, distinct-2 and
    perplexity under the unguarded model; the answers themselves under "answers"."""
    outs = generate(model, tokenizer, list(prompts), intervention, max_new_tokens=max_new_tokens, verify=False)
    ids = [tokenizer(o["completion"], add_special_tokens=False)["input_ids"] for o in outs]
    nll, n = 0.0, 0
    for p, a in zip(prompts, ids):
        s, k = answer_nll(model, tokenizer, p, a)
        nll, n = nll + s, n + k
    return {
        "repeated_3gram": _mean(repeated_ngram_share(a, 3) for a in ids),
        "distinct_2": _mean(distinct_n(a, 2) for a in ids),
        "base_perplexity": math.exp(nll / n) if n else None,
        "gated": _mean(o["gated"] for o in outs) if outs and outs[0]["gated"] is not None else None,
        "answers": [o["completion"] for o in outs],
    }
