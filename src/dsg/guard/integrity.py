"""What makes a guardrail folder trustworthy before it is applied: a content hash over everything it loads, and
a check of every field's type and range.

A guardrail that loads wrong fails silently at inference time (a threshold of 5 never opens the gate, NaN clamps
give NaN logits, edited encoder columns flag other tokens), so `Guardrail.load` refuses a folder whose content
hash does not match (any edit to guardrail.json, guardrail.safetensors or, for TopK, the SAE copy under sae/,
whose own hash is recorded in guardrail.json), a field of the wrong type or out of range, a tensor of the wrong
shape or with NaN/inf values, and a guardrail without a record of the model it was fitted on (unless the caller
accepts that).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import torch

from ..config import is_number
from ..errors import DSGError
from ..files import json_text
from ..lm.fingerprint import tensor_digest
from ..sae import ARCHITECTURES
from ..sae.base import MAX_DECODER
from .detector import MAX_FLOOR as DETECTOR_MAX_FLOOR
from .detector import MAX_WEIGHT as DETECTOR_MAX_WEIGHT
from .detector import SCALE as DETECTOR_SCALE
from .rule import CLAMP_MODES

HASH_FIELD = "content_sha256"
FILLERS_TENSOR = "hold.fillers"  # a held gate's token ids that carry no word (Guardrail.hold_fillers)
INVISIBLE_TENSOR = "hold.invisible"  # of those, the ids the windows pass over (Guardrail.hold_invisible)
BREAKS_TENSOR = "hold.breaks"  # of those, the line breaks passed over after short lines (Guardrail.hold_breaks)
ID_TABLES = {"hold_fillers": FILLERS_TENSOR, "hold_invisible": INVISIBLE_TENSOR, "hold_breaks": BREAKS_TENSOR}
MAX_TOKEN_ID = 1 << 31  # past any vocabulary
MAX_WINDOW = 1 << 17  # tokens: a window past any model's context reads like the whole input, and each request's
# gate state holds one flag per window token. It bounds a gate's hold too: a longer hold is a latch, and one near
# rule.NEVER (a gate that never opened) or int64 would read as always open or never open
MAX_CLAMP = 1e6  # far above any useful clamp (500 is the paper's), far below float overflow in the residual delta
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def content_sha256(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical JSON (without the hash field) and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json_text({k: v for k, v in meta.items() if k != HASH_FIELD}).encode())
    for name in sorted(tensors):
        tensor_digest(h, name, tensors[name])
    return h.hexdigest()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


MAX_NAME = 200  # characters in a guardrail's name


def check_name(name, where: str) -> None:
    """A guardrail's name is one printable line: `dsg inspect`, the audit log and error messages print it, and a
    line break or terminal escape in it could pass for lines dsg wrote."""
    if name is None:
        return
    if not isinstance(name, str):
        raise DSGError(f"{where}: 'name' must be a string, got {name!r}.")
    if len(name) > MAX_NAME or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise DSGError(f"{where}: 'name' must be one line of at most {MAX_NAME} characters without control "
                       f"characters, got {name[:40]!r}{'...' if len(name) > 40 else ''}.")  # fmt: skip


def check_rule(
    hook, features, threshold, clamp, clamp_mode, gated, d_sae: int, where: str, window=None, detector: bool = False,
    hold=None, latch=None, floor=None, prompt_level=None, latch_run=None,
) -> None:  # fmt: skip
    """The rule's parameters: the same checks for a guardrail built in code and one read from a file."""
    if window is not None and (not _is_int(window) or not 1 <= window <= MAX_WINDOW):
        raise DSGError(f"{where}: 'window' must be a positive integer up to {MAX_WINDOW} (tokens) or absent, got "
                       f"{window!r}.")  # fmt: skip
    if detector and window is None:
        raise DSGError(f"{where}: a detector gate reads windows of tokens, so 'window' must be set.")
    if floor is not None and not detector:
        raise DSGError(f"{where}: 'floor' bounds a detector's evidence per token, so the gate needs a detector.")
    if floor is not None and (not _is_int(floor) or abs(floor) > DETECTOR_MAX_FLOOR):
        raise DSGError(f"{where}: the detector's 'floor' must be an integer of magnitude at most {DETECTOR_MAX_FLOOR} "
                       f"or absent, got {floor!r}.")  # fmt: skip
    if hold is not None and (not _is_int(hold) or not 1 <= hold <= MAX_WINDOW):
        raise DSGError(f"{where}: 'hold' must be a positive integer up to {MAX_WINDOW} (tokens) or absent, got "
                       f"{hold!r}.")  # fmt: skip
    if hold is not None and window is None:
        raise DSGError(f"{where}: 'hold' is how long a windowed gate stays open, so 'window' must be set.")
    if latch is not None and not is_number(latch):
        raise DSGError(f"{where}: 'latch' must be a finite number (a window score) or absent, got {latch!r}.")
    if latch is not None and hold is None:
        raise DSGError(f"{where}: 'latch' guards the answer of a gate held open, so 'hold' must be set.")
    if latch is not None and is_number(threshold) and latch <= threshold:
        raise DSGError(f"{where}: 'latch' ({latch!r}) must lie above 'threshold' ({threshold!r}).")
    if latch is not None and not detector and latch >= 1:
        raise DSGError(f"{where}: 'latch' ({latch!r}) is a share of flagged tokens that a window must exceed, so it "
                       "must lie below 1.")  # fmt: skip
    if latch_run is not None and (not _is_int(latch_run) or not 2 <= latch_run <= MAX_WINDOW):
        raise DSGError(f"{where}: 'latch_run' must be an integer from 2 to {MAX_WINDOW} (judged windows in a row; "
                       f"1 would latch at any window over the threshold) or absent, got {latch_run!r}.")  # fmt: skip
    if latch_run is not None and hold is None:
        raise DSGError(f"{where}: 'latch_run' guards the answer of a gate held open, so 'hold' must be set.")
    if prompt_level is not None and not is_number(prompt_level):
        raise DSGError(f"{where}: 'prompt_level' must be a finite number (a window score) or absent, got "
                       f"{prompt_level!r}.")  # fmt: skip
    if prompt_level is not None and hold is None:
        raise DSGError(f"{where}: 'prompt_level' says near which windows a gate held open clamps a prompt, so 'hold' "
                       "must be set.")  # fmt: skip
    if prompt_level is not None and is_number(threshold) and prompt_level <= threshold:
        raise DSGError(f"{where}: 'prompt_level' ({prompt_level!r}) must lie above 'threshold' ({threshold!r}).")
    if prompt_level is not None and not detector and prompt_level >= 1:
        raise DSGError(f"{where}: 'prompt_level' ({prompt_level!r}) is a share of flagged tokens that a window must "
                       "exceed, so it must lie below 1.")  # fmt: skip
    if not isinstance(hook, str) or not hook:
        raise DSGError(f"{where}: 'hook' must be a non-empty string, got {hook!r}.")
    if not isinstance(features, (list, tuple)) or not features or not all(_is_int(j) for j in features):
        raise DSGError(f"{where}: 'features' must be a non-empty list of latent ids (integers), got {features!r}.")
    bad = [j for j in features if not 0 <= j < d_sae]
    if bad:
        raise DSGError(f"{where}: feature ids {bad} are out of range for an SAE with d_sae={d_sae}.")
    if len(set(features)) != len(features):
        raise DSGError(f"{where}: feature ids must be distinct, got {list(features)}.")
    if not isinstance(gated, bool):
        raise DSGError(f"{where}: 'gated' must be true or false, got {gated!r}.")
    if detector:
        if not is_number(threshold):
            raise DSGError(f"{where}: 'threshold' must be a finite number (detector evidence), got {threshold!r}.")
    elif not is_number(threshold) or not 0 <= threshold <= 1:
        raise DSGError(
            f"{where}: 'threshold' must be a number in [0, 1] (a share of flagged tokens), got {threshold!r}."
        )
    if not is_number(clamp) or not 0 < clamp <= MAX_CLAMP:
        raise DSGError(f"{where}: 'clamp' must be a positive number up to {MAX_CLAMP:g} (latents are set to -clamp), "
                       f"got {clamp!r}.")  # fmt: skip
    if clamp_mode not in CLAMP_MODES:
        raise DSGError(f"{where}: 'clamp_mode' must be one of {CLAMP_MODES}, got {clamp_mode!r}.")


