"""The Guardrail value object: which latents, at which hook, gated how, clamped how hard; and its files.

A guardrail holds only what its rule (guard/rule.py) needs: the selected latents' encoder (for ReLU/JumpReLU the
selected encoder columns, an SAE cut to those latents; for TopK the whole SAE, since a TopK latent depends on all
the others) and their decoder rows. Applying it to a model is a runtime's job (`guard.applied(model)`, see
dsg.runtime.hf).

On disk: `guardrail.json` (features, threshold, clamp, hook, config, seed, dsg version, SHA-256 of the SAE and of
the model weights upstream of the hook, corpus hashes) + `guardrail.safetensors` (the selected latents' slices and
per-latent statistics, and a detector gate's latents, integer weights and, for ReLU/JumpReLU, encoder slices),
plus the whole SAE under `sae/` for TopK.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .. import __version__
from ..config import is_index
from ..errors import DSGError
from ..files import atomic_directory, path_identity, read_artifact_json, read_safetensors, save_tensors, write_json
from ..lm.fingerprint import config_differences, model_fingerprint
from ..lm.hooks import HookPoint, resolve
from ..lm.models import DTYPES
from ..sae import ARCHITECTURES, SAE
from . import rule
from .detector import MAX_WEIGHT, SCALE, Detector
from .integrity import (
    BREAKS_TENSOR,
    FILLERS_TENSOR,
    HASH_FIELD,
    INVISIBLE_TENSOR,
    check_hold_tables,
    check_meta,
    check_name,
    check_record,
    check_rule,
    check_statistics,
    check_tensors,
    content_sha256,
)

FORMAT = "dsg-guardrail"
FORMAT_VERSION = 9  # the newest this dsg reads. 2: guardrail.json carries a content hash; 3: a detector floor;
# 4: a prompt level; 5: a hold counted in tokens that carry words, whose windows at fillers still opened it (no
# longer read: see _load_once); 6: the same, judged at words only; 7: windows that pass over invisible tokens; 8:
# and over the line breaks that end short lines; 9: a run latch (a guardrail is written with the lowest version
# that holds its rule, see to_json)
FLOORED_FORMAT_VERSION = 3
PROMPT_LEVEL_FORMAT_VERSION = 4
FILLERS_OPEN_FORMAT_VERSION = 5
HOLD_FILLERS_FORMAT_VERSION = 6
INVISIBLE_FORMAT_VERSION = 7
BREAKS_FORMAT_VERSION = 8
LATCH_RUN_FORMAT_VERSION = 9
SIGNED_FORMAT_VERSION = 2  # what a guardrail without a detector floor is written as, readable by dsg before floors
# rule fields an older dsg would ignore: (as the refusal names it, the lowest version written with it, what an older
# dsg does without it); a file naming one under an older version was edited
_FIELD_FORMATS = {
    "prompt_level": ("a 'prompt_level'", PROMPT_LEVEL_FORMAT_VERSION, "clamp differently"),
    "hold_fillers": ("'hold_fillers'", HOLD_FILLERS_FORMAT_VERSION, "hold the gate open for fewer tokens"),
    "hold_invisible": ("'hold_invisible'", INVISIBLE_FORMAT_VERSION, "let invisible characters thin out the windows"),
    "hold_breaks": ("'hold_breaks'", BREAKS_FORMAT_VERSION, "let line breaks thin out the windows"),
    "latch_run": ("a 'latch_run'", LATCH_RUN_FORMAT_VERSION, "guard fewer answers"),
}
JSON_NAME = "guardrail.json"
TENSORS_NAME = "guardrail.safetensors"
SAE_DIR = "sae"
_OWN_FIELDS = ("format", "format_version", "dsg_version", "name", "detector")  # written by to_json, never by info
RULE_FIELDS = ("hook", "features", "threshold", "clamp", "clamp_mode", "gated")
RULE_FIELDS += ("window", "hold", "latch", "prompt_level", "hold_fillers", "hold_invisible")  # the windowed gate's
RULE_FIELDS += ("hold_breaks", "latch_run")


class Flags(NamedTuple):
    """What a guardrail reads from the activations at its hook (Guardrail.flags)."""

    f: torch.Tensor  # [B, T, S] activations of the selected latents
    a: torch.Tensor  # [B, T] bool, real tokens where any selected latent fires (what the clamp acts on)
    evidence: torch.Tensor | None  # [B, T] int64, the detector's evidence per token (None without a detector)


def _detector_of(sae: SAE, detector: dict[int, int] | None, window: int | None, floor: int | None) -> Detector | None:
    """A Detector from {latent id: integer weight} and the floor of a token's evidence (checked with the rule,
    integrity.check_rule); it needs the windowed gate."""
    if detector is None:
        return None
    if window is None:
        raise DSGError("A detector gate reads windows of tokens: give the guardrail a window as well.")
    if not detector or not all(isinstance(j, int) and 0 <= j < sae.d_sae for j in detector):
        raise DSGError(f"The detector's latents must be ids in [0, {sae.d_sae}), got {sorted(detector)[:8]}...")
    if not all(isinstance(q, int) and abs(q) <= MAX_WEIGHT for q in detector.values()):
        raise DSGError(f"The detector's weights must be integers of magnitude at most {MAX_WEIGHT}.")
    latents = sorted(detector)
    return Detector.of(sae, latents, torch.tensor([detector[j] for j in latents], dtype=torch.long), floor)


def _sliced_encoder(record: dict, t: dict, W_enc: str, W_dec: str | None, b_enc: str, threshold: str) -> SAE:
    """An SAE over a few latents, rebuilt from the slices (tensor names in `t`) that a self-contained ReLU/JumpReLU
    guardrail saves; without decoder rows (`W_dec=None`) it can only encode."""
    enc = t[W_enc]
    dec = t[W_dec] if W_dec else torch.zeros(enc.shape[1], record["d_in"], dtype=enc.dtype)
    return ARCHITECTURES[record["architecture"]](enc, dec, t[b_enc], t["b_dec"], threshold=t.get(threshold),
                                                 apply_b_dec_to_input=record["apply_b_dec_to_input"],
                                                 hook_name=record.get("hook_name"))  # fmt: skip


def _load_detector(t: dict, record: dict, sae: SAE | None, floor: int | None) -> Detector:
    """The saved detector: over the whole SAE when it is known (always for TopK, whose guardrail keeps a copy),
    else over its saved encoder slices."""
    latents, weights = t["detector.latents"].tolist(), t["detector.weights"]
    if sae is not None:
        return Detector.of(sae, latents, weights, floor)
    encoder = _sliced_encoder(record, t, "detector.W_enc", None, "detector.b_enc", "detector.threshold")
    return Detector(latents, weights, encoder, floor)


def _latent_ids(features) -> list[int]:
    """Latent ids as Python ints: integers of any kind (numpy, an integer tensor) are taken, anything else (a float,
    a bool, a string of digits) is refused rather than rounded."""
    given = features
    if isinstance(features, torch.Tensor):
        features = features.tolist() if not features.is_floating_point() and features.dtype != torch.bool else [None]
    if isinstance(features, (str, bytes)) or not hasattr(features, "__iter__"):
        features = [None]
    ids = []
    for j in features:
        if not is_index(j):
            raise DSGError(f"The guardrail's features must be latent ids (integers), got {given!r}.")
        ids.append(operator.index(j))
    return ids


def _token_ids(ids) -> torch.Tensor | None:
    """Distinct token ids, ascending, as an int64 vector (None stays None)."""
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not all(is_index(i) for i in ids):
        raise DSGError("The guardrail's hold_fillers, hold_invisible and hold_breaks must be token ids (integers).")
    return torch.tensor(sorted({operator.index(i) for i in ids}), dtype=torch.long)


def _check_sae_record(record: dict, sae: SAE, where: str) -> None:
    """The SAE a guardrail was read with (its copy under sae/, or the caller's) against what guardrail.json says it
    is: an edit that kept the hashes consistent must not leave the rule reading latents the SAE does not have."""
    keys = ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input")
    differ = [f"{k} {record.get(k)!r} (the SAE has {getattr(sae, k)!r})" for k in keys
              if record.get(k) != getattr(sae, k)]  # fmt: skip
    if differ:
        raise DSGError(f"{where} records an SAE other than the one it is read with: {', '.join(differ)}; refit it.")


class SelectedLatents(torch.nn.Module):
    """The part of an SAE a guardrail needs: an encoder giving the selected latents' activations, and their
    decoder rows."""

    def __init__(self, encoder: SAE, features: Sequence[int], W_dec_SD: torch.Tensor, b_dec: torch.Tensor):
        super().__init__()
        self.encoder = encoder  # the SAE cut to the selected latents, or (TopK) the whole SAE
        self.register_buffer("features", torch.tensor(list(features), dtype=torch.long))
        self.register_buffer("W_dec", W_dec_SD)  # [S, D]
        self.register_buffer("b_dec", b_dec)

    @classmethod
    def of(cls, sae: SAE, features: Sequence[int]) -> SelectedLatents:
        idx = torch.tensor(list(features), dtype=torch.long)
        encoder = sae.restricted(features) if sae.encodes_latents_independently else sae
        return cls(encoder, features, sae.W_dec.data[idx].clone(), sae.b_dec.data.clone())

    @property
    def whole_sae(self) -> bool:
        """True when the encoder is the whole SAE (TopK) rather than one cut to the selected latents."""
        return not self.encoder.encodes_latents_independently

    def encode(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Activations of the selected latents, f [B, T, S]."""
        if self.whole_sae:
            return self.encoder.encode(x_BTD)[..., self.features]
        return self.encoder.encode(x_BTD)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"features": self.features, "W_dec_selected": self.W_dec, "b_dec": self.b_dec}
        if not self.whole_sae:
            t = self.encoder.tensors()
            out |= {"W_enc_selected": t["W_enc"], "b_enc_selected": t["b_enc"]}
            if "threshold" in t:
                out["threshold_selected"] = t["threshold"]
        return out


