"""Settling a guardrail's prompt level on held-out forget prompts.

A prompt level (FitConfig.gate_prompt_percentile) spares a prompt's own tokens the clamp unless a window of the
prompt scores over the level, a higher bar than the gate's threshold; the threshold still decides whether the
answer is guarded. That keeps benign text that crosses the threshold by chance readable, but it also leaves
unclamped every forget prompt that crosses the threshold and not the level, and how many those are depends on the
fit: with a detector fitted on 512 sequences per corpus, 87 % of the cyber validation questions score over the
level against 94 % over the threshold; fitted on 128, 61 % against 88 %, and the guardrail then keeps 68 % of the
base-correct cyber answers instead of 58 % (README, "Clamping a prompt only near windows over the latch level").

`settle_prompt_level` measures that on questions the fit never saw and drops the level where it would leave more
than one in ten of the clamped forget prompts unclamped. `dsg demo` and `dsg compare` run it on the forget
domain's validation questions; the check is recorded in the guardrail's info (`prompt_level_check`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..errors import DSGError
from .dilution import gate_rates_on_texts

PROMPT_LEVEL_MIN_SHARE = 0.9
"""Keep the prompt level only if the forget prompts it clamps anywhere are at least this share of those clamped
without it."""


def settle_prompt_level(model, tokenizer, guardrail, forget_prompts: Sequence[str],
                        min_share: float = PROMPT_LEVEL_MIN_SHARE) -> dict | None:  # fmt: skip
    """Judge the guardrail's prompt level on `forget_prompts` (held-out forget-domain prompts, e.g. validation
    questions): the share of them with any clamped token with and without the level. Where the level keeps less
    than `min_share` of them clamped, it is dropped (`guardrail.prompt_level = None`: every window over the
    threshold clamps the prompt near it, the rule without a prompt level). Returns the check's record, also stored
    in `guardrail.info["prompt_level_check"]`; None for a guardrail without a prompt level."""
    level = guardrail.prompt_level
    if level is None:
        return None
    if not 0 < min_share <= 1:
        raise DSGError(f"min_share must lie in (0, 1], got {min_share}.")
    if not forget_prompts:
        raise DSGError("Settling the prompt level needs held-out forget prompts; none were given.")
    plain = copy.copy(guardrail)  # the same latents, detector and levels, without the prompt level
    plain.prompt_level = None
    with_level = gate_rates_on_texts(model, tokenizer, forget_prompts, guardrail)[1]
    without = gate_rates_on_texts(model, tokenizer, forget_prompts, plain)[1]
    share = with_level / without if without else 1.0
    kept = share >= min_share
    record = {
        "prompts": len(forget_prompts),
        "clamped_with_level": with_level,
        "clamped_without_level": without,
        "share": share,
        "min_share": min_share,
        "level": level,
        "kept": kept,
    }
    if not kept:
        guardrail.prompt_level = None
    guardrail.info["prompt_level_check"] = record
    return record


def describe(record: dict | None) -> str | None:
    """One line on a prompt-level check, for reports."""
    if record is None:
        return None
    verdict = "kept" if record["kept"] else "dropped (the threshold's windows clamp the prompt)"
    return (
        f"prompt level {verdict}: on {record['prompts']} held-out forget prompts it leaves "
        f"{record['clamped_with_level']:.1%} clamped against {record['clamped_without_level']:.1%} without it "
        f"(share {record['share']:.2f}, needs {record['min_share']:.2f})"
    )
