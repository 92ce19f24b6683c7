"""The detector gate: a sparse linear score over SAE latents, summed over windows of tokens (guard/detector.py).

Fitted on tiny models; checked for what it promises: integer weights that name latents, a threshold calibrated
on its own window statistic, a decision that depends only on the tokens so far (whole, chunked, padded), files
that round-trip and refuse edits, and the same decisions from every runtime path."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dsg
from dsg.guard import rule
from dsg.guard.detector import RELATED_RUN, SCALE, fit_weights, holdout_split
from dsg.guard.stats import gate_rates
from dsg.lm.text import tokenize

from tiny import FORGET_TEXTS, RETAIN_TEXTS, sparse_sae, tiny_sae

FORGET = FORGET_TEXTS * 3
RETAIN = RETAIN_TEXTS * 3


def _config(**kw):
    base = dict(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=6, detector=True,
                detector_c=1.0, gate_percentile=90)  # fmt: skip
    return dsg.FitConfig(**(base | kw))


def test_the_hold_out_keeps_copies_and_chat_wrapped_forms_on_one_side():
    """The threshold's sequences share nothing with the fitted ones: a text in both corpora is kept once, and a
    question read whole inside its chat-wrapped form is drawn with it."""
    rng = np.random.default_rng(0)
    plain = [rng.integers(100, 1000, size=n).tolist() for n in rng.integers(RELATED_RUN + 2, 30, size=40)]
    wrapped = [[1, 2, 3] + q + [4, 5] for q in plain[:20]]  # template tokens around the question's own
    short = [[7, 8, 9], [7, 8, 9, 10]]  # too short to be related: each stands alone
    seqs = plain + wrapped + [list(q) for q in plain[30:]] + short  # the last ten plain ones twice
    for seed in range(5):
        held, fitted = holdout_split(seqs, 0.25, seed)
        assert not set(held) & set(fitted) and held and fitted
        assert len(held) + len(fitted) == len(seqs) - 10  # one of each copy kept
        assert set(held) | set(fitted) == set(range(60)) | {70, 71}  # the first occurrence of a copy is kept
        for k in range(20):  # a question and its chat form always on one side
            assert (k in held) == (40 + k in held)
        assert abs(len(held) - 0.25 * 62) <= 2  # about the share, whole groups at a time
    assert holdout_split(seqs, 0.25, 3) == holdout_split(seqs, 0.25, 3)
    assert holdout_split(seqs, 0.25, 3) != holdout_split(seqs, 0.25, 4)
    with pytest.raises(dsg.DSGError, match="two distinct"):
        holdout_split([[5, 6, 7]] * 4, 0.25, 0)
    with pytest.raises(dsg.DSGError, match="copies of one text"):
        holdout_split([plain[0], [1, 2] + plain[0]], 0.25, 0)


@pytest.fixture(scope="module")
def detected(tiny_llama):
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    return model, tok, sae, dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(), progress=False)


def test_the_detector_is_fitted_calibrated_and_recorded(detected):
    model, tok, sae, guard = detected
    det = guard.detector
    assert det is not None and len(det) == guard.info["detector_fit"]["latents"] >= 1
    assert det.weights.dtype == torch.long and (det.weights != 0).all()
    assert any(w > 0 for _, w in det.named_weights())
    peaks = guard.tensors["calibration_rho"].double().numpy()
    assert guard.threshold == pytest.approx(float(np.percentile(peaks, 90)))
    # the threshold is read from the sequences held out of the detector's fit, and only from them
    held = guard.info["detector_fit"]["calibration_sequences"]
    assert len(peaks) == held == guard.info["data"]["calibration"]["sequences"]
    fit_info, n_retain = guard.info["detector_fit"], guard.info["data"]["retain"]["sequences"]
    # RETAIN holds each text three times: the copies are dropped, a quarter of the distinct ones held
    assert fit_info["copies_dropped"] == n_retain - n_retain // 3 and held == round(0.25 * n_retain // 3)
    assert held + fit_info["fitted_sequences"] + fit_info["copies_dropped"] == n_retain
    assert guard.info["data"]["calibration"]["source"] == "retain (detector hold-out)"
    assert guard.gate_rule().startswith(f"detector over {len(det)} latents") and "last 6 tokens" in guard.gate_rule()
    # forget text scores above retain text on the detector's own statistic
    seqs = lambda texts: tokenize(tok, texts, 64)  # noqa: E731
    f = gate_rates(model, guard, seqs(FORGET_TEXTS), progress=False)
    r = gate_rates(model, guard, seqs(RETAIN_TEXTS), progress=False)
    assert f.mean() > r.mean()


def test_fit_weights_are_sparse_integers_and_refuse_empty_input():
    from scipy import sparse

    rng = np.random.default_rng(0)
    pos = sparse.csr_matrix((rng.random((60, 20)) < 0.3) * (np.arange(20) < 3) + (rng.random((60, 20)) < 0.05))
    neg = sparse.csr_matrix((rng.random((60, 20)) < 0.3) * (np.arange(20) >= 17) + (rng.random((60, 20)) < 0.05))
    w = fit_weights(pos.astype(float), neg.astype(float), c=1.0, seed=0)
    assert all(isinstance(q, int) for q in w.values())
    assert {0, 1, 2} & {j for j, q in w.items() if q > 0} and {17, 18, 19} & {j for j, q in w.items() if q < 0}
    assert fit_weights(pos.astype(float), neg.astype(float), c=1.0, seed=0) == w  # deterministic
    with pytest.raises(dsg.DSGError, match="empty"):
        fit_weights(pos[:0], neg, c=1.0, seed=0)


def test_evidence_windows_give_the_same_decisions_whole_chunked_and_token_by_token(detected):
    model, tok, sae, guard = detected
    torch.manual_seed(0)
    B, T, w = 3, 40, guard.window
    a = torch.rand(B, T) < 0.4
    e = torch.randint(-3 * SCALE, 4 * SCALE, (B, T))
    real = torch.rand(B, T) < 0.9
    threshold = 0.5 * SCALE
    whole, s_whole = rule.window_gate(a, real, None, threshold, w, e)
    state, parts = None, []
    for lo, hi in ((0, 7), (7, 8), (8, 25), (25, 40)):
        c, state = rule.window_gate(a[:, lo:hi], real[:, lo:hi], state, threshold, w, e[:, lo:hi])
        parts.append(c)
    assert torch.equal(torch.cat(parts, 1), whole)
    assert torch.equal(state.gated, s_whole.gated) and torch.equal(state.peak, s_whole.peak)
    assert not (whole & ~a).any()  # the clamp falls on flagged tokens only
    # a prefix of benign (negative-evidence) tokens cannot stop a later burst of evidence from opening the gate
    burst = torch.cat([torch.full((1, 200), -SCALE), torch.full((1, w), 2 * SCALE)], 1)
    ones = torch.ones_like(burst, dtype=torch.bool)
    assert rule.window_gate(ones, ones, None, threshold, w, burst)[1].gated.all()


def test_a_detector_guardrail_round_trips_and_refuses_edits(detected, tmp_path):
    model, tok, sae, guard = detected
    guard.save(tmp_path / "g")
    loaded = dsg.Guardrail.load(tmp_path / "g", sae=sae, model=model)
    assert torch.equal(loaded.detector.latents, guard.detector.latents)
    assert torch.equal(loaded.detector.weights, guard.detector.weights)
    self_contained = dsg.Guardrail.load(tmp_path / "g", model=model)  # ReLU: the detector's encoder slices
    ids = tok(FORGET_TEXTS[:2] + RETAIN_TEXTS[:2], return_tensors="pt", padding=True)
    decisions = []
    for g in (guard, loaded, self_contained):
        with torch.no_grad(), g.applied(model) as session:
            model(**ids)
        decisions.append(session.gated.clone())
    assert torch.equal(decisions[0], decisions[1]) and torch.equal(decisions[0], decisions[2])
    # an edited weight, or an edited latent count, is refused
    t = load_file(tmp_path / "g" / "guardrail.safetensors")
    t["detector.weights"][0] += 1
    save_file(t, tmp_path / "g" / "guardrail.safetensors")
    with pytest.raises(dsg.DSGError, match="content hash"):
        dsg.Guardrail.load(tmp_path / "g", sae=sae)


def test_detector_json_fields_are_checked(detected, tmp_path):
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, guard = detected
    guard.save(tmp_path / "g")
    path = tmp_path / "g" / "guardrail.json"
    meta = json.loads(path.read_text())
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")
    edits = [("latents", meta["detector"]["latents"] + 1), ("floor", 0.5), ("floor", "0"), ("floor", 2**40),
             ("floor", True), ("extra", 1)]  # fmt: skip
    for key, value in edits:  # re-hashed, so only the field check can catch each
        edited = json.loads(json.dumps(meta))
        edited["detector"][key] = value
        edited[HASH_FIELD] = content_sha256(edited, tensors)
        path.write_text(json.dumps(edited))
        with pytest.raises(dsg.DSGError, match="detector"):
            dsg.Guardrail.load(tmp_path / "g", sae=sae)


def test_re_hashed_levels_the_detector_cannot_reach_are_refused(detected, tmp_path):
    """The gate compares the mean evidence over a window with its levels. A threshold at or above the largest
    mean the weights can give never opens the gate, and one below the smallest (a sequence's first real token:
    its own evidence over w) opens it on every input: both are refused on load even with the content hash
    recomputed, as is a latch past reach; the bounds themselves are what the detector can give."""
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, guard = detected
    lowest, highest = guard.detector.reach(guard.window)
    w = guard.detector.weights
    assert highest == int(w.clamp(min=0).sum()) and lowest == int(w.clamp(max=0).sum()) / guard.window
    guard.save(tmp_path / "g")
    path = tmp_path / "g" / "guardrail.json"
    meta = json.loads(path.read_text())
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")
    never = "could never go over"
    edits = [({"threshold": highest}, never), ({"threshold": lowest - 0.5}, "every input"),
             ({"hold": 4, "latch": highest}, never), ({"threshold": highest - 1}, None),
             ({"threshold": lowest}, None)]  # fmt: skip
    for fields, message in edits:
        edited = json.loads(json.dumps(meta)) | fields
        edited[HASH_FIELD] = content_sha256(edited, tensors)
        path.write_text(json.dumps(edited))
        if message is None:  # within reach: loads
            assert dsg.Guardrail.load(tmp_path / "g", sae=sae).threshold == fields["threshold"]
            continue
        with pytest.raises(dsg.DSGError, match=message):
            dsg.Guardrail.load(tmp_path / "g", sae=sae)
    fitted, guard.threshold = guard.threshold, highest  # and on a guardrail edited in memory, before it is attached
    try:
        with pytest.raises(dsg.DSGError, match=never), guard.attach(model):
            pass
    finally:
        guard.threshold = fitted  # the fixture is shared


def test_a_topk_detector_reads_one_whole_sae_encoding(tiny_llama):
    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size, architecture="topk", k=6)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(), progress=False)
    assert guard.detector.encoder is None
    x = torch.randn(2, 9, model.config.hidden_size)
    real = torch.ones(2, 9, dtype=torch.bool)
    f, a, e = guard.flags(x, real)
    full = sae.encode(x)
    assert guard.detector.floor is None  # signed evidence by default
    want = ((full[..., guard.detector.latents] > 0).long() * guard.detector.weights).sum(-1)
    assert torch.equal(e, want) and torch.equal(f, full[..., guard.latents.features])


def test_the_evidence_floor_keeps_a_token_from_cancelling_its_neighbours(detected, tmp_path):
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, signed = detected
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(detector_floor=True), progress=False)
    assert guard.detector.floor == 0 and signed.detector.floor is None
    assert torch.equal(signed.detector.weights, guard.detector.weights)  # the floor does not change the fit
    assert (guard.detector.weights < 0).any()  # there is something to floor
    x = torch.randn(3, 40, model.config.hidden_size) * 4
    real = torch.ones(3, 40, dtype=torch.bool)
    e_signed, e_floor = signed.flags(x, real).evidence, guard.flags(x, real).evidence
    assert (e_signed < 0).any() and (e_floor >= 0).all()
    assert torch.equal(e_floor, e_signed.clamp(min=0))
    assert "at least 0" in guard.gate_rule() and "at least" not in signed.gate_rule()
    # the floor is part of the saved rule; a file without one (written before it existed) sums signed evidence
    guard.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "guardrail.json").read_text())
    assert meta["detector"]["floor"] == 0
    assert meta["format_version"] == 3  # a dsg from before floors refuses it instead of reading signed evidence
    assert dsg.Guardrail.load(tmp_path / "g", sae=sae).detector.floor == 0
    assert dsg.Guardrail.load(tmp_path / "g", model=model).detector.floor == 0  # self-contained: encoder slices
    signed.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "guardrail.json").read_text())["format_version"] == 2
    del meta["detector"]["floor"]
    meta[HASH_FIELD] = content_sha256(meta, read_safetensors(tmp_path / "g" / "guardrail.safetensors"))
    (tmp_path / "g" / "guardrail.json").write_text(json.dumps(meta))
    old = dsg.Guardrail.load(tmp_path / "g", sae=sae)
    assert old.detector.floor is None and torch.equal(old.flags(x, real).evidence, e_signed)


def test_a_floor_needs_a_detector():
    with pytest.raises(dsg.DSGError, match="detector"):
        dsg.Guardrail(tiny_sae(), None, [0, 1], 0.5, detector_floor=0)


def test_the_detector_needs_a_window():
    with pytest.raises(dsg.DSGError, match="gate_window"):
        dsg.FitConfig(detector=True)


def test_window_features_are_each_windows_firing_share(tiny_llama):
    """Rows: the windows of each sequence (stride w/2, the last ending at the sequence's end, one short window for
    a short sequence); entries: the share of the window's tokens on which each latent fires."""
    from dsg.guard.detector import window_features
    from dsg.lm.hooks import activations_by_batch
    from dsg.lm.text import batches

    model, tok = tiny_llama
    sae, w = tiny_sae(), 6
    seqs = [list(range(5, 5 + n)) for n in (3, 6, 7, 13, 20)]
    got = window_features(model, sae, "blocks.0.hook_resid_post", seqs, w, batch_size=2, pad_id=0, desc="",
                          progress=False).toarray()  # fmt: skip
    want = []
    for _, _, x, real in activations_by_batch(model, "blocks.0.hook_resid_post", batches(seqs, 1, 0)):
        fires = (sae.encode(x) > 0)[0][real[0]].double()
        m = fires.shape[0]
        ends = list(range(min(w, m), m + 1, w // 2))
        ends += [m] if ends[-1] != m else []
        want += [fires[max(0, e - w) : e].sum(0) / w for e in ends]
    assert got.shape == (len(want), sae.d_sae) and len(want) == 1 + 1 + 1 + 3 + 6  # real: all but the first
    np.testing.assert_allclose(got, torch.stack(want).numpy(), atol=1e-12)


def test_fits_sharing_statistics_reuse_the_detector_windows(detected, monkeypatch):
    """A sweep passes one `measure` to many fits: the detector's window features are computed once per window
    and the guardrails are the same as fits that compute them afresh."""
    import importlib

    fit_module = importlib.import_module("dsg.guard.fit")  # the module (dsg.guard.fit is also the function)
    model, tok, sae, _ = detected
    calls = []
    real = fit_module.window_features
    monkeypatch.setattr(fit_module, "window_features", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    stats = fit_module.measure(model, tok, sae, FORGET, RETAIN, _config(), progress=False)
    shared = [dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(**kw), stats=stats, progress=False)
              for kw in ({}, {"n_features": 3}, {"gate_window": 8})]  # fmt: skip
    assert calls == [6, 6, 8, 8]  # forget and retain windows, once per window size
    used, computed = stats.windows.take()  # what the three fits read: the w=6 windows twice, the w=8 ones once
    assert computed > 0 and used > computed and stats.windows.take() == (0, 0)
    fresh = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(n_features=3), progress=False)
    assert shared[1].detector.weights.tolist() == fresh.detector.weights.tolist()
    assert shared[1].threshold == fresh.threshold and shared[1].features == fresh.features
    # another hold-out draw fits on other negatives: those windows are computed anew, the forget ones reused
    calls.clear()
    other = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(detector_holdout=0.5), stats=stats, progress=False)
    assert calls == [6]
    fresh = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(detector_holdout=0.5), progress=False)
    assert other.detector.weights.tolist() == fresh.detector.weights.tolist() and other.threshold == fresh.threshold


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_firing_kept_by_the_statistics_pass_gives_the_same_windows(tiny_llama, architecture):
    """measure() keeps where latents fire for a detector config; the windows built from it, for all or some of
    the sequences, equal the ones a second forward pass gives."""
    import importlib

    from dsg.guard.detector import window_features
    from dsg.guard.stats import collect_stats

    fit_module = importlib.import_module("dsg.guard.fit")
    model, tok = tiny_llama
    sae = tiny_sae(architecture=architecture)
    seqs = [list(range(5 + i, 5 + i + n)) for i, n in enumerate((3, 6, 7, 13, 20, 9))]
    fires: list = []
    collect_stats(model, sae, "blocks.0.hook_resid_post", seqs, batch_size=4, pad_id=0, progress=False, fires=fires)
    assert len(fires) == len(seqs) and all(f.n_real == len(q) - 1 for f, q in zip(fires, seqs))
    kw = dict(batch_size=4, pad_id=0, desc="", progress=False)
    fresh = window_features(model, sae, "blocks.0.hook_resid_post", seqs, 6, **kw).toarray()
    for known in (fires, [f if i % 2 else None for i, f in enumerate(fires)]):
        kept = window_features(model, sae, "blocks.0.hook_resid_post", seqs, 6, known=known, **kw).toarray()
        np.testing.assert_array_equal(kept, fresh)
    stats = fit_module.measure(model, tok, sparse_sae(model, tok, FORGET + RETAIN, rate=0.1), FORGET, RETAIN,
                               _config(), progress=False)  # fmt: skip
    assert len(stats.forget_fires) == len(stats.forget_sequences)
    assert fit_module.measure(model, tok, sae, FORGET, RETAIN, _config(detector=False, gate_window=None),
                              progress=False).forget_fires is None  # fmt: skip


