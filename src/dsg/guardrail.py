"""The guardrail: a per-input gate and a clamp on a few SAE latents, applied as a delta on the residual stream.

For an input x with real tokens t (see corpus.real_token_mask) and selected latents S:

    a_t   = 1 if any latent in S fires (f_j > 0) at token t
    rho   = mean of a_t over the real tokens of x
    gated = rho > threshold                          (always true for a static guardrail)

In a gated input, every token with a_t = 1 gets all latents in S set to -clamp (clamp_mode="all", the paper's
rule) or only its active ones (clamp_mode="active", the SAEBench/Farrell static clamp). Because the SAE decoder is
linear, keeping the SAE error term makes the edited residual

    x' = x + sum_{j in S} (f'_j - f_j) W_dec[j]

so only |S| encoder columns and decoder rows are ever touched (for TopK SAEs the full encode is needed to know
which latents are in the top k). Tokens that are not clamped are returned bit-for-bit.

Generation with a KV cache: the gate is per-sequence state that spans prefill and decoding.
  * Prefill: the prompt is judged as a whole, exactly as above.
  * Decoding: rho is updated with every generated real token (counts over prompt + generated tokens so far), and
    the gate latches: once on, it stays on for the rest of the sequence. A guarded prompt stays guarded; a benign
    prompt whose continuation drifts into the domain is guarded from the token where the running rho crosses the
    threshold. Each generated token is clamped iff it is flagged and the gate is on at that token.
`dsg.generation.reference_generate` recomputes the whole sequence without a cache under the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .corpus import real_token_mask, special_token_ids
from .errors import DSGError
from .files import atomic_directory, read_artifact_json, read_safetensors, write_json
from .hooks import HookPoint, check_width, hooked, model_inputs, resolve
from .identity import model_fingerprint
from .sae import SAE

CLAMP_MODES = ("all", "active")
FORMAT = "dsg-guardrail"
FORMAT_VERSION = 1
JSON_NAME = "guardrail.json"
TENSORS_NAME = "guardrail.safetensors"
SAE_DIR = "sae"


class SelectedLatents(torch.nn.Module):
    """The part of an SAE a guardrail needs: encoder and decoder for the selected latents only.

    ReLU and JumpReLU latents are encoded independently, so the encoder columns of S give exact activations.
    A TopK latent's activation depends on all the others, so for TopK the full SAE is kept and encoded.
    """

    def __init__(self, sae: SAE, features: Sequence[int]):
        super().__init__()
        idx = torch.tensor(list(features), dtype=torch.long)
        self.architecture = sae.architecture
        self.apply_b_dec_to_input = sae.apply_b_dec_to_input
        self.register_buffer("features", idx)
        self.register_buffer("b_dec", sae.b_dec.data.clone())
        self.register_buffer("W_dec", sae.W_dec.data[idx].clone())  # [S, D]
        if sae.encodes_latents_independently:
            self.register_buffer("W_enc", sae.W_enc.data[:, idx].clone())  # [D, S]
            self.register_buffer("b_enc", sae.b_enc.data[idx].clone())
            thr = sae.threshold.data[idx].clone() if sae.threshold is not None else None
            self.register_buffer("threshold", thr)
            self.sae = None
        else:
            self.sae = sae

    def encode(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Activations of the selected latents, f [B, T, S]."""
        if self.sae is not None:
            return self.sae.encode(x_BTD)[..., self.features]
        x = x_BTD.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        f = torch.relu(pre)
        return f * (pre > self.threshold) if self.threshold is not None else f

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"features": self.features, "W_dec_selected": self.W_dec, "b_dec": self.b_dec}
        if self.sae is None:
            out |= {"W_enc_selected": self.W_enc, "b_enc_selected": self.b_enc}
            if self.threshold is not None:
                out["threshold_selected"] = self.threshold
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], architecture: str, apply_b_dec_to_input: bool) -> "SelectedLatents":
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.architecture = architecture
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.sae = None
        self.register_buffer("features", t["features"].long())
        self.register_buffer("b_dec", t["b_dec"])
        self.register_buffer("W_dec", t["W_dec_selected"])
        self.register_buffer("W_enc", t["W_enc_selected"])
        self.register_buffer("b_enc", t["b_enc_selected"])
        self.register_buffer("threshold", t.get("threshold_selected"))
        return self


