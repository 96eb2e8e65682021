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


def test_top_k_on_a_masked_row_keeps_the_best_allowed_tokens():
    rng = np.random.default_rng(0)
    row = rng.normal(size=5000).astype(np.float32)
    banned = rng.random(5000) < 0.99  # a grammar's mask: most of the vocabulary out
    row[banned] = -np.inf
    allowed = np.flatnonzero(~banned)
    for k in (5, allowed.size, allowed.size + 10):
        ids, vals = sampling.top_k(sampling.all_candidates(row), k)
        best = allowed[np.argsort(-row[allowed], kind="stable")[:k]]
        assert sorted(ids.tolist()) == sorted(best.tolist()) and np.isfinite(vals).all()
    # a ban that leaves more than k: the same k as without it, less the banned
    row = np.arange(100, dtype=np.float32)
    row[[99, 50]] = -np.inf
    assert sorted(sampling.top_k(sampling.all_candidates(row), 3)[0].tolist()) == [96, 97, 98]


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


# --- the order of the filters and where the temperature applies ---------------------------

def reference_distribution(probs, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    """What the README promises, written out on float64 lists: top-k, then top-p, then min-p,
    each on the distribution the one before left (at T = 1), then softmax(x / T) over the rest."""
    p = np.asarray(probs, dtype=np.float64) / np.sum(probs)
    kept = sorted(range(p.size), key=lambda i: -p[i])
    if top_k > 0:
        kept = kept[:top_k]
    if top_p < 1.0:
        total, acc, nucleus = sum(p[i] for i in kept), 0.0, []
        for i in kept:
            nucleus.append(i)
            acc += p[i] / total
            if acc >= top_p:
                break
        kept = nucleus
    if min_p > 0.0:
        best = max(p[i] for i in kept)
        kept = [i for i in kept if p[i] >= min_p * best]
    out = np.zeros(p.size)
    for i in kept:
        out[i] = p[i] ** (1.0 / temperature)  # softmax(log p / T), before normalising
    return out / out.sum()


def sampled_frequencies(settings, probs, n=12000, seed=5):
    s = make_sampler(settings)
    rng = np.random.default_rng(seed)
    counts = np.bincount([s(lp(*probs), rng) for _ in range(n)], minlength=len(probs))
    return counts / n


# Each case: probabilities, settings, the outcome worked out by hand in the README's order, and
# the outcome another order would give (so that the case tells the two apart).
ORDER_CASES = {
    # top-k keeps {0, 1}; renormalised they are 0.545, 0.455, so top-p 0.5 keeps 0 alone.
    # top-p first (or on the probabilities before top-k) would keep 0.30 + 0.25: {0, 1}.
    "top-k before top-p": ([0.30, 0.25, 0.20, 0.15, 0.10],
                           SamplingSettings(temperature=1.0, top_k=2, top_p=0.5, min_p=0.0),
                           [1.0, 0, 0, 0, 0], [0.30 / 0.55, 0.25 / 0.55, 0, 0, 0]),
    # top-p 0.75 keeps 0.4 + 0.3 + 0.2; min-p 0.4 (>= 0.16) keeps all three: 4/9, 3/9, 2/9.
    # min-p first would renormalise 0.4, 0.3, 0.2 to 0.44, 0.33, 0.22 and top-p stop at {0, 1}.
    "top-p before min-p": ([0.4, 0.3, 0.2, 0.1],
                           SamplingSettings(temperature=1.0, top_k=0, top_p=0.75, min_p=0.4),
                           [4 / 9, 3 / 9, 2 / 9, 0], [4 / 7, 3 / 7, 0, 0]),
    # top-p 0.7 at T = 1 keeps {0, 1}; then T = 0.25 raises them to the 4th power:
    # 0.0625 / 0.0706 = 0.885 and 0.115. Cooling first (0.887, 0.115, 0.023) keeps 0 alone.
    "cold temperature after top-p": ([0.5, 0.3, 0.2],
                                     SamplingSettings(temperature=0.25, top_k=0, top_p=0.7,
                                                      min_p=0.0),
                                     [0.5**4 / (0.5**4 + 0.3**4), 0.3**4 / (0.5**4 + 0.3**4), 0],
                                     [1.0, 0, 0]),
    # min-p 0.5 at T = 1 keeps {0, 1} (0.2 < 0.25); T = 4 takes 4th roots: 0.841, 0.740 -> 0.532,
    # 0.468. Warming first makes 0.2 -> 0.669, at least half of 0.841: all three kept.
    "hot temperature after min-p": ([0.5, 0.3, 0.2],
                                    SamplingSettings(temperature=4.0, top_k=0, top_p=1.0,
                                                     min_p=0.5),
                                    [0.5**0.25 / (0.5**0.25 + 0.3**0.25),
                                     0.3**0.25 / (0.5**0.25 + 0.3**0.25), 0],
                                    [0.5**0.25 / 2.25, 0.3**0.25 / 2.25, 0.2**0.25 / 2.25]),
}


@pytest.mark.parametrize("case", ORDER_CASES)
def test_filters_run_in_order_at_temperature_one_then_the_temperature(case):
    probs, settings, expected, other_order = ORDER_CASES[case]
    reference = reference_distribution(probs, settings.top_k, settings.top_p, settings.min_p,
                                       settings.temperature)
    np.testing.assert_allclose(reference, expected, atol=2e-3)  # the hand working agrees
    assert np.abs(np.asarray(other_order) - reference).max() > 0.1  # and the case discriminates
    freq = sampled_frequencies(settings, probs)
    assert freq[reference == 0].sum() == 0  # filtered tokens are never drawn
    # 12000 draws: a standard error of at most 0.0046, so 0.02 is more than 4 of them
    np.testing.assert_allclose(freq, reference, atol=0.02)


def test_the_kept_set_does_not_depend_on_the_temperature():
    probs = [0.32, 0.26, 0.18, 0.12, 0.07, 0.05]
    kept = None
    for t in (0.2, 0.5, 1.0, 2.0, 5.0):
        settings = SamplingSettings(temperature=t, top_k=5, top_p=0.85, min_p=0.3)
        freq = sampled_frequencies(settings, probs, n=6000, seed=int(t * 10))
        reference = reference_distribution(probs, 5, 0.85, 0.3, t)
        drawn = set(np.flatnonzero(freq).tolist())
        # top-k 5 renormalises to 0.337, 0.274, 0.189, 0.126, 0.074; top-p 0.85 keeps four
        # (0.926); min-p 0.3 (>= 0.096) keeps all four, at every temperature. Filtering after
        # T = 5 would keep five, after T = 0.2 only {0, 1}.
        assert set(np.flatnonzero(reference).tolist()) == {0, 1, 2, 3}
        assert drawn <= {0, 1, 2, 3}
        np.testing.assert_allclose(freq, reference, atol=0.03)
        kept = drawn if kept is None else kept | drawn
    assert kept == {0, 1, 2, 3}


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
    (SamplingSettings(top_k=-1), "top_k"),
    (SamplingSettings(top_p=0.0), "top_p"),
    (SamplingSettings(top_p=1.5), "top_p"),
    (SamplingSettings(min_p=-0.1), "min_p"),
    (SamplingSettings(min_p=1.1), "min_p"),
])
def test_out_of_range_settings_are_refused(settings, word):
    with pytest.raises(ValueError, match=word):
        settings.validate()
