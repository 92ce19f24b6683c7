"""Settling a guardrail's prompt level on held-out forget prompts.

A prompt level (FitConfig.gate_prompt_percentile) spares a prompt's own tokens the clamp unless a window of the
prompt scores over the level, a higher bar than the gate's threshold; the threshold still decides whether the
answer is guarded. That keeps benign text that crosses the threshold by chance readable, but it also leaves
unclamped every forget prompt that crosses the threshold and not the level, and how many those are depends on the
fit: with a detector fitted on 512 sequences per corpus (`dsg demo`), 87.3 % of 300 cyber validation questions have
a clamped token with the level against 95.7 % without it; fitted on 128 (`dsg demo --quick`), 58.3 % of 48 against
89.6 %, and that guardrail with the level keeps 68 % of the base-correct cyber answers instead of 58 % (README, "A
prompt is clamped only near windows over the latch level").

`settle_prompt_level` measures that on questions the fit never saw and drops the level where it would leave more
than one in ten of the clamped forget prompts unclamped. `dsg demo` and `dsg compare` run it on the forget
domain's validation questions, as the prompts they score (the question's stem: likelihood scoring); `dsg fit
--forget-prompts` on the user's. The check is recorded in the guardrail's info (`prompt_level_check`, with a hash
of the prompts).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..errors import DSGError
from ..guard.fit import corpus_sha256
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
    rates = [gate_rates_on_texts(model, tokenizer, forget_prompts, g) for g in (guardrail, plain)]
    if rates[0] is None or rates[1] is None:
        raise DSGError("Settling the prompt level needs a gated guardrail; this one gates no input.")
    (_, with_level), (_, without) = rates
    share = with_level / without if without else 1.0  # nothing clamped either way: no forget prompt to lose
    kept = share >= min_share
    record = {
        "prompts": len(forget_prompts),
        "prompts_sha256": corpus_sha256(list(forget_prompts)),
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


def settle_on_questions(model, tokenizer, guardrail, questions: Sequence[dict]) -> dict | None:
    """settle_prompt_level on held-out forget questions, read as the benches score them (likelihood scoring: the
    question's stem is the prompt)."""
    return settle_prompt_level(model, tokenizer, guardrail, [q["question"] for q in questions])


def describe(record: dict | None) -> str | None:
    """One line on a prompt-level check, for reports."""
    if record is None:
        return None
    verdict = "kept" if record["kept"] else "dropped (the threshold's windows clamp the prompt)"
    if not record["clamped_without_level"]:
        return (
            f"prompt level {verdict} unjudged: the threshold clamps none of the {record['prompts']} held-out forget "
            "prompts, so they cannot tell the two rules apart (is the gate fitted for this domain?)"
        )
    return (
        f"prompt level {verdict}: on {record['prompts']} held-out forget prompts it leaves "
        f"{record['clamped_with_level']:.1%} clamped against {record['clamped_without_level']:.1%} without it "
        f"(share {record['share']:.2f}, needs {record['min_share']:.2f})"
    )