def test_a_detector_fit_reads_the_kept_firing_instead_of_a_second_pass(detected, monkeypatch):
    """With the firing kept by measure(), the forget windows need no forward at all; the guardrail is the one
    fitted without it."""
    import importlib

    fit_module = importlib.import_module("dsg.guard.fit")
    model, tok, sae, _ = detected
    stats = fit_module.measure(model, tok, sae, FORGET, RETAIN, _config(), progress=False)
    forwards = []
    real = fit_module.window_features.__globals__["activations_by_batch"]
    monkeypatch.setitem(fit_module.window_features.__globals__, "activations_by_batch",
                        lambda m, h, chunks: (forwards.append(1) or x for x in real(m, h, chunks)))  # fmt: skip
    kept = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(), stats=stats, progress=False)
    assert not forwards  # no calibration corpus: every negative is a retain sequence the statistics pass saw
    bare = stats._replace(windows=None, forget_fires=None, retain_fires=None)
    again = dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(), stats=bare, progress=False)
    assert forwards
    assert kept.detector.weights.tolist() == again.detector.weights.tolist()
    assert kept.detector.latents.tolist() == again.detector.latents.tolist() and kept.threshold == again.threshold


def test_moving_a_guardrail_moves_its_detector_and_saved_rule_fields_win_over_info(detected, tmp_path):
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, guard = detected
    moved = dsg.Guardrail.load(_saved(guard, tmp_path / "m"), sae=sae).to("meta")
    assert moved.detector.weights.device.type == "meta" and moved.latents.W_dec.device.type == "meta"
    assert guard.detector.weights.device.type == "cpu"  # a loaded copy moved, not the fitted one
    # info that names a rule field cannot override the rule when written
    forged = dsg.Guardrail(sae, guard.hook, guard.features, 0.5, guard.clamp, window=guard.window,
                           info={"threshold": 0.0, "window": 999, "name": "forged"})  # fmt: skip
    meta = forged.to_json()
    assert meta["threshold"] == 0.5 and meta["window"] == guard.window and meta["name"] is None
    # a huge integer in a number field is one clear refusal, not an OverflowError
    path = _saved(guard, tmp_path / "h") / "guardrail.json"
    meta = json.loads(path.read_text())
    meta["clamp"] = 10**400
    meta[HASH_FIELD] = content_sha256(meta, read_safetensors(path.parent / "guardrail.safetensors"))
    path.write_text(json.dumps(meta))
    with pytest.raises(dsg.DSGError, match="'clamp' must be"):
        dsg.Guardrail.load(path.parent, sae=sae)


