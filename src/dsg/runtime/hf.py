"""Guardrails on a HuggingFace model: forward hooks that run the rule (guard/rule.py) at each guardrail's hook.

    with dsg.attach(model, guard_bio, guard_cyber) as session:
        model.generate(...)
    session.gated          # [B] inputs that any guardrail guarded

Each forward is classified from its inputs: a forward without a KV cache (or the prefill of one) is a prompt, and
its positions share one decision; a forward that continues a cache holds generated tokens, which extend the
running counts and can latch the gate (see rule.gate). `session.prompt_length` (set by the no-cache reference
generator) says where the prompt ends inside a full-sequence forward. `session.hold(decisions)` fixes the
decisions for the following forwards instead (scoring several continuations under one prompt's decision).
`session.fork(rows)` repeats the gate state of the latest forward's rows for the following continuation: a prefix
shared by several prompts is prefilled once and each prompt's own tokens continue it (exact for a prefix-causal
gate, see runtime.intervention.prefix_causal); that continuation is judged as the rest of the prompt.
`session.clamped` says which inputs had any token clamped (a gate held open for a while can close again before
an input ends, so an input can be clamped yet not `gated`).

Guardrails on the same hook point judge the same (unedited) activations and their deltas add up, so each keeps
its own gate. Tokens that are not clamped are returned bit-for-bit.

Guardrail state belongs to the call, not to the model: the hooks are installed once per model (and removed when
the last attachment ends), and each forward applies only the attachments active in the calling thread (or async
task: a context variable holds them). Threads sharing one model each get their own decisions, and a thread that
attached nothing runs the plain model. A thread started inside `attach` (HF's streaming pattern,
`Thread(target=model.generate)`) starts with an empty context and so runs unguarded: start it with
`contextvars.copy_context().run` to carry the attachment into it (its gate state is then kept per thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..errors import DSGError
from ..guard import rule
from ..guard.guardrail import Guardrail
from ..lm.hooks import HookPoint, check_width, hooked, resolve
from ..lm.text import real_token_mask, special_token_ids
from .intervention import RUNTIMES


def _any_of(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """[B] bool: the rows on in any of the [B] masks (None for none)."""
    return torch.stack(rows).any(0) if rows else None


@dataclass
class _Decisions:
    """What one thread's latest forward decided, per guardrail (Attachment's properties read it)."""

    gated_by: list[torch.Tensor | None]  # [B] bool gate
    first_by: dict[int, torch.Tensor] = field(default_factory=dict)  # [B] first clamped position
    clamped_by: dict[int, torch.Tensor] = field(default_factory=dict)  # [B] any token clamped
    clamp_by: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, T] the prompt's clamp


@dataclass
class Attachment:
    """What `attach` yields: the gate decisions of the latest forward pass, and generation state."""

    guardrails: list[Guardrail]
    prompt_length: int | None = None  # set by reference_generate: positions beyond it are treated as generated
    _held: torch.Tensor | None = None  # [B, G] decisions held fixed (see hold)
    _held_from: torch.Tensor | None = None  # [B, G] positions from which held rows are clamped (see hold)
    _held_mask: torch.Tensor | None = None  # [B, G, T] positions clamped exactly as given (see hold)
    _fork: Callable[[torch.Tensor], None] | None = None  # set by the attachment: forks its per-thread gate states
    # The latest forward's decisions, per thread: an attachment carried into several threads (copy_context().run,
    # asyncio.to_thread) reports to each thread what its own forwards decided. A thread that ran none reads the
    # latest any thread recorded (the streaming pattern: a worker generates, the caller reads after joining it).
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    _latest: _Decisions | None = field(default=None, repr=False, compare=False)

    def _decisions(self, write: bool = False) -> _Decisions:
        mine = getattr(self._local, "decisions", None)
        if write:
            if mine is None:
                mine = self._local.decisions = _Decisions([None] * len(self.guardrails))
            self._latest = mine
            return mine
        return mine or self._latest or _Decisions([None] * len(self.guardrails))

    @property
    def _gated_by(self) -> list[torch.Tensor | None]:  # per guardrail, [B] bool gate after the latest forward
        return self._decisions().gated_by

    @property
    def _first_by(self) -> dict[int, torch.Tensor]:  # per guardrail, [B] first clamped position
        return self._decisions().first_by

    @property
    def _clamped_by(self) -> dict[int, torch.Tensor]:  # per guardrail, [B] any token clamped
        return self._decisions().clamped_by

    @property
    def _clamp_by(self) -> dict[int, torch.Tensor]:  # per guardrail, [B, T] the prompt's clamp
        return self._decisions().clamp_by

    @property
    def gated(self) -> torch.Tensor | None:
        """[B] bool: inputs in the latest forward that any attached guardrail gated."""
        return _any_of([g for g in self._gated_by if g is not None])

    def decisions(self) -> torch.Tensor | None:
        """[B, G] bool: each guardrail's decision for each input of the latest prompt forward."""
        if any(g is None for g in self._gated_by):
            return None
        return torch.stack(self._gated_by, 1)

    @property
    def clamped(self) -> torch.Tensor | None:
        """[B] bool: inputs of the latest prompt forward in which any guardrail clamped a token. With a gate that
        holds open for a while instead of latching, an input can be clamped mid-way yet not `gated` at its end."""
        if len(self._clamped_by) != len(self.guardrails):
            return None
        return _any_of(list(self._clamped_by.values()))

    def first_clamped(self) -> torch.Tensor | None:
        """[B, G] long: each guardrail's first clamped position in the latest prompt forward (its length when
        none was clamped): where a windowed gate began to clamp."""
        if len(self._first_by) != len(self.guardrails):
            return None
        return torch.stack([self._first_by[i] for i in range(len(self.guardrails))], 1)

    def clamp_mask(self) -> torch.Tensor | None:
        """[B, G, T] bool: which tokens each guardrail clamped in the latest prompt forward."""
        if len(self._clamp_by) != len(self.guardrails):
            return None
        return torch.stack([self._clamp_by[i] for i in range(len(self.guardrails))], 1)

    def hold(
        self, decisions: torch.Tensor | None, start: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> None:
        """Judge no more: in the following forwards, flagged tokens of rows whose decision is on are clamped (from
        position `start` [B, G] on, when given) and other rows pass through (None judges again). `mask` [B, G, T']
        adds the tokens to clamp before `start` exactly: a prompt's own clamp_mask, so that re-running the prompt
        with a continuation after it repeats the prompt's clamping token for token (a gate held open for a while
        can close and open again inside a prompt, which no single start position describes)."""
        self._held, self._held_from, self._held_mask = decisions, start, mask

    def fork(self, rows: torch.Tensor) -> None:
        """The following forwards continue rows `rows` (repeats allowed) of the latest forward: its gate states and
        decisions are repeated to match (a shared prefix extended by several suffixes; the KV cache is forked
        alike by the caller). `first_clamped` is None from here on: the prompt now arrives in pieces."""
        old = self._decisions()
        pick = [g for g in old.gated_by if g is not None]
        rows = rows.to(pick[0].device) if pick else rows
        new = self._decisions(write=True)
        new.gated_by = [None if g is None else g[rows] for g in old.gated_by]
        new.first_by, new.clamped_by, new.clamp_by = {}, {}, {}
        if self._fork is not None:
            self._fork(rows)


class _Forward:
    """What the hooks need to know about the forward in progress: its inputs, and whether it continues a cache."""

    def __init__(self, specials: list[int]):
        self.specials = specials
        self.clear()

    def clear(self) -> None:
        self.seen, self.continuation, self.ids, self.mask, self.shape = False, False, None, None, None
        self.prompt_piece = False  # a continuation that holds the rest of a forked prompt (Attachment.fork)

    def on_inputs(self, inputs: dict) -> None:
        # transformers 5.24 renamed the forward's cache argument from past_key_values to cache
        past = next((inputs[k] for k in ("cache", "past_key_values") if inputs.get(k) is not None), None)
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


class _Attached:
    """One `attach` call: its guardrails by hook point, its gate states, its session, its forward bookkeeping."""

    def __init__(self, model, guardrails, by_hook: dict[str, list[int]], specials: list[int]):
        self.model, self.guardrails, self.by_hook, self.specials = model, guardrails, by_hook, specials
        self.session = Attachment(list(guardrails))
        self.session._fork = self.fork
        # per thread: a context copied into several threads (asyncio.to_thread) must not share a forward's state
        self.local = threading.local()

    @property
    def forward(self) -> _Forward:
        if not hasattr(self.local, "forward"):
            self.local.forward = _Forward(self.specials)
        return self.local.forward

    @property
    def states(self) -> list[rule.GateState | None]:
        if not hasattr(self.local, "states"):
            self.local.states = [None] * len(self.guardrails)
        return self.local.states

    def fork(self, rows: torch.Tensor) -> None:
        """This thread's gate states, rows `rows` repeated (see Attachment.fork); the next forward continues the
        prompt (its tokens are the rest of each row's prompt, not generated ones)."""
        states = self.states
        for i, st in enumerate(states):
            if st is not None:
                states[i] = type(st)(*(t[rows.to(t.device)] for t in st))
        self.local.prompt_next = True

    def begin(self, inputs: dict) -> None:
        """A forward starts in this thread: read its inputs, and whether it continues a forked prompt."""
        self.forward.on_inputs(inputs)
        self.forward.prompt_piece = getattr(self.local, "prompt_next", False)
        self.local.prompt_next = False

    def apply(self, name: str, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """The guardrails at hook `name` all judge x and add up their deltas: the edited activations, or None when
        nothing was clamped."""
        out = None
        B, T = x_BTD.shape[:2]
        session, forward = self.session, self.forward
        real = forward.real(B, T, x_BTD.device)
        if forward.prompt_piece or not forward.continuation:
            n_prompt = T if session.prompt_length is None else min(session.prompt_length, T)
        else:
            n_prompt = 0
        for i in self.by_hook[name]:
            g = self.guardrails[i]
            if x_BTD.shape[-1] != g.d_in:
                raise DSGError(
                    f"Hook point {name!r} gives activations of width {x_BTD.shape[-1]}, but guardrail {i}'s SAE reads "
                    f"width {g.d_in}; hook a residual-stream point such as 'blocks.L.hook_resid_post'."
                )
            f, a, e = g.flags(x_BTD, real)
            if session._held is not None:
                start = None if session._held_from is None else session._held_from[:, i]
                clamp_BT = rule.held(a, session._held[:, i], start)
                if session._held_mask is not None:
                    given = session._held_mask[:, i, :T].to(a.device)
                    clamp_BT[:, : given.shape[1]] |= given & a[:, : given.shape[1]]
            else:
                prev = self.states[i] if forward.continuation else None
                if forward.continuation and (prev is None or prev.gated.shape[0] != B):
                    raise DSGError(
                        "A cached continuation reached the guardrail without its prefill; start generation inside "
                        "attach()."
                    )
                clamp_BT, self.states[i] = g.gate(a, real, n_prompt, prev, e)
                record = session._decisions(write=True)
                record.gated_by[i] = self.states[i].gated
                if not forward.continuation:
                    first = clamp_BT.long().argmax(1)
                    record.first_by[i] = torch.where(clamp_BT.any(1), first, torch.full_like(first, T))
                    record.clamped_by[i] = clamp_BT.any(1)
                    record.clamp_by[i] = clamp_BT
            if clamp_BT.any():
                out = rule.apply_delta(x_BTD, *g.delta(f, clamp_BT), out)
        return out


_ACTIVE: ContextVar[tuple[_Attached, ...]] = ContextVar("dsg_attached", default=())
"""The attachments active in this thread or task, outermost first."""


class _ModelHooks:
    """The hooks installed on one model, shared by every attachment to it and removed with the last one."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.users, self.points = model, 0, {}
        self.inputs = model.register_forward_pre_hook(self.on_inputs, with_kwargs=True)
        # a forward's inputs describe that forward only: a later call on a submodule (model.model(...)) must not
        # read them as its own
        self.outputs = model.register_forward_hook(self.on_outputs)

    def mine(self) -> list[_Attached]:
        return [att for att in _ACTIVE.get() if att.model is self.model]

    def on_inputs(self, _module, args, kwargs) -> None:
        attached = self.mine()
        if attached:
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            for att in attached:
                att.begin(inputs)

    def on_outputs(self, _module, _args, _output) -> None:
        for att in self.mine():
            att.forward.clear()

    def add(self, point: HookPoint) -> None:
        if point.name not in self.points:

            def dispatch(x_BTD: torch.Tensor, name=point.name):
                # nested attachments act in turn, each on what the ones before it made of the activations
                out = None
                for att in self.mine():
                    if name in att.by_hook:
                        edited = att.apply(name, x_BTD if out is None else out)
                        out = edited if edited is not None else out
                return out

            hook = hooked(self.model, point, dispatch)
            hook.__enter__()
            self.points[point.name] = hook

    def remove(self) -> None:
        for hook in self.points.values():
            hook.__exit__(None, None, None)
        self.inputs.remove()
        self.outputs.remove()


_HOOKS: dict[int, _ModelHooks] = {}
_HOOKS_LOCK = threading.Lock()


@contextmanager
def _hooks_on(model: torch.nn.Module, points: list[HookPoint]):
    with _HOOKS_LOCK:
        hooks = _HOOKS.get(id(model))
        if hooks is None or hooks.model is not model:
            hooks = _HOOKS[id(model)] = _ModelHooks(model)
        for point in points:
            hooks.add(point)
        hooks.users += 1
    try:
        yield
    finally:
        with _HOOKS_LOCK:
            hooks.users -= 1
            if hooks.users == 0:
                hooks.remove()
                del _HOOKS[id(model)]


def _identity(g: Guardrail) -> tuple:
    return (g.sae_sha256, g.hook, tuple(g.features), g.threshold, g.clamp, g.clamp_mode, g.gated)


@contextmanager
def attach(
    model: torch.nn.Module, *guardrails: Guardrail, verify: bool = True, special_ids: Sequence[int] | None = None
):
    """Apply one or more guardrails to every forward pass of `model` inside the block, in this thread.

    With verify=True each guardrail first checks that `model` is the model it was fitted on. The same guardrail
    twice (in one call, or in nested calls on one model) is refused: it would clamp twice.
    """
    if not guardrails:
        raise DSGError("attach() needs at least one guardrail.")
    active = [_identity(g) for att in _ACTIVE.get() if att.model is model for g in att.guardrails]
    seen = set(active)
    for g in guardrails:
        if _identity(g) in seen:
            raise DSGError(f"{g!r} is attached twice to the same model; it would clamp twice.")
        seen.add(_identity(g))
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
        g.to(device)
    specials = list(special_ids) if special_ids is not None else special_token_ids(model)
    att = _Attached(model, guardrails, by_hook, specials)
    with _hooks_on(model, list(points.values())):
        _ACTIVE.set((*_ACTIVE.get(), att))
        try:
            yield att.session
        finally:  # by identity: attachments need not end in the order they began (interleaved generators)
            _ACTIVE.set(tuple(a for a in _ACTIVE.get() if a is not att))


@RUNTIMES.register("hf")
class HFRuntime:
    """PyTorch modules with a HuggingFace-style config: forward hooks at each guardrail's hook point."""

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, torch.nn.Module) and hasattr(model, "config")

    attach = staticmethod(attach)
