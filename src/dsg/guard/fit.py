"""Fitting a guardrail: statistics on forget and retain text, latent selection, gate calibration.

    guard = dsg.fit(model, tokenizer, sae, forget_texts, retain_texts, config=dsg.FitConfig(n_features=20))

Forward passes only, each stopped at the hooked layer. The threshold is the `gate_percentile` of rho over the
calibration texts (default: the retain texts), so by construction about (100 - gate_percentile)% of inputs like
the calibration texts are gated. Calibrate on text shaped like the traffic the model will see: if it serves chat
prompts, pass chat-formatted benign prompts as `calibration`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..config import check_choice, check_types
from ..errors import DSGError
from ..files import is_text
from ..lm.fingerprint import model_fingerprint
from ..lm.hooks import check_width, decoder_layers, resolve
from ..lm.models import check_sequences_fit, context_length
from ..lm.text import (
    corpus_sha256,
    filler_token_ids,
    invisible_token_ids,
    line_break_token_ids,
    pad_id_of,
    real_token_mask,
    spacing_token_ids,
    special_token_ids,
    subsample,
    tokenize,
)
from . import rule
from .detector import SCALE as DETECTOR_SCALE
from .detector import fit_weights, holdout_split, window_features
from .guardrail import Guardrail
from .integrity import MAX_CLAMP, MAX_WINDOW, check_name
from .rule import CLAMP_MODES
from .scorers import SCORERS, scores
from .stats import LatentSums, collect_stats, gate_rates


@dataclass
class FitConfig:
    """How to fit a guardrail. Defaults are the paper's (N=20, p_ratio=95, p_dyn=95, c=500)."""

    hook: str | None = None
    """Hook point, e.g. blocks.3.hook_resid_post; defaults to the hook named in the SAE's config (a point other
    than that one is refused)."""
    n_features: int = 20
    """Number of SAE latents to select (N)."""
    scorer: str = "ratio"
    """Latent scorer: ratio (paper: mean activation squared, forget over retain), fisher (E[f^2] ratio), or
    frequency (SAEBench static clamp: forget firing frequency after a retain cut-off)."""
    ratio_percentile: float = 95.0
    """Keep latents whose forget/retain score ratio is at or above this percentile over all latents (p_ratio)."""
    min_forget_percentile: float = 5.0
    """Keep latents whose forget score is at or above this percentile over all latents."""
    retain_cutoff: float = 0.01
    """frequency scorer only: drop latents that fire on at least this fraction of retain tokens."""
    gate_percentile: float = 95.0
    """Gate threshold = this percentile of rho over the calibration texts (p_dyn)."""
    gated: bool = True
    """Gate per input (dynamic); --no-gated clamps every input (static)."""
    gate_window: int | None = None
    """Prefix-causal gate: open (and latch) at the first token where more than the threshold's share of the last
    GATE_WINDOW real tokens is flagged, calibrated on the largest such share per calibration text; benign padding
    cannot dilute it. Default: the paper's whole-input share."""
    gate_hold: int | None = None
    """Windowed gate only: inside a prompt, stay open GATE_HOLD tokens (counted as gate_hold_words says) after each
    window over the threshold instead of latching to the prompt's end, so that a benign document the gate
    misjudges once is clamped near that stretch, not from there on; an answer is guarded to its end when the gate
    is open at the prompt's last token or opens during the answer. Default: latch."""
    gate_hold_words: bool = True
    """Held gate only: judge the gate at tokens that carry a letter or digit and count the hold in them
    (lm.text.filler_token_ids, stored with the guardrail), so that padding carrying no word (spaces, newlines,
    punctuation, zero-width characters, emoji) after a question can neither run the hold out nor open it; the levels
    are calibrated on windows ending at words. --no-gate-hold-words judges and counts every real token."""
    gate_skip_invisible: bool = True
    """Held gate judged at words only: its windows pass over the tokens that show nothing
    (lm.text.invisible_token_ids: zero-width spaces and joiners, direction marks, byte-order marks, soft hyphens,
    and the byte pieces of such characters), so that invisible characters typed between the words of a request
    cannot thin out its windows; text without them is read as before. --no-gate-skip-invisible keeps them in the
    windows."""
    gate_skip_spacing: bool = True
    """Held gate judged at words only: its windows also pass over the tokens that show only spacing within a line
    (lm.text.spacing_token_ids: runs of spaces and tabs, no-break and other Unicode spaces; not "\n" or "\r"), so
    that two spaces or a tab typed between the words of a request cannot thin out its windows (the Unicode spaces
    a vocabulary splits into bytes need gate_skip_invisible too: their pieces are in that table).
    --no-gate-skip-spacing keeps them in the windows."""
    gate_skip_short_lines: bool = True
    """Held gate judged at words only: its windows also pass over a line break (lm.text.line_break_token_ids) that
    ends a line of at most three word tokens showing nothing else but gaps (guard.rule.SHORT_LINE), so that a request
    typed one or two words to a line cannot thin out its windows; the breaks of prose, code, manual pages and the
    chat template's turns (whose lines hold punctuation, special tokens or more words) stay in them.
    --no-gate-skip-short-lines keeps every line break in the windows."""
    gate_latch_percentile: float | None = None
    """Held gate only (needs gate_hold): a second level, this percentile of the same calibration statistic (100:
    the largest), above the threshold; a prompt in which any window goes over it gets a guarded answer however
    much benign text follows (a forget question with padding after it), while the prompt itself stays held open
    near its stretches only. Default: only the gate at the prompt's last token guards the answer."""
    gate_latch_margin: float = 0.0
    """Latch level only: raise it above that percentile's value by this many times the gap between the threshold
    and that value (level = P + margin * (P - threshold)), as gate_prompt_margin raises the prompt level. The largest
    value over a few hundred calibration sequences is a noisy extreme, and which sequences are drawn for the
    calibration moves it: a long benign input whose peak window lands between two such draws latches the answer
    under one and not the other. Default 0: the percentile's value."""
    gate_latch_run_percentile: float | None = None
    """Held gate only (needs gate_hold): a prompt in which more judged windows in a row went over the threshold than
    this percentile of the same count on the calibration sequences (the longest such run in each; 100: the longest
    of all) gets a guarded answer however much benign text follows, as a window over the latch level does. A forget
    question reads as a stretch of windows over the threshold; benign text that crosses it does so in short bursts.
    The run R is stored with the guardrail (`latch_run`: the shortest run longer than that percentile's value).
    Default: no run latch."""
    gate_prompt_percentile: float | None = None
    """Held gate only (needs gate_hold): a prompt's tokens are clamped only within GATE_HOLD counted tokens of a window
    over this percentile of the same calibration statistic, above the threshold (100: the largest, the latch level
    at gate_latch_percentile 100); the threshold still decides whether the answer is guarded. A benign document
    whose evidence goes over the threshold but not this level is read as it is, and a forget question whose
    evidence does so near the prompt's end still gets a guarded answer. Default: prompts are clamped near windows
    over the threshold."""
    gate_prompt_margin: float = 0.0
    """Prompt level only: raise it above that percentile's value by this many times the gap between the threshold
    and that value (level = P + margin * (P - threshold)). The largest value over a few hundred calibration
    sequences is a noisy extreme: long benign documents go over it more often than the calibration texts did, and
    each one so clamped loses nats on every later token. Default 0: the percentile's value."""
    detector: bool = False
    """Detector gate (needs gate_window): instead of counting tokens where any selected latent fires, the window
    sums a sparse linear score over all SAE latents, fitted by L1 logistic regression on windows of forget text
    against retain and calibration text (positive weights mark the forget domain, negative ones retain text)."""
    detector_floor: bool = False
    """Detector only: no token's evidence goes below zero, so the benign words around a forget-domain term cannot
    cancel it (a latent with a negative weight still offsets forget latents firing on the same token). More short
    questions asked in plain words open the gate, and more long benign text does too. Default: signed evidence."""
    detector_context: int = 0
    """Detector only: also fit on a fifth of the forget and retain sequences read after benign context (CONTEXT/8,
    /4, /2 or CONTEXT tokens of the fitted retain and calibration sequences; all drawn with the seed), their windows
    taken from their own tokens only. A forget question deep in a long input fires latents a little differently
    from one read alone, and a detector that has seen both keeps its recall behind benign padding. Default 0:
    sequences alone."""
    detector_c: float = 0.3
    """Detector only: inverse L1 strength of the logistic regression (smaller: fewer latents)."""
    detector_holdout: float = 0.25
    """Detector only: share of the distinct retain and calibration sequences (drawn with the seed) kept out of the
    detector's fit; its threshold is calibrated on them alone. A threshold read from the texts the weights were
    fitted on sits too low: the weights have learnt those texts, not retain text in general. Copies (the same text
    in both corpora, a question and its chat-wrapped form) are drawn together (detector.holdout_split)."""
    clamp: float = 500.0
    """Clamp strength c: flagged latents are set to -c."""
    clamp_relative_to_norm: bool = False
    """Read clamp as a multiple of the mean residual-stream norm at the hook (on retain text), so it transfers
    across models."""
    clamp_mode: str = "all"
    """all: at a flagged token set every selected latent to -c (paper); active: only the ones that fire (SAEBench)."""
    max_length: int = 256
    """Tokens per sequence; longer documents are split into windows of this size."""
    max_sequences: int = 1024
    """At most this many sequences per corpus, drawn with the seed."""
    batch_size: int = 8
    """Sequences per forward pass."""
    seed: int = 0
    """Seed for subsampling the corpora."""

    def __post_init__(self):
        check_types(self)
        check_choice("scorer", self.scorer, SCORERS.names())
        check_choice("clamp_mode", self.clamp_mode, CLAMP_MODES)
        if not self.retain_cutoff > 0:  # a share of retain tokens; 1 or more cuts no latent
            raise DSGError(f"retain_cutoff is a positive share of retain tokens, got {self.retain_cutoff}.")
        if self.n_features < 1:
            raise DSGError(f"n_features must be at least 1, got {self.n_features}.")
        for name in ("ratio_percentile", "min_forget_percentile", "gate_percentile"):
            if not 0 <= getattr(self, name) <= 100:
                raise DSGError(f"{name} must lie in [0, 100], got {getattr(self, name)}.")
        if self.clamp <= 0 or (not self.clamp_relative_to_norm and self.clamp > MAX_CLAMP):
            raise DSGError(f"clamp must be a positive number up to {MAX_CLAMP:g} (latents are set to -clamp), "
                           f"got {self.clamp}.")  # fmt: skip
        if self.max_length < 2 or self.max_sequences < 1 or self.batch_size < 1:
            raise DSGError("max_length must be >= 2 and max_sequences, batch_size >= 1.")
        if self.gate_window is not None and not 1 <= self.gate_window <= MAX_WINDOW:
            raise DSGError(f"gate_window must be between 1 and {MAX_WINDOW} tokens, got {self.gate_window}.")
        if self.detector and self.gate_window is None:
            raise DSGError("The detector gate reads windows of tokens: set gate_window (--gate-window) as well.")
        if self.gate_hold is not None and (self.gate_window is None or not 1 <= self.gate_hold <= MAX_WINDOW):
            raise DSGError(f"gate_hold must be a positive number of tokens up to {MAX_WINDOW} and needs gate_window "
                           f"(--gate-window), got {self.gate_hold}.")  # fmt: skip
        latch = self.gate_latch_percentile
        if latch is not None and (self.gate_hold is None or not self.gate_percentile < latch <= 100):
            raise DSGError(f"gate_latch_percentile needs gate_hold (--gate-hold) and must lie above gate_percentile "
                           f"({self.gate_percentile:g}) and at most 100, got {latch}.")  # fmt: skip
        if self.gate_latch_margin < 0 or (self.gate_latch_margin and latch is None):
            raise DSGError(f"gate_latch_margin is a non-negative multiple of the gap between the threshold and the "
                           f"latch percentile's value and needs gate_latch_percentile (--gate-latch-percentile), "
                           f"got {self.gate_latch_margin}.")  # fmt: skip
        run = self.gate_latch_run_percentile
        if run is not None and (self.gate_hold is None or not 0 < run <= 100):
            raise DSGError(f"gate_latch_run_percentile needs gate_hold (--gate-hold) and must lie in (0, 100], got "
                           f"{run}.")  # fmt: skip
        level = self.gate_prompt_percentile
        if level is not None and (self.gate_hold is None or not self.gate_percentile < level <= 100):
            raise DSGError(f"gate_prompt_percentile needs gate_hold (--gate-hold) and must lie above gate_percentile "
                           f"({self.gate_percentile:g}) and at most 100, got {level}.")  # fmt: skip
        if self.gate_prompt_margin < 0 or (self.gate_prompt_margin and level is None):
            raise DSGError(f"gate_prompt_margin is a non-negative multiple of the gap between the threshold and "
                           f"the prompt percentile's value and needs gate_prompt_percentile "
                           f"(--gate-prompt-percentile), got {self.gate_prompt_margin}.")  # fmt: skip
        if self.detector_context and (not self.detector or not 0 <= self.detector_context <= MAX_WINDOW):
            raise DSGError(f"detector_context is a number of tokens up to {MAX_WINDOW} and needs the detector gate "
                           f"(--detector), got {self.detector_context}.")  # fmt: skip
        if self.detector_c <= 0:
            raise DSGError(f"detector_c must be positive, got {self.detector_c}.")
        if not 0 < self.detector_holdout < 1:
            raise DSGError(f"detector_holdout must lie strictly between 0 and 1, got {self.detector_holdout}.")


