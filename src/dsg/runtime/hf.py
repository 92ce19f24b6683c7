"""Guardrails on a HuggingFace model: forward hooks that run the rule (guard/rule.py) at each guardrail's hook.

    with dsg.attach(model, guard_bio, guard_cyber) as session:
        model.generate(...)
    session.gated          # [B] inputs that any guardrail guarded

Each forward is classified from its inputs: a forward without a KV cache (or the prefill of one) is a prompt, and
its positions share one decision; a forward that continues a cache holds generated tokens, which extend the
running counts and can latch the gate (see rule.gate). `session.prompt_length` (set by the no-cache reference
generator) says where the prompt ends inside a full-sequence forward. `session.hold(decisions)` fixes the
decisions for the following forwards instead (scoring several continuations under one prompt's decision).

Guardrails on the same hook point judge the same (unedited) activations and their deltas add up, so each keeps
its own gate. Tokens that are not clamped are returned bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import DSGError
from ..guard import rule
from ..guard.guardrail import Guardrail
from ..lm.hooks import check_width, hooked, model_inputs, resolve
from ..lm.text import real_token_mask, special_token_ids
from .intervention import RUNTIMES


@dataclass
class Attachment:
    """What `attach` yields: the gate decisions of the latest forward pass, and generation state."""

    guardrails: list[Guardrail]
    _gated_by: list[torch.Tensor | None] = field(default_factory=list)  # per guardrail, [B] bool latched gate
    prompt_length: int | None = None  # set by reference_generate: positions beyond it are treated as generated
    _held: torch.Tensor | None = None  # [B, G] decisions held fixed (see hold)

    @property
    def gated(self) -> torch.Tensor | None:
        """[B] bool: inputs in the latest forward that any attached guardrail gated."""
        present = [g for g in self._gated_by if g is not None]
        if not present:
            return None
        out = present[0].clone()
        for g in present[1:]:
            out |= g
        return out

    def decisions(self) -> torch.Tensor | None:
        """[B, G] bool: each guardrail's decision for each input of the latest prompt forward."""
        if any(g is None for g in self._gated_by):
            return None
        return torch.stack(self._gated_by, 1)

    def hold(self, decisions: torch.Tensor | None) -> None:
        """Judge no more: in the following forwards, flagged tokens of rows whose decision is on are clamped and
        other rows pass through (None judges again)."""
        self._held = decisions


class _Forward:
    """What the hooks need to know about the forward in progress: its inputs, and whether it continues a cache."""

    def __init__(self, specials: list[int]):
        self.specials = specials
        self.clear()

    def clear(self) -> None:
        self.seen, self.continuation, self.ids, self.mask, self.shape = False, False, None, None, None

    def on_inputs(self, inputs: dict) -> None:
        past = inputs.get("past_key_values")
        past_len = 0
        if past is not None:
            past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else int(past[0][0].shape[-2])
        self.clear()
        self.seen, self.continuation = True, past_len > 0
        self.ids, self.mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if self.ids is None and inputs.get("inputs_embeds") is not None:
            self.shape = tuple(inputs["inputs_embeds"].shape[:2])

    def real(self, B: int, T: int, device) -> torch.Tensor:
        """The real-token mask [B, T] of the forward's inputs."""
        if not self.seen:  # forward called on a submodule: the whole input is one prompt
            self.seen, self.shape = True, (B, T)
        real = real_token_mask(self.ids, self.mask, self.specials, self.shape or (B, T), self.continuation)
        if real.shape != (B, T):
            raise DSGError(
                f"A guardrail hook saw activations of shape {(B, T)} for inputs of shape {tuple(real.shape)}."
            )
        return real.to(device)


@contextmanager
def attach(
    model: torch.nn.Module, *guardrails: Guardrail, verify: bool = True, special_ids: Sequence[int] | None = None
):
    """Apply one or more guardrails to every forward pass of `model` inside the block.

    With verify=True each guardrail first checks that `model` is the model it was fitted on.
    """
    if not guardrails:
        raise DSGError("attach() needs at least one guardrail.")
    by_hook: dict[str, list[int]] = {}
    for i, g in enumerate(guardrails):
        by_hook.setdefault(g.hook, []).append(i)
    points = {name: resolve(model, name) for name in by_hook}
    for name, members in by_hook.items():
        for i in members:
            check_width(model, points[name], guardrails[i].d_in, f"Guardrail {i} (SAE)")
            if verify:
                guardrails[i].check_model(model, points[name])
    device = next(model.parameters()).device
    for g in guardrails:
        g.latents.to(device)
    session = Attachment(list(guardrails), [None] * len(guardrails))
    states: list[rule.GateState | None] = [None] * len(guardrails)
    forward = _Forward(list(special_ids) if special_ids is not None else special_token_ids(model))

    def make_hook(members: list[int]):
        def fn(x_BTD: torch.Tensor):
            B, T = x_BTD.shape[:2]
            real = forward.real(B, T, x_BTD.device)
            n_prompt = (
                0 if forward.continuation else T if session.prompt_length is None else min(session.prompt_length, T)
            )
            out = None
            for i in members:
                g = guardrails[i]
                f, a = g.flags(x_BTD, real)
                if session._held is not None:
                    clamp_BT = rule.held(a, session._held[:, i])
                else:
                    prev = states[i] if forward.continuation else None
                    if forward.continuation and (prev is None or prev.gated.shape[0] != B):
                        raise DSGError(
                            "A cached continuation reached the guardrail without its prefill; start generation "
                            "inside attach()."
                        )
                    clamp_BT, states[i] = g.gate(a, real, n_prompt, prev)
                    session._gated_by[i] = states[i].gated
                if clamp_BT.any():
                    out = rule.apply_delta(x_BTD, *g.delta(f, clamp_BT), out)
            return out

        return fn

    with model_inputs(model, forward.on_inputs), ExitStack() as hooks:
        for name, members in by_hook.items():
            hooks.enter_context(hooked(model, points[name], make_hook(members)))
        yield session


@RUNTIMES.register("hf")
class HFRuntime:
    """PyTorch modules with a HuggingFace-style config: forward hooks at each guardrail's hook point."""

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, torch.nn.Module) and hasattr(model, "config")

    attach = staticmethod(attach)