@dataclass
class GateState:
    """Per-sequence gate state carried from prefill through decoding."""

    flagged: torch.Tensor  # [B] flagged real tokens so far
    real: torch.Tensor  # [B] real tokens so far
    gated: torch.Tensor  # [B] bool, latched


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
        name: str | None = None,
        info: dict | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ):
        hook = hook or getattr(sae, "hook_name", None)
        if not hook:
            raise DSGError("The guardrail needs a hook point: pass hook=..., or use an SAE whose config names one.")
        features = [int(j) for j in features]
        if not features:
            raise DSGError("The guardrail needs at least one feature.")
        d_sae = sae.d_sae
        bad = [j for j in features if not 0 <= j < d_sae]
        if bad:
            raise DSGError(f"Feature ids {bad} are out of range for an SAE with d_sae={d_sae}.")
        if len(set(features)) != len(features):
            raise DSGError(f"Feature ids must be distinct, got {features}.")
        if clamp_mode not in CLAMP_MODES:
            raise DSGError(f"clamp_mode must be one of {CLAMP_MODES}, got {clamp_mode!r}.")
        self.sae = sae
        self.hook = hook
        self.features = features
        self.threshold = float(threshold)
        self.clamp = float(clamp)
        self.clamp_mode = clamp_mode
        self.gated = bool(gated)
        self.name = name
        self.info = dict(info or {})
        self.tensors = dict(tensors or {})
        self.sae_sha256 = self.info.get("sae", {}).get("sha256") or sae.sha256()
        self.latents = SelectedLatents(sae, features)

    def __repr__(self) -> str:
        gate = f"threshold={self.threshold:.4g}" if self.gated else "static"
        return (
            f"Guardrail(hook={self.hook!r}, features={self.features}, {gate}, clamp={self.clamp:g}, "
            f"clamp_mode={self.clamp_mode!r})"
        )

    # ---- the rule -------------------------------------------------------------------------------------------

    def flags(self, x_BTD: torch.Tensor, real_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [B, T, S], a [B, T]): selected activations and which real tokens have any of them firing."""
        f = self.latents.encode(x_BTD)
        return f, (f > 0).any(-1) & real_BT

    def rho(self, a_BT: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
        """Fraction of real tokens flagged, per sequence [B] (0 for a sequence with no real token)."""
        return a_BT.sum(1).float() / real_BT.sum(1).clamp(min=1).float()

    def gate(
        self, a_BT: torch.Tensor, real_BT: torch.Tensor, n_prompt: int, state: GateState | None
    ) -> tuple[torch.Tensor, GateState]:
        """Which tokens to clamp [B, T], given that the first `n_prompt` positions are (the rest of) a prompt.

        Prompt positions share one decision, rho(prompt) > threshold; later positions each extend the running
        counts and latch the gate.
        """
        B, T = a_BT.shape
        if state is None:
            zeros = torch.zeros(B, dtype=torch.long, device=a_BT.device)
            state = GateState(zeros, zeros.clone(), torch.zeros(B, dtype=torch.bool, device=a_BT.device))
        clamp_BT = torch.zeros_like(a_BT)
        flagged, real, gated = state.flagged, state.real, state.gated
        if n_prompt:
            a_p, r_p = a_BT[:, :n_prompt], real_BT[:, :n_prompt]
            flagged = flagged + a_p.sum(1)
            real = real + r_p.sum(1)
            decision = flagged.float() / real.clamp(min=1).float() > self.threshold if self.gated else torch.ones_like(gated)
            gated = gated | decision
            clamp_BT[:, :n_prompt] = a_p & gated[:, None]
        if n_prompt < T:
            a_g, r_g = a_BT[:, n_prompt:], real_BT[:, n_prompt:]
            run_flagged = flagged[:, None] + a_g.long().cumsum(1)
            run_real = real[:, None] + r_g.long().cumsum(1)
            if self.gated:
                crossed = run_flagged.float() / run_real.clamp(min=1).float() > self.threshold
                crossed = crossed & r_g  # only a real token can move the gate
                on = gated[:, None] | (crossed.long().cummax(1).values > 0)
            else:
                on = torch.ones_like(a_g)
            clamp_BT[:, n_prompt:] = a_g & on
            flagged, real, gated = run_flagged[:, -1], run_real[:, -1], on[:, -1]
        return clamp_BT, GateState(flagged, real, gated)

    def delta(self, f_BTS: torch.Tensor, clamp_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [P, 2], residual deltas [P, D]) for the clamped tokens only."""
        pos = clamp_BT.nonzero()
        f = f_BTS[pos[:, 0], pos[:, 1]]  # [P, S]
        coef = -self.clamp - f
        if self.clamp_mode == "active":
            coef = torch.where(f > 0, coef, torch.zeros_like(coef))
        return pos, coef @ self.latents.W_dec

    # ---- use ------------------------------------------------------------------------------------------------

    def attach(self, model: torch.nn.Module, verify: bool = True):
        """Context manager: `with guard.attach(model) as session: model(...)`. See `dsg.attach`."""
        return attach(model, self, verify=verify)

    def check_model(self, model: torch.nn.Module, hook: HookPoint | None = None) -> None:
        """Refuse a model whose weights upstream of the hook differ from the one the guardrail was fitted on."""
        expected = self.info.get("model", {}).get("weights_sha256")
        if not expected:
            return
        hook = hook or resolve(model, self.hook)
        got = model_fingerprint(model, hook)["weights_sha256"]
        if got != expected:
            raise DSGError(
                f"This guardrail was fitted on model {self.info['model'].get('name_or_path')!r} "
                f"(weights {expected[:12]}...), but the given model's weights up to {self.hook!r} hash to "
                f"{got[:12]}...; refit it for this model, or pass verify=False (--allow-model-mismatch) to apply it anyway."
            )

    # ---- files ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dsg_version": __version__,
            "name": self.name,
            "hook": self.hook,
            "features": self.features,
            "threshold": self.threshold,
            "clamp": self.clamp,
            "clamp_mode": self.clamp_mode,
            "gated": self.gated,
            **{k: v for k, v in self.info.items() if k not in ("sae",)},
            "sae": {
                **self.info.get("sae", {}),
                "sha256": self.sae_sha256,
                "architecture": self.sae.architecture,
                "d_in": self.sae.d_in,
                "d_sae": self.sae.d_sae,
                "k": self.sae.k,
                "apply_b_dec_to_input": self.sae.apply_b_dec_to_input,
                "hook_name": self.sae.hook_name,
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `guardrail.json` + `guardrail.safetensors` (and, for TopK SAEs, the SAE) atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            write_json(tmp / JSON_NAME, self.to_json())
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.latents.tensors().items()}
            tensors |= {f"stats.{k}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / TENSORS_NAME))
            if self.latents.sae is not None:
                self.sae.save(tmp / SAE_DIR)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, sae: SAE | None = None, model: torch.nn.Module | None = None
    ) -> "Guardrail":
        """Read a saved guardrail. Passing the `sae` or `model` checks that it is the one the guardrail was made for."""
        path = Path(path)
        meta = read_artifact_json(path, JSON_NAME, FORMAT, FORMAT_VERSION, "guardrail")
        t = read_safetensors(path / TENSORS_NAME)
        sae_meta = meta["sae"]
        if sae is not None and sae.sha256() != sae_meta["sha256"]:
            raise DSGError(
                f"The guardrail in {str(path)!r} was fitted on SAE {sae_meta['sha256'][:12]}..., but the given SAE "
                f"hashes to {sae.sha256()[:12]}...; pass the SAE it was fitted on."
            )
        if sae is None:
            if (path / SAE_DIR).is_dir():
                sae = SAE.load(path / SAE_DIR)
            else:
                sae = _sae_stub(sae_meta, t)
        stats = {k.removeprefix("stats."): v for k, v in t.items() if k.startswith("stats.")}
        info = {
            k: v for k, v in meta.items()
            if k not in ("format", "format_version", "dsg_version", "name", "hook", "features", "threshold",
                         "clamp", "clamp_mode", "gated")
        }
        info["saved_with"] = meta.get("dsg_version")
        guard = cls(
            sae, meta["hook"], meta["features"], meta["threshold"], meta["clamp"], meta.get("clamp_mode", "all"),
            meta.get("gated", True), name=meta.get("name"), info=info, tensors=stats,
        )
        guard.info.pop("saved_with", None)
        if model is not None:
            guard.check_model(model)
        return guard


