"""Tests for rlhfkit.eval.winrate: ties as half, Wilson and bootstrap intervals."""

import numpy as np
import pytest

from rlhfkit.eval.winrate import bootstrap_interval, wilson_interval, win_rate


def test_wilson_matches_published_value():
    # 7 successes of 10: the Wilson 95% interval tabulated in Newcombe (1998) is [0.3968, 0.8922].
    lo, hi = wilson_interval(0.7, 10)
    assert (lo, hi) == pytest.approx((0.3968, 0.8922), abs=1e-4)


def test_hand_computed_case_with_a_tie():
    # Outcomes [1, 1, 0.5, 0, 1]: rate 3.5 / 5 = 0.7, n = 5, z = 1.959964, z^2 / n = 0.7682918.
    # centre = (0.7 + 0.3841459) / 1.7682918 = 0.6131039
    # half   = 1.959964 / 1.7682918 * sqrt(0.21 / 5 + 0.7682918 / 20) = 0.3143120
    a = [2.0, 1.0, 0.5, 0.0, 3.0]
    b = [1.0, 0.0, 0.5, 1.0, 2.0]
    result = win_rate(a, b)
    assert result["rate"] == pytest.approx(0.7, abs=1e-12)
    assert result["ci95"] == pytest.approx([0.2987919, 0.9274159], abs=1e-6)
    assert (result["n"], result["wins"], result["ties"], result["losses"]) == (5, 3, 1, 1)
    assert result["ci_method"] == "wilson"


def test_all_wins_do_not_collapse_the_interval():
    # 7 of 7: centre (1 + 0.2743900) / 1.5487800 = 0.8228349, half 0.1771651 -> [0.6456698, 1].
    result = win_rate([2] * 7, [1] * 7)
    assert result["rate"] == 1.0
    assert result["ci95"] == pytest.approx([0.6456698, 1.0], abs=1e-6)


def test_all_ties_are_centred_on_half():
    result = win_rate([0.3, 0.7, 1.0], [0.3, 0.7, 1.0])
    assert result["rate"] == 0.5
    lo, hi = result["ci95"]
    assert lo == pytest.approx(1 - hi) and lo < 0.5 < hi
    assert (result["wins"], result["ties"], result["losses"]) == (0, 3, 0)


def test_bootstrap_is_seeded_and_brackets_the_rate():
    a = [1] * 60 + [0] * 40
    b = [0] * 60 + [1] * 40
    first = win_rate(a, b, method="bootstrap", seed=3)
    assert first == win_rate(a, b, method="bootstrap", seed=3)
    lo, hi = first["ci95"]
    assert lo < 0.6 < hi
    # The bootstrap and Wilson intervals of 60/100 agree to about a point.
    wilson = win_rate(a, b)["ci95"]
    assert (lo, hi) == pytest.approx(wilson, abs=0.02)


def test_bootstrap_of_constant_outcomes_is_wilsons_interval_not_a_point():
    # 20 wins of 20: every resample is 1.0, so the percentile interval would be [1, 1].
    assert bootstrap_interval([1.0] * 20) == wilson_interval(1.0, 20)
    lo, hi = bootstrap_interval([1.0] * 20)
    assert lo < 0.9 and hi == 1.0
    assert bootstrap_interval([0.0] * 7) == wilson_interval(0.0, 7)
    assert bootstrap_interval([0.5] * 10) == wilson_interval(0.5, 10)
    # Not a proportion: the bootstrap can say nothing about the spread, the point stays.
    assert bootstrap_interval([3.0, 3.0]) == (3.0, 3.0)


def test_bootstrap_win_rate_of_all_wins_notes_it_gave_wilsons_interval():
    result = win_rate([1.0] * 20, [0.0] * 20, method="bootstrap")
    assert result["rate"] == 1.0 and result["ci95"] == list(wilson_interval(1.0, 20))
    assert result["ci95"][0] < result["ci95"][1]
    assert result["ci_method"] == "bootstrap" and "all 20 outcomes equal" in result["ci_note"]


def test_bootstrap_of_mixed_outcomes_is_unchanged():
    outcomes = [1.0] * 12 + [0.5] * 3 + [0.0] * 5
    x = np.asarray(outcomes)
    means = x[np.random.default_rng(4).integers(0, x.size, size=(2000, x.size))].mean(axis=1)
    assert bootstrap_interval(outcomes, seed=4) == tuple(np.percentile(means, [2.5, 97.5]))
    result = win_rate([1.0] * 12 + [0.0] * 8, [0.0] * 12 + [1.0] * 8, method="bootstrap")
    assert result["ci_method"] == "bootstrap" and "ci_note" not in result


def test_mismatched_lengths_name_both():
    with pytest.raises(ValueError, match=r"len\(scores_a\)=3.*len\(scores_b\)=2"):
        win_rate([1, 2, 3], [1, 2])


def test_empty_raises():
    with pytest.raises(ValueError):
        win_rate([], [])


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'normal'"):
        win_rate([1.0], [0.0], method="normal")


def test_tolerance():
    a, b = [1.0 + 1e-12, 1.05], [1.0, 1.0]
    default = win_rate(a, b)
    assert (default["ties"], default["wins"]) == (1, 1)
    loose = win_rate(a, b, tol=0.1)
    assert loose["ties"] == 2 and loose["rate"] == 0.5
    # Exactly on the boundary counts as a tie (|a - b| <= tol).
    assert win_rate([0.5], [0.0], tol=0.5)["ties"] == 1
    assert win_rate([0.0], [0.5], tol=0.1)["losses"] == 1


def test_non_finite_score_raises():
    with pytest.raises(ValueError, match="index 1"):
        win_rate([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="index 0"):
        win_rate([1.0], [None])


def test_wilson_bounds_are_exact_at_rate_zero_and_one():
    # At rate 0 the lower bound is 0 and at rate 1 the upper bound is 1, exactly: rounding gave
    # hi = 0.9999999999999999 for 10/10 wins (an interval that excludes its own rate) and
    # lo = 2.8e-17 for 0/7. The other bound of 10/10 is 1 / (1 + z^2/n) = 0.7224672.
    assert wilson_interval(1.0, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    for n in range(1, 300):
        assert wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(1.0, n)[1] == 1.0
        lo, hi = wilson_interval(0.0, n)
        assert (1 - hi, 1 - lo) == pytest.approx(wilson_interval(1.0, n), abs=1e-12)
    result = win_rate([2] * 10, [1] * 10)
    assert result["ci95"][0] <= result["rate"] <= result["ci95"][1]
