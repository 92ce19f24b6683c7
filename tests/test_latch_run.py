"""The run latch (FitConfig.gate_latch_run_percentile, Guardrail.latch_run): a prompt in which R judged windows in
a row went over the threshold gets a guarded answer, R read from the calibration sequences; stored as format 9."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import dsg
from dsg.files import read_safetensors
from dsg.guard import rule
from dsg.guard.stats import gate_rates
from dsg.lm.text import tokenize

from tiny import FORGET_TEXTS, RETAIN_TEXTS, refuses_edit, sparse_sae

FORGET = FORGET_TEXTS * 3
RETAIN = RETAIN_TEXTS * 3
CALIBRATION = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS  # spread-out statistics


def _config(**kw):
    base = dict(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=6, detector=True,
                detector_c=1.0, gate_percentile=50, gate_hold=3, gate_latch_percentile=100.0,
                detector_holdout=0.5)  # fmt: skip
    return dsg.FitConfig(**(base | kw))


@pytest.fixture(scope="module")
def fitted(tiny_llama):
    """(model, tok, sae, the guardrail without a run latch, the same with one at P100 of the calibration runs)."""
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    plain = dsg.fit(model, tok, sae, FORGET, RETAIN, CALIBRATION, config=_config(), progress=False)
    run = dsg.fit(model, tok, sae, FORGET, RETAIN, CALIBRATION, config=_config(gate_latch_run_percentile=100.0),
                  progress=False)  # fmt: skip
    return model, tok, sae, plain, run


def test_the_run_latch_is_one_more_than_the_longest_calibration_run(fitted):
    """R is read from the calibration sequences' longest runs of judged windows over the threshold, which are the
    runs the gate itself counts (the state's `longest`); the other levels do not move."""
    model, tok, sae, plain, run = fitted
    assert plain.latch_run is None and "calibration_runs" not in plain.tensors
    assert (run.threshold, run.latch, run.prompt_level) == (plain.threshold, plain.latch, plain.prompt_level)
    runs = run.tensors["calibration_runs"]
    assert len(runs) == len(run.tensors["calibration_rho"]) and runs.max() >= 1
    assert run.latch_run == int(runs.max()) + 1
    # the scores gate_rates keeps are the gate's own windows: their largest is the statistic the levels come from
    seqs = tokenize(tok, CALIBRATION + FORGET_TEXTS, 64)
    scores: list = []
    peaks = gate_rates(model, run, seqs, windows=scores, progress=False)
    assert len(scores) == len(seqs)
    assert torch.allclose(torch.stack([s.max().clamp(min=0) for s in scores]), peaks)
    assert rule.longest_runs(scores, run.threshold).max() >= 2
    assert "judged windows in a row over the threshold" in run.gate_rule()
    assert f"latch_run={run.latch_run}" in repr(run)


def test_a_long_run_guards_the_answer_where_no_window_reaches_the_latch(fitted):
    """Under a run latch low enough to matter, a prompt whose run reaches R gets a guarded answer, one whose run
    does not is answered as the guardrail without it answers, and the prompt's own tokens are clamped the same."""
    model, tok, sae, plain, _ = fitted
    seqs = tokenize(tok, CALIBRATION + FORGET_TEXTS + [f"{f} {r} {r}" for f in FORGET_TEXTS for r in RETAIN_TEXTS],
                    64)  # fmt: skip
    scores: list = []
    peaks = gate_rates(model, plain, seqs, windows=scores, progress=False)
    longest = rule.longest_runs(scores, plain.threshold)
    below = [i for i in range(len(seqs)) if peaks[i] <= plain.latch]  # the peak latch leaves these to the hold
    lengths = sorted({int(longest[i]) for i in below if longest[i] >= 2})
    assert lengths, "no sequence below the latch runs two windows over the threshold; the check would prove nothing"
    runner = copy.copy(plain)  # the same latents, detector and levels, with a run latch at that run
    runner.latch_run = lengths[-1]
    for i in below:
        decisions, masks = [], []
        for g in (plain, runner):
            with g.applied(model) as session:
                model(torch.tensor([seqs[i]]))
                decisions.append(bool(session.gated[0]))
                masks.append(session.clamp_mask()[:, 0])
        assert torch.equal(masks[0], masks[1])  # the prompt's own tokens: as before
        if longest[i] >= lengths[-1]:
            assert decisions[1]
        else:
            assert decisions[1] == decisions[0]
    assert any(longest[i] >= lengths[-1] and not _gated(model, plain, seqs[i]) for i in below)


def _gated(model, guard, seq) -> bool:
    with guard.applied(model) as session:
        model(torch.tensor([seq]))
        return bool(session.gated[0])


def test_a_run_latch_is_saved_as_format_9_and_edits_are_refused(fitted, tmp_path):
    model, tok, sae, plain, run = fitted
    run.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "guardrail.json").read_text())
    assert meta["format_version"] == 9 and meta["latch_run"] == run.latch_run
    loaded = dsg.Guardrail.load(tmp_path / "r", sae=sae)
    assert loaded.latch_run == run.latch_run and torch.equal(
        loaded.tensors["calibration_runs"], run.tensors["calibration_runs"]
    )
    from dsg.guard.inspect import describe as inspect_file

    shown = inspect_file(tmp_path / "r")  # dsg inspect says where the latch sits among the calibration runs
    longest = int(run.tensors["calibration_runs"].max())
    assert f"longest {longest}," in shown and f"the run latch at {run.latch_run}" in shown
    assert "judged windows in a row over the threshold" in shown
    plain.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "guardrail.json").read_text())["format_version"] < 9
    tensors = read_safetensors(tmp_path / "r" / "guardrail.safetensors")
    refuses_edit(tmp_path, meta | {"format_version": 8}, tensors, sae, "format_version")  # an older dsg ignores it
    for value in (1, 0, -3, 2.5, "11", True, 1 << 40):
        refuses_edit(tmp_path, meta | {"latch_run": value}, tensors, sae, "latch_run")
    held = {k: v for k, v in meta.items() if k not in ("hold", "latch", "prompt_level")}
    refuses_edit(tmp_path, held, tensors, sae, "hold")
    with pytest.raises(dsg.DSGError, match="latch_run"):
        dsg.Guardrail(sae, None, run.features, 0.5, window=4, hold=3, latch_run=1)
    with pytest.raises(dsg.DSGError, match="hold"):
        dsg.Guardrail(sae, None, run.features, 0.5, window=4, latch_run=5)


def test_the_run_percentile_needs_a_held_gate_and_a_run_longer_than_one(fitted):
    model, tok, sae, _, _ = fitted
    with pytest.raises(dsg.DSGError, match="gate_latch_run_percentile"):
        dsg.FitConfig(gate_window=4, gate_latch_run_percentile=100.0)  # no hold
    for bad in (0.0, 101.0):
        with pytest.raises(dsg.DSGError, match="gate_latch_run_percentile"):
            dsg.FitConfig(gate_window=4, gate_hold=3, gate_latch_run_percentile=bad)
    # half the calibration sequences never go over a P50 threshold: their P1 run is 0, so R would be 1
    with pytest.raises(dsg.DSGError, match="Raise gate_latch_run_percentile"):
        dsg.fit(model, tok, sae, FORGET, RETAIN, CALIBRATION, config=_config(gate_latch_run_percentile=1.0),
                progress=False)  # fmt: skip