def check_meta(meta: dict, where: str, allow_missing_model: bool) -> None:
    """Every field of guardrail.json that loading reads."""
    sae = meta.get("sae")
    if not isinstance(sae, dict):
        raise DSGError(f"{where}: 'sae' must be an object describing the SAE, got {sae!r}.")
    if not isinstance(sae.get("sha256"), str) or not _SHA256.match(sae["sha256"]):
        raise DSGError(f"{where}: 'sae.sha256' must be a 64-digit hex digest, got {sae.get('sha256')!r}.")
    if sae.get("architecture") not in ARCHITECTURES:
        raise DSGError(
            f"{where}: 'sae.architecture' must be one of {ARCHITECTURES.names()}, got {sae.get('architecture')!r}."
        )
    for key in ("d_in", "d_sae"):
        if not _is_int(sae.get(key)) or sae[key] < 1:
            raise DSGError(f"{where}: 'sae.{key}' must be a positive integer, got {sae.get(key)!r}.")
    if not isinstance(sae.get("apply_b_dec_to_input"), bool):
        raise DSGError(f"{where}: 'sae.apply_b_dec_to_input' must be true or false.")
    rule = [meta.get(k) for k in ("hook", "features", "threshold", "clamp")]
    rule += [meta.get("clamp_mode", "all"), meta.get("gated", True), sae["d_sae"], where, meta.get("window")]
    detector = meta.get("detector")
    if detector is not None and not (
        isinstance(detector, dict) and _is_int(detector.get("latents")) and detector["latents"] >= 1
        and detector.get("scale") == DETECTOR_SCALE and set(detector) <= {"latents", "scale", "floor"}
    ):  # fmt: skip
        raise DSGError(f"{where}: 'detector' must be {{'latents': a positive count, 'scale': {DETECTOR_SCALE}}} and "
                       f"optionally 'floor', got {detector!r}.")  # fmt: skip
    floor = detector.get("floor") if detector is not None else None
    check_rule(*rule, detector is not None, meta.get("hold"), meta.get("latch"), floor, meta.get("prompt_level"),
               meta.get("latch_run"))  # fmt: skip
    check_name(meta.get("name"), where)
    model = meta.get("model")
    if model is None and not allow_missing_model:
        raise DSGError(
            f"{where} has no record of the model it was fitted on, so it cannot be checked against "
            "yours; refit it, or pass --allow-model-mismatch (allow_missing_model=True) to apply it anyway."
        )
    if model is not None and not (isinstance(model, dict) and _SHA256.match(str(model.get("weights_sha256", "")))):
        raise DSGError(f"{where}: 'model.weights_sha256' must be a 64-digit hex digest.")
    if model is not None and not isinstance(model.get("config", {}), dict):
        raise DSGError(f"{where}: 'model.config' must be an object (the fitted model's config), got "
                       f"{model['config']!r}.")  # fmt: skip
    check_record(meta, where)


