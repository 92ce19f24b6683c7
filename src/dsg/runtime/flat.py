"""Guardrails over a serving engine's flattened steps: many requests' tokens in one `[N, D]` batch.

A serving engine (vLLM) runs one forward per scheduler step over the concatenated tokens of every running
request: whole prompts, chunks of prompts, and one new token per decoding request, joined and left mid-flight.
`RequestGates` applies guardrails to such a step given, for each request, where its tokens sit in the batch and
where they sit in its sequence (`Chunk`), and keeps each request's gate state between steps, keyed by request
id. The rule is guard/rule.py's, the same as the HuggingFace runtime's:

  * the paper's gate judges a prompt whole, so a request's prompt must arrive in one step (no chunked prefill,
    no prefix-cache hit); a chunk that starts or ends inside a prompt is refused (`ChunkRefused`);
  * the windowed gate (`Guardrail(window=w)`, held open or latched: `hold`) is prefix-causal, so prompts may
    arrive in chunks;
  * a static guardrail clamps every flagged token;
  * tokens past the prompt extend the running state and can latch the gate, as in `rule.gate`;
  * a request seen again from position 0 (recomputed after preemption) starts afresh.

A token's position 0 and special tokens (BOS/EOS/PAD) are not real tokens, as in lm.text.real_token_mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DSGError
from ..guard import rule
from ..guard.guardrail import Guardrail


class ChunkRefused(DSGError):
    """A step holds a piece of a prompt that the guardrail's gate cannot judge on its own."""


@dataclass(frozen=True)
class Chunk:
    """One request's tokens in a step: `length` tokens from offset `start` of the flattened batch, the first of
    them at `position` in the request's sequence; the request's prompt is `prompt_length` tokens long."""

    request_id: str
    start: int
    length: int
    position: int
    prompt_length: int

    @property
    def prompt_tokens(self) -> int:
        """How many of the chunk's tokens belong to the prompt."""
        return max(0, min(self.prompt_length - self.position, self.length))


def _gated(state) -> bool:
    """The latched decision of a state: integer counts (the paper's gate) or tensors (the windowed gate)."""
    return bool(state.gated) if isinstance(state.gated, bool) else bool(state.gated[0])


def _stack(states: list) -> tuple:
    return type(states[0])(*(torch.cat(parts) for parts in zip(*states)))


def _unstack(state, n: int) -> list:
    return [type(state)(*(t[i : i + 1] for t in state)) for i in range(n)]