def _saved(guard, path):
    guard.save(path)
    return path


def test_window_features_after_context_are_the_own_tokens_windows_of_the_whole_forward(tiny_llama):
    """With `starts`, each sequence is read whole (its context attended to) and only its own tokens are windowed:
    the rows equal the windows of the whole forward's firing cut to those tokens, and differ from reading the
    own tokens alone (the context changes the activations)."""
    from dsg.guard.detector import window_features
    from dsg.lm.hooks import activations_by_batch
    from dsg.lm.text import batches

    model, tok = tiny_llama
    sae, w, hook = tiny_sae(), 4, "blocks.0.hook_resid_post"
    own = [list(range(7, 7 + n)) for n in (5, 9, 12)]
    context = [list(range(40, 40 + n)) for n in (3, 10, 0)]
    seqs, starts = [c + o for c, o in zip(context, own)], [len(c) for c in context]
    kw = dict(batch_size=2, pad_id=0, desc="", progress=False)
    got = window_features(model, sae, hook, seqs, w, starts=starts, **kw).toarray()
    want = []
    for (i,), _, x, real in activations_by_batch(model, hook, batches(seqs, 1, 0)):
        mask = real[0].clone()
        mask[: starts[i]] = False
        fires = (sae.encode(x) > 0)[0][mask].double()
        m = fires.shape[0]
        ends = list(range(min(w, m), m + 1, w // 2))
        ends += [m] if ends[-1] != m else []
        want.append((-len(seqs[i]), [fires[max(0, e - w) : e].sum(0) / w for e in ends]))
    rows = [r for _, rs in sorted(want, key=lambda t: t[0]) for r in rs]  # rows go longest sequence first
    np.testing.assert_allclose(got, torch.stack(rows).numpy(), atol=1e-12)
    alone = window_features(model, sae, hook, own, w, **kw).toarray()
    assert got.shape[0] == sum(len(r) for _, r in want) and not np.array_equal(np.sort(got, 0), np.sort(alone, 0))
    with pytest.raises(ValueError, match="no context"):
        window_features(model, sae, hook, seqs, w, starts=starts, known=[None] * 3, **kw)


def test_a_detector_fitted_in_context_adds_those_windows_and_is_reproducible(detected):
    """detector_context: every forget and fitted retain sequence is also read after benign context (from the
    fitted retain sequences only, never the calibration hold-out); the fit records it, adds those windows on both
    sides, and gives the same guardrail twice."""
    import importlib

    fit_module = importlib.import_module("dsg.guard.fit")
    model, tok, sae, plain = detected
    a, b = (dsg.fit(model, tok, sae, FORGET, RETAIN, config=_config(detector_context=16), progress=False)
            for _ in range(2))  # fmt: skip
    fit_a, fit_plain = a.info["detector_fit"], plain.info["detector_fit"]
    assert fit_a["context"] == 16 and "context" not in fit_plain
    assert fit_a["positive_windows"] > fit_plain["positive_windows"]
    assert fit_a["negative_windows"] > fit_plain["negative_windows"]
    assert a.detector.weights.tolist() == b.detector.weights.tolist() and a.threshold == b.threshold
    # the threshold is still read from the same held-out sequences, alone
    assert fit_a["calibration_sequences"] == fit_plain["calibration_sequences"]
    pool = [[1, 2, 3], [4, 5, 6, 7]]
    ctx, starts = fit_module._in_context([[9, 9], [8]], pool, 16, 5, np.random.default_rng(0))
    assert [s[st:] for s, st in zip(ctx, starts)] == [[9, 9], [8]]
    assert all(st in (2, 4, 5) for st in starts)  # 16/8, 16/4, then capped at the limit
    assert all(set(s[:st]) <= {1, 2, 3, 4, 5, 6, 7} for s, st in zip(ctx, starts))


def test_detector_context_needs_the_detector_and_a_bounded_length():
    with pytest.raises(dsg.DSGError, match="detector_context"):
        dsg.FitConfig(detector_context=64)
    with pytest.raises(dsg.DSGError, match="detector_context"):
        _config(detector_context=-1)


def test_a_prompt_level_is_fitted_saved_checked_and_applied(detected, tmp_path):
    """gate_prompt_percentile: the level is a percentile of the calibration statistic (100: the latch level), it is
    written as format 4 (a dsg from before it refuses the file instead of clamping prompts near every window over
    the threshold), edited values are refused, and through the HF runtime a prompt is clamped only near windows
    over it while the answer's decision is the plain gate's."""
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, _ = detected
    # a hold that counts every real token: format 4 is the prompt level's alone (6 adds the hold's filler ids)
    kw = dict(gate_hold=3, gate_latch_percentile=100.0, gate_percentile=50, gate_hold_words=False)
    calibration = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS  # spread-out statistics
    plain = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw), progress=False)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw, gate_prompt_percentile=100.0),
                    progress=False)  # fmt: skip
    assert plain.prompt_level is None and guard.prompt_level == guard.latch > guard.threshold == plain.threshold
    assert "clamped only near windows over" in guard.gate_rule()
    guard.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "guardrail.json").read_text())
    assert meta["format_version"] == 4 and meta["prompt_level"] == guard.prompt_level
    assert dsg.Guardrail.load(tmp_path / "g", sae=sae).prompt_level == guard.prompt_level
    plain.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "guardrail.json").read_text())["format_version"] == 2
    tensors = read_safetensors(tmp_path / "g" / "guardrail.safetensors")
    for value in (guard.threshold, guard.threshold - 1, "1", float("nan"), True):  # re-hashed: the field check
        edited = meta | {"prompt_level": value}
        edited[HASH_FIELD] = content_sha256(edited, tensors)
        (tmp_path / "g" / "guardrail.json").write_text(json.dumps(edited))
        with pytest.raises(dsg.DSGError, match="prompt_level"):
            dsg.Guardrail.load(tmp_path / "g", sae=sae)
    edited = meta | {"format_version": 3}  # a prompt level in a file that says older dsg can apply it
    edited[HASH_FIELD] = content_sha256(edited, tensors)
    (tmp_path / "g" / "guardrail.json").write_text(json.dumps(edited))
    with pytest.raises(dsg.DSGError, match="format_version"):
        dsg.Guardrail.load(tmp_path / "g", sae=sae)
    with pytest.raises(dsg.DSGError, match="hold"):
        dsg.Guardrail(sae, None, guard.features, 0.5, window=4, prompt_level=0.8)
    # applied: every clamped prompt token of the prompt-level guardrail is one the plain gate clamps, and the
    # decisions (what the answers get) are the same
    texts = [FORGET_TEXTS[0] + " " + RETAIN_TEXTS[1], RETAIN_TEXTS[0] + " " + FORGET_TEXTS[2], RETAIN_TEXTS[2]]
    masks, gated = _masks_and_decisions(model, tok, (plain, guard), texts)
    assert torch.equal(gated[0], gated[1]) and gated[0].any()
    assert not (masks[1] & ~masks[0]).any() and masks[0].any() and not torch.equal(masks[0], masks[1])


