"""Majority vote over hand-made comparison labels."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rlhfkit.crowd.aggregate import Aggregate, majority_vote


@dataclass(frozen=True)
class V:
    item_id: int
    chosen: int | None


def test_two_to_one():
    result = majority_vote([V(1, 0), V(1, 0), V(1, 1)])
    assert result == {1: Aggregate(item_id=1, winner=0, n_votes=3, agreement=pytest.approx(2 / 3))}


def test_unanimous_and_single_vote():
    result = majority_vote([V(7, 1), V(7, 1), V(8, 0)])
    assert result[7] == Aggregate(7, 1, 2, 1.0)
    assert result[8] == Aggregate(8, 0, 1, 1.0)


def test_split_vote_is_a_tie():
    result = majority_vote([V(1, 0), V(1, 1)])
    assert result[1].winner is None
    assert result[1].n_votes == 2
    assert result[1].agreement == 0.5


def test_tie_votes_count_as_an_outcome():
    # Two "tie" answers beat one vote for response 0.
    result = majority_vote([V(1, None), V(1, None), V(1, 0)])
    assert result[1].winner is None
    assert result[1].agreement == pytest.approx(2 / 3)
    # One tie vote does not stop a 2-1 majority.
    result = majority_vote([V(2, 1), V(2, None), V(2, 1)])
    assert result[2].winner == 1
    # A three-way split has no majority.
    result = majority_vote([V(3, 0), V(3, 1), V(3, None)])
    assert result[3].winner is None
    assert result[3].agreement == pytest.approx(1 / 3)


def test_items_are_independent_and_sorted():
    result = majority_vote([V(5, 0), V(2, 1), V(5, 0), V(2, 0), V(2, 1)])
    assert list(result) == [2, 5]
    assert (result[2].winner, result[2].n_votes) == (1, 3)
    assert (result[5].winner, result[5].n_votes) == (0, 2)
    assert majority_vote([]) == {}
