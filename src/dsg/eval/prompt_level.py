"""Settling a guardrail's prompt level on held-out forget questions.

A prompt level (FitConfig.gate_prompt_percentile) spares a prompt's own tokens the clamp unless a window of the
prompt scores over the level, a higher bar than the gate's threshold; the threshold still decides whether the
answer is guarded. That keeps benign text that crosses the threshold by chance readable, but it also leaves
unclamped the forget prompts that cross the threshold but not the level, and where the clamp on a question's own
tokens is part of what forgets, the guarded model then forgets less.

`settle_prompt_level` measures that cost where it shows, in answers: on held-out forget questions the base model
answers correctly, the share the guarded model still answers correctly with the level and without it, through the
real runtime. It drops the level where it keeps more than `max_loss` more of them. The check reads the level's
effect on forgetting, not how many prompt tokens are clamped, so it judges a level alike at any threshold (a lower
threshold clamps more prompts without the level but guards the same answers). With the embedded default's fit the
level keeps 2 more of 127 base-correct cyber validation questions (+1.6 points) at P97 and at P95 alike, and 1 more
(+0.8) raised by half its gap above the threshold (FitConfig.gate_prompt_margin, as shipped): kept; with
the smaller fit of `dsg demo --quick`, 1 more of the 22 among its 48 validation questions at P95 (+4.5 points; 2
more at P97): dropped, though on 300 of them the same fit's level also costs +1.6 points (docs/precision.md,
"A prompt is clamped only near windows over the latch level").

`dsg demo` and `dsg compare` run it on the forget domain's validation questions, scored as they score (likelihood,
length-normalised); `dsg fit --forget-questions` on the user's. The check is recorded in the guardrail's info
(`prompt_level_check`, with a hash of the questions).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

from ..errors import DSGError
from ..lm.text import corpus_sha256
from .mcq import check_unguarded, score_mcq

PROMPT_LEVEL_MAX_LOSS = 0.03
"""Keep the prompt level only if, of the held-out forget questions the base model answers correctly, the guarded
model with it still answers at most this share more than without it (3 points of base-correct accuracy). The
level is an economy of perplexity, so it may cost little forgetting: the embedded default's fit measures +1.6 points
on 127 base-correct validation questions, and the bar lies below one question of the 22 that `dsg demo --quick`
judges it on (4.5 points), which then decides for the clamp, the cautious side for an unlearning tool. Set between
the two, as the 90 % bar of the earlier check was, not swept."""


def settle_prompt_level(model, tokenizer, guardrail, forget_questions: Sequence[dict],
                        max_loss: float = PROMPT_LEVEL_MAX_LOSS, batch_size: int = 16, norm: bool = True,
                        progress: bool = False, base: Sequence | None = None) -> dict | None:  # fmt: skip
    """Judge the guardrail's prompt level on `forget_questions` (held-out multiple-choice questions of the forget
    domain, never fitted on; dicts with question, choices, answer): the base-correct accuracy of the guarded model
    with and without the level, scored by likelihood, length-normalised unless `norm` is False (as the benches
    score). Where the level keeps more than `max_loss` more of them, it is dropped
    (`guardrail.prompt_level = None`: every window over the threshold clamps the prompt near it, the rule without a
    prompt level). Returns the check's record, also stored in `guardrail.info["prompt_level_check"]`; None for a
    guardrail without a prompt level. `base`: score_mcq's results for these questions without an intervention, at
    this batch size, where the caller has them already (the comparison's base run); they are not scored again."""
    level = guardrail.prompt_level
    if level is None:
        return None
    if not 0 <= max_loss < 1:
        raise DSGError(f"max_loss must lie in [0, 1), got {max_loss}.")
    if not forget_questions:
        raise DSGError("Settling the prompt level needs held-out forget questions; none were given.")
    if not guardrail.gated:
        raise DSGError("Settling the prompt level needs a gated guardrail; this one gates no input.")
    kw = dict(batch_size=batch_size, progress=progress)

    def correct(results) -> list[bool]:
        return [r.correct_norm if norm else r.correct for r in results]

    if base is None:
        base = score_mcq(model, tokenizer, forget_questions, **kw)
    else:
        try:
            check_unguarded(base, forget_questions)
        except DSGError as e:
            raise DSGError(f"base is not the base model's results on these questions: {e}") from None
    known = [q for q, ok in zip(forget_questions, correct(base)) if ok]
    plain = copy.copy(guardrail)  # the same latents, detector and levels, without the prompt level
    plain.prompt_level = None
    counts, gated = [], 0
    for g in (guardrail, plain):
        # the first guarded run checks that the guardrail was made for this model (a fitted one was, a loaded one may
        # not have been); the second applies the same latents to the same model
        results = score_mcq(model, tokenizer, known, intervention=g, verify=g is guardrail, **kw) if known else []
        counts.append(sum(correct(results)))
        gated = sum(bool(r.gated) for r in results)  # τ decides whether a question is gated: equal in both
    n = max(len(known), 1)
    loss = (counts[0] - counts[1]) / n  # from counts, so that k of n compares exactly with a bar of k / n
    kept = loss <= max_loss
    record = {
        "questions": len(forget_questions),
        "questions_sha256": _questions_sha256(forget_questions),
        "normalized": norm,
        "base_correct": len(known),
        "gate_rate_base_correct": gated / n,
        "kept_with_level": counts[0] / n,
        "kept_without_level": counts[1] / n,
        "n_kept_with_level": counts[0],
        "n_kept_without_level": counts[1],
        "loss": loss,
        "max_loss": max_loss,
        "level": level,
        "kept": kept,
    }
    if not kept:
        guardrail.prompt_level = None
    guardrail.info["prompt_level_check"] = record
    return record


def _questions_sha256(questions: Sequence[dict]) -> str:
    return corpus_sha256([json.dumps({k: q.get(k) for k in ("question", "choices", "answer")}, sort_keys=True)
                          for q in questions])  # fmt: skip


def describe(record: dict | None) -> str | None:
    """One line on a prompt-level check, for reports."""
    if record is None:
        return None
    verdict = "kept" if record.get("kept") else "dropped (the threshold's windows clamp the prompt)"
    if "base_correct" not in record:  # a file from dsg 0.1's first check, which compared prompts clamped
        share = record.get("share")
        shown = f"{share:.2f}" if isinstance(share, float) else "not recorded"
        return f"prompt level {verdict} by the earlier check, on prompts clamped (share {shown})"
    n = record["questions"]
    if not record["base_correct"] or (not record["gate_rate_base_correct"] and not record["loss"]):
        why = "the base model answers none of them" if not record["base_correct"] else "the gate opens on none of them"
        return (
            f"prompt level {verdict} unjudged: on {n} held-out forget questions {why}, so they cannot tell the two "
            "rules apart (is the gate fitted for this domain?)"
        )
    return (
        f"prompt level {verdict}: of {record['base_correct']} base-correct held-out forget questions (of {n}) the "
        f"guarded model keeps {record['kept_with_level']:.1%} with it against {record['kept_without_level']:.1%} "
        f"without it (loss {100 * record['loss']:+.1f} points, allows {100 * record['max_loss']:.1f})"
    )