_RECORD_OBJECTS = ("config", "data", "detector_fit", "prompt_level_check", "baseline")  # what a guardrail's fit
# recorded: read by `dsg inspect`, reports and compare, never by the rule
# what a prompt-level check's report line reads (eval/prompt_level.describe)
_CHECK_NUMBERS = ("questions", "base_correct", "gate_rate_base_correct", "loss", "max_loss", "kept_with_level",
                  "kept_without_level")  # fmt: skip


def check_record(meta: dict, where: str) -> None:
    """The fit's record beside the rule: objects where an object was written, numbers where a report reads one, so
    an edited record is refused on load (and a malformed one on save) instead of breaking `dsg inspect` or a report
    later."""
    for key in _RECORD_OBJECTS:
        if key in meta and not isinstance(meta[key], dict):
            raise DSGError(f"{where}: '{key}' must be an object (the fit's record), got {meta[key]!r}.")
    bad = [k for k, v in meta.get("data", {}).items() if not isinstance(v, dict)]
    if bad:
        raise DSGError(f"{where}: each entry of 'data' must be an object describing a corpus; {bad} are not.")
    bad = [k for k, v in meta.get("data", {}).items() if "sha256" in v and not isinstance(v["sha256"], str)]
    if bad:
        raise DSGError(f"{where}: the 'sha256' of a corpus in 'data' must be a string; {bad} hold other values.")
    if "seed" in meta and not _is_int(meta["seed"]):
        raise DSGError(f"{where}: 'seed' must be an integer, got {meta['seed']!r}.")
    if "residual_norm" in meta and not is_number(meta["residual_norm"]):
        raise DSGError(f"{where}: 'residual_norm' must be a finite number, got {meta['residual_norm']!r}.")
    check = meta.get("prompt_level_check", {})
    if "base_correct" in check and not all(is_number(check.get(k)) for k in _CHECK_NUMBERS):
        raise DSGError(f"{where}: 'prompt_level_check' must hold numbers for {', '.join(_CHECK_NUMBERS)}.")


