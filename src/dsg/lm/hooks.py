"""Hook points on HuggingFace models, named the TransformerLens way.

`blocks.L.hook_resid_post` is the output of decoder layer L, `blocks.L.hook_resid_pre` its input; any other name
is taken as a module path (`model.layers.3.mlp`, or relative to `model.base_model` as sparsify names them:
`layers.3`). Hooks live in context managers that always remove themselves, and fail loudly when a name cannot be
resolved, in the manner of lm-eval's `steer`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch

from ..errors import DSGError
from .text import real_token_mask, special_token_ids

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the hooked activations are captured."""


@dataclass(frozen=True)
class HookPoint:
    """Where an activation lives: a module, and whether it is that module's input or output."""

    name: str
    module: torch.nn.Module
    kind: str  # "output" or "input"
    layer: int | None  # decoder layer index for blocks.* names

    @property
    def layers_before(self) -> int | None:
        """Decoder layers that have run when this residual-stream activation exists (layer L's output is layer
        L+1's input, one point under two names); None for other module names."""
        return None if self.layer is None else self.layer + (self.kind == "output")


def text_config(model: torch.nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def hidden_size(model: torch.nn.Module) -> int:
    cfg = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise DSGError(f"Cannot tell the hidden size of {type(model).__name__} from its config.")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose length is the config's number of hidden layers."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and "vision" not in name
    ]
    if not found:
        raise DSGError(f"Cannot find the {n} decoder layers of {type(model).__name__}.")
    return min(found, key=lambda item: item[0].count("."))


def resolve(model: torch.nn.Module, name: str) -> HookPoint:
    """Find the module behind a hook name, or raise a DSGError that names the hook and what exists."""
    m = _RESID.match(name)
    if m:
        layer, where = int(m.group(1)), m.group(2)
        _, layers = decoder_layers(model)
        if layer >= len(layers):
            raise DSGError(
                f"Hook point {name!r} asks for layer {layer}, but {type(model).__name__} has layers "
                f"0..{len(layers) - 1}."
            )
        return HookPoint(name, layers[layer], "output" if where == "post" else "input", layer)
    for root in (model, getattr(model, "base_model", None)):
        if root is None:
            continue
        try:
            return HookPoint(name, root.get_submodule(name), "output", None)
        except AttributeError:
            continue
    _, layers = decoder_layers(model)
    raise DSGError(
        f"Unknown hook point {name!r} for {type(model).__name__}: expected 'blocks.L.hook_resid_post' or "
        f"'blocks.L.hook_resid_pre' with 0 <= L < {len(layers)}, or a module name such as "
        f"{decoder_layers(model)[0] + '.0'!r}."
    )


def check_width(model: torch.nn.Module, hook: HookPoint, d_in: int, what: str = "The SAE") -> None:
    """For residual-stream hooks, the model's hidden size must equal the SAE's d_in."""
    if hook.layer is not None and hidden_size(model) != d_in:
        raise DSGError(
            f"{what} expects d_in={d_in} but hook point {hook.name!r} of {type(model).__name__} has width "
            f"{hidden_size(model)}."
        )


def upstream_parameters(model: torch.nn.Module, hook: HookPoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters that can influence the activations at `hook`, in a stable order.

    For residual-stream hooks these are all parameters except those of later decoder layers; for other module
    names, all parameters.
    """
    skip: set[str] = set()
    if hook.layer is not None:
        prefix, layers = decoder_layers(model)
        skip = {f"{prefix}.{i}." for i in range(hook.layers_before, len(layers))}
    for name, p in model.named_parameters():
        if not any(name.startswith(s) for s in skip):
            yield name, p


def _activations(x, hook: HookPoint) -> torch.Tensor:
    """`x` where it is what an SAE reads, [batch, tokens, width] activations; a module whose output is something
    else (a model output object, rotary tables, a stacked [streams, batch, tokens, width] tensor) is refused."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        raise DSGError(f"Hook point {hook.name!r} gives {got}, not the [batch, tokens, width] activations an SAE "
                       "reads; pick a decoder layer's residual stream (blocks.N.hook_resid_post) or a module whose "
                       "output is one.")  # fmt: skip
    return x