class CorpusStats(NamedTuple):
    """Latent statistics of the forget and retain corpora, reusable across selection settings."""

    forget: LatentSums
    retain: LatentSums
    forget_sequences: list[list[int]]
    retain_sequences: list[list[int]]
    windows: WindowMemo | None = None
    """Detector window features already computed from these sequences (filled by `fit`, so that fits sharing
    the statistics and the window do not repeat the forward passes); None: not kept."""
    forget_fires: list | None = None
    """Per forget sequence, where the latents fire (detector.Fires), kept by `measure` for a detector config:
    8 bytes per (token, firing latent), e.g. 16 MB for the demo's 512 sequences of 128 tokens at L0 = 32."""
    retain_fires: list | None = None
    """The same per retain sequence."""
    measured: dict | None = None
    """What the statistics were measured on (`_measured`): `fit(stats=...)` refuses them for other corpora or data
    settings; None: not recorded."""


def _measured(hook: str, config: FitConfig, forget, retain) -> dict:
    """The data settings and corpora a CorpusStats depends on (batch_size only moves float rounding)."""
    settings = {"hook": hook, "max_length": config.max_length, "max_sequences": config.max_sequences}
    return settings | {
        "seed": config.seed,
        "forget_sha256": corpus_sha256(forget),
        "retain_sha256": corpus_sha256(retain),
    }


