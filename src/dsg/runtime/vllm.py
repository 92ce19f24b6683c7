"""Guardrails inside vLLM's engine (v1): a vLLM general plugin.

    vllm serve MODEL --additional-config '{"dsg": {"guardrails": ["guard/"], "audit_log": "audit.jsonl"}}' \\
        --no-enable-prefix-caching --no-enable-chunked-prefill        # (what `dsg serve` passes for you)

vLLM loads the plugin in every process (entry point `vllm.general_plugins: dsg`); it does nothing unless the
engine's `additional_config` names guardrails. Then, in each worker, right after the model loads and before vLLM
compiles it:

  * the decoder layer of each guardrail's hook (`blocks.L.hook_resid_post`) is wrapped so that its output goes
    through one opaque op, `torch.ops.dsg.guard_residual` (torch.compile keeps it as a call, so the compiled graph
    stays the same whatever the guardrail decides);
  * each scheduler step, the model runner's own bookkeeping (which requests, where each one's tokens sit in the
    flattened batch, how many of its tokens are computed, how long its prompt is) becomes a list of
    `runtime.flat.Chunk`s, and the op applies `runtime.flat.RequestGates` (the rule of guard/rule.py, with gate
    state kept per request id) to the residual stream `hidden + residual` of vLLM's layer output.

Every decision is appended to the audit log (JSONL: time, request id, guardrail, rho, decision), from which the
API server plugin (runtime/vllm_http.py) answers each response's `x-dsg-gated` header.

Refused at startup, with the reason: prefix caching with a gated guardrail (a cached prefix holds KV computed
under another request's decision, and its tokens never reach the gate), chunked prefill with the paper's
whole-prompt gate (a prompt must be judged whole before any of it is clamped; a windowed guardrail is
prefix-causal and takes chunks), speculative decoding (rejected draft tokens would move the gate), pipeline
parallelism, and hooks other than a decoder layer's output.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from ..errors import DSGError
from ..guard.guardrail import Guardrail
from ..lm.text import special_ids_in
from .flat import Chunk, RequestGates

CONFIG_KEY = "dsg"
_STEP = threading.local()  # the step in progress in this worker thread: (state, input_ids, positions, chunks)


def settings_refusal(guardrails: list[Guardrail], prefix_caching: bool, chunked_prefill: bool) -> str | None:
    """Why these engine settings cannot serve these guardrails correctly (None: they can)."""
    gated = [g for g in guardrails if g.gated]
    whole = [g for g in gated if g.window is None]
    if gated and prefix_caching:
        return ("prefix caching is on: a cached prefix holds KV computed under another request's gate decision, and "
                "its tokens never reach the gate; serve with --no-enable-prefix-caching")  # fmt: skip
    if whole and chunked_prefill:
        return ("chunked prefill is on: the paper's gate judges a prompt whole before clamping any of it; serve with "
                "--no-enable-chunked-prefill (and max-num-batched-tokens >= max-model-len), or fit a windowed "
                "guardrail (--gate-window), whose prefix-causal gate takes prompts in chunks")  # fmt: skip
    return None


def _layer_index(hook: str) -> int:
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "hook_resid_post":
        return int(parts[1])
    raise DSGError(f"In vLLM a guardrail must hook a decoder layer's output (blocks.L.hook_resid_post), not {hook!r}.")


class _Worker:
    """The guardrails of one model runner: gates per request, the audit log, the hooked layers."""

    def __init__(self, runner, config: dict):
        paths = config.get("guardrails") or []
        if isinstance(paths, str):
            paths = [paths]
        self.guardrails = [Guardrail.load(p, allow_missing_model=True) for p in paths]
        if not self.guardrails:
            raise DSGError("additional_config.dsg.guardrails names no guardrail.")
        labels = [{"guardrail": g.name or Path(p).name, "guardrail_index": i, "guardrail_sha256": g.content_sha256}
                  for i, (p, g) in enumerate(zip(paths, self.guardrails))]  # fmt: skip
        vc = runner.vllm_config
        sched, cache = vc.scheduler_config, vc.cache_config
        chunked = bool(sched.enable_chunked_prefill) and sched.max_num_batched_tokens < vc.model_config.max_model_len
        why = settings_refusal(self.guardrails, bool(cache.enable_prefix_caching), chunked)
        if why is None and vc.speculative_config is not None:
            why = "speculative decoding is on: rejected draft tokens would move the gate"
        if why is None and vc.parallel_config.pipeline_parallel_size > 1:
            why = "pipeline parallelism is on: not supported yet"
        if why:
            raise DSGError(f"dsg guardrails cannot run in this vLLM engine: {why}.")
        self.audit = Path(config["audit_log"]) if config.get("audit_log") else None
        self.write_audit = self.audit is not None and _tp_rank() == 0
        self.lock = threading.Lock()
        specials = special_ids_in(vc.model_config.hf_config, vc.model_config.try_get_generation_config() or {})
        self.gates = RequestGates(self.guardrails, specials, on_event=self.record, labels=labels)
        self.hooks = {g.hook: _layer_index(g.hook) for g in self.guardrails}
        device = runner.device
        for g in self.guardrails:
            g.check_dtype(vc.model_config.dtype)
            g.to(device)
        self._wrap_layers(runner.get_model())

    def _wrap_layers(self, model) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise DSGError(f"dsg cannot find the decoder layers of vLLM's {type(model).__name__} (model.model.layers).")
        width = getattr(model.config, "hidden_size", None) if hasattr(model, "config") else None
        for hook, index in self.hooks.items():
            if not 0 <= index < len(layers):
                raise DSGError(f"Hook {hook!r}: the model has {len(layers)} decoder layers.")
            for g in self.guardrails:
                if g.hook == hook and width is not None and g.d_in != width:
                    raise DSGError(f"Guardrail {hook!r} reads width {g.d_in}; the model's residual has width {width}.")
            layers[index] = GuardedLayer(layers[index], hook)

    def record(self, event: dict) -> None:
        if self.write_audit:
            line = json.dumps(event) + "\n"
            with self.lock, open(self.audit, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def chunks(self, runner, positions: torch.Tensor) -> list[Chunk]:
        batch = runner.input_batch
        n = batch.num_reqs
        qsl = runner.query_start_loc.cpu[: n + 1].tolist()
        computed = batch.num_computed_tokens_cpu[:n].tolist()
        prompt = batch.num_prompt_tokens[:n].tolist()
        out = []
        for r, rid in enumerate(batch.req_ids[:n]):
            start, length = qsl[r], qsl[r + 1] - qsl[r]
            if length <= 0:
                continue
            if int(positions[start]) != computed[r]:
                raise DSGError(f"dsg: request {rid!r} starts at position {int(positions[start])}, but vLLM counts "
                               f"{computed[r]} computed tokens; this vLLM version is not supported.")  # fmt: skip
            out.append(Chunk(rid, start, length, computed[r], prompt[r]))
        return out


class GuardedLayer(torch.nn.Module):
    """A vLLM decoder layer whose output residual stream goes through the guardrail op."""

    def __init__(self, layer: torch.nn.Module, hook: str):
        super().__init__()
        self.layer = layer
        self.hook = hook
        if hook not in _HOOKS:
            _HOOKS.append(hook)
        self.hook_id = _HOOKS.index(hook)

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise DSGError(f"dsg expects vLLM decoder layers to return (hidden, residual); {type(self.layer).__name__} "
                           "does not.")  # fmt: skip
        hidden, residual = out
        return torch.ops.dsg.guard_residual(hidden, residual, self.hook_id)


_HOOKS: list[str] = []  # hook names; the op receives an index (custom ops take no strings in compiled graphs)


@torch.library.custom_op("dsg::guard_residual", mutates_args=())
def guard_residual(hidden: torch.Tensor, residual: torch.Tensor, hook_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer output (hidden, residual) with the guardrails' deltas at the clamped tokens of the step in
    progress. vLLM adds hidden and residual in the next layer, so a clamped token leaves here as (0, x + delta),
    x = hidden + residual: the next layer reads x + delta exactly as the HuggingFace runtime writes it."""
    hidden_out, residual_out = hidden.clone(), residual.clone()
    step = getattr(_STEP, "value", None)
    if step is None:  # warm-up and profiling runs
        return hidden_out, residual_out
    worker, input_ids, positions, chunks = step
    hook = _HOOKS[hook_id]
    n = max((c.start + c.length for c in chunks), default=0)
    if n == 0:
        return hidden_out, residual_out
    x = residual[:n].float() + hidden[:n].float()
    found = worker.gates.step(hook, x, input_ids[:n], positions[:n], chunks)
    if found is not None:
        idx, delta = found
        residual_out[idx] = (x[idx] + delta).to(residual.dtype)
        hidden_out[idx] = 0
    return hidden_out, residual_out


