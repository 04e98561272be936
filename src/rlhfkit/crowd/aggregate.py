"""Aggregation of disagreeing labels into one outcome per item.

Pure functions over label records; no database. Majority vote is the baseline that
Dawid-Skene and Bradley-Terry aggregation (crowd-kit) are measured against.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class Vote(Protocol):
    """What aggregation reads from a label: the item and the chosen original index."""

    @property
    def item_id(self) -> int: ...

    @property
    def chosen(self) -> int | None: ...


@dataclass(frozen=True)
class Aggregate:
    """The aggregated outcome of one item.

    `winner` is the original index of the preferred response, or None when the item
    is a tie (tie votes won, or the top two outcomes have equal counts).
    `agreement` is the share of votes for the winning outcome (the top count's share
    when there is no majority).
    """

    item_id: int
    winner: int | None
    n_votes: int
    agreement: float


def majority_vote(labels: Iterable[Vote]) -> dict[int, Aggregate]:
    """Aggregate comparison labels by plurality; a "tie" label is a vote for the tie outcome."""
    counts: dict[int, Counter[int | None]] = {}
    for label in labels:
        counts.setdefault(label.item_id, Counter())[label.chosen] += 1
    result: dict[int, Aggregate] = {}
    for item_id in sorted(counts):
        ranked = counts[item_id].most_common()
        n_votes = sum(n for _, n in ranked)
        top_outcome, top = ranked[0]
        no_majority = len(ranked) > 1 and ranked[1][1] == top
        result[item_id] = Aggregate(
            item_id=item_id,
            winner=None if no_majority else top_outcome,
            n_votes=n_votes,
            agreement=top / n_votes,
        )
    return result
