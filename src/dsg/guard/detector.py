"""The detector gate: a sparse linear score over SAE latent firing, read in windows of the last w real tokens.

The paper's gate asks whether *any* selected latent fires and averages that over the input. That signal is coarse:
latents chosen because they fire more on the forget corpus also fire in bursts on neighbouring text (a Python
manual, a chat preamble), and nothing in it can say "this is benign computing". The detector replaces that flag
with evidence: each latent j carries a weight w_j (positive for forget-domain latents, negative for latents that
mark retain text), fitted by an L1-regularised logistic regression on windows of forget versus retain and
calibration text, so the weights are few and each names a latent that can be inspected.

    e_t    = max(floor, sum_j q_j 1[f_tj > 0])   at real token t (q_j = round(w_j * SCALE), integers)
    window = sum of e over the last w real tokens / w   (a sequence's start counts as zero evidence)
    gate   opens, and latches, at the first token where window > threshold

The floor (FitConfig.detector_floor: 0; by default none, signed evidence) keeps a token's evidence from going
negative: the benign words around a forget-domain term ("What does sqlmap do?") cannot cancel it, while a latent
with a negative weight still offsets a forget latent that fires on the same token. It is a trade, not a free gain
(docs/precision.md, "A floor on each token's evidence was tried"): on the embedded default it lifts the gate on
short offensive questions asked in plain words (35 % -> 42.5 % of the hand-written probes), and the threshold
calibrated on long benign text rises with it, so fewer padded forget questions and more benign documents open the
gate.

The weights are integers so that window sums are exact: the decision is the same whether a prompt arrives whole,
in chunks, or one token at a time (rule.window_gate), and it depends only on the tokens so far. The threshold is
a percentile of the largest window score over the calibration texts, as for every gate here. The clamp is
unchanged: once the gate is open, flagged tokens (any *selected* latent firing) are clamped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DSGError
from ..lm.hooks import activations_by_batch
from ..lm.text import batches

SCALE = 1024  # weight units per 1.0 of logistic-regression weight
MAX_WEIGHT = 2**20  # |q_j| bound: sums over a window of 32 latents x 4096 tokens stay far inside int64 and float64
MAX_FLOOR = 2**30  # |floor| bound, for the same reason


class Detector(torch.nn.Module):
    """The detector's latents and integer weights (and, for an SAE whose latents encode independently, an encoder
    cut to those latents)."""

    def __init__(self, latents: Sequence[int], weights: torch.Tensor, encoder=None, floor: int | None = None):
        super().__init__()
        self.register_buffer("latents", torch.tensor(list(latents), dtype=torch.long))
        self.register_buffer("weights", weights.to(torch.long))
        self.encoder = encoder  # None: the latents are read from the guardrail's whole-SAE encoding (TopK)
        self.floor = floor  # None: signed evidence; an integer: no token's evidence goes below it

    @classmethod
    def of(cls, sae, latents: Sequence[int], weights: torch.Tensor, floor: int | None = None) -> Detector:
        encoder = sae.restricted(latents) if sae.encodes_latents_independently else None
        return cls(latents, weights, encoder, floor)

    def __len__(self) -> int:
        return int(self.latents.numel())

    def evidence(self, d_BTL: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
        """e [B, T] (int64): the summed weights of the detector latents firing at each real token (0 elsewhere)."""
        e = ((d_BTL > 0).to(torch.long) * self.weights).sum(-1)
        if self.floor is not None:
            e = e.clamp(min=self.floor)
        return torch.where(real_BT.bool(), e, torch.zeros_like(e))

    def reach(self, window: int) -> tuple[float, float]:
        """(lowest, highest) mean evidence over a window of `window` real tokens that this detector can give at a
        real token (rule.window_gate compares that mean with the gate's levels). The highest is every positive
        weight firing on every token; the lowest is met at a sequence's first real token, whose window holds it
        and w - 1 empty places, with every negative weight firing (or the floor)."""
        hi, lo = int(self.weights.clamp(min=0).sum()), int(self.weights.clamp(max=0).sum())
        if self.floor is not None:
            hi, lo = max(hi, self.floor), max(lo, self.floor)
        return lo / window, float(hi)

    def encode(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(x_BTD)

    def named_weights(self) -> list[tuple[int, float]]:
        """(latent id, weight) pairs, largest magnitude first: what the detector reads."""
        pairs = [(int(j), int(q) / SCALE) for j, q in zip(self.latents.tolist(), self.weights.tolist())]
        return sorted(pairs, key=lambda p: (-abs(p[1]), p[0]))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"detector.latents": self.latents, "detector.weights": self.weights}
        if self.encoder is not None:
            t = self.encoder.tensors()
            out |= {"detector.W_enc": t["W_enc"], "detector.b_enc": t["b_enc"]}
            if "threshold" in t:
                out["detector.threshold"] = t["threshold"]
        return out


class Fires(NamedTuple):
    """Where SAE latents fire in one sequence: (real-token position, latent id) pairs, and its real-token count."""

    tokens: torch.Tensor  # [nnz] int32
    latents: torch.Tensor  # [nnz] int32
    n_real: int

    def dense(self, d_sae: int) -> torch.Tensor:
        on = torch.zeros(self.n_real, d_sae, dtype=torch.bool)
        on[self.tokens.long(), self.latents.long()] = True
        return on


def firing(on_NF: torch.Tensor) -> Fires:
    """Fires from a dense [n_real, F] bool matrix."""
    t, j = on_NF.cpu().nonzero(as_tuple=True)
    return Fires(t.to(torch.int32), j.to(torch.int32), on_NF.shape[0])


def _windows_of(on: torch.Tensor, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(row, column, value, number of windows) of one sequence's windows, from its [n_real, F] firing matrix."""
    m = on.shape[0]
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0
    stride = max(window // 2, 1)
    ends = list(range(min(window, m), m + 1, stride))
    if ends[-1] != m:
        ends.append(m)
    counts = torch.cat([torch.zeros(1, on.shape[1], dtype=torch.int32), on.int().cumsum(0)])
    e = torch.tensor(ends)
    c = counts[e] - counts[(e - window).clamp(min=0)]  # [windows, F], all of the sequence's at once
    r, j = c.nonzero(as_tuple=True)
    return r.numpy(), j.numpy(), c[r, j].numpy() / window, len(ends)


def window_features(
    model, sae, hook, sequences: Sequence[Sequence[int]], window: int, *, batch_size: int, pad_id: int,
    desc: str, progress: bool, known: Sequence[Fires | None] | None = None, starts: Sequence[int] | None = None,
):  # fmt: skip
    """A sparse matrix [windows, d_sae]: for each window of `window` real tokens (stride window/2, the last one
    ending at the sequence's end, shorter sequences giving one shorter window), the share of its tokens on which
    each latent fires. Rows go sequence by sequence, longest first. Forwards stop at the hook, and are skipped for
    the sequences whose firing is `known` (kept from the statistics pass); nothing dense over the corpus is kept.
    `starts`: per sequence, the tokens before it that are context only (read by the forward, in no window)."""
    from scipy import sparse

    if starts is not None and known is not None:
        raise ValueError("window_features: firing kept from the statistics pass has no context to skip")
    known = list(known) if known is not None else [None] * len(sequences)
    blocks: dict[int, tuple] = {i: _windows_of(f.dense(sae.d_sae), window) for i, f in enumerate(known) if f}
    todo = [i for i in range(len(sequences)) if i not in blocks]
    bar = tqdm(total=len(todo), desc=desc, unit="seq", disable=not progress or not todo, leave=False)
    with torch.inference_mode():
        chunks = batches([sequences[i] for i in todo], batch_size, pad_id)
        for idx, _, x_BTD, real in activations_by_batch(model, hook, chunks):
            fires = sae.encode(x_BTD.to(sae.W_dec.dtype)) > 0  # [B, T, F]
            for b, i in enumerate(idx):
                own = real[b].clone()
                if starts is not None:  # batches() pads on the right: position p is the sequence's token p
                    own[: starts[todo[i]]] = False
                blocks[todo[i]] = _windows_of(fires[b][own].cpu(), window)  # the matrix is built on the CPU
            bar.update(len(idx))
    bar.close()
    rows, cols, vals, n = [], [], [], 0
    for i in sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i)):  # the order batches() gives
        r, j, v, w = blocks[i]
        rows.append(r + n)
        cols.append(j)
        vals.append(v)
        n += w
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return sparse.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))),
                             shape=(n, sae.d_sae))  # fmt: skip


