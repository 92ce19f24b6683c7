"""Text generation with guardrails, and the no-cache reference that defines what cached generation must equal.

`model.generate(...)` inside `dsg.attach(...)` decodes with a KV cache: the guardrail sees the prompt once
(prefill) and then one new token per step, carrying per-sequence gate state between them (see guard/rule.py for
the rule). `reference_generate` recomputes the whole sequence from scratch at every step, with the guardrail told
where the prompt ends, so the two must agree token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DSGError
from ..files import is_text
from ..guard.guardrail import Guardrail
from ..lm.models import check_fits_context
from ..lm.text import pad_batch, pad_id_of, position_ids, special_ids_in, special_token_in, special_token_strings
from .hf import attach
from .intervention import Intervention, as_intervention


@torch.inference_mode()
def reference_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    guardrails: Sequence[Guardrail] = (),
    max_new_tokens: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding without a KV cache: (generated ids [B, max_new_tokens], gate decisions [B]).

    `input_ids` is a left-padded batch of prompts. Every step runs the full sequence; positions past the prompt
    are judged as generated tokens.
    """
    ids, mask = input_ids, attention_mask
    prompt_length = ids.shape[1]
    gated = None
    for _ in range(max_new_tokens):
        if guardrails:
            with attach(model, *guardrails, verify=False) as session:
                session.prompt_length = prompt_length
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
                ).logits
            gated = session.gated
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, prompt_length:], gated


def _until(ids: list[int], ends: set[int]) -> list[int]:
    """`ids` up to its first id in `ends`."""
    return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)


def _refuse_forged_turns(tokenizer, prompts: Sequence[str]) -> None:
    """A user turn holding the tokenizer's special tokens ("<|im_end|>", "<|im_start|>assistant") would be read as
    the chat template's own: the prompt could close its turn and open the assistant's, a conversation its writer
    forged. Refused; a prompt meant to carry its special tokens goes without the template (chat=False)."""
    specials = special_token_strings(tokenizer)
    for i, p in enumerate(prompts):
        found = special_token_in(p, specials)
        if found is not None:
            raise DSGError(f"Prompt {i} holds the tokenizer's special token {found!r}, which the chat template would "
                           "read as its own (a turn the prompt forged). Remove it, or send the prompt as written "
                           "without the template (--no-chat, chat=False).")  # fmt: skip


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    intervention: Intervention | Sequence[Guardrail] | None = None,
    max_new_tokens: int = 64,
    chat: bool = True,
    verify: bool = True,
) -> list[dict]:
    """Greedy completions of `prompts` (with `chat`, formatted by the tokenizer's chat template; a tokenizer without
    one gets the prompts as written, with its special tokens), under `intervention` (a guardrail, a list of
    guardrails, a weight edit, or None).

    Returns one dict per prompt: prompt, completion, gated (None without a gated intervention).
    """
    intervention = as_intervention(intervention)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DSGError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise DSGError("prompts must be a non-empty list of strings.")
    broken = next((i for i, p in enumerate(prompts) if not is_text(p)), None)
    if broken is not None:
        raise DSGError(f"Prompt {broken} is not valid text: it holds unpaired surrogates (bytes that are not UTF-8, "
                       "as in a command-line argument with invalid bytes).")  # fmt: skip
    templated = bool(chat and getattr(tokenizer, "chat_template", None))  # no template: the prompt as written
    if templated:
        _refuse_forged_turns(tokenizer, prompts)
    texts = []
    for p in prompts:
        if templated:
            texts.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
            )
        else:
            texts.append(p)
    # a chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS), as in training
    encoded = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    empty = [p for p, e in zip(prompts, encoded) if not e]
    if empty:
        raise DSGError(f"Prompt {empty[0]!r} encodes to no tokens; give a non-empty prompt.")
    i = max(range(len(encoded)), key=lambda j: len(encoded[j]))
    # the last new token is generated, never read: it takes no position
    check_fits_context(model, len(encoded[i]) + max_new_tokens - 1, f"Prompt {i} ({len(encoded[i])} tokens) with "
                       f"{max_new_tokens} new tokens")  # fmt: skip
    pad = pad_id_of(tokenizer, model)
    ids, mask = pad_batch(encoded, pad, side="left")
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        num_beams=1,
    )
    gated = None
    if intervention is not None:
        with intervention.applied(model, verify=verify) as session:
            out = model.generate(**kwargs)
        gated = session.gated
    else:
        out = model.generate(**kwargs)
    # each completion ends at its first EOS: what generate appends to a finished row is padding, which a tokenizer
    # padded with an ordinary token would otherwise decode into the text
    config = getattr(model, "generation_config", None)
    ends = set(special_ids_in({"eos_token_id": getattr(config, "eos_token_id", None)},
                              {"eos_token_id": getattr(tokenizer, "eos_token_id", None)}))  # fmt: skip
    answers = [_until(row, ends) for row in out[:, ids.shape[1] :].tolist()]
    completions = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return [
        {"prompt": p, "completion": c.strip(), "gated": None if gated is None else bool(gated[i])}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
