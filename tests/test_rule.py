"""The guardrail's rule as pure tensor functions (guard/rule.py): no model, no hooks."""

import pytest
import torch

from dsg.guard import rule


def test_a_static_rule_clamps_every_flagged_token_and_gates_every_row():
    a = torch.tensor([[True, False, True], [False, False, False]])
    clamp, state = rule.gate(a, torch.ones_like(a), n_prompt=3, state=None, threshold=None)
    assert torch.equal(clamp, a) and state.gated.all()


def test_prompt_positions_share_one_decision_and_padding_does_not_count():
    a = torch.tensor([[True, True, False, False], [True, False, False, False]])
    real = torch.tensor([[True, True, True, False], [True, True, True, True]])  # row 0: last position is padding
    clamp, state = rule.gate(a, real, n_prompt=4, state=None, threshold=0.5)
    assert state.flagged.tolist() == [2, 1] and state.real.tolist() == [3, 4]
    assert state.gated.tolist() == [True, False]  # 2/3 > 0.5; 1/4 is not
    assert clamp[0].tolist() == [True, True, False, False] and not clamp[1].any()
    assert rule.rho(a, real).tolist() == pytest.approx([2 / 3, 0.25])


def test_generated_tokens_extend_the_counts_and_a_padding_token_cannot_move_the_gate():
    state = rule.GateState(torch.tensor([1]), torch.tensor([2]), torch.tensor([False]))
    a = torch.tensor([[True]])
    _, pad_state = rule.gate(a & False, torch.tensor([[False]]), 0, state, 0.5)
    assert not pad_state.gated.any() and pad_state.real.tolist() == [2]
    clamp, state = rule.gate(a, torch.tensor([[True]]), 0, state, 0.5)  # 2/3 > 0.5
    assert state.gated.tolist() == [True] and clamp.tolist() == [[True]]


def test_a_held_decision_clamps_only_the_rows_it_holds_on():
    a = torch.tensor([[True, False], [True, True]])
    assert rule.held(a, torch.tensor([False, True])).tolist() == [[False, False], [True, True]]


def test_clamp_delta_sets_latents_to_minus_c_and_active_mode_spares_silent_ones():
    f = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # [B=1, T=2, S=2]
    W_dec = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    clamp = torch.tensor([[True, False]])
    pos, delta = rule.clamp_delta(f, clamp, W_dec, 10.0, "all")
    assert pos.tolist() == [[0, 0]] and delta.tolist() == [[-12.0, -10.0, 0.0]]
    _, delta = rule.clamp_delta(f, clamp, W_dec, 10.0, "active")
    assert delta.tolist() == [[-12.0, 0.0, 0.0]]