def _sae_stub(meta: dict, t: dict[str, torch.Tensor]) -> SAE:
    """An SAE-shaped holder for a self-contained guardrail (ReLU/JumpReLU): only the selected latents are real.

    Its encode/decode are never used; `Guardrail` encodes through `SelectedLatents`.
    """
    d_in, d_sae = int(meta["d_in"]), int(meta["d_sae"])
    idx = t["features"].long()
    W_enc = torch.zeros(d_in, d_sae)
    W_enc[:, idx] = t["W_enc_selected"]
    W_dec = torch.zeros(d_sae, d_in)
    W_dec[idx] = t["W_dec_selected"]
    b_enc = torch.zeros(d_sae)
    b_enc[idx] = t["b_enc_selected"]
    threshold = None
    if meta["architecture"] == "jumprelu":
        threshold = torch.zeros(d_sae)
        threshold[idx] = t["threshold_selected"]
    sae = SAE(W_enc, W_dec, b_enc, t["b_dec"], meta["architecture"], threshold, None, meta["apply_b_dec_to_input"],
              meta.get("hook_name"))
    sae.sha256 = lambda: meta["sha256"]  # the stub stands for the full SAE it was cut from
    return sae


# ---- attaching ------------------------------------------------------------------------------------------------


@dataclass
class Attachment:
    """What `attach` yields: the gate decisions of the latest forward pass, and generation state."""

    guardrails: list[Guardrail]
    gated_by: list[torch.Tensor | None] = field(default_factory=list)  # per guardrail, [B] bool latched gate
    prompt_length: int | None = None  # set by reference_generate: positions beyond it are treated as generated
    fixed_gates: torch.Tensor | None = None
    """[B, n_guardrails] bool. When set, each row's gate is taken from here instead of being judged: flagged
    tokens of gated rows are clamped, other rows pass through. Scoring uses it to hold a prompt's decision fixed
    over several continuations forked from one prefill (which must not share or advance each other's state)."""

    @property
    def gated(self) -> torch.Tensor | None:
        """[B] bool: inputs in the latest forward that any attached guardrail gated."""
        present = [g for g in self.gated_by if g is not None]
        if not present:
            return None
        out = present[0].clone()
        for g in present[1:]:
            out |= g
        return out


