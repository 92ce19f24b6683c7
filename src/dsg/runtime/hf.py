"""Guardrails on a HuggingFace model: forward hooks that run the rule (guard/rule.py) at each guardrail's hook.

    with dsg.attach(model, guard_bio, guard_cyber) as session:
        model.generate(...)
    session.gated          # [B] inputs that any guardrail guarded

Each forward is classified from its inputs: a forward without a KV cache (or the prefill of one) is a prompt, and
its positions share one decision; a forward that continues a cache holds generated tokens, which extend the
running counts and can latch the gate (see rule.gate), unless it runs inside `with session.prefilling():` (a
prompt fed in chunks through the cache: each chunk is the rest of the prompt). `session.prompt_length` (set by
the no-cache reference generator, and by `model.generate` while an attachment is active, which a forward without
a cache cannot otherwise tell from a prompt) says where the prompt ends inside a full-sequence forward. The steps
of a `model.generate` call are the forwards given the inputs its `prepare_inputs_for_generation` made; a forward
one of its callbacks makes (a stopping criterion, a streamer) is a prompt of its own. The gate
state follows what generation does to the KV cache: rows reordered (beam search), repeated or selected, and
tokens cropped (assisted and prompt-lookup decoding, which drop rejected candidates: the state is recomputed
without them). `session.hold(decisions)` fixes the
decisions for the following forwards instead (scoring several continuations under one prompt's decision).
`session.fork(rows)` repeats the gate state of the latest forward's rows for the following continuation: a prefix
shared by several prompts is prefilled once and each prompt's own tokens continue it (exact for a prefix-causal
gate, see runtime.intervention.prefix_causal); that continuation is judged as the rest of the prompt.
`session.clamped` says which inputs had any token clamped (a gate held open for a while can close again before
an input ends, so an input can be clamped yet not `gated`).

Guardrails on the same hook point judge the same (unedited) activations and their deltas add up, so each keeps
its own gate; so do guardrails attached in nested blocks. Tokens that are not clamped are returned bit-for-bit.

Guardrail state belongs to the call, not to the model: the hooks are installed once per model (and removed when
the last attachment ends), and each forward applies only the attachments active in the calling thread (or async
task: a context variable holds them). Threads sharing one model each get their own decisions, and a thread that
attached nothing runs the plain model. A thread started inside `attach` (HF's streaming pattern,
`Thread(target=model.generate)`) starts with an empty context and so runs unguarded: start it with
`contextvars.copy_context().run` to carry the attachment into it. A gate state is kept with the KV cache it
judged, so a continuation continues its own cache's state in whichever thread or task it runs. An attachment whose
block has ended applies nowhere, also in contexts that carried it on; a `model.generate` that began under it
raises at its next step instead of going on unguarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..config import is_index
from ..errors import DSGError
from ..guard import rule
from ..guard.guardrail import Guardrail
from ..lm.hooks import HookPoint, check_width, hooked, resolve
from ..lm.text import attended_tokens, real_token_mask, special_ids_in, special_token_ids
from .intervention import RUNTIMES


def _any_of(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """[B] bool: the rows on in any of the [B] masks (None for none)."""
    return torch.stack(rows).any(0) if rows else None


class _CallLocal:
    """Attributes kept apart per call: per thread, and inside a thread that runs an event loop, per asyncio task
    (tasks gathered inside one `attach` block share its context, and run in one thread)."""

    def __init__(self):
        object.__setattr__(self, "_thread", threading.local())
        object.__setattr__(self, "_tasks", weakref.WeakKeyDictionary())

    def _space(self):
        tasks = object.__getattribute__(self, "_tasks")  # not self._tasks: a half-built copy has none
        loop = asyncio._get_running_loop()  # None in a thread that runs no event loop (current_task would raise)
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:
            return object.__getattribute__(self, "_thread")
        space = tasks.get(task)
        if space is None:
            space = tasks[task] = types.SimpleNamespace()
        return space

    def __getattr__(self, name):
        return getattr(self._space(), name)

    def __setattr__(self, name, value):
        setattr(self._space(), name, value)


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
    _prefill: Callable[[], Callable[[], None]] | None = None  # set by the attachment: starts a prefilling block
    _held: torch.Tensor | None = None  # [B, G] decisions held fixed (see hold)
    _held_from: torch.Tensor | None = None  # [B, G] positions from which held rows are clamped (see hold)
    _held_mask: torch.Tensor | None = None  # [B, G, T] positions clamped exactly as given (see hold)
    _fork: Callable[[torch.Tensor], None] | None = None  # set by the attachment: forks its per-thread gate states
    # The latest forward's decisions, per thread and asyncio task: an attachment carried into several threads
    # (copy_context().run, asyncio.to_thread) or tasks reports to each what its own forwards decided. One that ran
    # none reads the latest any recorded (the streaming pattern: a worker generates, the caller reads after it).
    _local: _CallLocal = field(default_factory=_CallLocal, repr=False, compare=False)
    _latest: _Decisions | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name, value) -> None:
        if name == "prompt_length" and value is not None:
            number = operator.index(value) if is_index(value) else None
            if number is None or number < 0:
                raise DSGError(f"prompt_length must be a number of tokens (an integer from 0) or None, got {value!r}.")
            value = number
        super().__setattr__(name, value)

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
        G = len(self.guardrails)
        _check_tensor("decisions", decisions, (torch.bool,), f"[batch, {G}]", 2, G)
        _check_tensor("start", start, _INTEGERS, f"[batch, {G}]", 2, G)
        _check_tensor("mask", mask, (torch.bool,), f"[batch, {G}, tokens]", 3, G)
        if start is not None and (decisions is None or start.shape != decisions.shape):
            raise DSGError(f"hold(): start must have the shape of decisions, {tuple(getattr(decisions, 'shape', ()))}.")
        if mask is not None and (decisions is None or mask.shape[:2] != decisions.shape):
            raise DSGError("hold(): mask must be [batch, guardrails, tokens] for the rows of decisions.")
        self._held, self._held_from, self._held_mask = decisions, start, mask

    def fork(self, rows: torch.Tensor) -> None:
        """The following forwards continue rows `rows` (repeats allowed) of the latest forward: its gate states and
        decisions are repeated to match (a shared prefix extended by several suffixes; the KV cache is forked
        alike by the caller). `first_clamped` is None from here on: the prompt now arrives in pieces."""
        _check_tensor("rows", rows, _INTEGERS, "[rows] of indices", 1)
        batch = next((g.shape[0] for g in self._gated_by if g is not None), None)
        if batch is not None and rows.numel() and not (int(rows.min()) >= 0 and int(rows.max()) < batch):
            raise DSGError(f"fork(): rows must index the latest forward's {batch} rows, got {rows.tolist()}.")
        self._reindex(rows)
        if self._fork is not None:
            self._fork(rows)

    @contextmanager
    def prefilling(self):
        """Inside the block, forwards that continue a KV cache hold more of the prompt, not generated tokens: a
        prompt fed in chunks (`model(chunk, past_key_values=cache)`) is then judged as the same prompt given whole.
        Needs a prefix-causal gate (windowed, or static). `session.clamped` covers every chunk."""
        if any(g.gated and not g.prefix_causal for g in self.guardrails):
            raise DSGError("A prompt fed in chunks needs a prefix-causal gate: the whole-input gate (no --gate-window) "
                           "decides on the whole prompt, which no chunk holds; feed the prompt whole.")  # fmt: skip
        end = self._prefill() if self._prefill is not None else None
        try:
            yield self
        finally:
            if end is not None:
                end()

    def _reindex(self, rows: torch.Tensor) -> None:
        """This thread's decisions, rows `rows` of the latest forward's (`first_clamped`, `clamped` and
        `clamp_mask` describe one whole forward, so they are None from here on)."""
        old = self._decisions()
        pick = [g for g in old.gated_by if g is not None]
        rows = rows.to(pick[0].device) if pick else rows
        new = self._decisions(write=True)
        new.gated_by = [None if g is None else g[rows] for g in old.gated_by]
        new.first_by, new.clamped_by, new.clamp_by = {}, {}, {}


class _Forward:
    """What the hooks need to know about the forward in progress: its inputs, and whether it continues a cache."""

    def __init__(self, specials: list[int]):
        self.specials = specials
        self.clear()

    def clear(self) -> None:
        self.seen, self.continuation, self.ids, self.mask, self.shape = False, False, None, None, None
        self.source = None  # the forward's input_ids (or inputs_embeds) tensor, which a nested base call is given
        self.past = 0  # cached positions before this forward's tokens
        self.prompt_piece = False  # a continuation that holds the rest of a prompt (Attachment.fork, prefilling)
        self.prompt_rest = None  # inside model.generate, how many tokens of a prompt whose start a cache holds
        self.owner = None  # the module whose forward this is: the model, or its base model called on its own
        self.generation = None  # the model.generate call this forward is a step of (None: none, or a callback's)
        self.padding_from = None  # inside model.generate: the first generated position
        self.dropped = None  # [B, T] what generate padded finished rows with: not text (see _finished_padding)

    def on_inputs(self, inputs: dict) -> None:
        past = _cache_of(inputs)
        past_len = 0
        if past is not None:
            past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else int(past[0][0].shape[-2])
        self.clear()
        self.seen, self.continuation = True, past_len > 0
        self.ids, self.mask = inputs.get("input_ids"), inputs.get("attention_mask")
        self.source = _source(inputs)
        self.past = past_len
        if isinstance(self.mask, dict):  # a mask per layer type (Gemma 2 with a static cache): the full-attention one
            self.mask = self.mask.get("full_attention", next(iter(self.mask.values()), None))
        if self.ids is None and inputs.get("inputs_embeds") is not None:
            self.shape = tuple(inputs["inputs_embeds"].shape[:2])
        self._check_mask_width(past)

    def _check_mask_width(self, cache=None) -> None:
        """A 2D attention mask covers the cached and the new positions (HF's convention): one column each. A model
        given another width fails, or reads other columns than the gate would (its first ones, the gate its last):
        refused, rather than judged on other tokens. One exception: a mask over every slot of a static-shaped
        cache, zero after the positions so far (BLOOM's generation pads its 2D mask so), reads as its first
        columns."""
        shape = tuple(self.ids.shape) if isinstance(self.ids, torch.Tensor) else self.shape
        if not (isinstance(self.mask, torch.Tensor) and self.mask.ndim == 2 and shape is not None and len(shape) == 2):
            return
        T, width = shape[1], self.mask.shape[1]
        if width > self.past + T and width == _slots(cache) and not bool(self.mask[:, self.past + T :].any()):
            self.mask = self.mask[:, : self.past + T]
            width = self.past + T
        if width != self.past + T:
            cached = f"{self.past} cached and " if self.past else ""
            whole = "of the whole sequence so far" if self.past else "the tokenizer gave with these inputs"
            raise DSGError(f"The attention mask has {width} columns for {cached}{T} new tokens (expected "
                           f"{self.past + T}, one per position); pass the mask {whole}.")  # fmt: skip

    def _columns(self, T: int) -> torch.Tensor | None:
        """Where a 4D mask over all of a static cache's slots holds the new tokens (right after the cached ones);
        None for any other mask."""
        if not (isinstance(self.mask, torch.Tensor) and self.mask.ndim == 4 and self.mask.shape[-1] != self.past + T):
            return None
        if self.past + T > self.mask.shape[-1]:
            raise DSGError(f"The attention mask covers {self.mask.shape[-1]} cache slots, fewer than the "
                           f"{self.past + T} positions so far: a sliding-window cache (a static or "
                           "'sliding_window' cache on a model whose every layer attends within a window), whose "
                           "slots the guardrail cannot tell padding in. Generate with the default dynamic "
                           "cache.")  # fmt: skip
        return torch.arange(self.past, self.past + T)

    def padding(self, B: int, T: int, device) -> torch.Tensor:
        """The forward's new tokens that are padding [B, T] (not attended): not text, and no line's end or start
        to the gate (Guardrail.counted)."""
        mask = self.mask if isinstance(self.mask, torch.Tensor) else None
        return ~attended_tokens(mask, self.shape or (B, T), self._columns(T), device).to(device)

    def real(self, B: int, T: int, device) -> torch.Tensor:
        """The real-token mask [B, T] of the forward's inputs."""
        if not self.seen:  # forward called on a submodule: the whole input is one prompt
            self.seen, self.shape = True, (B, T)
        columns = self._columns(T)
        real = real_token_mask(self.ids, self.mask, self.specials, self.shape or (B, T), self.continuation, columns)
        if self.dropped is not None and self.dropped.shape == real.shape:
            real = real & ~self.dropped.to(real.device)
        if real.shape != (B, T):
            raise DSGError(
                f"A guardrail hook saw activations of shape {(B, T)} for inputs of shape {tuple(real.shape)}."
            )
        return real.to(device)


class _Sequence:
    """The gate state of one batch of sequences being decoded (one KV cache): each guardrail's state, the latest
    forward's gate inputs (to recompute it after a crop), and whether the next forward holds more of the prompt
    (after Attachment.fork)."""

    __slots__ = ("states", "last", "prompt_next", "finished", "__weakref__")

    def __init__(self, n: int):
        self.states: list[rule.GateState | None] = [None] * n
        self.last: dict = {}
        self.prompt_next = False
        self.finished: torch.Tensor | None = None  # [B] rows model.generate has ended (an EOS generated)

    def copy(self) -> _Sequence:
        """Its own state from here on (the gate's states are replaced, never edited in place)."""
        new = _Sequence(len(self.states))
        new.states, new.last, new.prompt_next = list(self.states), dict(self.last), self.prompt_next
        new.finished = self.finished
        return new


class _PrefillingBlock:
    """One `session.prefilling()` block of one attachment; `open` until the block ends (a context copied inside
    it keeps the block in its context variable, and must see it ended)."""

    def __init__(self, attached: _Attached):
        self.attached, self.open = attached, True


_PREFILLING: ContextVar[tuple[_PrefillingBlock, ...]] = ContextVar("dsg_prefilling", default=())
"""The `session.prefilling()` blocks entered in this context (tasks and copied contexts inherit them)."""


class _Attached:
    """One `attach` call: its guardrails by hook point, its gate states, its session, its forward bookkeeping.

    A gate state belongs to the sequences it judged, so it is kept with their KV cache: a forward that continues a
    cache continues that cache's state, in whichever thread or asyncio task it runs (an `asyncio.wait_for` step
    runs in a task of its own). A forward's own bookkeeping and the decisions `session` reads are kept per thread
    and per task; so is the state of a continuation whose cache object was never seen (it continues the latest
    forward of its thread or task)."""

    def __init__(self, model, guardrails, by_hook: dict[str, list[int]], specials: list[int]):
        self.model, self.guardrails, self.by_hook, self.specials = model, guardrails, by_hook, specials
        self.session = Attachment(list(guardrails))
        self.session._fork, self.session._prefill = self.fork, self.start_prefilling
        # per thread and task: a context copied into several threads (asyncio.to_thread) or tasks (gathered inside
        # the block) must not share a forward's state
        self.local = _CallLocal()
        self.by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its _Sequence
        self.closed = False  # the `attach` block ended: a context that carried it on no longer runs under it

    @property
    def forward(self) -> _Forward:
        if not hasattr(self.local, "forward"):
            self.local.forward = _Forward(self.specials)
        return self.local.forward

    @property
    def sequence(self) -> _Sequence:
        """The sequences the forward in progress (or the latest one) in this thread or task judges."""
        if not hasattr(self.local, "sequence"):
            self.local.sequence = _Sequence(len(self.guardrails))
        return self.local.sequence

    @property
    def states(self) -> list[rule.GateState | None]:
        return self.sequence.states

    def _bind(self, cache, sequence: _Sequence) -> None:
        with contextlib.suppress(TypeError):  # a cache that takes no weak reference is followed per thread only
            self.by_cache[cache] = sequence
        with contextlib.suppress(AttributeError, TypeError):  # a deep copy of the cache carries the reference
            cache._dsg_origin = weakref.ref(cache)

    def _sequence_of(self, cache) -> _Sequence | None:
        """The sequence a continuation of `cache` continues: its own, or for a deep copy of a cache (HF's prompt
        reuse: `copy.deepcopy(prompt_cache)` per question) a copy of the original's; None when unknown."""
        try:
            known = self.by_cache.get(cache)
        except TypeError:  # no weak reference to it (a legacy tuple cache): unknown
            return None
        if known is not None:
            return known
        origin = getattr(cache, "_dsg_origin", None)
        original = origin() if isinstance(origin, weakref.ref) else None
        if original is None or original is cache:
            return None
        known = self.by_cache.get(original)  # weakly referenced already: the lookup cannot raise
        return known.copy() if known is not None else None

    @staticmethod
    def select(sequence: _Sequence, rows: torch.Tensor) -> None:
        """The sequence's gate states, rows `rows` of them (repeats allowed), as the KV cache's rows were."""
        for i, st in enumerate(sequence.states):
            if st is not None:
                sequence.states[i] = type(st)(*(t[rows.to(t.device)] for t in st))
        if sequence.finished is not None:
            sequence.finished = sequence.finished[rows.to(sequence.finished.device)]
        sequence.last = {}  # a crop cannot reach back past a reindexing

    def fork(self, rows: torch.Tensor) -> None:
        """The latest forward's gate states, rows `rows` repeated (see Attachment.fork); the next forward continues
        the prompt (its tokens are the rest of each row's prompt, not generated ones)."""
        self.select(self.sequence, rows)
        self.sequence.prompt_next = True

    def start_prefilling(self) -> Callable[[], None]:
        """Mark this context's forwards as more of the prompt; the returned function ends it. A context copied
        inside the block (a task, a worker) sees the mark only while the block lasts."""
        block = _PrefillingBlock(self)
        _PREFILLING.set((*_PREFILLING.get(), block))

        def end() -> None:
            block.open = False
            _PREFILLING.set(tuple(b for b in _PREFILLING.get() if b is not block))

        return end

    def prefilling_now(self) -> bool:
        return any(b.attached is self and b.open for b in _PREFILLING.get())

    def on_cache(self, cache, op: str, arg) -> None:
        """The KV cache changed under generation (see _ModelHooks.follow): its gate state follows it. `session`
        keeps reporting the latest forward's rows: beam search reorders the cache once more after its last step,
        to beams it never runs, and a run without a cache (which reorders nothing) reports the same."""
        sequence = self._sequence_of(cache) or self.sequence
        states = [st for st in sequence.states if st is not None]
        if not states:
            return
        B = states[0].gated.shape[0]
        if op == "crop":
            self.crop(sequence, int(arg))
            return
        if op == "batch_repeat_interleave":
            rows = torch.arange(B).repeat_interleave(int(arg))
        else:  # reorder_cache (beam search), batch_select_indices
            rows = torch.as_tensor(arg).reshape(-1).long()
        self.select(sequence, rows)

    def crop(self, sequence: _Sequence, removed: int) -> None:
        """The cache dropped its last `removed` positions (rejected candidate tokens): each gate's state becomes
        the one after the kept tokens of the latest forward, recomputed from the state before it."""
        if removed <= 0:
            return
        last, states = sequence.last, sequence.states
        record = self.session._decisions(write=True)
        for i, g in enumerate(self.guardrails):
            if states[i] is None:
                continue
            if i not in last or last[i][1].shape[1] < removed:
                raise DSGError(
                    "Generation removed tokens from the KV cache beyond the latest forward; the guardrail's gate "
                    "state cannot follow it. Decode without that strategy (greedy, sampling and beam search work)."
                )
            prev, a, real, e, n_prompt, counted = last[i]
            keep = a.shape[1] - removed
            e, counted = (None if x is None else x[:, :keep] for x in (e, counted))
            if keep == 0:
                states[i] = prev
            else:
                _, states[i] = g.gate(a[:, :keep], real[:, :keep], min(n_prompt, keep), prev, e, counted)
            last[i] = (prev, a[:, :keep], real[:, :keep], e, min(n_prompt, keep), counted)
            if states[i] is not None:
                record.gated_by[i] = states[i].gated

    def begin(self, inputs: dict, generation: _Generation | None = None) -> None:
        """A forward starts in this thread or task: read its inputs, find the sequences it judges (a continuation
        continues its cache's; a prompt starts new ones), and whether it continues a prompt (a forked one, or one
        fed in chunks inside `prefilling`). `generation`: the `model.generate` call it is a step of, if any."""
        forward = self.forward
        forward.on_inputs(inputs)
        forward.generation = generation
        cache = _cache_of(inputs)
        if forward.continuation:
            known = self._sequence_of(cache) if cache is not None else None
            if known is not None:
                self.local.sequence = known
            elif cache is not None and _weakly_referenced(cache) and not self.sequence.prompt_next:
                # a cache this attachment never judged (made by the plain model, or under another attach()): it
                # does not continue whatever this thread ran last, and is refused in apply for want of a prefill
                self.local.sequence = _Sequence(len(self.guardrails))
        else:
            self.local.sequence = _Sequence(len(self.guardrails))
        sequence = self.sequence
        if cache is not None:
            self._bind(cache, sequence)
        forward.prompt_piece = sequence.prompt_next or self.prefilling_now()
        sequence.prompt_next = False
        prompt_length = self.session.prompt_length
        if prompt_length is None and generation is not None:
            prompt_length = generation.length
        if generation is not None:  # where generated tokens begin, for the padding of finished rows
            forward.padding_from = 0 if forward.continuation and not forward.prompt_piece else generation.length or None
        if forward.continuation and not forward.prompt_piece and prompt_length and forward.past < prompt_length:
            # model.generate given a cache of the start of its prompt (a reused prompt cache, a new turn appended
            # to a conversation's cache): the rest of the prompt is prompt, judged as if the prompt came whole
            if any(g.gated and not g.prefix_causal for g in self.guardrails):
                raise DSGError("model.generate was given a KV cache that holds only part of its prompt: the "
                               "whole-input gate (no --gate-window) decides on the whole prompt, which the cached "
                               "part was not judged with; generate from the whole prompt without the cache, or use a "
                               "windowed gate.")  # fmt: skip
            forward.prompt_piece, forward.prompt_rest = True, prompt_length - forward.past
            forward.padding_from = forward.prompt_rest
        if forward.padding_from is not None and isinstance(forward.ids, torch.Tensor) and forward.ids.ndim == 2:
            # a generation's own steps carry its finished rows; its first forward (a prompt, or the rest of one
            # after a reused cache) starts with none
            before = sequence.finished if forward.continuation and not forward.prompt_piece else None
            forward.dropped, sequence.finished = _finished_padding(
                forward.ids, forward.padding_from, generation, before
            )

    def end(self, output) -> None:
        """A forward this attachment began has returned: a cache the model made for it continues its sequences."""
        cache = _cache_of(output) if isinstance(output, Mapping) else None  # a ModelOutput is a mapping
        if cache is not None:
            self._bind(cache, self.sequence)  # a tuple cache takes no weak reference and is not bound
        self.forward.clear()

    def apply(self, name: str, x_BTD: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The guardrails at hook `name` all judge x and add up their deltas, onto `out` (what attachments before
        this one made of x) or a copy of x: the edited activations, or `out` when nothing was clamped."""
        B, T = x_BTD.shape[:2]
        session, forward = self.session, self.forward
        real = forward.real(B, T, x_BTD.device)
        padding = forward.padding(B, T, x_BTD.device)
        generation = forward.generation
        prompt_length = session.prompt_length
        if prompt_length is None:
            prompt_length = (generation.length if generation is not None else 0) or None
        # a forward a callback of model.generate makes (a stopping criterion, a streamer running the model) is
        # judged as a prompt of its own, and leaves the session's decisions to the generation
        aside = generation is None and _generation_of(self.model) is not None
        if forward.prompt_rest is not None:  # the rest of a prompt whose start a cache holds
            n_prompt = min(forward.prompt_rest, T)
        elif forward.prompt_piece or not forward.continuation:
            n_prompt = T if prompt_length is None or forward.continuation else min(prompt_length, T)
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
                counted = g.counted(real, forward.ids, padding)
                clamp_BT, self.states[i] = g.gate(a, real, n_prompt, prev, e, counted)
                self.sequence.last[i] = (prev, a, real, e, n_prompt, counted)  # for a crop of this forward's tokens
                record = _Decisions([None] * len(self.guardrails)) if aside else session._decisions(write=True)
                record.gated_by[i] = self.states[i].gated
                if not forward.continuation:
                    first = clamp_BT.long().argmax(1)
                    record.first_by[i] = torch.where(clamp_BT.any(1), first, torch.full_like(first, T))
                    record.clamped_by[i] = clamp_BT.any(1)
                    record.clamp_by[i] = clamp_BT
                elif forward.prompt_piece:  # the rest of a prompt: `clamped` covers every piece
                    before = record.clamped_by.get(i)
                    now = clamp_BT.any(1)
                    record.clamped_by[i] = now if before is None or before.shape != now.shape else before | now
                    record.first_by.pop(i, None)
                    record.clamp_by.pop(i, None)
            if clamp_BT.any():
                out = rule.apply_delta(x_BTD, *g.delta(f, clamp_BT), out)
        return out


_ACTIVE: ContextVar[tuple[_Attached, ...]] = ContextVar("dsg_attached", default=())
"""The attachments active in this thread or task, outermost first."""


def _active_on(model: torch.nn.Module) -> list[_Attached]:
    """The attachments to `model` active in this thread or task, outermost first. One whose block has ended is not:
    a thread or task that carried it on (in a copied context) runs the plain model, whoever else is attached."""
    return [att for att in _ACTIVE.get() if att.model is model and not att.closed]


def _source(inputs: dict):
    """A forward's input tensor: its input_ids, or its inputs_embeds."""
    ids = inputs.get("input_ids")
    return ids if ids is not None else inputs.get("inputs_embeds")


def _slots(cache) -> int | None:
    """The number of positions a static-shaped KV cache holds (None for a cache that grows: a dynamic cache of a
    sliding-window model reports its window as its length)."""
    if not getattr(cache, "is_compileable", False):  # transformers' mark of a static-shaped cache
        return None
    for name in ("get_max_cache_shape", "get_max_length"):
        with contextlib.suppress(Exception):
            n = getattr(cache, name)()
            if isinstance(n, int) and n > 0:
                return n
    return None


def _cache_of(inputs: dict):
    """A forward's KV cache argument, or None (transformers 5.24 renamed it from past_key_values to cache)."""
    return next((inputs[k] for k in ("cache", "past_key_values") if inputs.get(k) is not None), None)


def _finished_padding(ids: torch.Tensor, start: int, generation: _Generation, before: torch.Tensor | None):
    """([B, T] the positions that are padding of a finished row, [B] the rows finished after these tokens). In a
    batch, `model.generate` appends its pad id to a row that has generated an EOS, with attention 1: with a pad id the
    model's config does not name (a tokenizer padded with an ordinary token) that padding would read as generated
    text, and move the row's gate. Positions from `start` on are generated; `before`: the rows already finished."""
    B, T = ids.shape
    generated = torch.arange(T, device=ids.device)[None, :] >= start
    ends = torch.isin(ids, generation.eos.to(ids.device)) & generated
    earlier = (ends.long().cumsum(1) - ends.long()) > 0  # an EOS generated before the position
    if before is not None and before.shape[0] == B:
        earlier = earlier | before.to(ids.device)[:, None]
    dropped = earlier & generated & torch.isin(ids, generation.pad.to(ids.device))
    finished = (earlier | ends)[:, -1] if T else (before if before is not None else torch.zeros(B, dtype=torch.bool))
    return dropped, finished


def _weakly_referenced(cache) -> bool:
    """Whether `cache` can key its gate state (a Cache object can; a legacy tuple cannot)."""
    try:
        weakref.ref(cache)
    except TypeError:
        return False
    return True


class _Generation:
    """One `model.generate` call in progress on one model: where its prompt ends, which ids end a row and pad it
    once finished, and which forwards are its own steps: those given the inputs `prepare_inputs_for_generation`
    made for them (tagged). A forward that one of its callbacks makes (a stopping criterion or a streamer running
    the model) is not: it is judged as a prompt of its own. For a model without that method every forward inside
    the call is its step."""

    def __init__(self, model, length: int, pad: Sequence[int], eos: Sequence[int], tagged: bool):
        self.model = model
        self.length = length  # the prompt's length (0: not known)
        self.pad = torch.tensor(sorted(set(pad)), dtype=torch.long)
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long)
        self.tagged, self.expected = tagged, None  # the input tensor of the step prepared last

    def expect(self, prepared) -> None:
        """`prepare_inputs_for_generation` made the inputs of the next step."""
        self.expected = _source(prepared) if isinstance(prepared, Mapping) else None

    def claims(self, inputs: dict) -> bool:
        if not self.tagged:
            return True
        source = _source(inputs)
        own = source is not None and source is self.expected
        if own:
            self.expected = None  # each prepared input is one step
        return own


def _generation_ids(model, kwargs: dict, key: str) -> list[int]:
    """The ids `model.generate(**kwargs)` uses as `key` (pad_token_id: what it pads a finished row with;
    eos_token_id: what ends a row), from its arguments or the model's generation config."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return special_ids_in({key: kwargs[key] if kwargs.get(key) is not None else getattr(config, key, None)})


_GENERATING: ContextVar[_Generation | None] = ContextVar("dsg_generating", default=None)
"""The `model.generate` call in progress in this thread or task, None outside one (see _ModelHooks)."""


def _generation_of(model) -> _Generation | None:
    """The `model.generate` call in progress in this thread or task, if it is `model`'s (another model run inside
    it, by a callback, is not in it)."""
    generation = _GENERATING.get()
    return generation if generation is not None and generation.model is model else None


_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_tensor(name: str, x, dtypes, shape: str, ndim: int, width: int | None = None) -> None:
    """A DSGError unless `x` is None or a tensor of one of `dtypes` with `ndim` dimensions (the second `width`)."""
    if x is None:
        return
    if (
        not isinstance(x, torch.Tensor)
        or x.dtype not in dtypes
        or x.ndim != ndim
        or (width is not None and x.shape[1] != width)
    ):
        kind = "a bool" if dtypes == (torch.bool,) else "an integer"
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DSGError(f"{name} must be {kind} tensor {shape}, got a {got}.")


_GENERATING_UNDER: ContextVar[tuple[_Attached, ...]] = ContextVar("dsg_generating_under", default=())
"""The attachments active when the `model.generate` call in progress in this thread or task began."""

_CACHE_OPS = ("reorder_cache", "batch_repeat_interleave", "batch_select_indices", "crop")


class _ModelHooks:
    """The hooks installed on one model, shared by every attachment to it and removed with the last one: one on
    the model's inputs and outputs, the same on its base model (read when it is called on its own, as
    `model.model(...)`), one per hook point, and a wrapper of `model.generate` that tells the hooks where the
    prompt ends."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.users, self.points = model, 0, {}
        self.handles = [
            model.register_forward_pre_hook(self.on_inputs, with_kwargs=True),
            # a forward's inputs describe that forward only: a later call on a submodule (model.model(...)) must
            # not read them as its own, nor the next forward, when this one raised or was stopped at a hook
            model.register_forward_hook(self.on_outputs, always_call=True),
        ]
        base = getattr(model, "base_model", None)
        if isinstance(base, torch.nn.Module) and base is not model:
            self.handles += [base.register_forward_pre_hook(self.on_inputs, with_kwargs=True),
                             base.register_forward_hook(self.on_outputs, always_call=True)]  # fmt: skip
        # a method set on the instance (a user's or a library's wrapper) is wrapped in turn and put back on removal
        self.own = {
            name: vars(model)[name] for name in ("generate", "prepare_inputs_for_generation") if name in vars(model)
        }
        self.generate = self.prepare = None
        if callable(getattr(model, "generate", None)):
            self.generate = self._wrap_generate(model.generate)
            model.generate = self.generate
            prepare = getattr(model, "prepare_inputs_for_generation", None)
            if callable(prepare):
                self.prepare = self._wrap_prepare(prepare)
                model.prepare_inputs_for_generation = self.prepare

    def mine(self) -> list[_Attached]:
        return _active_on(self.model)

    def on_inputs(self, module, args, kwargs) -> None:
        if any(att.closed for att in _GENERATING_UNDER.get() if att.model is self.model):
            raise DSGError(
                "The attach() block this model.generate call began under has ended, and generation went on: the "
                "tokens from here would not be guarded. Wait for the generation (join its thread) inside the block."
            )
        attached = self.mine()
        if attached:
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            generation, own = _generation_of(self.model), None
            for att in attached:
                # the base model inside the model's own forward (given the same input tensor) reads nothing new;
                # any other forward starts afresh, also after one cut short by KeyboardInterrupt (which skips the
                # output hooks, so its inputs were never cleared)
                forward = att.forward
                nested = module is not self.model and forward.owner is not None and forward.source is _source(inputs)
                if not nested:
                    if own is None:  # decided once per forward, for every attachment
                        own = generation is not None and generation.claims(inputs)
                    att.begin(inputs, generation if own else None)
                    att.forward.owner = module
            past = _cache_of(inputs)
            if past is not None:
                self.follow(past)

    def on_outputs(self, module, _args, output) -> None:
        for att in self.mine():
            if att.forward.owner is module:
                att.end(output)

    def follow(self, cache) -> None:
        """Make the gate state follow what `model.generate` does to `cache`: beam search reorders its rows,
        contrastive and assisted decoding repeat, select or crop them. Each such method of the cache object is
        wrapped once to tell the attachments active where it is called, inside a `generate` call only: outside it,
        whoever edits the cache says so with `session.fork` (eval.mcq does)."""
        if getattr(cache, "_dsg_followed", False):
            return
        for op in _CACHE_OPS:
            method = getattr(type(cache), op, None)
            if callable(method) and (op != "crop" or hasattr(cache, "get_seq_length")):

                def followed(this, arg, *rest, _method=method, _op=op, **kw):
                    before = this.get_seq_length() if _op == "crop" else 0
                    out = _method(this, arg, *rest, **kw)
                    if _GENERATING.get() is not None:
                        # crop's argument changed meaning across versions: what it removed is measured instead
                        change = before - this.get_seq_length() if _op == "crop" else arg
                        for att in self.mine():
                            att.on_cache(this, _op, change)
                    return out

                # bound to the cache object: a deep copy of the cache (a bound method copies to one bound to the
                # copy) follows its own rows, not the original's
                with contextlib.suppress(AttributeError):  # a cache that takes no attributes is not followed
                    setattr(cache, op, types.MethodType(followed, cache))
        with contextlib.suppress(AttributeError):
            cache._dsg_followed = True

    def _wrap_prepare(self, prepare):
        """`model.prepare_inputs_for_generation` tagging the inputs it makes as the `generate` call's next step, so
        that a forward one of its callbacks makes is told apart (see _Generation)."""

        def tagging_prepare(*args, **kwargs):
            out = prepare(*args, **kwargs)
            generation = _generation_of(self.model)
            if generation is not None:
                generation.expect(out)
            return out

        tagging_prepare.__wrapped__ = prepare
        tagging_prepare.__doc__ = prepare.__doc__
        return tagging_prepare

    def _wrap_generate(self, generate):
        """`model.generate` telling the hooks the prompt's length: a forward without a cache (use_cache=False) holds
        the prompt and the tokens generated so far, and only the prompt's positions are judged as prompt. The call
        keeps the hooks installed until it returns, and a forward it makes after an attachment it began under has
        ended (a worker carrying the caller's context, whose block was left without waiting for it) raises
        instead of running unguarded."""

        def guarded_generate(*args, **kwargs):
            inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")
            length = int(inputs.shape[1]) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else 0
            with _HOOKS_LOCK:
                self.users += 1
            generation = _Generation(
                self.model,
                length,
                _generation_ids(self.model, kwargs, "pad_token_id"),
                _generation_ids(self.model, kwargs, "eos_token_id"),
                self.prepare is not None,
            )
            tokens = (_GENERATING.set(generation), _GENERATING_UNDER.set(tuple(self.mine())))
            try:
                return generate(*args, **kwargs)
            finally:
                _GENERATING_UNDER.reset(tokens[1])
                _GENERATING.reset(tokens[0])
                _release(self)

        guarded_generate.__wrapped__ = generate
        guarded_generate.__doc__ = generate.__doc__
        return guarded_generate

    def add(self, point: HookPoint) -> None:
        if point.name not in self.points:

            def dispatch(x_BTD: torch.Tensor, name=point.name):
                # nested attachments judge the same unedited activations, as guardrails in one attach() call do
                # (each was fitted on the base model), and their deltas add up
                out = None
                for att in self.mine():
                    if name in att.by_hook:
                        out = att.apply(name, x_BTD, out)
                return out

            hook = hooked(self.model, point, dispatch, recorded=True)  # output_hidden_states shows the edit
            hook.__enter__()
            self.points[point.name] = hook

    def remove(self) -> None:
        for hook in self.points.values():
            hook.__exit__(None, None, None)
        for handle in self.handles:
            handle.remove()
        for name, wrapper in (("generate", self.generate), ("prepare_inputs_for_generation", self.prepare)):
            if wrapper is not None and vars(self.model).get(name) is wrapper:
                if name in self.own:
                    setattr(self.model, name, self.own[name])
                else:
                    delattr(self.model, name)


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
        _release(hooks)