class RequestGates:
    """Per-request gate state for guardrails applied inside a serving engine's steps."""

    def __init__(
        self,
        guardrails: Sequence[Guardrail],
        special_ids: Sequence[int],
        on_event: Callable[[dict], None] | None = None,
        labels: Sequence[dict] | None = None,
    ):
        self.guardrails = list(guardrails)
        for g in self.guardrails:
            g.check()
        self.specials = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.states: dict[str, list] = {}  # request id -> per-guardrail state (None before its first chunk)
        self.prompt_clamped: dict[str, list[int]] = {}  # request id -> per-guardrail count of clamped prompt tokens
        self.on_event = on_event
        self.labels = list(labels) if labels is not None else [{"guardrail": g.name or f"guardrail-{i}"}
                                                                for i, g in enumerate(self.guardrails)]  # fmt: skip

    @property
    def hooks(self) -> list[str]:
        return sorted({g.hook for g in self.guardrails})

    def keep_only(self, request_ids) -> None:
        """Forget the state of every request not in `request_ids` (finished or aborted)."""
        keep = set(request_ids)
        for rid in [r for r in self.states if r not in keep]:
            del self.states[rid]
            self.prompt_clamped.pop(rid, None)

    def decision(self, request_id: str) -> list[bool] | None:
        """Each guardrail's latched decision for a request (None before its prompt was judged)."""
        states = self.states.get(request_id)
        if states is None or any(s is None for s in states):
            return None
        return [_gated(s) for s in states]

    def real(self, input_ids_N: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
        specials = self.specials.to(input_ids_N.device)
        return (positions_N > 0) & ~torch.isin(input_ids_N, specials)

    @torch.inference_mode()
    def step(
        self, hook: str, x_ND: torch.Tensor, input_ids_N: torch.Tensor, positions_N: torch.Tensor, chunks: list[Chunk]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The residual deltas for one step at `hook`: (token indices [P], deltas [P, D]) or None when nothing is
        clamped. `x_ND` holds the step's activations at the hook (rows past the last chunk are padding)."""
        members = [i for i, g in enumerate(self.guardrails) if g.hook == hook]
        if not members or not chunks:
            return None
        ids = [c.request_id for c in chunks]
        if len(set(ids)) < len(ids):
            twice = next(r for r in ids if ids.count(r) > 1)
            raise ChunkRefused(f"Request {twice!r} holds two chunks in one step; each request's gate state "
                               "advances once per step.")  # fmt: skip
        empty = next((c for c in chunks if c.position == 0 and c.prompt_length == 0), None)
        if empty is not None and any(g.gated for g in self.guardrails):
            raise ChunkRefused(f"Request {empty.request_id!r} has an empty prompt: the gate has nothing to judge.")
        n = max(c.start + c.length for c in chunks)
        x = x_ND[:n]
        real_N = self.real(input_ids_N[:n], positions_N[:n])
        for c in chunks:
            unseen = c.request_id not in self.states or any(
                self.states[c.request_id][i] is None and self.guardrails[i].gated for i in members
            )  # a layer's guardrails that never saw this request (another layer's may have)
            if c.position == 0 or unseen:
                if c.position and any(self.guardrails[i].gated for i in members):
                    raise ChunkRefused(
                        f"Request {c.request_id!r} arrived at position {c.position} with no gate state: a prefix-cache "
                        "hit, which the guardrail cannot judge; serve it with prefix caching off."
                    )
                # only this hook's guardrails start afresh: a step calls here once per hooked layer, and the
                # guardrails of a layer before this one have judged this same chunk already
                states = self.states.setdefault(c.request_id, [None] * len(self.guardrails))
                clamped = self.prompt_clamped.setdefault(c.request_id, [0] * len(self.guardrails))
                for i in members:
                    states[i], clamped[i] = None, 0
        decoding = [c for c in chunks if c.prompt_tokens == 0]
        prefilling = [c for c in chunks if c.prompt_tokens > 0]
        out_idx, out_delta = [], []
        for i in members:
            g = self.guardrails[i]
            f, a, e = g.flags(x[None], real_N[None])
            e_N = e[0] if e is not None else None
            counted = g.counted(real_N[None], input_ids_N[None, :n])
            counted_N = counted[0] if counted is not None else None
            clamp_N = torch.zeros(n, dtype=torch.bool, device=x.device)
            if decoding:
                self._decode(i, g, decoding, a[0], real_N, clamp_N, e_N, counted_N)
            for c in prefilling:
                self._prefill(i, g, c, a[0], real_N, clamp_N, e_N, counted_N)
            if clamp_N.any():
                pos, delta = g.delta(f, clamp_N[None])
                out_idx.append(pos[:, 1])
                out_delta.append(delta)
        if not out_idx:
            return None
        return torch.cat(out_idx), torch.cat(out_delta)

    def _segment(self, chunks: list[Chunk], t_N: torch.Tensor) -> torch.Tensor:
        """[R, Lmax] rows of t for the chunks, right-padded with False."""
        L = max(c.length for c in chunks)
        out = torch.zeros(len(chunks), L, dtype=t_N.dtype, device=t_N.device)
        for r, c in enumerate(chunks):
            out[r, : c.length] = t_N[c.start : c.start + c.length]
        return out

    def _decode(self, i: int, g: Guardrail, chunks: list[Chunk], a_N, real_N, clamp_N, e_N=None, counted_N=None):
        """Chunks of generated tokens only (each decoding request's new token)."""
        states = [self.states[c.request_id][i] for c in chunks]
        missing = [c.request_id for c, s in zip(chunks, states) if s is None]
        if missing and g.gated:
            raise ChunkRefused(f"Request {missing[0]!r} is decoding, but its prompt never reached the guardrail.")
        if g.window is None:
            self._decode_counts(i, g, chunks, states, a_N, real_N, clamp_N)
            return
        a, real = self._segment(chunks, a_N), self._segment(chunks, real_N)
        e = self._segment(chunks, e_N) if e_N is not None else None
        counted = self._segment(chunks, counted_N) if counted_N is not None else None
        before = [bool(s.gated[0]) for s in states]
        clamp, state = g.gate(a, real, 0, _stack(states), e, counted)
        for r, (c, s) in enumerate(zip(chunks, _unstack(state, len(chunks)))):
            self.states[c.request_id][i] = s
            clamp_N[c.start : c.start + c.length] |= clamp[r, : c.length]
            if not before[r] and bool(s.gated[0]):
                self._event(c, i, g, s, "latched")

    def _decode_counts(self, i: int, g: Guardrail, chunks, states, a_N, real_N, clamp_N) -> None:
        """The paper's gate (or a static clamp) on generated tokens, as rule.gate computes it (rho in float32, the
        latch, only real tokens move the gate), on integer counts: one tensor read per step, whatever the number
        of requests."""
        a, real = a_N.tolist(), real_N.tolist()
        threshold = np.float32(g.threshold)
        clamped = []
        for c, s in zip(chunks, states):
            flagged, n_real, on = s if s is not None else (0, 0, True)
            was = on
            for t in range(c.start, c.start + c.length):
                if real[t]:
                    flagged, n_real = flagged + a[t], n_real + 1
                    if g.gated and not on and np.float32(flagged) / np.float32(n_real) > threshold:
                        on = True
                if a[t] and (on or not g.gated):
                    clamped.append(t)
            self.states[c.request_id][i] = rule.GateState(flagged, n_real, on)
            if g.gated and not was and on:
                self._event(c, i, g, self.states[c.request_id][i], "latched")
        if clamped:
            clamp_N[torch.tensor(clamped, dtype=torch.long, device=clamp_N.device)] = True

    def _prefill(self, i: int, g: Guardrail, c: Chunk, a_N, real_N, clamp_N, e_N=None, counted_N=None) -> None:
        whole = g.window is None and g.gated  # the paper's gate judges the prompt whole
        if whole and (c.position != 0 or c.prompt_tokens < c.prompt_length):
            raise ChunkRefused(
                f"Request {c.request_id!r}'s prompt of {c.prompt_length} tokens arrived in pieces (tokens "
                f"{c.position}..{c.position + c.prompt_tokens}): the paper's gate judges a prompt whole; serve with "
                "chunked prefill off (max-num-batched-tokens at least max-model-len), or use a windowed guardrail."
            )
        prev = self.states[c.request_id][i]
        if g.window is None:  # integer counts between steps (see _decode_counts); a prompt starts afresh
            prev = None
        sl = slice(c.start, c.start + c.length)
        e = e_N[None, sl] if e_N is not None else None
        counted = counted_N[None, sl] if counted_N is not None else None
        clamp, state = g.gate(a_N[None, sl], real_N[None, sl], c.prompt_tokens, prev, e, counted)
        if g.window is None:
            state = rule.GateState(int(state.flagged[0]), int(state.real[0]), bool(state.gated[0]))
        self.states[c.request_id][i] = state
        clamp_N[sl] |= clamp[0]
        self.prompt_clamped[c.request_id][i] += int(clamp[0, : c.prompt_tokens].sum())
        if c.position + c.prompt_tokens == c.prompt_length:
            self._event(c, i, g, state, "prompt")

    def _event(self, c: Chunk, i: int, g: Guardrail, state, event: str) -> None:
        if self.on_event is None:
            return
        run, unit = {}, g.gate_unit()
        if isinstance(state, rule.WindowState):
            score = float(state.peak[0]) / unit
            if g.latch_run is not None:  # the longest run of windows over the threshold, beside the run latch
                run = {"run": int(state.longest[0]), "latch_run": g.latch_run}
        else:
            score = int(state.flagged) / max(int(state.real), 1)
        self.on_event({
            "time": time.time(),
            "request_id": c.request_id,
            "event": event,
            **self.labels[i],
            "rho": round(score, 6),
            "threshold": round(g.threshold / unit, 6) if g.gated else None,
            "gated": _gated(state),
            "prompt_tokens": c.prompt_length,
            "prompt_clamped": self.prompt_clamped[c.request_id][i],
            **run,
        })  # fmt: skip