@contextmanager
def hooked(
    model: torch.nn.Module,
    hook: HookPoint | str,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    this_thread: bool = False,
    recorded: bool = False,
):
    """Run `fn` on the activation at `hook` for every forward pass inside the block.

    `fn(x)` may return a replacement tensor of the same shape, or None to leave it. Handles decoder layers that
    return tuples (older transformers) as well as bare tensors. A module's hooks see the forwards of every
    thread: with `this_thread`, `fn` runs only on those of the thread that entered the block, and a concurrent
    caller's forwards on the same model pass untouched. With `recorded`, what `fn` returns is what transformers
    records for `output_hidden_states`: its recording hooks, installed on a model's first forward, are moved
    behind this one (every other hook keeps its order, so an edit registered later still has the last word).
    """
    if isinstance(hook, str):
        hook = resolve(model, hook)
    checked = fn
    fn = lambda x: checked(_activations(x, hook))  # noqa: E731
    if this_thread:
        me, inner = threading.get_ident(), fn
        fn = lambda x: inner(x) if threading.get_ident() == me else None  # noqa: E731
    if hook.kind == "output":

        def on_output(_module, _args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)

        handle = hook.module.register_forward_hook(on_output)
        if recorded:
            _record_after(hook.module)
    else:

        def on_input(_module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = hook.module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()


def _record_after(module: torch.nn.Module) -> None:
    """Move transformers' `output_hidden_states` recording hooks (utils/output_capturing.py, transformers 5) on
    `module` behind its other forward hooks, so that they record what those return."""
    hooks = module._forward_hooks
    for key in [k for k, fn in hooks.items() if "output_capturing_hook" in getattr(fn, "__qualname__", "")]:
        hooks.move_to_end(key)


def forward_to_hook(model: torch.nn.Module, hook: HookPoint | str, **inputs) -> torch.Tensor:
    """The activation at `hook` for `model(**inputs)`, running the model only as far as the hook."""
    captured = []

    def capture(x):
        captured.append(x)

    with stopped_after(model, hook, capture):
        model(**inputs, use_cache=False)
    name = getattr(hook, "name", hook)
    if not captured:
        raise DSGError(f"The forward pass never reached hook point {name!r}.")
    ids = inputs.get("input_ids")
    if ids is not None and tuple(captured[0].shape[:2]) != tuple(ids.shape):
        raise DSGError(f"Hook point {name!r} gives a tensor of shape {tuple(captured[0].shape)} for "
                       f"{tuple(ids.shape)} input tokens, not one activation per token; pick a decoder layer's "
                       "residual stream (blocks.N.hook_resid_post) or a module whose output is one.")  # fmt: skip
    return captured[0]


@contextmanager
def stopped_after(
    model: torch.nn.Module, hook: HookPoint | str, stop: Callable[[torch.Tensor], bool | None] | None = None
):
    """Inside the block, each forward pass of this thread ends at `hook` (StopForward, caught by the `with`,
    which then goes on after its block). Given `stop`, it first calls `stop(x)` on the activation there and goes
    on where that returns False. Forwards of other threads on the same model pass untouched: a caller cutting
    its own forwards short never cuts a concurrent caller's.

    A hook registered before the block (a guardrail's, at the same point) runs first, so `stop` sees what it
    decided."""

    def check(x):
        if stop is None or stop(x) is not False:
            raise StopForward

    with hooked(model, hook, check, this_thread=True), suppress(StopForward):
        yield


def activations_by_batch(
    model: torch.nn.Module, hook: HookPoint | str, batches: Iterable[tuple[Sequence[int], torch.Tensor, torch.Tensor]]
) -> Iterator[tuple[Sequence[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each (indices, input_ids, attention_mask) batch: (indices, attention_mask, activations [B, T, D] at
    `hook`, real-token mask [B, T]), each forward stopped at the hook. Tensors go to the model's device."""
    point = resolve(model, hook) if isinstance(hook, str) else hook
    specials = special_token_ids(model)
    device = next(model.parameters()).device
    for idx, ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        real = real_token_mask(ids, mask, specials)
        yield idx, mask, forward_to_hook(model, point, input_ids=ids, attention_mask=mask), real
