"""`dsg serve`: vLLM's own OpenAI-compatible server with guardrails, for the embedded default or a user's model.

    dsg serve --guardrail dsg-demo/guardrail              # SmolLM2-135M-Instruct on 127.0.0.1:8000
    dsg serve --model ./my-model --guardrail bio/ --guardrail cyber/ --port 9000 -- --max-num-seqs 64

It checks each guardrail against the model (unless --allow-model-mismatch), then runs vLLM's server with the
settings the guardrails need (runtime/vllm.py says why) and both dsg plugins enabled; arguments after `--` go to
vLLM unchanged. Needs vLLM in the same environment (scripts/install-vllm.sh).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DSGError
from ..guard.guardrail import Guardrail
from ..lm.models import KNOWN_MODELS, ensure_converted

PLUGINS = ("dsg", "dsg_http")


def model_folder(name_or_path: str) -> Path:
    """The HuggingFace folder vLLM loads: a known model's converted fp32 folder, or the user's folder."""
    spec = KNOWN_MODELS.get(name_or_path.strip().lower())
    if spec is not None:
        return ensure_converted(spec)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise DSGError(f"{name_or_path!r} is neither a known model ({', '.join(sorted(KNOWN_MODELS))}) nor a "
                       "HuggingFace model folder with a config.json.")  # fmt: skip
    return path


def _last_switch(args: Sequence[str], name: str, default: bool) -> bool:
    """The value the last `--NAME`, `--no-NAME` or `--NAME=true|false` among `args` gives a vLLM switch."""
    value = default
    for a in args:
        flag, _, given = a.partition("=")
        if flag == f"--{name}":
            value = given.strip().lower() not in ("false", "0", "no") if given else True
        elif flag == f"--no-{name}":
            value = False
    return value


def serve_command(
    model: str,
    guardrails: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    audit_log: str | None = None,
    max_model_len: int = 2048,
    kv_cache_gib: float | None = None,
    prefix_caching: bool = False,
    dtype: str | None = None,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start vLLM's server with these guardrails."""
    _check_settings(max_model_len, kv_cache_gib, dtype, extra if guardrails else ())
    folder = model_folder(model)
    if dtype is None:  # dsg runs the embedded models in fp32 (vLLM on CPU would cast them to bf16)
        dtype = "float32" if model.strip().lower() in KNOWN_MODELS else "auto"
    guards = [Guardrail.load(p, allow_missing_model=True) for p in guardrails]
    argv = [python, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(folder), "--served-model-name", model, "--dtype", dtype, "--host", host, "--port", str(port),
            "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len)]  # fmt: skip
    if kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    elif not _graphs_possible() and not _sizes_memory(extra) and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # on a CPU vLLM would claim 92 % of the machine's memory and refuse to start where some is in use
        argv += ["--kv-cache-memory-bytes", str(cpu_kv_cache_bytes(folder, max_model_len, dtype))]
    argv += ["--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    whole = any(g.gated and g.window is None for g in guards)
    argv += ["--no-enable-chunked-prefill"] if whole else []
    env = dict(os.environ)
    if guards:
        from .vllm import settings_refusal

        # vLLM keeps the last of a flag given twice: the engine options after `--` decide, as they will there
        prefix = _last_switch(extra, "enable-prefix-caching", prefix_caching)
        chunked = _last_switch(extra, "enable-chunked-prefill", False) if whole else False
        why = settings_refusal(guards, prefix, chunked_prefill=chunked)
        if why:
            raise DSGError(f"These guardrails cannot be served with these settings: {why}.")
        audit = Path(audit_log or "dsg-audit.jsonl").expanduser().resolve()
        if audit.is_dir():
            raise DSGError(f"--audit-log {str(audit)!r} is a folder; give a file (JSON lines are appended to it).")
        audit.parent.mkdir(parents=True, exist_ok=True)
        config = {"guardrails": [str(Path(p).resolve()) for p in guardrails], "audit_log": str(audit)}
        argv += ["--additional-config", json.dumps({"dsg": config})]
        if _graphs_possible() and "--enforce-eager" not in extra:
            # a captured CUDA graph replays its kernels without running Python, so the guardrail op (which reads
            # the step's requests from Python state) would be skipped on replay: run the model eagerly
            argv += ["--enforce-eager"]
        named = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
        if named:  # the user allow-lists plugins: add ours to the list
            env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*named, *PLUGINS]))
        else:  # endpoint plugins load only when named; general plugins load when the list names them
            env["VLLM_PLUGINS"] = ",".join(PLUGINS)
    argv += list(extra)
    return argv, env