class WindowMemo:
    """Detector window features by (hook, SAE, which sequences, window, batching), with what each took to
    compute, and the entries the fits since the last `take` read (a sweep charges each fit the full cost of what
    it used). It lives as long as its statistics (one entry per window size and negative set a sweep tries);
    fits sharing it from several threads are serialised while they compute or read an entry, and should not use
    `take`."""

    def __init__(self):
        self.features: dict[tuple, object] = {}
        self.seconds: dict[tuple, float] = {}
        self._used: list[tuple] = []
        self._computed = 0.0
        self._lock = threading.Lock()

    def get(self, key: tuple, compute):
        with self._lock:
            if key not in self.features:
                t = time.perf_counter()
                self.features[key] = compute()
                self.seconds[key] = time.perf_counter() - t
                self._computed += self.seconds[key]
            self._used.append(key)
            return self.features[key]

    def take(self) -> tuple[float, float]:
        """(seconds the entries read since the last take cost to compute, seconds spent computing since then)."""
        out = (sum(self.seconds[k] for k in self._used), self._computed)
        self._used, self._computed = [], 0.0
        return out


def _sequences(tokenizer, texts: Sequence[str], config: FitConfig, salt: int) -> list[list[int]]:
    return subsample(tokenize(tokenizer, texts, config.max_length), config.max_sequences, config.seed + salt)