def _release(hooks: _ModelHooks) -> None:
    """One user of the hooks (an attachment, a `generate` call in progress) is done; the last removes them."""
    with _HOOKS_LOCK:
        hooks.users -= 1
        if hooks.users == 0:
            hooks.remove()
            if _HOOKS.get(id(hooks.model)) is hooks:
                del _HOOKS[id(hooks.model)]


def _identity(g: Guardrail) -> tuple:
    return (g.sae_sha256, g.hook, tuple(g.features), g.threshold, g.clamp, g.clamp_mode, g.gated)


@contextmanager
def attach(
    model: torch.nn.Module, *guardrails: Guardrail, verify: bool = True, special_ids: Sequence[int] | None = None
):
    """Apply one or more guardrails to every forward pass of `model` inside the block, in this thread or task (and
    in threads and tasks that carry its context, until the block ends).

    With verify=True each guardrail first checks that `model` is the model it was fitted on. The same guardrail
    twice (in one call, or in nested calls on one model) is refused: it would clamp twice.
    """
    if not guardrails:
        raise DSGError("attach() needs at least one guardrail.")
    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
        raise DSGError("attach() takes the model itself, not what torch.compile returned (its hooks and weight names "
                       "are the wrapped model's): attach to the model, e.g. attach(compiled._orig_mod, ...), and call "
                       "the compiled one inside the block.")  # fmt: skip
    for g in guardrails:
        if isinstance(g, (list, tuple)):
            raise DSGError("attach() takes the guardrails one by one after the model, attach(model, *guards), and "
                           "got a list.")  # fmt: skip
        if not isinstance(g, Guardrail):
            raise DSGError(f"attach() takes Guardrail objects after the model, and got a {type(g).__name__}: load "
                           "one with dsg.Guardrail.load(folder).")  # fmt: skip
        g.check()
    active = [_identity(g) for att in _active_on(model) for g in att.guardrails]
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
            guardrails[i].check_dtype(next(model.parameters()).dtype)
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
            att.closed = True
            _ACTIVE.set(tuple(a for a in _ACTIVE.get() if a is not att))


def attached_to(model: torch.nn.Module) -> bool:
    """Whether an attachment to `model` is active in this thread or task (its forwards are guarded here)."""
    return bool(_active_on(model))


def refuse_if_attached(model: torch.nn.Module, what: str) -> None:
    """A DSGError when `what` (a pass that must read the model's own activations) runs inside `attach()`."""
    if attached_to(model):
        raise DSGError(f"{what} reads the model's own activations, but it runs inside attach() on this model, whose "
                       "guardrails would clamp what it reads; run it outside the attach() block.")  # fmt: skip


@RUNTIMES.register("hf")
class HFRuntime:
    """PyTorch modules with a HuggingFace-style config: forward hooks at each guardrail's hook point."""

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, torch.nn.Module) and hasattr(model, "config")

    attach = staticmethod(attach)