SERVE_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
OWN_FLAGS = ("--additional-config",)  # dsg passes its guardrails to the engine through it
SPECULATIVE_FLAGS = ("--speculative-config", "--speculative-model", "--num-speculative-tokens")


def _check_settings(max_model_len, kv_cache_gib, dtype, extra: Sequence[str]) -> None:
    """Refuse, before vLLM starts (and ends in tracebacks a minute later), what dsg's own options cannot be and the
    engine options that would take the guardrails away or that the engine plugin refuses (`extra`: those after
    `--`, given with guardrails)."""
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
        raise DSGError(f"--max-model-len must be a number of tokens of at least 2, got {max_model_len!r}.")
    if kv_cache_gib is not None and (
        isinstance(kv_cache_gib, bool)
        or not (isinstance(kv_cache_gib, int | float) and 0 < kv_cache_gib < float("inf"))
    ):
        raise DSGError(f"--kv-cache-gib must be a positive number of GiB, got {kv_cache_gib!r}.")
    if dtype is not None and dtype not in SERVE_DTYPES:
        raise DSGError(f"--dtype must be one of {', '.join(SERVE_DTYPES)}, got {dtype!r}.")
    flags = {_flag(a) for a in extra if a.startswith("--")}
    for flag in OWN_FLAGS:  # also its dotted form, --additional-config.dsg=...
        if any(f == flag or f.startswith(flag + ".") for f in flags):
            raise DSGError(f"{flag} after '--' would replace the configuration dsg serve gives the engine (its "
                           "guardrails and audit log); leave it out.")  # fmt: skip
    for flag in SPECULATIVE_FLAGS:
        if flag in flags:
            raise DSGError(f"{flag}: speculative decoding cannot serve guardrails (rejected draft tokens would move "
                           "the gate); leave it out.")  # fmt: skip


KV_SEQUENCES = 8  # on a CPU, the KV cache holds this many sequences of --max-model-len tokens by default
KV_FALLBACK = 1 << 30  # bytes, for a model whose config does not give its attention shape
MEMORY_SHARE = 4  # ... and takes at most this share (1/4) of the memory available when the server starts

MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory", "--gpu-memory-utilization",
                "--device-memory-utilization")  # fmt: skip


def _sizes_memory(extra: Sequence[str]) -> bool:
    """Whether the engine options after `--` size vLLM's memory themselves."""
    return any(_flag(a) in MEMORY_FLAGS for a in extra)


def _flag(arg: str) -> str:
    """An engine option's name as vLLM reads it, whichever spelling it was given in (`--a_b=1` is `--a-b`)."""
    return arg.split("=", 1)[0].replace("_", "-")


def cpu_kv_cache_bytes(folder: Path, max_model_len: int, dtype: str) -> int:
    """The KV cache `dsg serve` asks vLLM for on a CPU: KV_SEQUENCES full-length sequences (2 x layers x KV heads
    x head size x element size per token, from the model's config.json), at most a quarter of the memory available
    now and at least one sequence, rounded up to a MiB."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config) if isinstance(config, dict) else {}
        layers = config.get("num_hidden_layers", config.get("n_layer"))
        heads = config.get("num_attention_heads", config.get("n_head"))
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config.get("hidden_size", config.get("n_embd", 0)) // heads
        size = 4 if dtype in ("float32", "float") else 2  # vLLM on a CPU runs anything else in 16 bits
        per_token = 2 * int(layers) * int(kv_heads) * int(head_dim) * size
    except (OSError, ValueError, TypeError, AttributeError, ZeroDivisionError):
        per_token = 0
    want = per_token * max_model_len * KV_SEQUENCES if per_token > 0 else KV_FALLBACK
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        want = min(want, available // MEMORY_SHARE)
    except (ValueError, OSError, AttributeError):  # no such sysconf name here: keep the size asked for
        pass
    want = max(want, per_token * max_model_len)
    mib = 1 << 20
    return -(-want // mib) * mib


def _graphs_possible() -> bool:
    """Whether vLLM may capture CUDA (or ROCm) graphs here: an accelerator is visible."""
    import torch

    return torch.cuda.is_available()


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise DSGError("dsg serve needs vLLM in this environment: run scripts/install-vllm.sh (CPU) or install "
                       "vllm next to dsg (GPU).") from None  # fmt: skip