@contextmanager
def attach(model: torch.nn.Module, *guardrails: Guardrail, verify: bool = True, special_ids: Sequence[int] | None = None):
    """Apply one or more guardrails to every forward pass of `model` inside the block.

    Guardrails on the same hook point judge the same (unedited) activations and their deltas add up, so each
    keeps its own gate. With verify=True each guardrail first checks that `model` is the model it was fitted on.
    """
    if not guardrails:
        raise DSGError("attach() needs at least one guardrail.")
    specials = list(special_ids) if special_ids is not None else special_token_ids(model)
    by_hook: dict[str, list[int]] = {}
    for i, g in enumerate(guardrails):
        by_hook.setdefault(g.hook, []).append(i)
    points = {}
    for name, members in by_hook.items():
        point = resolve(model, name)
        for i in members:
            check_width(model, point, guardrails[i].sae.d_in, f"Guardrail {i} (SAE)")
            if verify:
                guardrails[i].check_model(model, point)
        points[name] = point
    session = Attachment(list(guardrails), [None] * len(guardrails))
    states: list[GateState | None] = [None] * len(guardrails)
    ctx: dict = {}

    def on_inputs(inputs: dict) -> None:
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        past = inputs.get("past_key_values")
        past_len = 0
        if past is not None:
            past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else int(past[0][0].shape[-2])
        ctx.clear()
        ctx["continuation"] = past_len > 0
        if ids is None and inputs.get("inputs_embeds") is not None:
            ctx["shape"] = tuple(inputs["inputs_embeds"].shape[:2])
        ctx["ids"], ctx["mask"] = ids, mask

    for g in guardrails:
        g.latents.to(next(model.parameters()).device)

    def make_hook(members: list[int]):
        def fn(x_BTD: torch.Tensor):
            B, T = x_BTD.shape[:2]
            if "continuation" not in ctx:  # forward called on a submodule: the whole input is one prompt
                ctx.update(continuation=False, ids=None, mask=None, shape=(B, T))
            ids, mask = ctx["ids"], ctx["mask"]
            real = real_token_mask(ids, mask, specials, ctx.get("shape", (B, T)), ctx["continuation"]).to(x_BTD.device)
            if real.shape != (B, T):
                raise DSGError(f"Hook {members} saw activations of shape {(B, T)} for inputs of shape {tuple(real.shape)}.")
            if ctx["continuation"]:
                n_prompt = 0
            else:
                n_prompt = T if session.prompt_length is None else min(session.prompt_length, T)
            out = None
            for i in members:
                g = guardrails[i]
                f, a = g.flags(x_BTD, real)
                if session.fixed_gates is not None:
                    clamp_BT = a & session.fixed_gates[:, i, None].to(a.device)
                else:
                    prev = states[i] if ctx["continuation"] else None
                    if ctx["continuation"] and (prev is None or prev.gated.shape[0] != B):
                        raise DSGError(
                            "A cached continuation reached the guardrail without its prefill; start generation inside attach()."
                        )
                    clamp_BT, states[i] = g.gate(a, real, n_prompt, prev)
                    session.gated_by[i] = states[i].gated
                if clamp_BT.any():
                    pos, d = g.delta(f, clamp_BT)
                    out = x_BTD.clone() if out is None else out
                    out[pos[:, 0], pos[:, 1]] += d.to(out.dtype)
            return out

        return fn

    with model_inputs(model, on_inputs):
        with _stack(model, [(points[name], make_hook(members)) for name, members in by_hook.items()]):
            yield session


@contextmanager
def _stack(model, hooks):
    if not hooks:
        yield
        return
    (point, fn), rest = hooks[0], hooks[1:]
    with hooked(model, point, fn), _stack(model, rest):
        yield
