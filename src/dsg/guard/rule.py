"""The guardrail's rule as pure tensor functions: the only code every runtime (HF hooks today, a serving engine
tomorrow) shares. No hooks, no models, no files: tensors in, tensors out, and the per-sequence gate state passed
in and returned explicitly.

For a sequence with real tokens t (see lm.text.real_token_mask) and the activations f_t of the selected latents S:

    a_t    = 1 if any latent in S fires (f_tj > 0) at token t                       flagged_tokens
    rho    = mean of a_t over the real tokens                                       rho
    gated  = rho > threshold              (always true for a static guardrail)      gate
    x'_t   = x_t + sum_{j in S} (f'_tj - f_tj) W_dec[j]   at clamped tokens         clamp_delta
             f'_tj = -c for every j (mode "all", the paper) or for the active j only (mode "active")

Across prefill and decoding the gate is per-sequence state (`GateState`: flagged and real counts so far, and the
latched decision):
  * prompt positions share one decision, rho(prompt so far) > threshold;
  * each later (generated) position extends the running counts, and the gate latches: once on, it stays on. A
    token is clamped iff it is flagged and the gate is on at that token. Only a real token can move the gate.
A decision held fixed from elsewhere (several continuations scored under one prompt's decision) uses `held`.
The windowed gate (`window_gate`) judges the last w real tokens at each token instead, so the decision at a token
depends only on the tokens up to it; it latches, or (`hold`) stays open a fixed number of tokens inside a prompt,
and then (`latch`) a window over a second, higher level, or (`latch_run`) a run of R windows over the threshold,
still guards the answer however much text follows it, and
(`prompt_level`) a prompt's own tokens may be clamped only near windows over a higher level than the one that
decides the answer. With `counted_BT` (the tokens that carry words) the held gate is judged, and its hold counted,
at those tokens only: a run of whitespace, punctuation or invisible characters neither opens nor ends it; given as
roles, it also names the invisible tokens the windows pass over, and the line breaks they pass over where one ends
a short line of words (the state then carries the current line).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CLAMP_MODES = ("all", "active")


class GateState(NamedTuple):
    """Per-sequence gate state carried from prefill through decoding."""

    flagged: torch.Tensor  # [B] long, flagged real tokens so far
    real: torch.Tensor  # [B] long, real tokens so far
    gated: torch.Tensor  # [B] bool, latched decision

    @classmethod
    def start(cls, batch: int, device=None) -> GateState:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(zeros, zeros.clone(), torch.zeros(batch, dtype=torch.bool, device=device))


def flagged_tokens(f_BTS: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
    """a [B, T]: real tokens at which any selected latent fires."""
    return (f_BTS > 0).any(-1) & real_BT


def rho(a_BT: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
    """Fraction of real tokens flagged, per sequence [B] (0 for a sequence with no real token)."""
    return a_BT.sum(1).float() / real_BT.sum(1).clamp(min=1).float()


def gate(
    a_BT: torch.Tensor, real_BT: torch.Tensor, n_prompt: int, state: GateState | None, threshold: float | None
) -> tuple[torch.Tensor, GateState]:
    """Which tokens to clamp [B, T] and the new state, given that the first `n_prompt` positions are (the rest of)
    a prompt and the others are generated. `threshold=None` is a static guardrail: the gate is always on."""
    B, T = a_BT.shape
    state = state if state is not None else GateState.start(B, a_BT.device)
    clamp_BT = torch.zeros_like(a_BT)
    flagged, real, gated = state
    if n_prompt:
        a_p, r_p = a_BT[:, :n_prompt], real_BT[:, :n_prompt]
        flagged = flagged + a_p.sum(1)
        real = real + r_p.sum(1)
        if threshold is None:
            decision = torch.ones_like(gated)
        else:
            decision = flagged.float() / real.clamp(min=1).float() > threshold
        gated = gated | decision
        clamp_BT[:, :n_prompt] = a_p & gated[:, None]
    if n_prompt < T:
        a_g, r_g = a_BT[:, n_prompt:], real_BT[:, n_prompt:]
        run_flagged = flagged[:, None] + a_g.long().cumsum(1)
        run_real = real[:, None] + r_g.long().cumsum(1)
        if threshold is None:
            on = torch.ones_like(a_g)
        else:
            crossed = run_flagged.float() / run_real.clamp(min=1).float() > threshold
            crossed = crossed & r_g  # only a real token can move the gate
            on = gated[:, None] | (crossed.long().cummax(1).values > 0)
        clamp_BT[:, n_prompt:] = a_g & on
        flagged, real, gated = run_flagged[:, -1], run_real[:, -1], on[:, -1]
    return clamp_BT, GateState(flagged, real, gated)


def held(a_BT: torch.Tensor, gated_B: torch.Tensor, start_B: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp [B, T] under a decision held fixed: flagged tokens of gated rows (from position `start_B` on, where
    the prompt's own clamping began: a windowed gate opens mid-prompt and spares the tokens before)."""
    clamp_BT = a_BT & gated_B[:, None].to(a_BT.device)
    if start_B is not None:
        clamp_BT &= torch.arange(a_BT.shape[1], device=a_BT.device)[None, :] >= start_B[:, None].to(a_BT.device)
    return clamp_BT


