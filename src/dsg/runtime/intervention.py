"""What every way of changing a model's behaviour at evaluation time has in common.

An `Intervention` (a guardrail, several guardrails, a weight edit) is applied to a model for the duration of a
block and yields a `Session`:

    with intervention.applied(model) as session:
        model(...)                       # the intervention acts on every forward inside the block
        session.gated                    # [B] which inputs of the latest forward it chose to act on (None: n/a)
        session.clamped                  # [B] in which of them it changed any token (None: n/a; see acted_on)
        d = session.decisions()          # [B, G] the decision of each of its G gates (None: it has no gate)
        session.hold(d[rows])            # later forwards (continuations of those rows) keep those decisions
        session.fork(rows)               # later forwards continue rows `rows` of the latest one (a shared prefix)

Evaluation, generation and the comparison bench talk to interventions only through this protocol, so a new
runtime or a new kind of intervention plugs in without touching them.

A runtime is what runs guardrails inside a kind of model (runtime/hf.py: forward hooks on a HuggingFace model).
Each registers itself in `RUNTIMES` with `supports(model)` and `attach(model, *guardrails, verify)`; `attach`
here picks the first runtime that supports the model. A new runtime is one module plus its registration line
and its import in `runtime/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Protocol, runtime_checkable

import torch

from ..errors import DSGError
from ..guard.guardrail import Guardrail
from ..lm.hooks import HookPoint, resolve
from ..registry import Registry

RUNTIMES: Registry[type] = Registry("runtime")


class Session(Protocol):
    @property
    def gated(self) -> torch.Tensor | None: ...

    @property
    def clamped(self) -> torch.Tensor | None: ...

    def decisions(self) -> torch.Tensor | None: ...

    def hold(self, decisions: torch.Tensor | None) -> None: ...

    def fork(self, rows: torch.Tensor) -> None:
        """The following forwards continue rows `rows` (repeats allowed) of the latest forward: one prefix
        prefilled once and extended by several suffixes. Only meaningful where `prefix_causal` holds."""


@runtime_checkable
class Intervention(Protocol):
    def applied(self, model: torch.nn.Module, verify: bool = True) -> AbstractContextManager[Session]: ...

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse (DSGError) a model other than the one the intervention was made for."""


class Ungated:
    """The session of an intervention that has no gate (a weight edit): it acts on every input."""

    gated = None
    clamped = None

    def decisions(self) -> None:
        return None

    def hold(self, decisions) -> None:
        pass

    def fork(self, rows) -> None:
        pass


class Guardrails:
    """Several guardrails as one intervention, attached together by the model's runtime (each keeps its gate)."""

    def __init__(self, *guardrails):
        self.guardrails = guardrails

    def __repr__(self) -> str:
        return f"Guardrails({', '.join(map(repr, self.guardrails))})"

    def applied(self, model: torch.nn.Module, verify: bool = True):
        return attach(model, *self.guardrails, verify=verify)

    def check_model(self, model: torch.nn.Module) -> None:
        for g in self.guardrails:
            g.check_model(model)


class Stack:
    """Ungated interventions (weight edits) applied together, and at most one gated one, applied last: its session
    is the stack's (as_intervention puts all guardrails of a list into one `Guardrails`)."""

    def __init__(self, *interventions: Intervention):
        self.interventions = list(interventions)

    @contextmanager
    def applied(self, model: torch.nn.Module, verify: bool = True) -> Iterator[Session]:
        with ExitStack() as stack:
            sessions = [stack.enter_context(i.applied(model, verify=verify)) for i in self.interventions]
            gated = [s for s in sessions if not isinstance(s, Ungated)]
            if len(gated) > 1:
                raise DSGError("A Stack holds at most one gated intervention; put all guardrails in one Guardrails.")
            yield gated[0] if gated else Ungated()

    def check_model(self, model: torch.nn.Module) -> None:
        for i in self.interventions:
            i.check_model(model)


