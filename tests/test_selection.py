"""Feature selection equals a plain numpy transcription of the paper's rule."""

import numpy as np
import pytest

import dsg


def reference_rule(m_f, m_r, n, p_ratio, p_forget):
    """Line by line from the official get_top_features_percentile (retain filter at P100 is a no-op)."""
    forget_score = m_f**2
    retain_score = m_r**2
    ratio = forget_score / (retain_score + 1e-21)
    keep = [
        j
        for j in range(len(m_f))
        if ratio[j] >= np.percentile(ratio, p_ratio) and forget_score[j] >= np.percentile(forget_score, p_forget)
    ]
    keep.sort(key=lambda j: (-forget_score[j], j))
    return keep[:n]


@pytest.mark.parametrize("seed", range(8))
def test_select_features_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    d = 512
    m_f = rng.exponential(0.1, d) * (rng.random(d) < 0.7)  # many latents silent on forget text
    m_r = rng.exponential(0.1, d) * (rng.random(d) < 0.6)  # ... and many never fire on retain text
    m_f[:5] = m_f[5]  # ties
    for n, p_ratio, p_forget in [(20, 95, 5), (10, 90, 5), (50, 75, 50)]:
        got = dsg.select_features(m_f, m_r, n, p_ratio, p_forget)
        assert got == reference_rule(m_f, m_r, n, p_ratio, p_forget)
        assert len(got) <= n and len(set(got)) == len(got)


def test_latents_silent_on_forget_text_are_never_selected():
    """Where at most 5 % of latents fire on forget text, both percentile cuts fall to 0 and the paper's rule would
    fill the top N with silent latents by id; ours selects only those that fire."""
    m_f, m_r = np.zeros(100), np.zeros(100)
    m_f[[70, 30]] = [0.5, 0.2]
    assert reference_rule(m_f, m_r, 5, 95, 5) == [70, 30, 0, 1, 2]
    assert dsg.select_features(m_f, m_r, 5, 95, 5) == [70, 30]
    assert dsg.select_features(m_f, m_r, 5, 95, 5, scorer="fisher") == [70, 30]


def test_fisher_scorer_uses_second_moments_unsquared():
    rng = np.random.default_rng(0)
    sq_f, sq_r = rng.exponential(1.0, 100), rng.exponential(1.0, 100)
    got = dsg.select_features(sq_f, sq_r, 10, 90, 5, scorer="fisher")
    # same as the ratio rule applied to square roots (the ratio rule squares its inputs)
    assert got == dsg.select_features(np.sqrt(sq_f), np.sqrt(sq_r), 10, 90, 5)


def test_frequency_scorer_applies_the_retain_cutoff():
    p_f = np.array([0.9, 0.8, 0.7, 0.6, 0.0])
    p_r = np.array([0.5, 0.001, 0.02, 0.0, 0.0])
    assert dsg.select_by_frequency(p_f, p_r, 3, retain_cutoff=0.01) == [1, 3]


def test_bad_inputs():
    with pytest.raises(dsg.DSGError, match="differ in length"):
        dsg.select_features(np.ones(3), np.ones(4))
    with pytest.raises(dsg.DSGError, match="Percentiles"):
        dsg.select_features(np.ones(3), np.ones(3), ratio_percentile=120)
    with pytest.raises(dsg.DSGError, match="n_features"):
        dsg.select_features(np.ones(3), np.ones(3), n_features=0)