def _masks_and_decisions(model, tok, guards, texts):
    """Per guardrail, through the HF runtime on one batch of `texts`: which prompt tokens it clamped, and its gate
    decisions (what the answers get)."""
    enc = tok(texts, return_tensors="pt", padding=True)
    masks, gated = [], []
    for g in guards:
        with g.applied(model) as session:
            model(**enc)
            masks.append(session.clamp_mask()[:, 0])
            gated.append(session.gated)
    return masks, gated


def test_a_prompt_level_needs_a_held_gate_above_the_threshold():
    with pytest.raises(dsg.DSGError, match="gate_prompt_percentile"):
        dsg.FitConfig(gate_window=4, gate_prompt_percentile=100.0)
    with pytest.raises(dsg.DSGError, match="gate_prompt_percentile"):
        dsg.FitConfig(gate_window=4, gate_hold=2, gate_percentile=97, gate_prompt_percentile=90)
    for margin, extra in ((0.5, {}), (-0.1, {"gate_prompt_percentile": 100.0})):  # no level to raise; negative
        with pytest.raises(dsg.DSGError, match="gate_prompt_margin"):
            dsg.FitConfig(gate_window=4, gate_hold=2, gate_percentile=97, gate_prompt_margin=margin, **extra)


def test_a_prompt_margin_raises_the_prompt_level_alone(detected):
    """gate_prompt_margin: the prompt level goes up by that many gaps between the threshold and the percentile's
    value; the threshold and the latch level stay, and through the HF runtime the raised level clamps fewer of the
    prompt tokens the unraised one does, and no other, with the same decisions."""
    model, tok, sae, _ = detected
    # a latch below the prompt level, so that raising the latch level instead would be told apart
    kw = dict(
        gate_hold=3, gate_latch_percentile=75.0, gate_percentile=50, gate_prompt_percentile=100.0, detector_holdout=0.5
    )  # each of the four retain texts is drawn with the calibration texts holding it
    calibration = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS
    at = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw), progress=False)
    raised = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw, gate_prompt_margin=0.5),
                     progress=False)  # fmt: skip
    assert raised.threshold == at.threshold and raised.latch == at.latch < at.prompt_level
    assert raised.prompt_level == pytest.approx(at.prompt_level + 0.5 * (at.prompt_level - at.threshold))
    assert raised.info["config"]["gate_prompt_margin"] == 0.5
    texts = [FORGET_TEXTS[0] + " " + RETAIN_TEXTS[1], RETAIN_TEXTS[0] + " " + FORGET_TEXTS[2], FORGET_TEXTS[1]]
    masks, gated = _masks_and_decisions(model, tok, (at, raised), texts)
    assert torch.equal(gated[0], gated[1])
    assert not (masks[1] & ~masks[0]).any() and masks[1].sum() < masks[0].sum()