def check_fillers(fillers: torch.Tensor | None, hold, where: str) -> None:
    """A held gate's filler ids: distinct token ids in ascending order, int64, given only with a hold."""
    if fillers is None:
        return
    if hold is None:
        raise DSGError(f"{where}: 'hold_fillers' are the tokens a held gate neither judges nor counts, so 'hold' must "
                       "be set.")  # fmt: skip
    _check_token_ids(fillers, "filler", where)


def check_hold_tables(fillers, invisible, breaks, hold, where: str) -> None:
    """A held gate's id tables (each a tensor or None): the fillers (check_fillers); of those, the invisible ids the
    windows pass over and the line breaks they pass over after a short line, none of which may be both (a token
    the windows always pass over cannot also be one they pass over only after a short line)."""
    check_fillers(fillers, hold, where)
    _check_filler_subset(invisible, fillers, "hold_invisible", "invisible", "the windows pass over", where)
    _check_filler_subset(breaks, fillers, "hold_breaks", "line-break", "the windows may pass over", where)
    if breaks is not None and invisible is not None and torch.isin(breaks.cpu(), invisible.cpu()).any():
        raise DSGError(f"{where}: no line-break id may also be an invisible id.")


def _check_filler_subset(ids, fillers, field: str, what: str, role: str, where: str) -> None:
    """A table of filler ids (`field`, e.g. the invisible ones): token ids like the fillers' (check_fillers), each
    of them a filler."""
    if ids is None:
        return
    if fillers is None:
        raise DSGError(f"{where}: '{field}' are fillers {role}, so 'hold_fillers' must be set.")
    _check_token_ids(ids, what, where)
    if not torch.isin(ids.cpu(), fillers.cpu()).all():
        raise DSGError(f"{where}: every {what} id must also be a filler id (a token that carries no word).")


