"""Pure NumPy tests of the repetition penalties, on small rows and hand-written histories."""

import numpy as np
import pytest

from edge_genarm import penalties
from edge_genarm.sampling import SamplingSettings


def row(n=8):
    return np.zeros(n, dtype=np.float32)


def test_presence_and_frequency_follow_openai():
    out = penalties.occurrence_penalty(row(), [3, 3, 5], presence=0.5, frequency=0.25)
    expected = row()
    expected[3] = -(0.5 + 2 * 0.25)
    expected[5] = -(0.5 + 0.25)
    np.testing.assert_allclose(out, expected)


def test_repeat_lengths_find_the_longest_run_each_token_would_extend():
    # ... 1 2 3 [4] ... 1 2 3: writing 4 would repeat "1 2 3 4"; 9 follows "3" only once
    tokens, runs = penalties.repeat_lengths([1, 2, 3, 4, 7, 3, 9, 1, 2, 3])
    assert dict(zip(tokens.tolist(), runs.tolist())) == {4: 3, 9: 1}


def test_repeat_lengths_of_a_loop_overlap_themselves():
    # "5 6 5 6 5": the suffix "5 6 5" reappears at the start, and 6 followed it
    tokens, runs = penalties.repeat_lengths([5, 6, 5, 6, 5])
    assert dict(zip(tokens.tolist(), runs.tolist())) == {6: 3}


def test_a_breaker_stops_the_match_and_a_breaker_at_the_end_stops_all():
    breakers = np.zeros(16, dtype=bool)
    breakers[0] = True  # say, a newline
    history = [1, 2, 3, 4, 0, 1, 2, 3]
    tokens, runs = penalties.repeat_lengths(history, breakers)
    assert dict(zip(tokens.tolist(), runs.tolist())) == {4: 3}
    history = [7, 1, 2, 0, 9, 1, 2]  # of the suffix "9 1 2", "1 2" occurred, then the breaker
    tokens, runs = penalties.repeat_lengths(history, breakers)
    assert dict(zip(tokens.tolist(), runs.tolist())) == {0: 2}
    assert penalties.repeat_lengths([1, 2, 0, 1, 2, 0], breakers)[0].size == 0


def test_dry_penalty_grows_with_the_repeat_and_spares_short_ones():
    history = [1, 2, 3, 4, 7, 3, 9, 1, 2, 3]
    out = penalties.dry_penalty(row(), history, multiplier=0.8, base=1.75, allowed_length=2)
    expected = row()
    expected[4] = -0.8 * 1.75 ** (3 - 2)  # "1 2 3" repeated: 4 would make it 4 long
    np.testing.assert_allclose(out, expected, rtol=1e-6)  # 9 follows a 1-token repeat: spared


def test_dry_penalty_is_capped_and_a_long_loop_is_cut():
    loop = [1, 2, 3, 4] * 30
    out = penalties.dry_penalty(row(), loop, multiplier=0.8, base=1.75, allowed_length=2)
    assert out[1] == pytest.approx(-penalties.MAX_DRY_PENALTY)
    assert np.count_nonzero(out) == 1
    flat = penalties.dry_penalty(row(), loop, multiplier=0.5, base=1.0, allowed_length=2)
    assert flat[1] == pytest.approx(-0.5)  # base 1: the same penalty at every length
    big = penalties.dry_penalty(row(), loop, multiplier=100.0, base=1.75, allowed_length=2)
    assert big[1] == pytest.approx(-100.0)  # a multiplier over the cap is the cap


def test_penalize_leaves_the_row_alone_when_off_and_on_an_empty_history():
    r = np.log(np.full(8, 1 / 8, dtype=np.float32))
    assert penalties.penalize(r, [1, 2, 1, 2], SamplingSettings()) is r
    on = SamplingSettings(presence_penalty=1.0, dry_multiplier=1.0)
    assert penalties.penalize(r, [], on) is r
    out = penalties.penalize(r, [1, 2, 1, 2, 1], on)
    assert out[2] == pytest.approx(r[2] - 1.0 - 1.0 * 1.75 ** (3 - 2))
    assert out[1] == pytest.approx(r[1] - 1.0)
    assert out[0] == r[0]


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 2.5, "presence-penalty must be between -2 and 2"),
    ("frequency_penalty", float("nan"), "frequency-penalty must be between -2 and 2"),
    ("dry_multiplier", -1.0, "dry-multiplier must be a finite number >= 0"),
    ("dry_base", 0.5, "dry-base must be a finite number >= 1"),
    ("dry_allowed_length", 0, "dry-allowed-length must be >= 1"),
    ("dry_sequence_breakers", ("",), "dry-sequence-breaker must be a non-empty string"),
])
def test_settings_refuse_penalties_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value}).validate()
