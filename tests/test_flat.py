"""Guardrails over a serving engine's flattened steps (runtime/flat.py): whatever the schedule (requests joining
and leaving mid-flight, prompts whole or in chunks, one token per decoding step, a request recomputed from
position 0 after preemption), each request's clamped tokens and deltas are those of the rule applied to its whole
sequence, the no-cache reference; and what cannot be judged is refused."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import dsg
from dsg.guard import rule
from dsg.lm.hooks import activations_by_batch
from dsg.lm.text import real_token_mask, special_token_ids
from dsg.runtime.flat import Chunk, ChunkRefused, RequestGates

from tiny import FORGET_TEXTS, RETAIN_TEXTS, sparse_sae


@pytest.fixture(scope="module")
def setting(tiny_llama):
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.15)
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, gate_percentile=50)
    paper = dsg.fit(model, tok, sae, FORGET_TEXTS * 3, RETAIN_TEXTS * 3, config=config, progress=False)
    window = dsg.Guardrail(sae, paper.hook, paper.features, 0.25, window=4)
    static = dsg.Guardrail(sae, paper.hook, paper.features, gated=False)
    others = [j for j in range(sae.d_sae) if j not in paper.features][:6]
    weights = dict.fromkeys(paper.features, 700) | {j: -300 - 50 * k for k, j in enumerate(others)}
    detector = dsg.Guardrail(sae, paper.hook, paper.features, 150.0, window=4, detector=weights)
    texts = [t + " " + u for t, u in zip(FORGET_TEXTS + RETAIN_TEXTS, RETAIN_TEXTS + FORGET_TEXTS)][:8]
    seqs = [tok(t)["input_ids"][:40] for t in texts]
    acts = {}
    for idx, _, x, _ in activations_by_batch(model, paper.hook, [([i], torch.tensor([s]), torch.ones(1, len(s)))
                                                                  for i, s in enumerate(seqs)]):  # fmt: skip
        acts[idx[0]] = x[0]
    prompts = [max(3, len(s) // 2 - 3 * (i % 3)) for i, s in enumerate(seqs)]
    peaks = []  # the detector's threshold: the median of its window statistic, so some requests open and some not
    for i, s in enumerate(seqs):
        real = real_token_mask(torch.tensor([s]), None, special_token_ids(model))
        _, a, e = detector.flags(acts[i][None], real)
        peaks.append(float(rule.window_gate(a, real, None, 0.0, 4, e)[1].peak[0]))
    detector.threshold = float(sorted(peaks)[len(peaks) // 2])
    held = dsg.Guardrail(sae, paper.hook, paper.features, detector.threshold, window=4, detector=weights, hold=3)
    closed = []  # prompt peaks of the prompts the held gate opened and closed again before their end
    opened = []  # prompt peaks of the prompts that went over the threshold
    for i, s in enumerate(seqs):
        real = real_token_mask(torch.tensor([s[: prompts[i]]]), None, special_token_ids(model))
        _, a, e = held.flags(acts[i][None, : prompts[i]], real)
        state = held.gate(a, real, prompts[i], None, e)[1]
        if float(state.peak[0]) > held.threshold:
            opened.append(float(state.peak[0]))
        if float(state.peak[0]) > held.threshold and not state.gated[0]:
            closed.append(float(state.peak[0]))
    assert closed, "the setting needs a prompt whose held gate closes before its end"
    latch = (detector.threshold + max(closed)) / 2  # that prompt goes over it, others only over the threshold
    latched = dsg.Guardrail(sae, paper.hook, paper.features, detector.threshold, window=4, detector=weights, hold=3,
                            latch=latch)  # fmt: skip
    # prompts are clamped only near their highest windows: above the latch, below the highest prompt's peak
    prompted = dsg.Guardrail(sae, paper.hook, paper.features, detector.threshold, window=4, detector=weights, hold=3,
                             latch=latch, prompt_level=(latch + max(opened)) / 2)  # fmt: skip
    # a gate judged at words only: here every third token id is a "filler", so that the count differs from the real
    # tokens', and so are the tokens at which the first request's windows go over the threshold
    real = real_token_mask(torch.tensor([seqs[0]]), None, special_token_ids(model))
    share = rule._window_shares(rule.WindowState.start(1, 4), held.flags(acts[0][None], real)[2], real)[0][0]
    fillers = sorted(
        {t for s in seqs for t in s if t % 3 == 0} | {seqs[0][p] for p in (share > held.threshold).nonzero()[:, 0]}
    )
    words = dsg.Guardrail(sae, paper.hook, paper.features, detector.threshold, window=4, detector=weights, hold=3,
                          latch=latch, hold_fillers=fillers)  # fmt: skip
    run = _run_latched(sae, paper, weights, acts, seqs, prompts, sorted(peaks), special_token_ids(model))
    guards = {"paper": paper, "window": window, "static": static, "detector": detector, "held": held,
              "latch": latched, "prompt": prompted, "words": words, "run": run}  # fmt: skip
    return guards, seqs, acts, prompts, special_token_ids(model)


def _run_latched(sae, paper, weights, acts, seqs, prompts, levels, specials):
    """A held detector gate with a run latch (no window latch): the lowest of `levels` at which some prompt runs
    two or more windows over the threshold and is shut at its end, R that prompt's run, so that the run latch
    guards an answer the hold alone leaves open."""
    for threshold in levels:
        held = dsg.Guardrail(sae, paper.hook, paper.features, threshold, window=4, detector=weights, hold=3)
        runs = []
        for i, s in enumerate(seqs):
            real = real_token_mask(torch.tensor([s[: prompts[i]]]), None, specials)
            _, a, e = held.flags(acts[i][None, : prompts[i]], real)
            state = held.gate(a, real, prompts[i], None, e)[1]
            if not state.gated[0]:
                runs.append(int(state.longest[0]))
        if max(runs, default=0) >= 2:
            return dsg.Guardrail(sae, paper.hook, paper.features, threshold, window=4, detector=weights, hold=3,
                                 latch_run=max(runs))  # fmt: skip
    raise AssertionError("no prompt runs two windows over any threshold and is shut at its end")


def reference(g, seq, x, n_prompt, specials):
    """The rule on the whole sequence: {position: delta} of the clamped tokens."""
    ids = torch.tensor([seq])
    real = real_token_mask(ids, None, specials)
    f, a, e = g.flags(x[None], real)
    clamp, _ = g.gate(a, real, n_prompt, None, e, g.counted(real, ids))
    pos, delta = g.delta(f, clamp)
    return {int(p): d for p, d in zip(pos[:, 1], delta)}


def simulate(gates, hook, seqs, acts, prompts, chunk: int | None, seed: int, preempt: int | None = None):
    """Run the requests through a random continuous-batching schedule; {request: {position: delta}}. With several
    hooks (a list), each step calls every hook in turn, as an engine's forward reaches each hooked layer, and the
    result is {hook: {request: {position: delta}}}."""
    hooks = [hook] if isinstance(hook, str) else list(hook)
    rng = random.Random(seed)
    joins = {r: rng.randrange(0, 6) for r in range(len(seqs))}
    done = dict.fromkeys(range(len(seqs)), 0)  # tokens computed
    outs = {h: {r: {} for r in range(len(seqs))} for h in hooks}
    preempted = False
    step = 0
    while any(done[r] < len(seqs[r]) for r in done):
        live = [r for r in done if joins[r] <= step and done[r] < len(seqs[r])]
        rng.shuffle(live)
        if preempt is not None and not preempted and done[preempt] > prompts[preempt] + 2:
            done[preempt], preempted = 0, True  # recomputed from scratch: prompt and generated tokens together
            for out in outs.values():
                out[preempt] = {}
            gates.keep_only([str(r) for r in live if r != preempt])
        pieces, chunks, start = [], [], 0
        for r in live:
            pos = done[r]
            if pos < prompts[r]:  # prefill: whole prompt (or a chunk), or the whole recomputed sequence
                n = prompts[r] - pos if chunk is None else min(chunk, prompts[r] - pos)
                if preempted and r == preempt and pos == 0:
                    n = len(seqs[r]) - 3
            else:
                n = 1
            pieces.append((r, pos, n))
            chunks.append(Chunk(str(r), start, n, pos, prompts[r]))
            start += n
        if pieces:
            x = torch.cat([acts[r][p : p + n] for r, p, n in pieces])
            x = torch.cat([x, torch.randn(3, x.shape[1])])  # padding rows past the last chunk
            ids = torch.tensor([t for r, p, n in pieces for t in seqs[r][p : p + n]] + [0, 0, 0])
            positions = torch.tensor([p + k for r, p, n in pieces for k in range(n)] + [0, 0, 0])
            for h in hooks:
                found = gates.step(h, x, ids, positions, chunks)
                if found is not None:
                    owner = [(r, p + k) for r, p, n in pieces for k in range(n)]
                    for i, d in zip(found[0].tolist(), found[1]):
                        r, p = owner[i]
                        outs[h][r][p] = d
            for r, p, n in pieces:
                done[r] = p + n
        step += 1
    return outs[hook] if isinstance(hook, str) else outs


@pytest.mark.parametrize(
    "kind,chunk",
    [("paper", None), ("window", None), ("window", 3), ("static", 2), ("detector", None), ("detector", 3),
     ("held", None), ("held", 3), ("latch", None), ("latch", 2), ("prompt", None), ("prompt", 2), ("words", None),
     ("words", 2), ("run", None), ("run", 2)],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1])
def test_any_schedule_clamps_what_the_whole_sequence_rule_clamps(setting, kind, chunk, seed):
    guards, seqs, acts, prompts, specials = setting
    g = guards[kind]
    events = []
    gates = RequestGates([g], specials, on_event=events.append)
    got = simulate(gates, g.hook, seqs, acts, prompts, chunk, seed, preempt=2 if seed else None)
    clamped = 0
    for r, seq in enumerate(seqs):
        want = reference(g, seq, acts[r], prompts[r], specials)
        assert sorted(got[r]) == sorted(want), f"request {r}"
        for p in want:
            torch.testing.assert_close(got[r][p], want[p], atol=1e-4, rtol=1e-4)
        clamped += len(want)
    assert clamped > 0  # the setting clamps something
    if kind in ("latch", "run"):  # and the latch guards an answer the hold alone leaves open
        held = guards["held"] if kind == "latch" else copy.copy(g)
        if kind == "run":  # the same gate without its run latch
            held.latch_run = None
        assert any(reference(g, s, acts[r], prompts[r], specials).keys() != reference(held, s, acts[r], prompts[r],
                   specials).keys() for r, s in enumerate(seqs))  # fmt: skip
    if kind == "words":  # judging words only clamps other tokens than the latch judging every real token
        latched = guards["latch"]
        mine = [set(reference(g, s, acts[r], prompts[r], specials)) for r, s in enumerate(seqs)]
        theirs = [set(reference(latched, s, acts[r], prompts[r], specials)) for r, s in enumerate(seqs)]
        assert mine != theirs
    if kind == "prompt":  # clamped only near windows over the level: a subset of the latch's clamps, the same
        # answers, and with a level above every prompt's peak (just under the largest mean evidence the detector
        # can give: window sums are multiples of 1/4 here), no prompt token at all
        latched = guards["latch"]
        high = dsg.Guardrail(latched.sae, g.hook, g.features, g.threshold, window=4, detector=dict(
            zip(g.detector.latents.tolist(), g.detector.weights.tolist())), hold=3, latch=g.latch,
            prompt_level=g.detector.reach(g.window)[1] - 0.125)  # fmt: skip
        for r, s in enumerate(seqs):
            theirs = set(reference(latched, s, acts[r], prompts[r], specials))
            for level in (g, high):
                mine = set(reference(level, s, acts[r], prompts[r], specials))
                assert mine <= theirs and {p for p in mine if p >= prompts[r]} == {p for p in theirs if p >= prompts[r]}
            assert not any(p < prompts[r] for p in reference(high, s, acts[r], prompts[r], specials))
        assert any(p < prompts[r] for r, s in enumerate(seqs) for p in reference(g, s, acts[r], prompts[r], specials))
    if kind != "static":
        decided = {e["request_id"] for e in events if e["event"] == "prompt"}
        assert decided == {str(r) for r in range(len(seqs))}
        for e in (e for e in events if e["event"] == "prompt"):  # the last prompt event of a recomputed request
            r = int(e["request_id"])
            want = reference(g, seqs[r], acts[r], prompts[r], specials)
            last = [x for x in events if x["request_id"] == e["request_id"] and x["event"] == "prompt"][-1]
            assert last["prompt_clamped"] == sum(p < prompts[r] for p in want), f"request {r}"
    if kind == "held":  # a held gate clamps inside some prompt and is shut at its end: the event says both
        assert any(e["prompt_clamped"] > 0 and not e["gated"] for e in events if e["event"] == "prompt")
    if kind == "run":  # the audit event says how long the prompt's longest run was, beside R
        prompt_events = [e for e in events if e["event"] == "prompt"]
        assert all(e["latch_run"] == g.latch_run and isinstance(e["run"], int) for e in prompt_events)
        runs = [e["run"] for e in prompt_events]
        assert max(runs) >= g.latch_run > min(runs)
    if kind in ("paper", "detector", "held", "latch", "prompt", "words", "run"):
        on = {e["request_id"] for e in events if e["gated"]}
        assert 0 < len(on) < len(seqs)  # some requests gated, some not: the gates are per request


@pytest.mark.parametrize("chunk", [None, 2])
def test_guardrails_at_two_layers_each_keep_their_own_state_across_a_steps_calls(setting, chunk):
    """An engine's step calls the guardrails once per hooked layer; a request's first chunk must start afresh only
    the guardrails of the layer being called, or the second layer's call wipes what the first judged (an engine
    crash at the first decoding step, or a chunked prompt clamped late)."""
    guards, seqs, acts, prompts, specials = setting
    first = guards["prompt"]
    second = dsg.Guardrail(first.sae, "blocks.1.hook_resid_post", first.features, guards["window"].threshold,
                           window=4)  # fmt: skip
    events = []
    gates = RequestGates([first, second], specials, on_event=events.append)
    got = simulate(gates, [first.hook, second.hook], seqs, acts, prompts, chunk, seed=1, preempt=2)
    clamped = {first.hook: 0, second.hook: 0}
    for g in (first, second):
        for r, seq in enumerate(seqs):
            want = reference(g, seq, acts[r], prompts[r], specials)
            assert sorted(got[g.hook][r]) == sorted(want), (g.hook, r)
            clamped[g.hook] += len(want)
    assert all(clamped.values())
    for r in range(len(seqs)):  # each guardrail's last prompt event counts its own clamped prompt tokens
        for i, g in enumerate((first, second)):
            mine = [e for e in events if e["request_id"] == str(r) and e["event"] == "prompt"
                    and e["guardrail"] == f"guardrail-{i}"]  # fmt: skip
            want = reference(g, seqs[r], acts[r], prompts[r], specials)
            assert mine and mine[-1]["prompt_clamped"] == sum(p < prompts[r] for p in want), (i, r)


def test_prompt_event_reports_the_prompts_rho(setting):
    guards, seqs, acts, prompts, specials = setting
    g = guards["paper"]
    events = []
    gates = RequestGates([g], specials, on_event=events.append)
    simulate(gates, g.hook, seqs, acts, prompts, None, 0)
    for e in (e for e in events if e["event"] == "prompt"):
        r = int(e["request_id"])
        ids = torch.tensor([seqs[r][: prompts[r]]])
        real = real_token_mask(ids, None, specials)
        _, a, _ = g.flags(acts[r][None, : prompts[r]], real)
        assert e["rho"] == pytest.approx(float(rule.rho(a, real)[0]), abs=1e-6)
        assert e["gated"] == (e["rho"] > g.threshold) or any(
            x["request_id"] == e["request_id"] and x["event"] == "latched" for x in events
        )


def test_a_prompt_in_pieces_is_refused_by_the_whole_prompt_gate(setting):
    guards, seqs, acts, prompts, specials = setting
    g = guards["paper"]
    with pytest.raises(ChunkRefused, match="chunked prefill off"):
        simulate(RequestGates([g], specials), g.hook, seqs, acts, prompts, 2, 0)


def test_a_request_that_starts_mid_sequence_is_refused(setting):
    guards, seqs, acts, _, specials = setting
    for kind in ("paper", "window"):
        g = guards[kind]
        gates = RequestGates([g], specials)
        x = acts[0][5:9]
        with pytest.raises(ChunkRefused, match="prefix-cache hit"):
            gates.step(g.hook, x, torch.tensor(seqs[0][5:9]), torch.arange(5, 9), [Chunk("a", 0, 4, 5, 8)])
    # a static guardrail at an earlier layer has nothing to judge and takes the chunk; the gated one after it still
    # refuses what it never saw the start of
    w = guards["window"]
    static, later = (
        guards["static"],
        dsg.Guardrail(w.sae, "blocks.1.hook_resid_post", w.features, w.threshold, window=4),
    )
    gates = RequestGates([static, later], specials)
    ids, positions, chunk = torch.tensor(seqs[0][5:9]), torch.arange(5, 9), [Chunk("a", 0, 4, 5, 8)]
    gates.step(static.hook, acts[0][5:9], ids, positions, chunk)
    with pytest.raises(ChunkRefused, match="prefix-cache hit"):
        gates.step(later.hook, acts[0][5:9], ids, positions, chunk)


def test_a_step_with_one_request_twice_or_an_empty_prompt_is_refused(setting):
    """Two chunks of one request in a step would overwrite one gate state with the other; an empty prompt leaves a
    gate nothing to judge. Both are refused with their reason rather than served wrong."""
    guards, seqs, acts, prompts, specials = setting
    a, b = prompts[0], prompts[4]
    x = torch.cat([acts[0][:a], acts[4][:b]])
    ids, pos = torch.tensor(seqs[0][:a] + seqs[4][:b]), torch.cat([torch.arange(a), torch.arange(b)])
    for kind in ("paper", "window"):
        g = guards[kind]
        with pytest.raises(ChunkRefused, match="two chunks in one step"):
            RequestGates([g], specials).step(g.hook, x, ids, pos, [Chunk("d", 0, a, 0, a), Chunk("d", a, b, 0, b)])
        with pytest.raises(ChunkRefused, match="empty prompt"):
            RequestGates([g], specials).step(g.hook, acts[0][:1], ids[:1], torch.arange(1), [Chunk("e", 0, 1, 0, 0)])


def test_finished_requests_are_forgotten_and_a_reused_id_starts_afresh(setting):
    guards, seqs, acts, prompts, specials = setting
    g = guards["paper"]
    gates = RequestGates([g], specials)
    n = prompts[0]
    gates.step(g.hook, acts[0][:n], torch.tensor(seqs[0][:n]), torch.arange(n), [Chunk("a", 0, n, 0, n)])
    assert gates.decision("a") is not None
    gates.keep_only(["b"])
    assert gates.decision("a") is None and not gates.states


def test_a_detector_gates_audit_record_is_in_the_units_inspect_shows(setting):
    """rho and threshold of a detector gate's audit record are mean evidence per weight unit, as `dsg inspect` and
    the gate's description print them (the guardrail stores its levels in integer weight units)."""
    from dsg.guard.detector import SCALE

    guards, seqs, acts, prompts, specials = setting
    g = guards["held"]
    events = []
    simulate(RequestGates([g], specials, on_event=events.append), g.hook, seqs, acts, prompts, None, 0)
    prompt_events = [e for e in events if e["event"] == "prompt"]
    assert prompt_events and g.gate_unit() == SCALE
    assert all(e["threshold"] == pytest.approx(g.threshold / SCALE) for e in prompt_events)
    assert f"> {g.threshold / SCALE:.4g}" in g.gate_rule() and f"threshold={g.threshold / SCALE:.4g}" in repr(g)
    for e in prompt_events:
        r = int(e["request_id"])
        real = real_token_mask(torch.tensor([seqs[r][: prompts[r]]]), None, specials)
        _, a, ev = g.flags(acts[r][None, : prompts[r]], real)
        peak = float(g.gate(a, real, prompts[r], None, ev)[1].peak[0])
        assert e["rho"] == pytest.approx(peak / SCALE, abs=1e-6)