def _sae_record(sae: SAE, sha256: str) -> dict:
    return {
        "sha256": sha256,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "hook_name": sae.hook_name,
    }


def fitted_dtype(guardrails) -> str | None:
    """The dtype of the model `guardrails` were fitted on, as they record it (None where none records one); a
    model to check them against is loaded in it. Guardrails fitted in different dtypes cannot share one model."""
    recorded = {str(g.info.get("model", {}).get("dtype")) for g in guardrails} - {"None"}
    if len(recorded) > 1:
        names = ", ".join(f"{g.name or i}: {g.info.get('model', {}).get('dtype')}" for i, g in enumerate(guardrails))
        raise DSGError(f"The guardrails were fitted on models of different dtypes ({names}); a model in one dtype "
                       "is another model to the rest. Refit them in one dtype.")  # fmt: skip
    return recorded.pop() if recorded else None


def dtype_for(guardrails) -> torch.dtype:
    """The dtype to load a model in to check `guardrails` against: the one they were fitted in (fitted_dtype),
    float32 where none records one dsg loads in."""
    return DTYPES.get(fitted_dtype(guardrails) or "", torch.float32)


class Guardrail:
    """A Dynamic SAE Guardrail: which latents, at which hook, gated how, clamped how hard."""

    def __init__(
        self,
        sae: SAE,
        hook: str | None = None,
        features: Sequence[int] = (),
        threshold: float = 0.0,
        clamp: float = 500.0,
        clamp_mode: str = "all",
        gated: bool = True,
        *,
        window: int | None = None,
        detector: dict[int, int] | None = None,
        detector_floor: int | None = None,
        hold: int | None = None,
        latch: float | None = None,
        latch_run: int | None = None,
        prompt_level: float | None = None,
        hold_fillers: Sequence[int] | None = None,
        hold_invisible: Sequence[int] | None = None,
        hold_breaks: Sequence[int] | None = None,
        name: str | None = None,
        info: dict | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ):
        hook = hook or getattr(sae, "hook_name", None)
        if not hook:
            raise DSGError("The guardrail needs a hook point: pass hook=..., or use an SAE whose config names one.")
        features = _latent_ids(features)
        check_rule(hook, features, threshold, clamp, clamp_mode, gated, sae.d_sae, "The guardrail", window,
                   detector is not None, hold, latch, detector_floor, prompt_level, latch_run)  # fmt: skip
        fillers, invisible, breaks = _token_ids(hold_fillers), _token_ids(hold_invisible), _token_ids(hold_breaks)
        check_hold_tables(fillers, invisible, breaks, hold, "The guardrail")
        if info is not None and not isinstance(info, dict):
            raise DSGError(f"info must be a dict (the guardrail's free-form record), got a {type(info).__name__}.")
        if tensors is not None and not (
            isinstance(tensors, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
        ):
            raise DSGError("tensors must be a dict of names to torch tensors (statistics saved beside the guardrail).")
        info = dict(info or {})
        sha = sae.sha256()
        given = info.get("sae", {}).get("sha256") if isinstance(info.get("sae"), dict) else None
        if given is not None and given != sha:
            raise DSGError(f"info['sae']['sha256'] names SAE {str(given)[:12]}..., but the guardrail is built from SAE "
                           f"{sha[:12]}...; the record must describe the SAE it holds.")  # fmt: skip
        record = _sae_record(sae, sha)
        self._setup(
            SelectedLatents.of(sae, features),
            record,
            sae,
            hook,
            features,
            threshold,
            clamp,
            clamp_mode,
            gated,
            name,
            info,
            tensors,
            window,
            _detector_of(sae, detector, window, detector_floor),
            hold,
            latch,
            prompt_level,
            fillers,
            invisible,
            breaks,
            latch_run,
        )

    def _setup(
        self, latents, sae_record, sae, hook, features, threshold, clamp, clamp_mode, gated, name, info, tensors,
        window=None, detector=None, hold=None, latch=None, prompt_level=None, hold_fillers=None, hold_invisible=None,
        hold_breaks=None, latch_run=None,
    ) -> None:  # fmt: skip
        self.latents = latents
        self.sae_record = sae_record
        self.sae = sae  # the whole SAE when known (fitted here, or a TopK guardrail's sae/ copy), else None
        self.hook = hook
        self.features = list(features)
        self.threshold = float(threshold)
        self.clamp = float(clamp)
        self.clamp_mode = clamp_mode
        self.gated = bool(gated)
        self.window = window  # None: the paper's whole-input gate; w: the prefix-causal windowed gate
        self.detector = detector  # None: the window counts flagged tokens; a Detector: it sums weighted evidence
        self.hold = hold  # None: the windowed gate latches; h: inside a prompt it stays open h counted tokens
        self.latch = None if latch is None else float(latch)  # held gate: a window over it guards the answer
        self.latch_run = latch_run  # held gate: so do this many judged windows in a row over the threshold
        # held gate: a prompt's tokens are clamped only near windows over it (None: over the threshold)
        self.prompt_level = None if prompt_level is None else float(prompt_level)
        # held gate: ids of the tokens that carry no word (lm.text.filler_token_ids), at which the gate is not judged
        # and which the hold does not count (None: every real token is judged and counted)
        self.hold_fillers = hold_fillers
        # held gate: of those, the ids the windows pass over: tokens that show nothing (lm.text.invisible_token_ids)
        # and, as fitted since spacing was added, those that show only spacing within a line
        # (lm.text.spacing_token_ids). None: the windows hold every real token but for hold_breaks
        self.hold_invisible = hold_invisible
        # held gate: of the fillers, the line breaks (lm.text.line_break_token_ids) the windows pass over where one
        # ends a short line of words (rule.SHORT_LINE). None: the windows hold every line break
        self.hold_breaks = hold_breaks
        self.name = name
        self.info = dict(info or {})
        self.tensors = dict(tensors or {})
        self.content_sha256: str | None = None  # the hash of the files it was loaded from (None: not loaded)
        self._check_levels_reachable()

    def check(self) -> None:
        """Refuse (DSGError) settings changed after the guardrail was built into ones that could not have been
        given to it: a threshold of NaN, a clamp of infinity, an unknown clamp mode, a hold past any context. Its
        latents cannot be changed in place (`features` only names them): build a new Guardrail for others.
        Attaching and saving check first."""
        if [int(j) for j in self.features] != self.latents.features.tolist():
            raise DSGError(f"This guardrail's features were changed after it was built ({self.features[:8]} named, "
                           f"{self.latents.features.tolist()[:8]} held); build a new Guardrail(sae, features=...) "
                           "for other latents.")  # fmt: skip
        check_name(self.name, "The guardrail")
        floor = self.detector.floor if self.detector is not None else None
        check_rule(self.hook, self.features, self.threshold, self.clamp, self.clamp_mode, self.gated,
                   int(self.sae_record["d_sae"]), "The guardrail", self.window, self.detector is not None, self.hold,
                   self.latch, floor, self.prompt_level, self.latch_run)  # fmt: skip
        check_hold_tables(self.hold_fillers, self.hold_invisible, self.hold_breaks, self.hold, "The guardrail")
        self._check_levels_reachable()

    def _check_levels_reachable(self) -> None:
        """A detector gate's levels must lie within the mean window evidence its weights can give (Detector.reach):
        at or above the highest the gate could never go over them; below the lowest it opens on every input."""
        if self.detector is None or not self.gated or self.window is None:
            return
        lowest, highest = self.detector.reach(self.window)
        for name, level in (("threshold", self.threshold), ("latch", self.latch), ("prompt_level", self.prompt_level)):
            if level is not None and level >= highest:
                raise DSGError(f"The guardrail's '{name}' ({level:g}, {level / SCALE:.4g} in weight units) is at or "
                               f"above the largest mean window evidence its detector can give ({highest:g}): the "
                               "gate could never go over it.")  # fmt: skip
        if self.threshold < lowest:
            raise DSGError(
                f"The guardrail's 'threshold' ({self.threshold:g}) lies below the smallest mean window "
                f"evidence its detector can give ({lowest:g}): the gate would open on every input."
            )

    @property
    def sae_sha256(self) -> str:
        return self.sae_record["sha256"]

    @property
    def d_in(self) -> int:
        return int(self.sae_record["d_in"])

    def gate_rule(self) -> str:
        """The gate in words, e.g. for reports."""
        if not self.gated:
            names = ("window", "hold", "latch", "latch_run", "prompt_level", "detector")
            unused = [n for n in names if getattr(self, n) is not None]
            # a static fit records the gate settings it was given; say that they do nothing rather than hide them
            return "static (every input)" + (f"; its {', '.join(unused)} settings are unused" if unused else "")
        if self.detector is not None:
            floor = self.detector.floor
            each = f" (each token's at least {floor / SCALE:g})" if floor is not None else ""
            return (f"detector over {len(self.detector)} latents: mean evidence{each} over the last {self.window} "
                    f"tokens > {self.threshold / SCALE:.4g}, {self._opens_how()}")  # fmt: skip
        if self.window is not None:
            return (f"share of flagged tokens over the last {self.window} tokens > {self.threshold:.4g}, "
                    f"{self._opens_how()}")  # fmt: skip
        return f"whole-input rho > {self.threshold:.4f}"

    def _opens_how(self) -> str:
        if self.hold is None:
            return "latched"
        unit = self.gate_unit()
        counted = "tokens that carry words" if self.hold_fillers is not None else "tokens"
        how = f"open for {self.hold} {counted} in a prompt, latched in the answer"
        if self.hold_fillers is not None:
            how = f"judged at words, {how}"
        passed = [f"{len(self.hold_invisible)} blank tokens"] if self.hold_invisible is not None else []
        if self.hold_breaks is not None:
            passed.append(f"line breaks after lines of at most {rule.SHORT_LINE} word tokens")
        if passed:
            how = f"windows pass over {' and '.join(passed)}, {how}"
        if self.prompt_level is not None:
            how += f" (a prompt's tokens are clamped only near windows over {self.prompt_level / unit:.4g})"
        latches = [f"a window over {self.latch / unit:.4g}"] if self.latch is not None else []
        if self.latch_run is not None:
            latches.append(f"{self.latch_run} judged windows in a row over the threshold")
        return how + (f"; {' or '.join(latches)} anywhere in the prompt guards the answer" if latches else "")

    def gate_unit(self) -> float:
        """What the stored levels (threshold, latch, prompt level) are divided by wherever they are shown: a detector
        gate stores them in its integer weight units (detector.SCALE per 1.0 of weight) and shows mean evidence."""
        return float(SCALE) if self.detector is not None else 1.0

    def __repr__(self) -> str:
        unit = self.gate_unit()
        gate = f"threshold={self.threshold / unit:.4g}" if self.gated else "static"
        gate += f", window={self.window}" if self.window is not None else ""
        gate += f", hold={self.hold}" if self.hold is not None else ""
        gate += " words" if self.hold is not None and self.hold_fillers is not None else ""
        gate += " visible" if self.hold is not None and self.hold_invisible is not None else ""
        gate += " lines" if self.hold is not None and self.hold_breaks is not None else ""
        gate += f", latch={self.latch / unit:.4g}" if self.latch is not None else ""
        gate += f", latch_run={self.latch_run}" if self.latch_run is not None else ""
        gate += f", prompt_level={self.prompt_level / unit:.4g}" if self.prompt_level is not None else ""
        gate += f", detector={len(self.detector)} latents" if self.detector is not None else ""
        return (
            f"Guardrail(hook={self.hook!r}, features={self.features}, {gate}, clamp={self.clamp:g}, "
            f"clamp_mode={self.clamp_mode!r})"
        )

    # ---- the rule, on this guardrail's parameters ------------------------------------------------------------

    def flags(self, x_BTD: torch.Tensor, real_BT: torch.Tensor) -> Flags:
        """Selected activations f [B, T, S], which real tokens have any of them firing a [B, T], and (detector gate)
        each token's evidence e [B, T]."""
        det = self.detector
        if det is not None and det.encoder is None:  # TopK: one whole-SAE encoding serves both
            full = self.latents.encoder.encode(x_BTD)
            f, d = full[..., self.latents.features], full[..., det.latents]
        else:
            f = self.latents.encode(x_BTD)
            d = det.encode(x_BTD) if det is not None else None
        return Flags(f, rule.flagged_tokens(f, real_BT), det.evidence(d, real_BT) if det is not None else None)

    @property
    def prefix_causal(self) -> bool:
        """Whether the decision at a token depends only on the tokens up to it (static, or a windowed gate): then
        a prompt may arrive in pieces (a shared prefix, chunked prefill, a prefix cache) with the same result."""
        return not self.gated or self.window is not None

    def counted(
        self, real_BT: torch.Tensor, ids_BT: torch.Tensor | None, padding_BT: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The real tokens a held gate is judged at and counts [B, T]: those whose ids are not among `hold_fillers`
        (bool); with `hold_invisible` or `hold_breaks`, as roles (int8: rule.WORD for those, rule.INVISIBLE for the
        fillers the windows pass over, rule.BREAK for the line breaks they pass over after a short line, rule.FILLER
        for the other tokens; `padding_BT`, the positions that are padding, are rule.INVISIBLE then: a special
        token that is not real ends a short line, padding does not). None (every real token is judged and counted)
        without a table, or without token ids (a forward given embeddings: then a window ending at a filler may
        open a gate whose levels were read at words)."""
        if self.hold is None or self.hold_fillers is None or ids_BT is None or ids_BT.shape != real_BT.shape:
            return None
        ids_BT = ids_BT.to(real_BT.device)
        words = real_BT & ~torch.isin(ids_BT, self.hold_fillers.to(ids_BT.device))
        if self.hold_invisible is None and self.hold_breaks is None:
            return words
        roles = torch.full(real_BT.shape, rule.FILLER, dtype=torch.int8, device=real_BT.device)
        if self.hold_invisible is not None:
            roles[torch.isin(ids_BT, self.hold_invisible.to(ids_BT.device))] = rule.INVISIBLE
        if self.hold_breaks is not None:
            roles[torch.isin(ids_BT, self.hold_breaks.to(ids_BT.device))] = rule.BREAK
        roles[words] = rule.WORD
        if padding_BT is not None and padding_BT.shape == roles.shape:
            roles[padding_BT.to(roles.device) & ~real_BT] = rule.INVISIBLE
        return roles

    def gate(self, a_BT, real_BT, n_prompt: int, state, evidence_BT=None, counted_BT=None):
        """Which tokens to clamp [B, T] and the new gate state (see rule.gate; with a window, rule.window_gate,
        which with a detector sums `evidence_BT` and with `hold` tells the first `n_prompt` positions, held open,
        from generated ones, latched, judged at and counting the real tokens in `counted_BT`: see `counted`)."""
        if self.gated and self.window is not None:
            return rule.window_gate(a_BT, real_BT, state, self.threshold, self.window, evidence_BT, self.hold,
                                    n_prompt, self.latch, self.prompt_level, counted_BT, self.latch_run)  # fmt: skip
        return rule.gate(a_BT, real_BT, n_prompt, state, self.threshold if self.gated else None)

    def delta(self, f_BTS: torch.Tensor, clamp_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [P, 2], residual deltas [P, D]) for the clamped tokens only."""
        return rule.clamp_delta(f_BTS, clamp_BT, self.latents.W_dec, self.clamp, self.clamp_mode)

    # ---- use ------------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> Guardrail:
        """Move what the rule reads (the selected latents and the detector) to `device`; returns self."""
        self.latents.to(device)
        if self.detector is not None:
            self.detector.to(device)
        if self.hold_fillers is not None:
            self.hold_fillers = self.hold_fillers.to(device)
        if self.hold_invisible is not None:
            self.hold_invisible = self.hold_invisible.to(device)
        if self.hold_breaks is not None:
            self.hold_breaks = self.hold_breaks.to(device)
        return self

    def applied(self, model: torch.nn.Module, verify: bool = True):
        """The Intervention protocol: `with guard.applied(model) as session: model(...)`, run by the runtime that
        supports the model (dsg.runtime)."""
        from ..runtime import attach  # the runtimes import this module

        return attach(model, self, verify=verify)

    attach = applied

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a clamp whose edit of the residual stream a model computing in `dtype`, or this guardrail's own
        dtype, cannot hold: at a flagged token the clamp alone moves each dimension by up to |clamp| times the summed
        magnitudes of the selected latents' decoder rows (computed in the SAE's dtype, from coefficients of about
        |clamp|), and float16 holds at most 65504. Past half of that the guarded activations, and the text generated
        from them, would be inf or NaN (an empty answer that reads like forgetting)."""
        rows = float(self.latents.W_dec.float().abs().sum(0).max()) if self.features else 0.0
        reach = abs(self.clamp) * rows
        own = self.latents.W_dec.dtype
        for whose, dt, value in (("the model's", dtype, reach), ("the guardrail's", own, max(reach, abs(self.clamp)))):
            if not dt.is_floating_point or value <= torch.finfo(dt).max / 2:
                continue
            name, limit = str(dt).removeprefix("torch."), torch.finfo(dt).max / 2
            below = abs(self.clamp) * limit / value
            raise DSGError(f"The clamp {self.clamp:g} moves the residual stream at {self.hook!r} by up to "
                           f"{value:.3g}, more than {whose} {name} holds with room for the activations "
                           f"({limit:.3g}): its outputs would be inf or NaN. Refit with a clamp below {below:.3g} "
                           "(--clamp), or run it in float32 or bfloat16.")  # fmt: skip

    def check_model(self, model: torch.nn.Module, hook: HookPoint | None = None) -> None:
        """Refuse a model whose weights upstream of the hook, or whose config fields that change what they compute,
        differ from the model's the guardrail was fitted on."""
        record = self.info.get("model", {})
        expected = record.get("weights_sha256")
        if not expected:
            return
        mismatch = "refit it for this model, or pass verify=False (--allow-model-mismatch) to apply it anyway"
        hook = hook or resolve(model, self.hook)
        got = model_fingerprint(model, hook)["weights_sha256"]
        if got != expected:
            model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            fitted = record.get("dtype") or str(self.latents.W_dec.dtype).removeprefix("torch.")
            cast = (f" The model's weights are {model_dtype} and the fitted model's were {fitted}: weights are "
                    f"hashed in their dtype, so a model cast after or before the fit differs; load it in "
                    f"{fitted} (--dtype {fitted}; dsg.load_model(..., dtype=torch.{fitted})) to check it.")  # fmt: skip
            cast = cast if model_dtype != fitted else ""
            raise DSGError(
                f"This guardrail was fitted on model {record.get('name_or_path')!r} (weights {expected[:12]}...), "
                f"but the given model's weights up to {self.hook!r} hash to {got[:12]}...; {mismatch}.{cast}"
            )
        changed = config_differences(record.get("config"), model)
        if changed:
            raise DSGError(
                f"This guardrail was fitted on model {record.get('name_or_path')!r} with the same weights but another "
                f"config, which changes the activations at {self.hook!r}: {'; '.join(changed[:5])}; {mismatch}."
            )

    # ---- files ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self._format_version,
            "dsg_version": __version__,
            "name": self.name,
            "hook": self.hook,
            "features": self.features,
            "threshold": self.threshold,
            "clamp": self.clamp,
            "clamp_mode": self.clamp_mode,
            "gated": self.gated,
            **({"window": self.window} if self.window is not None else {}),
            **({"hold": self.hold} if self.hold is not None else {}),
            **({"latch": self.latch} if self.latch is not None else {}),
            **({"latch_run": self.latch_run} if self.latch_run is not None else {}),
            **({"prompt_level": self.prompt_level} if self.prompt_level is not None else {}),
            **({"hold_fillers": len(self.hold_fillers)} if self.hold_fillers is not None else {}),
            **({"hold_invisible": len(self.hold_invisible)} if self.hold_invisible is not None else {}),
            **({"hold_breaks": len(self.hold_breaks)} if self.hold_breaks is not None else {}),
            **({"detector": self._detector_record()} if self.detector is not None else {}),
            **{k: v for k, v in self.info.items() if k not in ("sae", *RULE_FIELDS, *_OWN_FIELDS)},
            "sae": {**self.info.get("sae", {}), **self.sae_record},
        }

    @property
    def _format_version(self) -> int:
        """The lowest format version that holds this rule, so that a dsg too old to apply it refuses the file
        instead of reading it as another rule: 9 with a run latch, 8 with windows that pass over the line breaks
        that end short lines, 7 with windows that pass over invisible tokens, 6 with a hold that skips fillers, 4
        with a prompt level (each field's version is in _FIELD_FORMATS), 3 with a detector floor, else 2."""
        versions = [version for field, (_, version, _) in _FIELD_FORMATS.items() if getattr(self, field) is not None]
        if self.detector is not None and self.detector.floor is not None:
            versions.append(FLOORED_FORMAT_VERSION)
        return max(versions, default=SIGNED_FORMAT_VERSION)

    def _detector_record(self) -> dict:
        floor = self.detector.floor
        return {"latents": len(self.detector), "scale": SCALE, **({"floor": floor} if floor is not None else {})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `guardrail.json` + `guardrail.safetensors` (and, for TopK SAEs, the SAE) atomically; the JSON
        carries a content hash of everything loading reads (see guard/integrity.py)."""
        path = Path(path)
        self.check()
        check_record(self.to_json(), "The guardrail's info")  # what loading would refuse is refused here
        check_statistics(self.tensors, int(self.sae_record["d_sae"]), "The guardrail's statistics")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.latents.tensors().items()}
        if self.detector is not None:
            tensors |= {k: v.detach().cpu().contiguous() for k, v in self.detector.tensors().items()}
        tensors |= {f"stats.{k}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        if self.hold_fillers is not None:
            tensors[FILLERS_TENSOR] = self.hold_fillers.detach().cpu().contiguous()
        if self.hold_invisible is not None:
            tensors[INVISIBLE_TENSOR] = self.hold_invisible.detach().cpu().contiguous()
        if self.hold_breaks is not None:
            tensors[BREAKS_TENSOR] = self.hold_breaks.detach().cpu().contiguous()
        meta = self.to_json()
        meta[HASH_FIELD] = content_sha256(meta, tensors)
        with atomic_directory(path, "guardrail") as tmp:
            write_json(tmp / JSON_NAME, meta)
            save_tensors(tensors, tmp / TENSORS_NAME)
            if self.latents.whole_sae:
                self.latents.encoder.save(tmp / SAE_DIR)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        sae: SAE | None = None,
        model: torch.nn.Module | None = None,
        *,
        allow_missing_model: bool = False,
    ) -> Guardrail:
        """Read a saved guardrail, refusing one that was modified after it was written or holds a value out of
        range. Passing the `sae` or `model` checks that it is the one the guardrail was made for.

        Saving replaces the whole folder in one step, but a reader opens its files one by one: one that read the
        old folder's JSON and the new one's tensors sees a mismatch. When the folder was replaced while it was
        read, it is read again (up to five times) instead of being reported as tampered with."""
        path = Path(path)
        for attempt in range(5):
            before = path_identity(path)
            try:
                guard = cls._load_once(path, sae, allow_missing_model)
                break
            except DSGError:
                if attempt == 4 or path_identity(path) == before:
                    raise
        if model is not None:
            guard.check_model(model)
        return guard

    @classmethod
    def _load_once(cls, path: Path, sae: SAE | None, allow_missing_model: bool) -> Guardrail:
        meta = read_artifact_json(path, JSON_NAME, FORMAT, FORMAT_VERSION, "guardrail")
        where = repr(str(path / JSON_NAME))
        t = read_safetensors(path / TENSORS_NAME)
        if meta.get(HASH_FIELD) != content_sha256(meta, t):
            what = "has no content hash" if HASH_FIELD not in meta else "does not match its content hash"
            raise DSGError(f"The guardrail in {str(path)!r} {what}: its files were changed after it was written "
                           "(or by a dsg that did not hash them); refit it.")  # fmt: skip
        check_meta(meta, where, allow_missing_model)
        if meta.get("format_version") == FILLERS_OPEN_FORMAT_VERSION:
            raise DSGError(f"{where} was written by a dsg whose held gate also opened at windows ending on fillers "
                           "(whitespace, punctuation) and read its levels there; this dsg judges words only, so its "
                           "threshold would no longer be the percentile it was fitted as. Refit it.")  # fmt: skip
        for field, (named, version, older) in _FIELD_FORMATS.items():
            if field in meta and meta.get("format_version", 0) < version:
                raise DSGError(f"{where} has {named} but format_version {meta.get('format_version')!r}; a dsg "
                               f"writes it as {version} (older ones ignore the field and {older}), so the file was "
                               "edited; refit it.")  # fmt: skip
        check_tensors(t, meta, repr(str(path / TENSORS_NAME)))
        record = meta["sae"]
        if sae is not None and sae.sha256() != record["sha256"]:
            raise DSGError(
                f"The guardrail in {str(path)!r} was fitted on SAE {record['sha256'][:12]}..., but the given SAE "
                f"hashes to {sae.sha256()[:12]}...; pass the SAE it was fitted on."
            )
        features = list(meta["features"])
        if sae is None and (path / SAE_DIR).is_dir():
            sae = SAE.load(path / SAE_DIR, dtype=None)  # in the dtype it was fitted and hashed in
            if sae.sha256() != record["sha256"]:
                raise DSGError(f"The SAE copy in {str(path / SAE_DIR)!r} was changed after the guardrail was written "
                               "(its hash differs from the one recorded); refit the guardrail.")  # fmt: skip
        if sae is not None:
            _check_sae_record(record, sae, where)
            latents = SelectedLatents.of(sae, features)
        elif not ARCHITECTURES[record["architecture"]].encodes_latents_independently:
            raise DSGError(f"The {record['architecture']} guardrail in {str(path)!r} needs its SAE copy in {SAE_DIR}/.")
        else:  # a self-contained ReLU/JumpReLU guardrail: the saved slices are an SAE over the selected latents
            encoder = _sliced_encoder(record, t, "W_enc_selected", "W_dec_selected", "b_enc_selected",
                                      "threshold_selected")  # fmt: skip
            latents = SelectedLatents(encoder, features, t["W_dec_selected"], t["b_dec"])
        detector = _load_detector(t, record, sae, meta["detector"].get("floor")) if "detector" in meta else None
        stats = {k.removeprefix("stats."): v for k, v in t.items() if k.startswith("stats.")}
        fillers = t.get(FILLERS_TENSOR) if "hold_fillers" in meta else None
        invisible = t.get(INVISIBLE_TENSOR) if "hold_invisible" in meta else None
        breaks = t.get(BREAKS_TENSOR) if "hold_breaks" in meta else None
        check_hold_tables(fillers, invisible, breaks, meta.get("hold"), where)
        skip = ("format", "format_version", "dsg_version", "name", HASH_FIELD, "detector", *RULE_FIELDS)
        info = {k: v for k, v in meta.items() if k not in skip}
        keys = ("sha256", "architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "hook_name")
        guard = cls.__new__(cls)
        guard._setup(
            latents,
            {k: record.get(k) for k in keys},
            sae,
            meta["hook"],
            features,
            meta["threshold"],
            meta["clamp"],
            meta.get("clamp_mode", "all"),
            meta.get("gated", True),
            meta.get("name"),
            info,
            stats,
            meta.get("window"),
            detector,
            meta.get("hold"),
            meta.get("latch"),
            meta.get("prompt_level"),
            fillers,
            invisible,
            breaks,
            meta.get("latch_run"),
        )
        guard.content_sha256 = meta[HASH_FIELD]  # verified above
        return guard