def test_a_latch_margin_raises_the_latch_level_alone(detected):
    """gate_latch_margin: the latch level goes up by that many gaps between the threshold and the percentile's
    value, the threshold and prompt level stay, and an input whose peak lies between the two levels latches its
    answer under the first only."""
    model, tok, sae, _ = detected
    kw = dict(gate_hold=3, gate_latch_percentile=75.0, gate_percentile=50, gate_prompt_percentile=100.0,
              detector_holdout=0.5)  # fmt: skip
    calibration = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS
    at = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw), progress=False)
    raised = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw, gate_latch_margin=1.0),
                     progress=False)  # fmt: skip
    assert raised.threshold == at.threshold and raised.prompt_level == at.prompt_level
    assert raised.latch == pytest.approx(at.latch + (at.latch - at.threshold)) and raised.latch > at.latch
    assert raised.info["config"]["gate_latch_margin"] == 1.0
    # the calibration statistic of a sequence between the two levels: latched under one guardrail, not the other
    peaks = gate_rates(model, at, tokenize(tok, calibration + FORGET_TEXTS, 64), progress=False)
    between = [float(p) for p in peaks if at.latch < p <= raised.latch]
    assert between, "no input peaks between the two latch levels; the check would prove nothing"
    with pytest.raises(dsg.DSGError, match="gate_latch_margin"):
        _config(gate_hold=3, gate_latch_margin=0.5)  # a margin with no latch to raise
    with pytest.raises(dsg.DSGError, match="gate_latch_margin"):
        _config(gate_hold=3, gate_latch_percentile=99.0, gate_latch_margin=-1.0)