def fit_weights(positive, negative, c: float, seed: int) -> dict[int, int]:
    """L1-regularised logistic regression of forget (positive) against retain windows, classes weighted equally:
    {latent id: integer weight} for the latents it keeps. `c` is the inverse regularisation strength (smaller:
    fewer latents)."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise DSGError("The detector needs forget and retain windows to learn from; one of the corpora is empty.")
    X = sparse.vstack([positive, negative]).tocsr()
    y = np.concatenate([np.ones(positive.shape[0]), np.zeros(negative.shape[0])])
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    clf = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", max_iter=1000, random_state=seed)
    clf.fit(X, y, sample_weight=weight)
    q = np.clip(np.rint(clf.coef_[0] * SCALE), -MAX_WEIGHT, MAX_WEIGHT).astype(np.int64)
    out = {int(j): int(q[j]) for j in np.flatnonzero(q)}
    if not any(v > 0 for v in out.values()):
        raise DSGError(
            f"The detector kept no latent that marks the forget domain (detector_c={c:g}); raise detector_c or use "
            "more forget text."
        )
    return out


RELATED_RUN = 8  # tokens: a sequence read inside another (a chat-wrapped copy of a question) is related past this


def holdout_split(sequences: Sequence[Sequence[int]], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(held, fitted): indices of `sequences` for the detector's threshold and for its weights, drawn with `seed`.

    A text and its copies never straddle the split: a sequence that equals another (the same general text in the
    retain and the calibration corpus) is dropped after its first occurrence, and a sequence whose tokens after
    its first are read whole inside another (a question and the same question in the chat template) is drawn
    with it, as one group. A threshold read from copies of what the weights were fitted on would sit as low as
    one read from the fitted texts themselves. About `share` of the distinct sequences are held, whole groups at a
    time, and at least one group lies on each side.
    """
    first: dict[tuple, int] = {}
    for i, s in enumerate(sequences):
        first.setdefault(tuple(s), i)
    distinct = sorted(first.values())
    if len(distinct) < 2:
        raise DSGError("The detector needs at least two distinct retain or calibration sequences: one to fit its "
                       "weights, one to calibrate its threshold.")  # fmt: skip
    parent = {i: i for i in distinct}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # a sequence s is read inside t where t holds s[1:] (the first token may be BOS or a template's). Each s is
    # looked up by its rarest run of RELATED_RUN tokens, so that a run every chat-wrapped text shares (the
    # template's) does not make every pair a candidate
    seqs = [list(s) for s in sequences]
    counts = Counter(
        tuple(seqs[i][p : p + RELATED_RUN]) for i in distinct for p in range(len(seqs[i]) - RELATED_RUN + 1)
    )
    rarest: dict[tuple, list[tuple[int, int]]] = {}
    for i in distinct:
        s = seqs[i]
        if len(s) > RELATED_RUN:
            o = min(range(1, len(s) - RELATED_RUN + 1), key=lambda p: counts[tuple(s[p : p + RELATED_RUN])])
            rarest.setdefault(tuple(s[o : o + RELATED_RUN]), []).append((i, o - 1))
    for j in distinct:
        t = seqs[j]
        for p in range(len(t) - RELATED_RUN + 1):
            for i, o in rarest.get(tuple(t[p : p + RELATED_RUN]), ()):
                s, q = seqs[i], p - o
                if i != j and q >= 0 and t[q : q + len(s) - 1] == s[1:]:
                    parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in distinct:
        groups.setdefault(root(i), []).append(i)
    members = list(groups.values())
    if len(members) < 2:
        raise DSGError("The retain and calibration sequences are all copies of one text, or read inside one "
                       "another: the detector needs distinct texts to fit its weights on and to calibrate its "
                       "threshold on.")  # fmt: skip
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    target = max(1, round(share * len(distinct)))
    held: list[int] = []
    for n, g in enumerate(order):
        if len(held) >= target or n == len(order) - 1:
            break
        held += members[g]
    return sorted(held), sorted(set(distinct) - set(held))