def _check_token_ids(ids: torch.Tensor, what: str, where: str) -> None:
    """One of a held gate's id tables: a vector of distinct int64 token ids in ascending order, in range."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 1:
        raise DSGError(f"{where}: the hold's {what} ids must be a vector of int64 token ids.")
    ids = ids.cpu()
    if len(ids) and (ids[0] < 0 or ids[-1] >= MAX_TOKEN_ID or not (ids[1:] > ids[:-1]).all()):
        raise DSGError(f"{where}: the hold's {what} ids must be distinct token ids in ascending order, each from 0 "
                       f"up to {MAX_TOKEN_ID - 1}.")  # fmt: skip


def check_tensors(t: dict[str, torch.Tensor], meta: dict, where: str) -> None:
    """Shapes and finiteness of the selected latents' slices and of a detector's tensors (and the detector's dtypes
    and ranges)."""
    sae, S = meta["sae"], len(meta["features"])
    d_in = sae["d_in"]
    expected = {"features": (S,), "W_dec_selected": (S, d_in), "b_dec": (d_in,)}
    arch = ARCHITECTURES[sae["architecture"]]
    if arch.encodes_latents_independently:
        expected |= {"W_enc_selected": (d_in, S), "b_enc_selected": (S,)}
        expected |= {f"{n}_selected": (S,) for n in arch.extra_tensors}
    for field, name in ID_TABLES.items():
        if field in meta:
            n = meta[field]
            if not _is_int(n) or n < 0:
                raise DSGError(f"{where}: '{field}' in guardrail.json must be a count of token ids, got {n!r}.")
            expected[name] = (n,)
    if "detector" in meta:
        L = meta["detector"]["latents"]
        expected |= {"detector.latents": (L,), "detector.weights": (L,)}
        if arch.encodes_latents_independently:
            expected |= {"detector.W_enc": (d_in, L), "detector.b_enc": (L,)}
            expected |= {f"detector.{n}": (L,) for n in arch.extra_tensors}
    for name, shape in expected.items():
        if name not in t:
            raise DSGError(f"{where} lacks the tensor {name!r}.")
        if tuple(t[name].shape) != shape:
            raise DSGError(f"{where}: tensor {name!r} has shape {tuple(t[name].shape)}, expected {shape}.")
        if t[name].is_floating_point() and not torch.isfinite(t[name]).all():
            raise DSGError(f"{where}: tensor {name!r} holds NaN or infinite values.")
    ids = set(ID_TABLES.values())
    floats = {name: t[name].dtype for name in expected if t[name].is_floating_point() and name not in ids}
    if len(set(floats.values())) > 1:
        raise DSGError(f"{where}: the SAE's tensors must share one dtype, got "
                       f"{', '.join(f'{n} {d}' for n, d in sorted(floats.items()))}.")  # fmt: skip
    if not (t["W_dec_selected"].double().abs() <= MAX_DECODER).all():
        raise DSGError(f"{where}: 'W_dec_selected' holds values past {MAX_DECODER:g}: no SAE decodes that way, and "
                       "a clamp times such a row overflows the residual stream.")  # fmt: skip
    if "detector" in meta:
        lat, q = t["detector.latents"], t["detector.weights"]
        if lat.dtype != torch.long or q.dtype != torch.long:
            raise DSGError(f"{where}: the detector's latents and weights must be int64 tensors.")
        if not ((lat >= 0) & (lat < sae["d_sae"])).all() or len(set(lat.tolist())) != len(lat):
            raise DSGError(f"{where}: the detector's latent ids must be distinct ids below d_sae={sae['d_sae']}.")
        if not (q.abs() <= DETECTOR_MAX_WEIGHT).all():
            raise DSGError(f"{where}: the detector's weights must have magnitude at most {DETECTOR_MAX_WEIGHT}.")
    if t["features"].tolist() != list(meta["features"]):
        raise DSGError(f"{where}: the tensor 'features' does not match the features in guardrail.json.")
    check_statistics({k.removeprefix("stats."): v for k, v in t.items() if k.startswith("stats.")}, sae["d_sae"],
                     where)  # fmt: skip


# the statistics dsg.fit writes with one value per SAE latent (what `dsg inspect` indexes by latent id)
PER_LATENT = tuple(f"{side}_{s}" for side in ("forget", "retain") for s in ("mean", "frequency", "mean_square"))
PER_LATENT += ("score_forget", "score_retain", "score_ratio")


def check_statistics(stats: dict[str, torch.Tensor], d_sae: int, where: str) -> None:
    """The fit's statistics and calibration scores (saved as `stats.*`, read by `dsg inspect`): vectors of finite
    floats, one value per latent for those fit writes per latent."""
    for key, x in stats.items():
        name = f"stats.{key}"
        per_latent = key in PER_LATENT
        if not isinstance(x, torch.Tensor):
            raise DSGError(f"{where}: {name!r} must be a tensor, got a {type(x).__name__}.")
        if x.dim() != 1 or not x.is_floating_point() or (per_latent and x.numel() != d_sae):
            size = f"{d_sae} values (one per latent)" if per_latent else "a vector"
            raise DSGError(f"{where}: tensor {name!r} must be floats, {size}; got {x.dtype} of shape "
                           f"{tuple(x.shape)}.")  # fmt: skip
        if not torch.isfinite(x).all():  # what `dsg inspect` prints and a fit's statistics never hold
            raise DSGError(f"{where}: tensor {name!r} holds values that are not finite numbers.")