@guard_residual.register_fake
def _(hidden, residual, hook_id):
    return torch.empty_like(hidden), torch.empty_like(residual)


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 (no parallel state: one rank)
        return 0


def _config_of(runner) -> dict | None:
    extra = runner.vllm_config.additional_config or {}
    if not isinstance(extra, dict):
        return None
    config = extra.get(CONFIG_KEY)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise DSGError('additional_config.dsg must be an object: {"guardrails": [...], "audit_log": "..."}.')
    return config


def _wrap_load_model(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_dsg", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = _config_of(self)
        if config is not None:
            self._dsg = _Worker(self, config)

    load_model._dsg = True
    cls.load_model = load_model


def _wrap_model_forward(cls) -> None:
    original = cls._model_forward
    if getattr(original, "_dsg", False):
        return

    def _model_forward(self, input_ids=None, positions=None, **kwargs):
        worker = getattr(self, "_dsg", None)
        if worker is None:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        if input_ids is None:
            raise DSGError("dsg guardrails need token ids in each step (inputs given as embeddings are not supported).")
        worker.gates.keep_only(self.requests.keys())  # finished, aborted and preempted requests leave
        chunks = worker.chunks(self, positions.cpu())
        _STEP.value = (worker, input_ids, positions, chunks)
        try:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        finally:
            _STEP.value = None

    _model_forward._dsg = True
    cls._model_forward = _model_forward


def register() -> None:
    """The `vllm.general_plugins` entry point: patch vLLM's model runners (a no-op unless a guardrail is named)."""
    if os.environ.get("DSG_VLLM_PLUGIN", "1") == "0":
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        _wrap_load_model(cls)
    _wrap_model_forward(GPUModelRunner)