def test_apply_delta_touches_only_the_clamped_positions():
    x = torch.randn(2, 3, 4)
    out = rule.apply_delta(x, torch.tensor([[1, 2]]), torch.ones(1, 4), None)
    assert torch.equal(out[1, 2], x[1, 2] + 1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(out[mask], x[mask]) and out is not x


def _windowed_reference(a, real, threshold, w, hold=None, n_prompt=0, latch=None, prompt_level=None, counted=None,
                        latch_run=None):  # fmt: skip
    """The windowed gate written as a loop over tokens: the definition the vectorised rule must equal. Latched;
    or, with `hold`, open within `hold` real tokens of a window over the threshold at positions before
    `n_prompt` (the prompt) and latched from there on (the answer), which with `latch` also opens once any window
    so far went over the latch. With `prompt_level`, prompt positions are clamped only within `hold` real tokens of
    a window over it; what the answer gets does not change. With `counted`, only those real tokens are judged: the
    hold counts them, and a window ending elsewhere (a filler) neither opens, latches nor sets the peak. With
    `latch_run`, `latch_run` judged windows in a row over the threshold latch like a window over `latch`."""
    counted = real if counted is None else counted
    clamp, gated, peaks = torch.zeros_like(a), [], []
    for b in range(a.shape[0]):
        recent, on, peak, since, strong, since_p, run = [], False, 0.0, None, False, None, 0
        for t in range(a.shape[1]):
            opens = False
            if real[b, t]:
                recent = (recent + [int(a[b, t])])[-w:]
                share = sum(recent) / w
                judged = bool(counted[b, t])  # a filler's window neither opens, latches nor peaks
                step = int(judged)
                if judged:
                    peak, opens = max(peak, share), share > threshold
                    run = run + 1 if opens else 0
                since = 0 if opens else None if since is None else since + step
                strong = strong or (judged and latch is not None and share > latch)
                strong = strong or (latch_run is not None and run >= latch_run)
                if prompt_level is not None:
                    high = judged and share > prompt_level
                    since_p = 0 if high else None if since_p is None else since_p + step
            if hold is not None and t < n_prompt:
                on = since is not None and since < hold
                near = on if prompt_level is None else since_p is not None and since_p < hold
            else:
                on = on or opens or (hold is not None and strong)
                near = on
            clamp[b, t] = bool(a[b, t]) and near
        gated.append(on or (hold is not None and strong))
        peaks.append(peak)
    return clamp, torch.tensor(gated), torch.tensor(peaks)


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_the_windowed_gate_equals_its_definition_whole_chunked_or_token_by_token(seed, words):
    """Latched, as calibration reads it too (`words`: judged at the tokens that carry words only)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 30, generator=g) < 0.3
    real = torch.rand(4, 30, generator=g) < 0.9
    a = a & real
    counted = real & (torch.rand(4, 30, generator=g) < 0.6) if words else None
    want, gated, peaks = _windowed_reference(a, real, 0.5, 5, counted=counted)
    if words:
        assert (peaks <= _windowed_reference(a, real, 0.5, 5)[2]).all()  # the largest of fewer windows
    for chunk in (30, 7, 1):
        state, parts = None, []
        for t in range(0, 30, chunk):
            part = None if counted is None else counted[:, t : t + chunk]
            c, state = rule.window_gate(a[:, t : t + chunk], real[:, t : t + chunk], state, 0.5, 5, counted_BT=part)
            parts.append(c)
        assert torch.equal(torch.cat(parts, 1), want), chunk
        assert torch.equal(state.gated, gated) and torch.allclose(state.peak, peaks.float())


def test_benign_padding_cannot_dilute_the_windowed_gate():
    burst = torch.tensor([[False] * 3 + [True] * 4 + [False] * 3])
    for pad in (0, 50, 500):
        a = torch.cat([torch.zeros(1, pad, dtype=torch.bool), burst], 1)
        real = torch.ones_like(a)
        whole_input = float(rule.rho(a, real)[0])
        _, state = rule.window_gate(a, real, None, 0.5, 5)
        assert state.gated.all(), pad  # 4 of 5 consecutive tokens: open, however long the preamble
        assert (whole_input > 0.3) == (pad == 0)  # the paper's share falls with the padding


def test_a_held_decision_can_start_where_the_prompt_began_to_clamp():
    a = torch.tensor([[True, True, False, True], [True, False, True, True]])
    gated = torch.tensor([True, False])
    assert rule.held(a, gated).tolist() == [[True, True, False, True], [False] * 4]
    start = torch.tensor([1, 0])  # a windowed gate opened after the first token of row 0
    assert rule.held(a, gated, start).tolist() == [[False, True, False, True], [False] * 4]


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("prompt_level", [None, 0.8])
@pytest.mark.parametrize("latch_run", [None, 3])
@pytest.mark.parametrize("latch", [None, 0.7, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_a_held_open_gate_equals_its_definition_whole_chunked_or_token_by_token(seed, latch, latch_run, prompt_level,
                                                                                 words):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(6, 40, generator=g) < 0.35
    real = torch.rand(6, 40, generator=g) < 0.9
    a[:2, :8] = True  # two rows whose prompt goes over the latch early, then closes
    a[:2, 8:30] = False
    a[2, :16] = torch.tensor([True, True, True, False] * 4)  # a long stretch over the threshold, under the latch
    a[2, 16:30] = False
    a = a & real
    counted = real & (torch.rand(6, 40, generator=g) < 0.6) if words else None  # tokens that carry words
    n_prompt = 30
    levels = dict(latch=latch, prompt_level=prompt_level, counted=counted, latch_run=latch_run)
    want, _, _ = _windowed_reference(a, real, 0.5, 4, hold=3, n_prompt=n_prompt, **levels)
    if words:  # judging words only changes which tokens are clamped
        every = _windowed_reference(a, real, 0.5, 4, 3, n_prompt, **(levels | {"counted": None}))[0]
        assert not torch.equal(want, every)
    assert want[:, :n_prompt].any() and not torch.equal(want, _windowed_reference(a, real, 0.5, 4)[0])
    if latch is not None:  # the latch guards answers the hold alone would leave open
        assert not torch.equal(want, _windowed_reference(a, real, 0.5, 4, hold=3, n_prompt=n_prompt)[0])
    if latch_run is not None and latch != 0.7:  # so does a run over the threshold where no window reaches the latch
        no_run = _windowed_reference(a, real, 0.5, 4, 3, n_prompt, **(levels | {"latch_run": None}))[0]
        assert want[2, n_prompt:].any() and not no_run[2, n_prompt:].any()
        assert not (no_run & ~want).any()
    if prompt_level is not None:  # the prompt level spares prompt tokens the threshold alone would clamp
        plain = _windowed_reference(a, real, 0.5, 4, 3, n_prompt, **(levels | {"prompt_level": None}))[0]
        assert (plain[:, :n_prompt] & ~want[:, :n_prompt]).any() and not (want & ~plain).any()
        assert torch.equal(want[:, n_prompt:], plain[:, n_prompt:])
    for chunk in (40, 7, 1):
        for prompt_only in (False, True):  # the whole sequence, or its prompt alone (what the answer would get)
            T = n_prompt if prompt_only else 40
            state, parts = None, []
            for t in range(0, T, chunk):
                sl = slice(t, min(t + chunk, T))
                c, state = rule.window_gate(a[:, sl], real[:, sl], state, 0.5, 4, None, 3,
                                            max(0, min(n_prompt - t, chunk)), latch, prompt_level,
                                            None if counted is None else counted[:, sl], latch_run)  # fmt: skip
                parts.append(c)
            cut = None if counted is None else counted[:, :T]
            ref, ref_gated, ref_peaks = _windowed_reference(a[:, :T], real[:, :T], 0.5, 4, 3, n_prompt,
                                                            **(levels | {"counted": cut}))  # fmt: skip
            assert torch.equal(torch.cat(parts, 1), ref), (chunk, prompt_only)
            assert torch.equal(state.gated, ref_gated), (chunk, prompt_only)
            assert torch.allclose(state.peak, ref_peaks.float()), (chunk, prompt_only)


def test_the_longest_run_the_state_keeps_is_the_calibration_statistic():
    """rule.longest_runs (what fit reads R from) equals the state's `longest` after the same windows, whole or in
    chunks; tokens the gate does not judge neither extend nor break a run."""
    g = torch.Generator().manual_seed(5)
    a = torch.rand(4, 50, generator=g) < 0.5
    real = torch.ones_like(a)
    counted = torch.rand(4, 50, generator=g) < 0.7
    share = rule._window_shares(rule.WindowState.start(4, 4), a, real)[0]
    judged = rule.judged_tokens(real, counted)
    want = rule.longest_runs([share[b][judged[b]] for b in range(4)], 0.5)
    assert want.max() >= 2
    for chunk in (50, 9, 1):
        state = None
        for t in range(0, 50, chunk):
            sl = slice(t, t + chunk)
            state = rule.window_gate(a[:, sl], real[:, sl], state, 0.5, 4, None, 3, 0, counted_BT=counted[:, sl])[1]
        assert torch.equal(state.longest, want), chunk
    assert rule.longest_runs([torch.tensor([0.6, 0.7, 0.1, 0.9]), torch.tensor([])], 0.5).tolist() == [2, 0]


def test_a_latch_guards_the_answer_to_a_question_padded_after():
    question = [True] * 6 + [False] * 40  # a strong burst, then more benign text than the hold
    a = torch.tensor([question, [False, True] * 3 + [False] * 40])  # row 1: over the threshold, not the latch
    real = torch.ones_like(a)
    for latch, guarded in ((None, [False, False]), (0.9, [True, False])):
        clamp, state = rule.window_gate(a, real, None, 0.5, 4, None, 8, a.shape[1], latch)
        assert not clamp[:, 20:].any()  # the padding itself is not clamped
        assert state.gated.tolist() == guarded
        answer = torch.ones(2, 5, dtype=torch.bool)
        clamp, _ = rule.window_gate(answer, torch.ones_like(answer), state, 0.5, 4, None, 8, 0, latch)
        assert clamp[0].all() == guarded[0]


def test_padding_that_carries_no_word_cannot_run_a_counted_hold_out():
    """A forget burst, then 40 filler tokens (zero-width spaces, " ."): counting every real token, the 8-token hold
    runs out and the answer is not guarded; counting tokens that carry words, the gate is still open at the end.
    Benign words after the burst still close it."""
    burst = [True] * 6
    a = torch.tensor([burst + [False] * 40, burst + [False] * 40])
    real = torch.ones_like(a)
    counted = torch.ones_like(a)
    counted[0, 6:] = False  # row 0: fillers after the burst; row 1: words
    _, every = rule.window_gate(a, real, None, 0.5, 4, None, 8, a.shape[1])
    clamp, words = rule.window_gate(a, real, None, 0.5, 4, None, 8, a.shape[1], counted_BT=counted)
    assert every.gated.tolist() == [False, False] and words.gated.tolist() == [True, False]
    answer = torch.tensor([[True, False, False]] * 2)  # one flagged token: the answer alone opens nothing
    guarded, _ = rule.window_gate(answer, torch.ones_like(answer), words, 0.5, 4, None, 8, 0)
    assert guarded.tolist() == [[True, False, False], [False] * 3]


def test_padding_that_carries_no_word_cannot_open_a_counted_hold_or_reach_the_latch():
    """A benign request whose words never open the gate, then 40 fillers whose windows carry evidence (newlines
    the detector reads as code): judged at every real token the fillers open the gate, hold it open to the end
    and pass the latch; judged at words only they do nothing. The same evidence at words opens it. (A window
    ending at a word still sums the fillers before it.)"""
    a = torch.tensor([[False] * 6 + [True] * 40] * 2)
    real = torch.ones_like(a)
    counted = torch.ones_like(a)
    counted[0, 6:] = False  # row 0: the evidence sits on fillers; row 1: on words
    every_clamp, every = rule.window_gate(a, real, None, 0.5, 4, None, 8, a.shape[1], 0.9)
    clamp, words = rule.window_gate(a, real, None, 0.5, 4, None, 8, a.shape[1], 0.9, counted_BT=counted)
    assert every.gated.tolist() == [True, True] and every_clamp[0].any()
    assert words.gated.tolist() == [False, True] and not clamp[0].any() and clamp[1, 8:].all()
    assert float(words.peak[0]) == 0.0 and float(words.peak[1]) == 1.0
    answer = torch.ones(2, 6, dtype=torch.bool)  # generated fillers do not open the answer's gate either
    words = torch.tensor([[False] * 6, [True] * 6])  # row 0: every generated token a filler
    _, after = rule.window_gate(answer, answer, None, 0.5, 4, None, 8, 0, counted_BT=words)
    assert after.gated.tolist() == [False, True]


def test_a_held_open_gate_closes_after_a_benign_burst_and_guards_an_answer_begun_open():
    burst = [False] * 5 + [True] * 4 + [False] * 20
    a = torch.tensor([burst + burst[:9]])  # a benign stretch the gate misjudges, then a forget question at the end
    real = torch.ones_like(a)
    clamp, state = rule.window_gate(a, real, None, 0.5, 5, None, 8, a.shape[1])
    on = [bool(x) for x in clamp[0]]
    assert on[7:9] == [True, True] and not any(on[9:29])  # clamped near the first burst only
    assert state.gated.all()  # open at the prompt's last token: the answer is guarded
    answer = torch.zeros(1, 30, dtype=torch.bool)
    answer[0, ::3] = True
    clamp, state = rule.window_gate(answer, torch.ones_like(answer), state, 0.5, 5, None, 8, 0)
    assert torch.equal(clamp, answer) and state.gated.all()  # latched through the answer


def test_a_prompt_level_spares_a_benign_stretch_and_still_guards_the_answer():
    """Prompt tokens are clamped only near windows over the prompt level; the threshold still decides the answer:
    a stretch over the threshold alone is read as it is, and a prompt ending on one gets a guarded answer."""
    weak = [False, True] * 3  # windows of 4 at 0.5 to 0.75: over the threshold (0.4), not the level (0.8)
    strong = [True] * 6  # windows at 1.0: over both
    a = torch.tensor([[False] * 10 + weak + [False] * 20 + weak, [False] * 10 + strong + [False] * 20 + strong])
    real = torch.ones_like(a)
    plain, plain_state = rule.window_gate(a, real, None, 0.4, 4, None, 8, a.shape[1])
    clamp, state = rule.window_gate(a, real, None, 0.4, 4, None, 8, a.shape[1], None, 0.8)
    assert plain[0].any() and not clamp[0].any()  # row 0: only over the threshold, its prompt is untouched
    # row 1: clamped from the token whose window goes over the level (the burst's 4th) instead of the threshold
    assert clamp[1, 13:16].all() and not clamp[1, :13].any() and plain[1, 11:13].all()
    assert not (clamp[1] & ~plain[1]).any()
    assert state.gated.tolist() == plain_state.gated.tolist() == [True, True]  # both answers are guarded
    answer = torch.tensor([[True, False, True]] * 2)
    guarded, _ = rule.window_gate(answer, torch.ones_like(answer), state, 0.4, 4, None, 8, 0, None, 0.8)
    assert torch.equal(guarded, answer)
