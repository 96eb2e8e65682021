"""Pure NumPy tests of each sampler and of the factory that chains them."""

import numpy as np
import pytest

from edge_genarm import sampling
from edge_genarm.sampling import SamplingSettings, make_sampler


def lp(*probs):
    return np.log(np.array(probs, dtype=np.float32))


def ids(cands):
    return sorted(int(i) for i in sampling.candidate_ids(cands))


def test_greedy_takes_the_argmax():
    assert sampling.greedy(lp(0.1, 0.6, 0.3)) == 1


def test_top_k_keeps_the_k_best():
    assert ids(sampling.top_k(sampling.all_candidates(lp(0.1, 0.4, 0.2, 0.3)), 2)) == [1, 3]
    assert ids(sampling.top_k(sampling.all_candidates(lp(0.1, 0.4, 0.5)), 0)) == [0, 1, 2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    c = sampling.all_candidates(lp(0.5, 0.3, 0.15, 0.05))
    assert ids(sampling.top_p(c, 0.5)) == [0]
    assert ids(sampling.top_p(c, 0.79)) == [0, 1]
    assert ids(sampling.top_p(c, 0.81)) == [0, 1, 2]
    assert ids(sampling.top_p(c, 1.0)) == [0, 1, 2, 3]


def test_top_p_is_exact_when_the_nucleus_is_wider_than_its_first_guess():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000).astype(np.float32)  # flat: the nucleus has thousands of ids
    c = sampling.all_candidates(logits)
    got = ids(sampling.top_p(c, 0.9))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    assert got == sorted(order[:n].tolist())
    assert len(got) > 64 * 8


def test_min_p_keeps_tokens_near_the_best():
    c = sampling.all_candidates(lp(0.5, 0.3, 0.15, 0.05))
    assert ids(sampling.min_p(c, 0.5)) == [0, 1]
    assert ids(sampling.min_p(c, 0.0)) == [0, 1, 2, 3]


def test_categorical_follows_the_distribution_and_temperature():
    rng = np.random.default_rng(1)
    c = sampling.all_candidates(lp(0.2, 0.8))
    draws = [sampling.categorical(c, 1.0, rng) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(0.8, abs=0.03)
    cold = [sampling.categorical(c, 0.25, rng) for _ in range(2000)]
    # T = 0.25 raises probabilities to the 4th power: 0.8^4 / (0.8^4 + 0.2^4) = 0.996
    assert np.mean(cold) == pytest.approx(0.996, abs=0.01)


def test_factory_chains_filters_then_temperature():
    s = make_sampler(SamplingSettings(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    rng = np.random.default_rng(2)
    draws = {s(lp(0.4, 0.35, 0.25), rng) for _ in range(300)}
    assert draws == {0, 1}


def test_factory_is_greedy_at_temperature_zero_or_with_greedy():
    for settings in (SamplingSettings(temperature=0.0), SamplingSettings(greedy=True)):
        s = make_sampler(settings)
        assert s(lp(0.3, 0.7), np.random.default_rng(0)) == 1


def test_same_seed_same_draws():
    s = make_sampler(SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    logits = np.random.default_rng(3).normal(size=100).astype(np.float32)
    a = [s(logits, r) for r in [np.random.default_rng(7)] for _ in range(20)]
    b = [s(logits, r) for r in [np.random.default_rng(7)] for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("settings, word", [
    (SamplingSettings(temperature=-0.1), "temperature"),
    (SamplingSettings(temperature=float("nan")), "temperature"),
    (SamplingSettings(top_k=-1), "top-k"),
    (SamplingSettings(top_p=0.0), "top-p"),
    (SamplingSettings(top_p=1.5), "top-p"),
    (SamplingSettings(min_p=-0.1), "min-p"),
    (SamplingSettings(min_p=1.1), "min-p"),
])
def test_out_of_range_settings_are_refused(settings, word):
    with pytest.raises(ValueError, match=word):
        settings.validate()