def _prompt_level_pair(detected):
    """The guardrail with a prompt level fitted in the test above, and held-out prompts of both kinds."""
    model, tok, sae, _ = detected
    kw = dict(gate_hold=3, gate_latch_percentile=100.0, gate_percentile=50, gate_prompt_percentile=100.0)
    # windows that hold the lone spaces the tiny tokenizer writes before most words, as the questions below were
    # chosen with (its small vocabulary leaves a space a token of its own far more often than SmolLM2's does)
    kw["gate_skip_spacing"] = False
    calibration = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, calibration, config=_config(**kw), progress=False)
    prompts = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS[:2]] + FORGET_TEXTS
    return model, tok, guard, prompts


CHOICES = [" x", " j"]  # two choices the tiny model weighs closely enough for a clamp to flip


def _level_questions(model, tok, guard, prompts):
    """Questions on `prompts`, each asked twice: once with the base model's choice as the answer (base-correct)
    and once with the other choice (base-wrong, so outside what the check judges). Returns them with the level's
    loss on the base-correct ones and the shares kept with and without it, measured directly through score_mcq."""
    from dsg.eval.mcq import score_mcq

    level, qs = guard.prompt_level, [{"question": p, "choices": CHOICES, "answer": 0} for p in prompts]
    kw = dict(batch_size=16, progress=False)  # as the check batches them
    base = [r.prediction_norm for r in score_mcq(model, tok, qs, **kw)]
    plain = copy.copy(guard)
    plain.prompt_level = None
    preds = [[r.prediction_norm for r in score_mcq(model, tok, qs, intervention=g, **kw)] for g in (guard, plain)]
    assert guard.prompt_level == level
    kept = [sum(p == b for p, b in zip(pred, base)) / len(base) for pred in preds]
    known = [q | {"answer": b} for q, b in zip(qs, base)]
    return known + [q | {"answer": 1 - b} for q, b in zip(qs, base)], kept[0] - kept[1], kept