def _checked_texts(label: str, texts) -> None:
    """A corpus is a list of strings (a single string would be read as one document per character)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise DSGError(f"The {label} corpus must be a list of texts, got {type(texts).__name__}.")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DSGError(f"The {label} corpus must hold strings; item {bad} is a {type(texts[bad]).__name__}.")
    if not any(t.strip() for t in texts):
        raise DSGError(f"The {label} corpus is empty.")
    bad = next((i for i, t in enumerate(texts) if not is_text(t)), None)
    if bad is not None:
        raise DSGError(f"The {label} corpus's item {bad} holds an unpaired surrogate (bytes that are not UTF-8, or "
                       "half of an escaped pair): it is not text a tokenizer can read.")  # fmt: skip


def _checked_hook(model, sae, config: FitConfig):
    hook = config.hook or sae.hook_name
    if not hook:
        raise DSGError("No hook point: the SAE's config names none, so set FitConfig.hook (--hook).")
    point = resolve(model, hook)
    check_width(model, point, sae.d_in)
    if config.hook and sae.hook_name and config.hook != sae.hook_name:
        # an SAE read at another layer than it was trained on encodes nothing it learnt: refuse, unless the two
        # names are one point (a layer's output is the next layer's input), or the SAE's own name is not one
        # this model knows (an SAE from another library's naming, mapped by the user)
        try:
            trained = resolve(model, sae.hook_name)
        except DSGError:
            trained = None
        if trained is not None and _position(model, trained) != _position(model, point):
            raise DSGError(f"The SAE was trained at {sae.hook_name!r}; hook {config.hook!r} (--hook) reads another "
                           f"point of the model, where its latents mean nothing. Leave --hook out to use the "
                           f"SAE's.")  # fmt: skip
    return hook, point


def _position(model, point):
    """Where a hook point reads the model: its place in the residual stream (a decoder layer's module path, such
    as 'model.layers.3' or sparsify's 'layers.3', included), or another module's input or output."""
    if point.layer is not None:
        return ("resid", point.layers_before)
    try:
        layers = decoder_layers(model)[1]
    except DSGError:  # a model whose decoder layers dsg cannot find: module names are compared as modules
        layers = []
    index = next((i for i, m in enumerate(layers) if m is point.module), None)
    if index is not None:
        return ("resid", index + (point.kind == "output"))
    return (id(point.module), point.kind)


def measure(
    model: torch.nn.Module,
    tokenizer,
    sae,
    forget: Sequence[str],
    retain: Sequence[str],
    config: FitConfig | None = None,
    *,
    progress: bool = True,
) -> CorpusStats:
    """Latent statistics of both corpora (the expensive part of `fit`); pass the result to `fit(stats=...)` to try
    several selection settings without recomputing it. Depends on config.hook, max_length, max_sequences,
    batch_size and seed only."""
    config = config or FitConfig()
    hook, _ = _checked_hook(model, sae, config)
    for label, texts in (("forget", forget), ("retain", retain)):
        _checked_texts(label, texts)
    if set(_spacing_aside(forget)) <= set(_spacing_aside(retain)):
        raise DSGError("Every forget text is also in the retain corpus (the same texts, repeated or as a subset); "
                       "nothing could tell the domain apart.")  # fmt: skip
    forget_seqs, retain_seqs = _sequences(tokenizer, forget, config, 1), _sequences(tokenizer, retain, config, 2)
    if not forget_seqs or not retain_seqs:
        raise DSGError("The forget and retain corpora must each hold at least one text of two or more tokens.")
    check_sequences_fit(model, forget_seqs + retain_seqs, config.max_length)
    sae = sae.to(next(model.parameters()).device)
    kw = dict(batch_size=config.batch_size, pad_id=pad_id_of(tokenizer, model), progress=progress)
    # a detector reads where latents fire in these same sequences: keep it from this pass
    forget_fires, retain_fires = ([], []) if config.detector and config.gated else (None, None)
    sums = {}
    for label, seqs, fires in (("forget", forget_seqs, forget_fires), ("retain", retain_seqs, retain_fires)):
        sums[label] = collect_stats(model, sae, hook, seqs, desc=f"{label} statistics", fires=fires, **kw)
        if float(sums[label].n_tokens) == 0:
            raise DSGError(f"The {label} corpus holds no real token (only special tokens such as BOS, EOS or PAD, "
                           "or one token a text): there is nothing to measure.")  # fmt: skip
    return CorpusStats(
        sums["forget"],
        sums["retain"],
        forget_seqs,
        retain_seqs,
        WindowMemo(),
        forget_fires,
        retain_fires,
        _measured(hook, config, forget, retain),
    )


def fit(
    model: torch.nn.Module,
    tokenizer,
    sae,
    forget: Sequence[str],
    retain: Sequence[str],
    calibration: Sequence[str] | None = None,
    config: FitConfig | None = None,
    *,
    name: str | None = None,
    progress: bool = True,
    stats: CorpusStats | None = None,
) -> Guardrail:
    """Fit a Dynamic SAE Guardrail for the domain of `forget` against `retain`.

    `stats` (from `measure` with the same corpora and data settings) skips the statistics pass.
    """
    config = config or FitConfig()
    config.__post_init__()  # a config changed after it was built is checked again
    check_name(name, "fit")  # before the passes, not when the result is saved
    hook, point = _checked_hook(model, sae, config)
    if config.n_features > sae.d_sae:  # measure() does not select, so only fit() checks this
        raise DSGError(f"n_features={config.n_features} exceeds the SAE's {sae.d_sae} latents.")
    calib_seqs = _calibration_sequences(model, tokenizer, calibration, forget, config)  # before the statistics pass
    if stats is not None:
        _check_measured_alike(stats, _measured(hook, config, forget, retain))
    stats = stats or measure(model, tokenizer, sae, forget, retain, config, progress=progress)
    f_sums, r_sums = stats.forget, stats.retain
    retain_seqs = stats.retain_sequences
    kw = dict(batch_size=config.batch_size, pad_id=pad_id_of(tokenizer, model), progress=progress)

    features = SCORERS[config.scorer].select(f_sums, r_sums, config)
    if not features:
        raise DSGError(
            "No latent passed the selection filters (a selected latent must fire on the forget corpus, and none "
            "that passed the scorer's cuts does); lower ratio_percentile / min_forget_percentile, raise "
            "retain_cutoff, use more forget text, or check that the SAE's latents fire at this hook."
        )
    silent = [j for j in features if not bool(sae.W_dec[j].any())]
    if silent:
        raise DSGError(
            f"The selected latents {', '.join(map(str, silent[:8]))} have all-zero decoder rows in the "
            "SAE: clamping them would change nothing. Check the SAE's W_dec (a pruned or damaged file)."
        )
    clamp = config.clamp * r_sums.mean_norm if config.clamp_relative_to_norm else config.clamp

    calib_seqs = retain_seqs if calib_seqs is None else calib_seqs
    detector, detector_info = None, None
    if config.detector and config.gated:
        detector, detector_info, calib_seqs = _fit_detector(model, sae, hook, stats, calib_seqs, config, kw)
    floor = 0 if detector is not None and config.detector_floor else None
    fillers, invisible, breaks = _word_tables(tokenizer, config)
    guard = Guardrail(sae, hook, features, 0.0, clamp, config.clamp_mode, config.gated, window=config.gate_window,
                      hold=config.gate_hold, detector=detector, detector_floor=floor, hold_fillers=fillers,
                      hold_invisible=invisible, hold_breaks=breaks, name=name)  # fmt: skip
    guard.check_dtype(next(model.parameters()).dtype)  # before the calibration pass, not when first applied
    rho, real_tokens, (threshold, latch, prompt_level), runs = _calibrate(model, guard, calib_seqs, config, kw)
    latch_run = _latch_run(runs, config) if runs is not None else None

    tensors = {**f_sums.summary("forget"), **r_sums.summary("retain"), **scores(f_sums, r_sums, config.scorer)}
    tensors["calibration_rho"] = rho
    if runs is not None:
        tensors["calibration_runs"] = runs.float()
    info = {
        "config": dataclasses.asdict(config) | {"hook": hook},
        "seed": config.seed,
        "model": model_fingerprint(model, point),
        "sae": {"sha256": sae.sha256()},
        "data": _data_record(forget, retain, calibration, stats, calib_seqs, detector is not None, real_tokens),
        "residual_norm": r_sums.mean_norm,
        **({"detector_fit": detector_info} if detector_info else {}),
    }
    return Guardrail(sae, hook, features, threshold, clamp, config.clamp_mode, config.gated, window=config.gate_window,
                     hold=config.gate_hold, latch=latch, latch_run=latch_run, prompt_level=prompt_level,
                     detector=detector,
                     detector_floor=floor, hold_fillers=fillers, hold_invisible=invisible, hold_breaks=breaks,
                     name=name, info=info, tensors=tensors)  # fmt: skip


def _calibration_sequences(model, tokenizer, calibration: Sequence[str] | None, forget: Sequence[str],
                           config: FitConfig) -> list | None:  # fmt: skip
    """The calibration texts as sequences, checked (text, benign, within the model's context); None without any."""
    if calibration is None:
        return None
    _checked_texts("calibration", calibration)
    _check_calibration_benign(calibration, forget)
    seqs = _sequences(tokenizer, calibration, config, 3)
    check_sequences_fit(model, seqs, config.max_length)
    return seqs


def _check_measured_alike(stats: CorpusStats, now: dict) -> None:
    """Refuse statistics (fit's stats=) measured on other corpora or data settings than `now` records."""
    if stats.measured is None:
        return
    differ = [k for k in now if now[k] != stats.measured.get(k)]
    if differ:
        what = ", ".join(k.replace("_sha256", " corpus") for k in differ)
        raise DSGError(f"The statistics passed to fit (stats=) were measured with another {what} than this fit "
                       "uses; measure them again with these corpora and settings.")  # fmt: skip


def _word_tables(tokenizer, config: FitConfig) -> tuple[list[int] | None, list[int] | None, list[int] | None]:
    """The id tables of a held gate judged at words (Guardrail.hold_fillers, hold_invisible, hold_breaks), as
    `config` asks; None for each it does not use."""
    if not (config.gated and config.gate_hold is not None and config.gate_hold_words):
        return None, None, None
    breaks = (line_break_token_ids(tokenizer) or None) if config.gate_skip_short_lines else None
    return filler_token_ids(tokenizer), _passed_over(tokenizer, config), breaks


def _passed_over(tokenizer, config: FitConfig) -> list[int] | None:
    """The ids a held gate judged at words has its windows pass over (Guardrail.hold_invisible): the invisible
    tokens and the spacing ones, as `config` asks; None for neither."""
    ids = invisible_token_ids(tokenizer) if config.gate_skip_invisible else []
    ids += spacing_token_ids(tokenizer) if config.gate_skip_spacing else []
    return sorted(ids) if config.gate_skip_invisible or config.gate_skip_spacing else None


def _spacing_aside(texts: Sequence[str]) -> list[str]:
    """The texts with runs of whitespace made one space, to tell one text given twice apart from two texts."""
    return [" ".join(t.split()) for t in texts]


def _check_calibration_benign(calibration: Sequence[str], forget: Sequence[str]) -> None:
    """Calibration is benign traffic: the gate's levels are read from it, so a forget text there (the forget corpus
    passed again, or part of it) lifts them to where forget text itself no longer opens the gate."""
    seen = set(_spacing_aside(forget))
    shared = [i for i, t in enumerate(_spacing_aside(calibration)) if t in seen]
    if shared:
        raise DSGError(f"{len(shared)} of {len(calibration)} calibration texts are also forget texts (the first: "
                       f"calibration text {shared[0]}). Calibration must be benign traffic: the gate's threshold is "
                       "read from it, and forget text there lifts it above what forget text reaches.")  # fmt: skip


def _calibrate(model, guard: Guardrail, calib_seqs, config: FitConfig, kw):
    """(the gate's statistic on each calibration text it judges any token of, the real tokens those texts hold,
    the (threshold, latch, prompt level) read from the statistic, and with gate_latch_run_percentile the longest run
    of judged windows over the threshold in each of those texts, else None) for `guard`, whose levels are still
    unset."""
    scores = [] if config.gate_latch_run_percentile is not None and config.gated else None
    rho = gate_rates(model, guard, calib_seqs, desc="gate calibration", windows=scores, **kw)
    real, judged = _token_counts(model, calib_seqs, guard)
    rho = rho[judged > 0]  # a text with nothing to judge would read as a benign 0
    highest = guard.detector.reach(guard.window)[1] if guard.detector is not None and guard.window else 1.0
    levels = _gate_levels(rho, config, guard.detector is not None, highest)
    if scores is None:
        return rho, int(real.sum()), levels, None
    runs = rule.longest_runs([s for s, n in zip(scores, judged.tolist()) if n > 0], levels[0])
    return rho, int(real.sum()), levels, runs


def _latch_run(runs: torch.Tensor, config: FitConfig) -> int:
    """R for the run latch: the shortest run of judged windows longer than gate_latch_run_percentile of the
    calibration sequences' longest runs, or a DSGError where that would latch at any window over the threshold."""
    value = float(np.percentile(runs.double().numpy(), config.gate_latch_run_percentile))
    latch_run = int(np.floor(value)) + 1
    if latch_run < 2:
        raise DSGError(f"The run latch (the shortest run longer than the {config.gate_latch_run_percentile:g}th "
                       f"percentile of the longest run of windows over the threshold in each of the {len(runs)} "
                       f"calibration sequences, {value:g}) would be {latch_run}: any window over the threshold would "
                       "guard the answer, as a latched gate does. Raise gate_latch_run_percentile, or lower "
                       "gate_percentile so that more calibration windows go over the threshold.")  # fmt: skip
    return min(latch_run, MAX_WINDOW)


def _token_counts(model, sequences, guard: Guardrail) -> tuple[torch.Tensor, torch.Tensor]:
    """(real tokens, tokens the gate judges) per sequence, long [n] each: lm.text.real_token_mask, and of those
    the ones Guardrail.counted keeps (a held gate counted in words judges only words); a DSGError when no sequence
    holds a token the gate judges."""
    specials = special_token_ids(model)
    real_n, judged_n = [], []
    for seq in sequences:
        ids = torch.tensor([seq])
        real = real_token_mask(ids, None, specials)
        real_n.append(int(real.sum()))
        judged_n.append(int(rule.judged_tokens(real, guard.counted(real, ids)).sum()))
    real, judged = torch.tensor(real_n, dtype=torch.long), torch.tensor(judged_n, dtype=torch.long)
    if not judged.any():
        what = "token that carries a word" if real.any() else "real token"
        raise DSGError(f"The calibration texts hold no {what} (only special tokens such as BOS, EOS or PAD, or "
                       "one token a text, or only whitespace and punctuation to a gate judged at words): the gate "
                       "has nothing to be calibrated on.")  # fmt: skip
    return real, judged


def raised_level(level: float, threshold: float, margin: float) -> float:
    """`level` raised `margin` gaps between `threshold` and it (FitConfig.gate_latch_margin, gate_prompt_margin)."""
    return level + margin * max(level - threshold, 0.0)


def _gate_levels(rho: torch.Tensor, config: FitConfig, has_detector: bool, highest: float = 1.0):
    """The gate's threshold, latch level and prompt level: percentiles of the calibration statistic `rho` (one value
    per calibration sequence), or a DSGError where a level could never be exceeded (`highest`: the largest value
    the statistic can take, 1 for a share of flagged tokens) or does not lie above the threshold."""
    values = rho.double().numpy()
    held = " (the detector's hold-out of the distinct retain and calibration ones)" if has_detector else ""
    threshold = float(np.percentile(values, config.gate_percentile))
    unit = DETECTOR_SCALE if has_detector else 1  # shown per weight unit, as dsg inspect shows a detector's levels
    shown = threshold / unit
    if config.gated and threshold >= highest:
        statistic, why = ("the detector's mean window evidence", "the largest its weights can give") if has_detector \
            else ("rho", "the selected latents fire on every token of them")  # fmt: skip
        raise DSGError(
            f"The gate could never open: the {config.gate_percentile:g}th percentile of {statistic} over the "
            f"{len(values)} calibration sequences{held} is {shown:.4g} ({why}), and an input is gated only when it "
            "exceeds it. Calibrate on text unlike the forget corpus (the retain corpus must not be the forget "
            "corpus), use more forget and retain text, or lower gate_percentile."
        )
    levels = []
    for what, name, percentile, margin, never in (
        ("latch level", "gate_latch_percentile", config.gate_latch_percentile, config.gate_latch_margin,
         "the answer would never latch"),
        ("prompt level", "gate_prompt_percentile", config.gate_prompt_percentile, config.gate_prompt_margin,
         "no prompt token would be clamped"),
    ):  # fmt: skip
        level = None
        if config.gated and percentile is not None:
            level = raised_level(float(np.percentile(values, percentile)), threshold, margin)
            if level <= threshold:
                raise DSGError(
                    f"The {what} (the {percentile:g}th percentile of the calibration statistic, "
                    f"{level / unit:.4g}) does not lie above the gate threshold ({shown:.4g}): the {len(values)} "
                    "calibration sequences"
                    f"{held} are too few or too alike to tell the two apart. Raise {name}, lower gate_percentile, or "
                    "calibrate on more distinct text."
                )
            if level >= highest:
                statistic = "mean detector evidence" if has_detector else "share of flagged tokens"
                raise DSGError(
                    f"The {what} (from the {percentile:g}th percentile of the calibration statistic) is "
                    f"{level / unit:.4g}: no window's {statistic} can exceed it (at most {highest / unit:.4g}), so "
                    f"{never}. Lower {name} (or its margin), or calibrate on text unlike the forget corpus."
                )
        levels.append(level)
    return threshold, *levels


def _data_record(forget, retain, calibration, stats: CorpusStats, calib_seqs, held: bool, calib_tokens: int) -> dict:
    """What the guardrail was fitted and calibrated on: counts of real tokens (as the statistics count them: no
    special token, no first position) and corpus hashes (`held`: the threshold was calibrated on the detector's
    hold-out of the retain and calibration sequences)."""
    return {
        "forget": {
            "documents": len(forget),
            "sequences": len(stats.forget_sequences),
            "tokens": int(stats.forget.n_tokens),
            "sha256": corpus_sha256(forget),
        },
        "retain": {
            "documents": len(retain),
            "sequences": len(stats.retain_sequences),
            "tokens": int(stats.retain.n_tokens),
            "sha256": corpus_sha256(retain),
        },
        "calibration": {
            "source": ("retain" if calibration is None else "calibration") + (" (detector hold-out)" if held else ""),
            "sequences": len(calib_seqs),
            "tokens": calib_tokens,
            "positions": sum(len(s) for s in calib_seqs),  # every position a calibration forward reads
            "sha256": corpus_sha256(retain if calibration is None else calibration),
        },
    }


def _fit_detector(model, sae, hook, stats: CorpusStats, calib_seqs, config: FitConfig, kw):
    """The detector's {latent: integer weight}, a record of what it was fitted on, and the sequences its threshold
    is calibrated on. Windows of the forget sequences are fitted against windows of most of the retain and
    calibration sequences (guard/detector.py); the rest, drawn with the seed, are held out for the threshold."""
    w = config.gate_window
    negatives = list(stats.retain_sequences)
    known = list(stats.retain_fires or [None] * len(negatives))  # firing kept by the statistics pass
    if calib_seqs is not stats.retain_sequences:  # no separate calibration corpus: the retain one stands in
        negatives += calib_seqs
        known += [None] * len(calib_seqs)
    held_idx, fit_idx = holdout_split(negatives, config.detector_holdout, config.seed + 4)
    held = [negatives[i] for i in held_idx]
    fitted, fitted_known = [negatives[i] for i in fit_idx], [known[i] for i in fit_idx]
    sae_sha = sae.sha256() if stats.windows is not None else None
    positive = _windows(stats, sae_sha, model, sae, hook, stats.forget_sequences, w, "forget", kw, stats.forget_fires)
    negative = _windows(stats, sae_sha, model, sae, hook, fitted, w, "retain", kw, fitted_known)
    if config.detector_context:
        from scipy import sparse

        limit, rng = _context_limit(model, config), np.random.default_rng(config.seed + 5)

        def in_context(seqs, label):  # a fifth of `seqs`, after context drawn from the fitted negatives
            some = sorted(rng.permutation(len(seqs))[: -(-len(seqs) // CONTEXT_SHARE)].tolist())
            ctx, starts = _in_context([seqs[i] for i in some], fitted, config.detector_context, limit, rng)
            return _windows(stats, sae_sha, model, sae, hook, ctx, w, f"{label} in context", kw, starts=starts)

        positive = sparse.vstack([positive, in_context(stats.forget_sequences, "forget")]).tocsr()
        negative = sparse.vstack([negative, in_context(fitted, "retain")]).tocsr()
    weights = fit_weights(positive, negative, config.detector_c, config.seed)
    info = {"c": config.detector_c, "positive_windows": positive.shape[0], "negative_windows": negative.shape[0],
            "latents": len(weights), "forget_latents": sum(q > 0 for q in weights.values()),
            "calibration_sequences": len(held), "fitted_sequences": len(fitted),
            "copies_dropped": len(negatives) - len(held) - len(fitted)}  # fmt: skip
    if config.detector_context:
        info["context"] = config.detector_context
    return weights, info, held


CONTEXT_SHARE = 5  # detector_context: one in this many forget and retain sequences is also read after context


def _context_limit(model, config: FitConfig) -> int:
    """The longest benign context a sequence can be read after: the model's positions less a sequence's."""
    n_positions = context_length(model)
    if n_positions is None:
        return config.detector_context
    return max(0, min(config.detector_context, n_positions - config.max_length))


def _in_context(seqs, pool, context: int, limit: int, rng) -> tuple[list[list[int]], list[int]]:
    """Each sequence after a benign context of context/8, /4, /2 or context tokens (at most `limit`), cut from
    sequences of `pool` joined in an order drawn from `rng`: (the joined sequences, where each own part starts)."""
    out, starts = [], []
    lengths = [max(1, context // d) for d in (8, 4, 2, 1)]
    for s in seqs:
        n = max(0, min(int(rng.choice(lengths)), limit))
        prefix: list[int] = []
        while len(prefix) < n:
            prefix += pool[int(rng.integers(len(pool)))]
        out.append(prefix[:n] + list(s))
        starts.append(n)
    return out, starts


def _ids_sha256(sequences: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(q) for q in sequences]).encode()).hexdigest()


def _windows(stats: CorpusStats, sae_sha: str | None, model, sae, hook, sequences, w: int, label: str, kw,
             known=None, starts=None):  # fmt: skip
    """Window features of `sequences`, from the statistics' memo when an earlier fit computed them: the key holds
    everything they depend on (hook, SAE, the sequences themselves, window, batching, where each one's windows
    start). `known`: the sequences' firing where the statistics pass kept it (no forward needed for those)."""

    def compute():
        return window_features(model, sae, hook, sequences, w, desc=f"detector: {label} windows", known=known,
                               starts=starts, **kw)  # fmt: skip

    if stats.windows is None:
        return compute()
    key = (hook, sae_sha, _ids_sha256(sequences), w, kw["batch_size"], kw["pad_id"], _ids_sha256([starts or []]))
    return stats.windows.get(key, compute)