def clamp_delta(
    f_BTS: torch.Tensor, clamp_BT: torch.Tensor, W_dec_SD: torch.Tensor, clamp: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [P, 2], residual deltas [P, D]) for the clamped tokens only: sum_j (f'_j - f_j) W_dec[j]."""
    pos = clamp_BT.nonzero()
    f = f_BTS[pos[:, 0], pos[:, 1]]  # [P, S]
    coef = -clamp - f
    if mode == "active":
        coef = torch.where(f > 0, coef, torch.zeros_like(coef))
    return pos, coef @ W_dec_SD


def apply_delta(x_BTD: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` (or a copy of x) with the deltas added at `pos`; untouched positions stay bit-for-bit."""
    out = x_BTD.clone() if out is None else out
    out[pos[:, 0], pos[:, 1]] += delta.to(out.dtype)
    return out


# ---- the windowed, prefix-causal gate ---------------------------------------------------------------------------


# what a real token is to a windowed gate judged at words (window_gate's `counted_BT` as roles, Guardrail.counted)
INVISIBLE, FILLER, WORD = 0, 1, 2  # passed over by the windows; in them, not judged; in them and judged
BREAK = 3  # a line break: a filler the windows pass over where it ends a short line of words (SHORT_LINE)
SHORT_LINE = 3  # the most word tokens a line may hold for the windows to pass over the break that ends it
NEVER = 2**40  # WindowState.quiet of a sequence whose gate never opened: more real tokens than any context
_OTHER = 2**20  # WindowState.line of a line that shows something besides words and gaps (or that started unseen)


class WindowState(NamedTuple):
    """Per-sequence state of the windowed gate: the flags of the last (up to) w real tokens, the decision, the
    largest window score so far, how long ago a window last went over the threshold, the current line's word
    tokens (for the line breaks the windows pass over), and the current and longest runs of judged windows over the
    threshold (for `latch_run`): see window_gate."""

    recent: torch.Tensor  # [B, w] long, flags of the most recent real tokens, right-aligned
    count: torch.Tensor  # [B] long, how many of them are real (<= w)
    gated: torch.Tensor  # [B] bool, the gate after the last token (latched, or held open: see window_gate)
    peak: torch.Tensor  # [B] float, the largest window share seen so far (at judged tokens: see window_gate)
    quiet: torch.Tensor  # [B] long, counted tokens since the last window over the threshold (NEVER: none yet)
    quiet_prompt: torch.Tensor  # [B] long, the same for window_gate's `prompt_level` (NEVER: none yet, or unused)
    line: torch.Tensor  # [B] long, word tokens on the current line so far (_OTHER or more: not a short line)
    run: torch.Tensor  # [B] long, judged windows over the threshold in a row, up to the last judged token
    longest: torch.Tensor  # [B] long, the longest such run so far (window_gate's `latch_run`)

    @classmethod
    def start(cls, batch: int, window: int, device=None) -> WindowState:
        long = torch.zeros(batch, window, dtype=torch.long, device=device)
        never = torch.full((batch,), NEVER, device=device)
        return cls(long, long[:, 0].clone(), torch.zeros(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, device=device), never, never.clone(),
                   torch.full((batch,), _OTHER, device=device), long[:, 0].clone(), long[:, 0].clone())  # fmt: skip


def window_gate(
    a_BT: torch.Tensor,
    real_BT: torch.Tensor,
    state: WindowState | None,
    threshold: float,
    window: int,
    evidence_BT: torch.Tensor | None = None,
    hold: int | None = None,
    n_prompt: int | None = None,
    latch: float | None = None,
    prompt_level: float | None = None,
    counted_BT: torch.Tensor | None = None,
    latch_run: int | None = None,
) -> tuple[torch.Tensor, WindowState]:
    """The prefix-causal gate: at each real token, the share of flagged tokens among the last `window` real tokens
    (a sequence's start counts as unflagged, so a few flagged tokens in a short input do not make a full window);
    the gate opens (and stays open) at the first token where that share exceeds `threshold`, and from there on
    every flagged token is clamped. The decision at a token depends only on the tokens up to it, so a prompt may
    arrive whole, in chunks, or one token at a time (streaming, chunked prefill, a prefix cache) with the same
    result; benign text before or after a burst of forget-domain tokens cannot dilute it.

    With `evidence_BT` (integers per token, the detector gate: guard/detector.py) the window sums that evidence
    instead of the flags; the clamp still falls on flagged tokens once the gate is open.

    With `hold` (h counted tokens: real ones, or with `counted_BT` those that carry words) the gate does not latch
    inside a prompt: it is open at the token whose window goes over the threshold and the next h - 1 counted ones,
    and each such window opens it again. A benign document whose detector evidence spikes once is then clamped
    near the spike, not from there to its end. Generated tokens (positions from `n_prompt` on; None: every position
    is a prompt's) latch as before: a prompt whose gate is open at its last token gets a guarded answer to its end,
    and an answer that opens the gate stays guarded.

    With `latch` (a level above `threshold`; hold only) a prompt in which any window went over `latch` also gets a
    guarded answer, wherever that window was: a forget question followed by more than h benign counted tokens ("ask
    first, pad after") is still answered under the clamp. Prompt positions stay as `hold` makes them, so a benign
    document is clamped only near its misjudged stretches; the state's `peak` carries the evidence across chunks.

    With `latch_run` (R judged windows; hold only) a prompt in which R judged windows in a row went over the
    threshold also gets a guarded answer, wherever that run was: a forget question reads as a stretch of windows
    over the threshold, while benign text that crosses it does so in short bursts. Tokens the gate does not judge
    neither extend nor break a run; the state's `run` and `longest` carry it across chunks.

    With `prompt_level` (a level above `threshold`; hold only: the latch level, or above it by a margin) a
    prompt's tokens are clamped only within h counted tokens of a window over `prompt_level`, while the threshold
    still decides the answer as above. A benign document whose evidence goes over the threshold but not over
    `prompt_level` is read as it is; a forget question whose evidence goes over the threshold within the last h
    counted tokens of its prompt (or over `latch` anywhere) gets a guarded answer.

    With `counted_BT` (bool [B, T], the real tokens that carry words: Guardrail.counted) only those are judged: a
    window ending at a filler (whitespace, punctuation, invisible characters) neither opens the gate, nor reaches
    the latch or the prompt level, nor counts towards `peak`, and the hold counts only words. Padding that carries
    no word can then neither run a hold out nor open one. Windows still sum every real token's signal. None: every
    real token is judged. As roles (int8 [B, T]: WORD, FILLER, INVISIBLE or BREAK, Guardrail.counted), WORD tokens
    are judged as above, and the windows hold only the tokens `in_windows` keeps: they pass over INVISIBLE ones
    and the BREAKs that end a short line, so fillers typed between the words of a request cannot thin its windows
    out. The state's `line` carries the current line across chunks."""
    B, T = a_BT.shape
    state = state if state is not None else WindowState.start(B, window, a_BT.device)
    w = state.recent.shape[1]
    signal = a_BT if evidence_BT is None else evidence_BT
    kept, line = in_windows(real_BT, counted_BT, state.line)
    share, flags, valid, cum_real = _window_shares(state, signal, kept)
    judged = judged_tokens(real_BT, counted_BT)  # where windows decide
    opens = judged & (share > threshold)
    runs = _runs(opens, judged & ~opens, state.run)
    if hold is None:
        on = state.gated[:, None] | (opens.long().cummax(1).values > 0) if T else state.gated[:, None]
        where, quiet, quiet_prompt, strong = on, state.quiet, state.quiet_prompt, None
    else:
        on, where, quiet, quiet_prompt, strong = _held(opens, judged, share, state, hold, n_prompt, latch, prompt_level,
                                                       runs, latch_run)  # fmt: skip
    clamp_BT = a_BT & where
    total, recent = _last_window(flags, valid, cum_real, state.recent)
    peak = torch.maximum(state.peak, torch.where(judged, share, 0.0).max(1).values) if T else state.peak
    gated = on[:, -1] if T else state.gated
    if strong is not None:
        gated = gated | strong[:, -1]  # what the answer gets, after a prompt that ends here
    run = runs[:, -1] if T else state.run
    longest = torch.maximum(state.longest, runs.max(1).values) if T else state.longest
    return clamp_BT, WindowState(recent, total[:, 0].clamp(max=w), gated, peak, quiet, quiet_prompt, line, run, longest)


def _runs(over_BT: torch.Tensor, reset_BT: torch.Tensor, run_B: torch.Tensor) -> torch.Tensor:
    """[B, T] long: at each position, how many windows over the threshold (`over_BT`) came in a row up to it, since
    the latest window that did not (`reset_BT`; positions in neither leave the count as it is); `run_B` is the
    count the chunk continues."""
    seen = over_BT.long().cumsum(1)
    last = torch.where(reset_BT, seen, -run_B[:, None].to(seen.device)).cummax(1).values if seen.shape[1] else seen
    return seen - last


def longest_runs(scores: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """[n] long: for each sequence's judged window scores (1-D, in order), the longest run of them over
    `threshold`: the statistic window_gate's `latch_run` compares with R (the state's `longest`)."""
    out = []
    for s in scores:
        over = (s > threshold)[None]
        out.append(int(_runs(over, ~over, torch.zeros(1, dtype=torch.long)).max()) if s.numel() else 0)
    return torch.tensor(out, dtype=torch.long)


def _held(opens_BT, judged_BT, share_BT, state: WindowState, hold: int, n_prompt: int | None, latch, prompt_level,
          runs_BT=None, latch_run: int | None = None):  # fmt: skip
    """(on [B, T]: where the gate is open, where [B, T]: the tokens it may clamp, quiet, quiet_prompt, strong [B, T]
    or None: whether any window so far went over `latch`, or `latch_run` windows in a row over the threshold) for
    window_gate with `hold`: prompt positions held open within `hold` judged tokens of a window over the threshold,
    generated ones latched (_held_open), and with `prompt_level` a prompt's tokens clamped only near windows over
    that level."""
    T = opens_BT.shape[1]
    n_p = T if n_prompt is None else min(n_prompt, T)
    strong = None
    if latch is not None and T:  # the answer is guarded once any window so far went over `latch`
        strong = (state.peak > latch)[:, None] | ((judged_BT & (share_BT > latch)).long().cummax(1).values > 0)
    if latch_run is not None and T:  # or once `latch_run` windows in a row went over the threshold
        long_run = (state.longest >= latch_run)[:, None] | ((runs_BT >= latch_run).long().cummax(1).values > 0)
        strong = long_run if strong is None else strong | long_run
    on, quiet = _held_open(opens_BT, judged_BT, state.gated, state.quiet, hold, n_p, strong)
    where, quiet_prompt = on, state.quiet_prompt
    if prompt_level is not None and T:  # prompt tokens: only near windows over `prompt_level`
        near, quiet_prompt = _held_open(judged_BT & (share_BT > prompt_level), judged_BT, state.gated,
                                        state.quiet_prompt, hold, T)  # fmt: skip
        where = torch.cat([near[:, :n_p], on[:, n_p:]], 1)
    return on, where, quiet, quiet_prompt, strong


def judged_tokens(real_BT: torch.Tensor, counted_BT: torch.Tensor | None) -> torch.Tensor:
    """The real tokens a windowed gate is judged at [B, T] bool: all of them (None), those `counted_BT` marks
    (bool), or those whose role is WORD (roles: see window_gate)."""
    real = real_BT.bool()
    if counted_BT is None:
        return real
    return real & (counted_BT.bool() if counted_BT.dtype == torch.bool else counted_BT == WORD)


def in_windows(real_BT: torch.Tensor, counted_BT: torch.Tensor | None, line_B: torch.Tensor):
    """(the real tokens a windowed gate's windows hold [B, T], the line after the last token [B]): every real
    token, but for those whose role is INVISIBLE (lm.text.invisible_token_ids and spacing_token_ids: zero-width
    characters, doubled spaces, tabs) and the BREAKs (lm.text.line_break_token_ids) that end a line of at most
    SHORT_LINE word tokens showing nothing else but gaps (_short_line_breaks, from `line_B`, the line the tokens
    continue; a sequence's first line counts as not short; elsewhere a BREAK is a filler). So the windows hold the
    last `window` real tokens that show something besides a gap. Tokens without roles (bool or None) leave a line
    unseen (not short)."""
    if counted_BT is None or counted_BT.dtype == torch.bool:
        return real_BT, torch.full_like(line_B, _OTHER) if real_BT.shape[1] else line_B
    passed, line = _short_line_breaks(real_BT, counted_BT, line_B)
    return real_BT & (counted_BT != INVISIBLE).to(real_BT.device) & ~passed, line


def _short_line_breaks(real_BT: torch.Tensor, counted_BT: torch.Tensor | None, line_B: torch.Tensor):
    """([B, T] the BREAK tokens that end a short line, so the windows pass over them; [B] the line after the last
    token) for window_gate. A line is the tokens after the last BREAK: its WORD tokens count one each, its
    INVISIBLE ones (and padding, which the runtimes mark INVISIBLE) nothing, and any other token (a filler that
    shows something, or a token that is not real: a special token of the chat template) makes it not short.
    `line_B` is the line the chunk continues; `counted_BT` holds roles (int8)."""
    B, T = real_BT.shape
    if not T:
        return torch.zeros_like(real_BT, dtype=torch.bool), line_B
    real = real_BT.bool()
    breaks = real & (counted_BT == BREAK)
    weight = torch.full(real.shape, _OTHER, dtype=torch.long, device=real.device)
    weight[(counted_BT == WORD) & real] = 1
    weight[(counted_BT == INVISIBLE) | breaks] = 0  # not real and INVISIBLE: padding (Guardrail.counted)
    line_B = line_B.to(real.device).clamp(max=_OTHER)
    total = torch.cat([line_B[:, None], weight], 1).cumsum(1)  # [B, 1 + T]: the line the chunk continues, first
    at = torch.arange(1, T + 1, device=real.device).expand(B, T)
    last = torch.where(breaks, at, torch.zeros_like(at)).cummax(1).values  # column of the latest break, 0: none
    before = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], 1)  # of the latest break before each token
    # the line each token ends: from the latest break before it, or (none in this chunk) from `line_B`
    held = total[:, :-1] - torch.where(before > 0, total.gather(1, before), 0)
    ended = breaks & (held >= 1) & (held <= SHORT_LINE)
    line = total[:, -1] - torch.where(last[:, -1] > 0, total.gather(1, last[:, -1:])[:, 0], 0)
    return ended, line.clamp(max=_OTHER)


def _window_shares(state: WindowState, signal_BT: torch.Tensor, real_BT: torch.Tensor):
    """(share [B, T], flags, valid and cum_real [B, w + T]) for window_gate: at each position the signal summed over
    the last w real tokens (the state's recent ones first) divided by w, 0 at positions that are not real."""
    w = state.recent.shape[1]
    slots = torch.arange(w, device=signal_BT.device)
    valid = torch.cat([slots[None, :] >= (w - state.count)[:, None], real_BT.bool()], 1)  # [B, w + T]
    flags = torch.cat([state.recent, signal_BT.long()], 1) * valid
    cum_flags, cum_real = flags.cumsum(1), valid.long().cumsum(1)
    # flagged real tokens in the window ending at p: cum_flags[p] minus cum_flags at the last position whose real
    # count is at most cum_real[p] - w
    before = torch.searchsorted(cum_real.contiguous(), (cum_real - w).contiguous(), right=True) - 1
    outside = torch.where(before >= 0, cum_flags.gather(1, before.clamp(min=0)), torch.zeros_like(cum_flags))
    share = (cum_flags - outside).float() / w
    return torch.where(valid, share, torch.zeros_like(share))[:, w:], flags, valid, cum_real


def _last_window(flags, valid, cum_real, recent_before):
    """(real tokens so far [B, 1], the new window: the last w real flags, right-aligned [B, w]) for window_gate."""
    w = recent_before.shape[1]
    total = cum_real[:, -1:]
    rank = total - cum_real  # 0 for the last real token
    keep = valid & (rank < w)
    recent = torch.zeros_like(recent_before)
    rows = torch.arange(flags.shape[0], device=flags.device)[:, None].expand_as(keep)
    recent[rows[keep], (w - 1 - rank)[keep]] = flags[keep]
    return total, recent


def _held_open(opens_BT, counted_BT, gated_B, quiet_B, hold: int, n_prompt: int, strong_BT=None):
    """(on [B, T], new quiet [B]) for window_gate's `hold`: prompt positions are open within `hold` counted tokens
    (`counted_BT`: the real ones, or those of them that carry words) of the last opening (`quiet_B` carries one
    from earlier chunks); generated positions latch, from the gate at the prompt's last token (`gated_B` before this
    chunk) or (`strong_BT`, window_gate's `latch` and `latch_run`) any window so far over the latch, or a long
    enough run of windows over the threshold."""
    B, T = opens_BT.shape
    if not T:
        return gated_B[:, None], quiet_B
    seen = counted_BT.long().cumsum(1)  # counted tokens so far in this chunk
    last = torch.where(opens_BT, seen, -quiet_B[:, None]).cummax(1).values  # `seen` at the latest opening
    since = seen - last
    on = since < hold
    if n_prompt < T:
        before = on[:, n_prompt - 1] if n_prompt else gated_B
        if n_prompt and strong_BT is not None:
            before = before | strong_BT[:, n_prompt - 1]
        on[:, n_prompt:] = before[:, None] | (opens_BT[:, n_prompt:].long().cummax(1).values > 0)
    quiet = torch.where(on[:, -1] & (n_prompt < T), torch.zeros_like(since[:, -1]), since[:, -1])
    return on, quiet