def test_settling_the_prompt_level_keeps_or_drops_it_by_the_forgetting_it_costs(detected, tmp_path):
    """settle_prompt_level scores held-out forget questions with the base model and, on those it answers correctly,
    with the guardrail with and without its level (through the real runtime); it keeps the level where the level
    keeps at most max_loss more of them and drops it otherwise; the check is recorded in the guardrail's file,
    which then holds the rule it applies."""
    from dsg.eval.prompt_level import describe, settle_prompt_level

    model, tok, guard, prompts = _prompt_level_pair(detected)
    level = guard.prompt_level
    questions, loss, kept = _level_questions(model, tok, guard, prompts)
    assert loss > 0  # answers chosen so that the level costs forgetting

    record = settle_prompt_level(model, tok, guard, questions, max_loss=loss)
    assert record["kept"] and guard.prompt_level == level
    assert 2 * record["base_correct"] == record["questions"] == len(questions)  # only the base-correct are judged
    assert [record["kept_with_level"], record["kept_without_level"]] == pytest.approx(kept)
    assert record["loss"] == pytest.approx(loss) and len(record["questions_sha256"]) == 64
    assert record["gate_rate_base_correct"] > 0 and record["n_kept_with_level"] > record["n_kept_without_level"]
    assert (
        guard.info["prompt_level_check"] == record and "kept: of" in describe(record) and "loss +" in describe(record)
    )
    from dsg.eval.mcq import score_mcq

    base = score_mcq(model, tok, questions, batch_size=16, progress=False)  # a caller's base run, not scored again
    assert settle_prompt_level(model, tok, guard, questions, max_loss=loss, base=base) == record
    with pytest.raises(dsg.DSGError, match="base is not the base model's results"):
        settle_prompt_level(model, tok, guard, questions[1:], max_loss=loss, base=base)
    assert guard.prompt_level == level

    record = settle_prompt_level(model, tok, guard, questions, max_loss=loss - 1e-6)
    assert not record["kept"] and guard.prompt_level is None and record["level"] == level
    assert "dropped" in describe(record)
    assert "clamped only near windows over" not in guard.gate_rule()
    guard.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "guardrail.json").read_text())
    # written as format 8 for its hold's tables (the level's 4 is not needed), older without them
    assert "prompt_level" not in meta and meta["format_version"] == 8 and meta["prompt_level_check"]["kept"] is False
    loaded = dsg.Guardrail.load(tmp_path / "g", sae=detected[2])
    assert loaded.prompt_level is None and loaded.info["prompt_level_check"] == record
    assert torch.equal(loaded.hold_fillers, guard.hold_fillers)
    without = dsg.Guardrail.load(tmp_path / "g", sae=detected[2])
    without.hold_fillers = without.hold_invisible = without.hold_breaks = None
    without.save(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "guardrail.json").read_text())["format_version"] < 4
    from dsg.guard.inspect import describe as inspect_file

    shown = inspect_file(tmp_path / "g")
    assert describe(record) in shown  # dsg inspect shows the check
    median = float(loaded.tensors["calibration_rho"].double().quantile(0.5)) / SCALE  # in the gate line's units
    assert f"calibration rho: median {median:.3f}" in shown and f"> {loaded.threshold / SCALE:.4g}" in shown
    # questions the gate never opens on cannot judge the level: kept, and the line says why
    guard.prompt_level = level
    benign = [{"question": t, "choices": CHOICES, "answer": 0} for t in RETAIN_TEXTS[2:]]
    benign = [q | {"answer": r.prediction_norm} for q, r in zip(benign, score_mcq(model, tok, benign, progress=False))]
    record = settle_prompt_level(model, tok, guard, benign, max_loss=0.0)
    assert record["base_correct"] == len(benign) and record["gate_rate_base_correct"] == 0 and record["kept"]
    assert "unjudged" in describe(record) and "the gate opens on none" in describe(record)
    guard.prompt_level = None
    # without a level there is nothing to settle; a level is never settled on no questions or a bound out of range
    assert settle_prompt_level(model, tok, guard, questions) is None and describe(None) is None
    # a file written by the earlier check (shares of prompts clamped) is still described, not a crash
    old = {"prompts": 12, "clamped_with_level": 0.5, "clamped_without_level": 0.6, "share": 0.83, "kept": False}
    assert "earlier check" in describe(old) and "0.83" in describe(old) and "dropped" in describe(old)
    guard.prompt_level = level
    with pytest.raises(dsg.DSGError, match="forget questions"):
        settle_prompt_level(model, tok, guard, [])
    for bad in (-0.1, 1.0):
        with pytest.raises(dsg.DSGError, match="max_loss"):
            settle_prompt_level(model, tok, guard, questions, max_loss=bad)
    from tiny import tiny_model

    other = tiny_model("llama", seed=1, vocab=len(tok))  # same shapes, other weights: not the model it was fitted on
    with pytest.raises(dsg.DSGError, match="was fitted on model"):
        settle_prompt_level(other, tok, guard, questions + [q | {"answer": 1 - q["answer"]} for q in questions])
    assert guard.prompt_level == level  # a refused check changes nothing