def attach(model, *guardrails, verify: bool = True, **options) -> AbstractContextManager[Session]:
    """Apply guardrails to every forward of `model` inside the block, with the runtime that supports the model:
    `with dsg.attach(model, guard_bio, guard_cyber) as session: ...` (each guardrail keeps its own gate)."""
    for runtime in RUNTIMES.values():
        if runtime.supports(model):
            return runtime.attach(model, *guardrails, verify=verify, **options)
    raise DSGError(f"No runtime can apply guardrails to a {type(model).__name__}; known: {', '.join(RUNTIMES)}.")


def as_intervention(x: Intervention | Sequence | None) -> Intervention | None:
    """None for nothing; an intervention as it is; a sequence as one intervention: its guardrails attached together
    (each keeps its own gate), applied inside its other interventions (weight edits)."""
    if x is None or isinstance(x, Intervention):
        return x
    items = list(x)
    if not items:
        return None
    guards = [i for i in items if isinstance(i, Guardrail)]
    others = [as_intervention(i) for i in items if not isinstance(i, Guardrail)]
    together = [Guardrails(*guards)] if guards else []
    if not others and len(together) == 1:
        return together[0]
    return Stack(*others, *together)


def acted_on(session: Session | None) -> torch.Tensor | None:
    """[B] the inputs of the latest prompt forward that the intervention changed: those with a clamped token where
    the session says (a gate held open for a while can close again before an input ends, so an input can be
    clamped yet not gated at its end), else those it gated. None without a gate."""
    if session is None:
        return None
    rows = getattr(session, "clamped", None)  # a session of another runtime may not say
    return rows if rows is not None else session.gated


def left_alone(session: Session | None) -> bool:
    """Whether the latest prompt forward left every input alone: no input gated, no token clamped (False where the
    session cannot say, or has no gate). Such a batch computes exactly what the model computes without the
    intervention."""
    if session is None or session.gated is None:
        return False
    clamped = getattr(session, "clamped", None)
    return clamped is not None and not bool(session.gated.any()) and not bool(clamped.any())


def gates_decided(model: torch.nn.Module, intervention: Intervention | None) -> HookPoint | None:
    """The hook point after which every gate of `intervention` has judged a forward (the deepest of its
    guardrails' hooks): a forward can stop there when only the gates' decisions are wanted. None where that is
    not known: no guardrail, or a hook outside the decoder layers."""
    guards = guardrails_in(intervention)
    points = [resolve(model, g.hook) for g in guards]
    if not points or any(p.layer is None for p in points):
        return None
    return max(points, key=lambda p: (p.layer, p.kind == "output"))  # a layer's input comes before its output


def only_guardrails(intervention: Intervention | None) -> bool:
    """Whether `intervention` is guardrails and nothing else (no weight edit): where its gates leave an input
    alone, the model computes exactly what it computes without it."""
    if isinstance(intervention, Guardrail | Guardrails):
        return True
    return isinstance(intervention, Stack) and all(map(only_guardrails, intervention.interventions))


def prefix_causal(intervention: Intervention | None) -> bool:
    """Whether the intervention's effect on a token depends only on the tokens up to it, so that a prefix shared
    by several inputs can be run once and its state forked to each (`Session.fork`): true for no intervention, a
    weight edit, a static guardrail and a windowed gate; false for the whole-input gate (the paper's rule: every
    prompt token waits for the prompt's rho) and for interventions that do not say."""
    if intervention is None:
        return True
    if isinstance(intervention, Guardrail):
        return intervention.prefix_causal
    if isinstance(intervention, Guardrails):
        return all(g.prefix_causal for g in intervention.guardrails)
    if isinstance(intervention, Stack):
        return all(prefix_causal(i) for i in intervention.interventions)
    return bool(getattr(intervention, "prefix_causal", False))


def guardrails_in(intervention: Intervention | None) -> list:
    """The guardrails an intervention applies (none for a weight edit)."""
    if intervention is None:
        return []
    if isinstance(intervention, Guardrail):
        return [intervention]
    if isinstance(intervention, Guardrails):
        return list(intervention.guardrails)
    if isinstance(intervention, Stack):
        return [g for i in intervention.interventions for g in guardrails_in(i)]
    return []
