"""Pure NumPy tests of log-softmax, the guided combination and vocabulary alignment."""

import numpy as np
import pytest

from edge_genarm import guidance


def test_log_softmax_normalises_and_matches_the_definition():
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    expected = x - np.log(np.exp(x).sum())
    np.testing.assert_allclose(guidance.log_softmax(x), expected, rtol=1e-6)
    assert np.exp(guidance.log_softmax(x)).sum() == pytest.approx(1.0, abs=1e-6)


def test_log_softmax_is_stable_for_huge_logits_and_keeps_minus_infinity():
    x = np.array([1000.0, 1000.0, -np.inf], dtype=np.float32)
    out = guidance.log_softmax(x)
    np.testing.assert_allclose(out[:2], [np.log(0.5)] * 2, rtol=1e-6)
    assert out[2] == -np.inf


def test_log_softmax_works_row_by_row():
    x = np.array([[0.0, 0.0], [0.0, np.log(3.0)]], dtype=np.float32)
    np.testing.assert_allclose(np.exp(guidance.log_softmax(x)), [[0.5, 0.5], [0.25, 0.75]],
                               rtol=1e-6)


def guide(base, arms, weights, rows=None):
    """The engine's combination: base rows, then each ARM's rows added with their weights."""
    guided = np.array(np.atleast_2d(base), dtype=np.float32)
    rows = np.arange(guided.shape[0]) if rows is None else np.asarray(rows)
    for arm, w in zip(arms, weights):
        guidance.add_weighted(guided, rows, np.broadcast_to(np.float32(w), rows.shape),
                              np.atleast_2d(arm))
    return guided if np.ndim(base) == 2 else guided[0]


def test_weighted_arms_give_the_product_of_experts():
    base = np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32))
    arm = np.log(np.array([0.1, 0.1, 0.8], dtype=np.float32))
    guided = guide(base, [arm], [2.0])
    p = np.array([0.5 * 0.01, 0.25 * 0.01, 0.25 * 0.64])
    np.testing.assert_allclose(np.exp(guidance.log_softmax(guided)), p / p.sum(), rtol=1e-5)


def differs_by_a_constant(a, b, atol=1e-5):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.allclose(d, d.flat[0], atol=atol)


def test_a_padded_arm_is_normalised_over_its_own_vocabulary_then_sliced():
    base = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    arm = np.array([0.0, 3.0, 0.0, 5.0], dtype=np.float32)  # a padded ARM: one extra token
    guided = guide(base, [arm], [1.0])
    assert guided.shape == (3,)
    expected = guidance.log_softmax(base) + guidance.log_softmax(arm)[:3]
    assert differs_by_a_constant(guided, expected)
    np.testing.assert_allclose(guidance.log_softmax(guided), guidance.log_softmax(expected),
                               atol=1e-6)


def test_weight_zero_contributes_nothing_and_a_negative_weight_steers_away():
    base = np.log(np.array([0.5, 0.5], dtype=np.float32))
    arm = np.log(np.array([0.9, 0.1], dtype=np.float32))
    np.testing.assert_allclose(guide(base, [arm], [0.0]), base, rtol=1e-6)
    away = guide(base, [arm], [-1.0])
    assert away[1] > away[0]


def test_several_arms_add_with_their_weights():
    base = np.array([0.5, 0, 0, 2], dtype=np.float32)
    a1 = np.array([0, 1, 2, 3], dtype=np.float32)
    a2 = np.array([3, 2, 1, 0], dtype=np.float32)
    g = guide(base, [a1, a2], [0.5, 1.5])
    expected = (guidance.log_softmax(base) + 0.5 * guidance.log_softmax(a1)
                + 1.5 * guidance.log_softmax(a2))
    assert differs_by_a_constant(g, expected)
    assert not differs_by_a_constant(g, guidance.log_softmax(base) + guidance.log_softmax(a1))


def test_each_row_takes_its_own_weight_and_only_the_rows_given():
    base = np.array([[0, 1, 2], [2, 1, 0], [1, 1, 1]], dtype=np.float32)
    arm_rows = np.array([[1, 0, 0, 9], [0, 0, 1, 9]], dtype=np.float32)  # rows 0 and 2 only
    kept = arm_rows.copy()
    guided = base.copy()
    guidance.add_weighted(guided, np.array([0, 2]), np.array([2.0, -0.5]), arm_rows)
    assert differs_by_a_constant(guided[0], guidance.log_softmax(base[0])
                                 + 2 * guidance.log_softmax(arm_rows[0])[:3])
    np.testing.assert_array_equal(guided[1], base[1])
    assert differs_by_a_constant(guided[2], guidance.log_softmax(base[2])
                                 - 0.5 * guidance.log_softmax(arm_rows[1])[:3])
    np.testing.assert_array_equal(arm_rows, kept)


def test_common_vocab_size_and_first_mismatch():
    assert guidance.common_vocab_size([49152, 49216]) == 49152
    assert guidance.first_token_mismatch(["a", "b", "c"], ["a", "b", "c", "<pad>"]) is None
    assert guidance.first_token_mismatch(["a", "b", "c"], ["a", "x", "c"]) == 1
