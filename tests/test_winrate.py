"""Tests for rlhfkit.eval.winrate."""

import math

import pytest

from rlhfkit.eval.winrate import win_rate


def test_hand_computed_case():
    # Outcomes [1, 1, 0.5, 0, 1]: mean 3.5 / 5 = 0.7.
    # Deviations 0.3, 0.3, -0.2, -0.7, 0.3; squares sum to 0.09*3 + 0.04 + 0.49 = 0.8.
    # Sample variance 0.8 / 4 = 0.2, std = sqrt(0.2) = 0.4472136; se = std / sqrt(5) = 0.2.
    # Half width 1.96 * 0.2 = 0.392 -> [0.308, 1.092], clipped to [0.308, 1.0].
    a = [2.0, 1.0, 0.5, 0.0, 3.0]
    b = [1.0, 0.0, 0.5, 1.0, 2.0]
    result = win_rate(a, b)
    assert result["rate"] == pytest.approx(0.7, abs=1e-12)
    assert result["ci95"][0] == pytest.approx(0.308, abs=1e-6)
    assert result["ci95"][1] == pytest.approx(1.0, abs=1e-6)
    assert (result["n"], result["wins"], result["ties"], result["losses"]) == (5, 3, 1, 1)


def test_unclipped_interval():
    # 6 wins, 4 losses: rate 0.6; squared deviations 6 * 0.16 + 4 * 0.36 = 2.4,
    # variance 2.4 / 9, se = sqrt(2.4 / 9) / sqrt(10) = 0.1632993, half width 0.3200667.
    result = win_rate([1] * 6 + [0] * 4, [0] * 6 + [1] * 4)
    assert result["rate"] == pytest.approx(0.6)
    assert result["ci95"] == pytest.approx([0.2799333, 0.9200667], abs=1e-6)
    half = 1.96 * math.sqrt(2.4 / 9) / math.sqrt(10)
    assert result["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-12)


def test_all_ties_collapse_interval():
    result = win_rate([0.3, 0.7, 1.0], [0.3, 0.7, 1.0])
    assert result["rate"] == 0.5
    assert result["ci95"] == [0.5, 0.5]
    assert (result["wins"], result["ties"], result["losses"]) == (0, 3, 0)


def test_all_wins_and_single_prompt_collapse_interval():
    assert win_rate([2, 3], [1, 1])["ci95"] == [1.0, 1.0]
    single = win_rate([0.0], [1.0])
    assert single["rate"] == 0.0 and single["ci95"] == [0.0, 0.0] and single["n"] == 1


def test_mismatched_lengths_name_both():
    with pytest.raises(ValueError, match=r"len\(scores_a\)=3.*len\(scores_b\)=2"):
        win_rate([1, 2, 3], [1, 2])


def test_empty_raises():
    with pytest.raises(ValueError):
        win_rate([], [])


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
