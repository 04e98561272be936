"""Aggregation: majority vote on hand-made labels, crowd-kit methods on a synthetic crowd, export rows."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from rlhfkit.crowd.aggregate import (
    METHODS,
    Aggregate,
    PairVote,
    aggregate,
    aggregate_pairs,
    majority_vote,
    pair_probability,
    preference_rows,
    ranking_votes,
    strength_margin,
)


@dataclass(frozen=True)
class V:
    item_id: int
    chosen: int | None


@dataclass(frozen=True)
class Item:
    prompt: str
    responses: list[str]


def test_two_to_one():
    result = majority_vote([V(1, 0), V(1, 0), V(1, 1)])
    agg = result[1]
    assert (agg.item_id, agg.winner, agg.n_votes) == (1, 0, 3)
    assert agg.agreement == pytest.approx(2 / 3)
    # P(0 beats 1) = 2 / (2 + 1) from the vote shares.
    assert agg.confidence == pytest.approx(2 / 3)
    assert agg.ranking == (0, 1)


def test_unanimous_and_single_vote():
    result = majority_vote([V(7, 1), V(7, 1), V(8, 0)])
    assert (result[7].winner, result[7].n_votes, result[7].agreement) == (1, 2, 1.0)
    assert (result[8].winner, result[8].n_votes, result[8].agreement) == (0, 1, 1.0)
    assert result[7].confidence > 0.999


def test_split_vote_is_a_tie():
    result = majority_vote([V(1, 0), V(1, 1)])
    assert result[1].winner is None
    assert result[1].n_votes == 2
    assert result[1].agreement == 0.5
    assert result[1].confidence == 0.5


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


def test_pair_probability_is_a_sigmoid_of_score_differences():
    assert pair_probability([0.0, 0.0], 0, 1) == 0.5
    assert pair_probability([math.log(3), 0.0], 0, 1) == pytest.approx(0.75)
    assert pair_probability([math.log(3), 0.0], 1, 0) == pytest.approx(0.25)
    assert pair_probability([-800.0, 800.0], 1, 0) == 1.0  # no overflow


def _crowd(n_items: int = 150, seed: int = 0) -> tuple[dict[int, int], list[PairVote]]:
    """Known truth; five 80%-accurate annotators, a random and an always-left spammer, an adversary."""
    rng = random.Random(seed)
    truth = {i: rng.randint(0, 1) for i in range(n_items)}
    accuracy = {f"good-{k}": 0.8 for k in range(5)} | {"spam-random": 0.5, "adversary": 0.15}
    names = [*accuracy, "spam-left"]
    votes = []
    for item_id, true in truth.items():
        for name in rng.sample(names, 3):
            left = rng.randint(0, 1)
            if name == "spam-left":
                chosen = left
            else:
                chosen = true if rng.random() < accuracy[name] else 1 - true
            votes.append(PairVote(item_id, name, left, 1 - left, chosen))
    return truth, votes


def _recovered(truth: dict[int, int], result: dict) -> int:
    return sum(result[i].winner == t for i, t in truth.items())


def test_dawid_skene_beats_majority_vote_with_spammers_and_an_adversary():
    truth, votes = _crowd()
    mv, ds = _recovered(truth, aggregate(votes, "mv")), _recovered(truth, aggregate(votes, "ds"))
    # DS learns the adversary's inverted confusion and the spammers' uselessness; MV cannot.
    assert ds > mv + 0.04 * len(truth)


def test_every_method_gives_one_outcome_per_item():
    truth, votes = _crowd(n_items=60, seed=1)
    for method in METHODS:
        result = aggregate(votes, method)
        assert sorted(result) == sorted(truth), method
        for agg in result.values():
            assert agg.n_votes == 3
            assert 0.5 <= agg.confidence <= 1.0, method
            assert sorted(agg.ranking) == [0, 1]
            if agg.winner is not None:
                assert agg.ranking[0] == agg.winner
        # Better than a coin, even with three bad annotators in eight.
        assert _recovered(truth, result) > 0.6 * len(truth), method


def test_categorical_methods_keep_ties_and_pairwise_methods_drop_them():
    votes = [
        PairVote(1, "a", 0, 1, None),
        PairVote(1, "b", 1, 0, None),
        PairVote(1, "c", 0, 1, 0),
        PairVote(2, "a", 0, 1, 1),
        PairVote(2, "b", 0, 1, 1),
        PairVote(2, "c", 1, 0, None),
        PairVote(3, "a", 0, 1, None),
    ]
    for method in ("mv", "ds"):
        result = aggregate(votes, method)
        assert result[1].winner is None, method  # two ties beat one vote
        assert result[2].winner == 1, method
    for method in ("bt", "noisy_bt"):
        result = aggregate(votes, method)
        assert result[1].winner == 0, method  # the tie answers carry no direction
        assert result[2].winner == 1, method
        assert result[3].winner is None and result[3].confidence == 0.5, method  # only a tie
        assert result[3].n_votes == 1


def test_rankings_become_pairs_for_the_pairwise_methods():
    responses = ["best", "middle", "worst"]
    votes = ranking_votes(9, "a", "q", responses, [0, 1, 2]) + ranking_votes(
        9, "b", "q", responses, [0, 2, 1]
    )
    votes += ranking_votes(9, "c", "q", responses, [1, 0, 2])
    assert len(votes) == 9  # C(3, 2) pairs per ranking
    assert PairVote(9, "a", 1, 2, 1) in votes
    result = aggregate(votes, "bt")[9]
    assert result.ranking == (0, 1, 2)
    rows = preference_rows({9: Item("q", responses)}, {9: result}, "test", "bt")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("best", "middle"),
        ("best", "worst"),
        ("middle", "worst"),
    ]
    for row in rows:
        assert row["margin"] == pytest.approx(2 * row["confidence"] - 1, abs=1e-3)
        assert 0 < row["margin"] <= 1


def test_categorical_methods_aggregate_rankings_pair_by_pair():
    responses = ["best", "middle", "worst"]
    votes = [
        *ranking_votes(9, "a", "q", responses, [0, 1, 2]),
        *ranking_votes(9, "b", "q", responses, [0, 2, 1]),
        *ranking_votes(9, "c", "q", responses, [1, 0, 2]),
    ]
    result = aggregate(votes, "mv")[9]
    # Vote shares per pair: 0 beats 1 by 2/3, 0 beats 2 by 3/3 (the losing share floored at
    # 1e-6), 1 beats 2 by 2/3; the scores are the row means of the log-odds matrix.
    d01, d02, d12 = math.log(2), math.log(1 / 1e-6), math.log(2)
    expected = [(d01 + d02) / 3, (-d01 + d12) / 3, (-d02 - d12) / 3]
    assert result.scores == pytest.approx(expected, abs=1e-6)
    assert result.winner == 0 and result.ranking == (0, 1, 2)
    rows = preference_rows({9: Item("q", responses)}, {9: result}, "test", "mv")
    best_middle = next(r for r in rows if (r["chosen"], r["rejected"]) == ("best", "middle"))
    assert best_middle["confidence"] == pytest.approx(
        1 / (1 + math.exp(-(expected[0] - expected[1]))), abs=1e-4
    )
    for method in ("ds", "wawa", "mace"):
        assert aggregate(votes, method)[9].ranking == (0, 1, 2), method
    # A level ranking has no winner.
    level = [
        *ranking_votes(4, "a", "q", responses, [0, 1, 2]),
        *ranking_votes(4, "b", "q", responses, [1, 0, 2]),
    ]
    assert aggregate(level, "mv")[4].winner is None


def test_a_tie_stays_a_tie_when_rankings_are_aggregated_with_the_comparisons():
    # Item 1: two tie answers against one for response 0, so the tie is the most likely outcome;
    # item 3: a 2-1 majority for response 0 beside a tie answer. Item 2 is a ranking of three,
    # whose pairs send the whole set through the pair-by-pair path.
    comparisons = [
        PairVote(1, "a", 0, 1, None),
        PairVote(1, "b", 1, 0, None),
        PairVote(1, "c", 0, 1, 0),
        PairVote(3, "a", 0, 1, 0),
        PairVote(3, "b", 1, 0, 0),
        PairVote(3, "c", 0, 1, None),
    ]
    responses = ["x", "y", "z"]
    rankings = ranking_votes(2, "a", "q", responses, [0, 1, 2]) + ranking_votes(
        2, "b", "q", responses, [0, 2, 1]
    )
    items = {1: Item("q1", ["p", "q"]), 2: Item("q", responses), 3: Item("q3", ["r", "s"])}
    for method in ("mv", "wawa", "ds", "mace"):
        alone = aggregate(comparisons, method)
        mixed = aggregate(comparisons + rankings, method)
        assert alone[1].winner is None, method
        assert mixed[1].winner is None and mixed[1].confidence == 0.5, method
        assert mixed[3].winner == alone[3].winner == 0, method
        rows = preference_rows(items, mixed, "test", method)
        assert not any(row["prompt"] == "q1" for row in rows), method


def test_dawid_skene_reads_an_adversarys_rankings_the_right_way_round():
    """Simulated rankings of 4: DS learns the inverting annotator and beats majority vote."""
    from rlhfkit.crowd.simulate import AnnotatorProfile, rank

    pool = [AnnotatorProfile(f"honest{i}", flip_prob=0.3) for i in range(2)]
    pool.append(AnnotatorProfile("adversary", kind="adversarial", flip_prob=0.1))
    rng = random.Random(0)
    items, votes = {}, []
    for item_id in range(300):
        values = rng.sample(range(100), 4)
        responses = [f"r{v}" for v in values]
        items[item_id] = Item(f"q{item_id}", responses)
        for profile in pool:
            ranking = rank(profile, "q", responses, lambda _p, r: int(r[1:]) / 100, rng)
            votes += ranking_votes(item_id, profile.name, f"q{item_id}", responses, ranking)

    def correct(method: str) -> int:
        out = aggregate(votes, method)
        return sum(
            out[i].ranking[0] == max(range(4), key=lambda j: int(items[i].responses[j][1:])) for i in items
        )

    assert correct("ds") > correct("mv") + 30


def test_preference_rows_skip_undecided_items_and_carry_the_margin():
    items = {1: Item("q1", ["x", "y"]), 2: Item("q2", ["u", "v"])}
    result = aggregate(
        [V2(1, "a", 0, 1, 1), V2(1, "b", 0, 1, 1), V2(1, "c", 1, 0, 0), V2(2, "a", 0, 1, None)], "mv"
    )
    rows = preference_rows(items, result, "feedback:p", "mv")
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("q1", "y", "x")
    assert row["margin"] == pytest.approx(2 * (2 / 3) - 1, abs=1e-4)
    assert row["n_votes"] == 3 and row["source"] == "feedback:p"


V2 = PairVote


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown aggregation method 'glad'"):
        aggregate([PairVote(1, "a", 0, 1, 0)], "glad")
    with pytest.raises(ValueError, match="neither of the two shown"):
        aggregate([PairVote(1, "a", 0, 1, 2)], "bt")
    assert aggregate([], "ds") == {}


def _bt_votes(item_id: int, wins: dict[tuple[int, int], int]) -> list[PairVote]:
    """`wins[(i, j)]` votes of i over j, each from its own annotator, shown in index order."""
    votes = []
    for (better, worse), n in wins.items():
        for k in range(n):
            left, right = sorted((better, worse))
            votes.append(PairVote(item_id, f"{better}>{worse}#{k}", left, right, better))
    return votes


# Win counts whose every pair is exactly as Bradley-Terry strengths 4 : 2 : 1 predict (2 of 3,
# 2 of 3, 4 of 5), so the maximum-likelihood scores are log 4, log 2, log 1 up to a constant.
_BT_421 = {(0, 1): 2, (1, 0): 1, (1, 2): 2, (2, 1): 1, (0, 2): 4, (2, 0): 1}


def test_bradley_terry_reaches_the_maximum_likelihood_scores():
    agg = aggregate(_bt_votes(1, _BT_421), "bt")[1]
    s = agg.scores
    assert (s[0] - s[1], s[1] - s[2]) == pytest.approx((math.log(2), math.log(2)), abs=1e-3)
    assert agg.confidence == pytest.approx(2 / 3, abs=1e-3)  # P(0 beats 1) = 4 / (4 + 2)


def test_bradley_terry_scores_of_an_item_do_not_depend_on_the_rest_of_the_project():
    """Items share no BT parameters: a large project neither rescales an item nor costs quadratic memory."""
    import tracemalloc

    rng = random.Random(0)
    others = [
        PairVote(item_id, f"w{k}", 0, 1, rng.randint(0, 1)) for item_id in range(2, 1502) for k in range(3)
    ]
    alone = aggregate(_bt_votes(1, _BT_421), "bt")[1]
    tracemalloc.start()
    try:
        together = aggregate(_bt_votes(1, _BT_421) + others, "bt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert together[1].scores == pytest.approx(alone.scores, abs=1e-6)
    assert len(together) == 1501
    # A dense win matrix over the project's 3,003 responses alone would take 72 MB.
    assert peak < 40e6


def test_level_pairs_of_an_aggregated_ranking_give_no_row():
    """A pair the aggregate leaves level (P = 0.5) is no preference; exporting it would train a coin flip."""
    responses = ["best", "middle", "worst"]
    votes = [
        *ranking_votes(9, "a", "q", responses, [0, 1, 2]),
        *ranking_votes(9, "b", "q", responses, [0, 2, 1]),
    ]
    agg = aggregate(votes, "mv")[9]
    assert agg.winner == 0 and agg.scores[1] == agg.scores[2]
    rows = preference_rows({9: Item("q", responses)}, {9: agg}, "test", "mv")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("best", "middle"), ("best", "worst")]
    assert all(r["margin"] > 0 for r in rows)


def test_a_ranking_whose_top_two_are_level_still_gives_its_decided_pairs():
    """No winner (the top two level) says nothing about the rest of the ranking: both beat the last."""
    responses = ["good", "also good", "bad"]
    votes = [
        *ranking_votes(4, "a", "q", responses, [0, 1, 2]),
        *ranking_votes(4, "b", "q", responses, [1, 0, 2]),
    ]
    agg = aggregate(votes, "mv")[4]
    assert agg.winner is None and agg.scores[0] == agg.scores[1]
    rows = preference_rows({4: Item("q", responses)}, {4: agg}, "test", "mv")
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == [("also good", "bad"), ("good", "bad")]


def test_aggregated_rows_keep_a_chat_prompt_as_messages(tmp_path):
    """Aggregated pairs write a chat item's prompt as its messages, as every export does."""
    from rlhfkit.feedback.store import FeedbackStore

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Top 5 films?"}]
    with FeedbackStore(tmp_path / "chat.db", seed=0, durable=False) as store:
        project = store.create_project("chat", task_type="comparison", overlap=1)
        store.add_items(project, [{"prompt": messages, "responses": ["1. Alien", "films are nice"]}])
        annotator = store.add_annotator("ann")
        task = store.next_task(project, annotator)
        store.submit(task.token, annotator, {"choice": "left" if task.order[0] == 0 else "right"})
        items = {item.item_id: item for item in store.items(project)}
        labels = store.labels(project)
    for method in ("mv", "bt"):
        rows = aggregate_pairs(items, labels, method, "feedback:chat").rows
        # TRL's conversational preference format: after a chat prompt, chosen and rejected are messages.
        reply = [{"role": "assistant", "content": "1. Alien"}]
        assert [(r["prompt"], r["chosen"]) for r in rows] == [(messages, reply)], method


@pytest.mark.parametrize("method", METHODS)
def test_a_choice_outside_the_shown_pair_is_refused_by_every_method(method):
    with pytest.raises(ValueError, match="neither of the two shown"):
        aggregate([PairVote(1, "a", 0, 1, 2), PairVote(2, "a", 0, 1, 0)], method)
    with pytest.raises(ValueError, match="with itself"):
        aggregate([PairVote(1, "a", 1, 1, 1)], method)


def test_a_ranking_with_two_identical_responses_keeps_every_other_pair():
    """Identical texts are two entries of the ranking: their pair is skipped, no other pair is lost."""
    responses = ["same", "other", "same"]
    votes = ranking_votes(3, "a", "q", responses, [0, 1, 2])
    assert votes == [PairVote(3, "a", 0, 1, 0), PairVote(3, "a", 1, 2, 1)]
    agg = aggregate(votes + ranking_votes(3, "b", "q", responses, [0, 1, 2]), "bt")[3]
    assert agg.ranking == (0, 1, 2)
    rows = preference_rows({3: Item("q", responses)}, {3: agg}, "test", "bt")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("same", "other"), ("other", "same")]
    assert rows[0]["confidence"] == pytest.approx(pair_probability(agg.scores, 0, 1), abs=1e-4)
    assert rows[1]["confidence"] == pytest.approx(pair_probability(agg.scores, 1, 2), abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_identical_responses_give_no_pair_that_the_preference_reader_refuses(method):
    """A comparison of two identical samples (decided by its votes) and a ranking with two identical
    texts make no row with chosen == rejected, which PreferencePair refuses (as trl-preference skips
    them since 2d8c835): `ranked_pairs` leaves the pair of two identical texts out."""
    from rlhfkit.data.records import PreferencePair

    items = {1: Item("p", ["same", "same"]), 2: Item("q", ["a", "b"]), 3: Item("r", ["x", "y", "x"])}
    votes = [PairVote(1, who, 0, 1, 0) for who in "abc"] + [PairVote(2, who, 0, 1, 1) for who in "abc"]
    for who in "abc":
        votes += ranking_votes(3, who, "r", items[3].responses, [0, 1, 2])
    result = aggregate_pairs(items, votes, method, "test")
    rows = result.rows
    assert rows and all(row["chosen"] != row["rejected"] for row in rows)
    assert {row["prompt"] for row in rows} == {"q", "r"}
    for row in rows:
        PreferencePair.model_validate({k: row[k] for k in ("prompt", "chosen", "rejected", "margin")})
    # The skipped item is counted, apart from the undecided ones.
    assert result.n_undecided == 0
    assert result.summary() == {
        "n_items": 3,
        "n_pairs": len(rows),
        "n_undecided": 0,
        "n_identical_skipped": 1,
    }


def test_an_identical_item_without_a_winner_is_undecided_not_identical():
    items = {1: Item("p", ["same", "same"]), 2: Item("q", ["a", "b"]), 3: Item("s", ["z", "z"])}
    votes = [PairVote(1, "a", 0, 1, 0), PairVote(1, "b", 0, 1, 1)]  # split: no winner
    votes += [PairVote(2, "a", 0, 1, 1), PairVote(3, "a", 0, 1, 0)]
    result = aggregate_pairs(items, votes, "mv", "test")
    assert (result.n_items, result.n_undecided, result.n_identical, len(result.rows)) == (3, 1, 1, 1)


def test_noisy_bradley_terry_gives_an_always_left_annotator_no_say():
    """Two honest annotators and one who always picks the left response label every item.

    Noisy BT explains the third one's answers by a left bias and no skill, so an item the
    honest two split stays level; plain BT (and majority vote) let the left-picker decide it.
    """
    rng = random.Random(0)
    votes, split, agreed = [], [], {}
    for item_id in range(60):
        true = rng.randint(0, 1)
        a, b = (true if rng.random() < 0.8 else 1 - true for _ in range(2))
        for name, chosen in (("honest-a", a), ("honest-b", b)):
            left = rng.randint(0, 1)
            votes.append(PairVote(item_id, name, left, 1 - left, chosen))
        left = rng.randint(0, 1)
        votes.append(PairVote(item_id, "always-left", left, 1 - left, left))
        if a != b:
            split.append(item_id)
        else:
            agreed[item_id] = a
    result = aggregate(votes, "noisy_bt")
    assert len(split) >= 15
    assert max(result[i].confidence for i in split) < 0.55
    assert all(result[i].winner == winner and result[i].confidence > 0.9 for i, winner in agreed.items())
    assert min(aggregate(votes, "bt")[i].confidence for i in split) > 0.6


def test_noisy_bt_gradient_is_the_gradient_of_its_loss():
    import numpy as np

    from rlhfkit.crowd.aggregate import _noisy_bt_gradient, _noisy_bt_loss

    rng = np.random.default_rng(0)
    n_labels, n_workers = 6, 3
    left = rng.integers(1, n_labels + 1, 40)
    right = 1 + (left + rng.integers(0, n_labels - 1, 40)) % n_labels  # never the left one
    data = np.stack([left, right, np.where(rng.random(40) < 0.5, left, right)], axis=1)
    workers = rng.integers(0, n_workers, 40)
    x = rng.normal(0, 2, 1 + n_labels + 2 * n_workers)
    args = (data, workers, n_labels, n_workers, 0.3)
    step = np.eye(x.size) * 1e-6
    numeric = [(_noisy_bt_loss(x + e, *args) - _noisy_bt_loss(x - e, *args)) / 2e-6 for e in step]
    assert _noisy_bt_gradient(x, *args) == pytest.approx(numeric, abs=1e-5)


# Pair margins from the annotators' strengths (feedback.margin=strength).


def test_strength_margin_is_the_mean_strength_over_three():
    assert strength_margin([3, 3]) == pytest.approx(1.0)
    assert strength_margin([1]) == pytest.approx(1 / 3)
    assert strength_margin([1, 2, 3]) == pytest.approx(2 / 3)
    # Labels without a strength (imports) are left out of the mean; none at all gives no margin.
    assert strength_margin([None, 2]) == pytest.approx(2 / 3)
    assert strength_margin([None]) is None
    assert strength_margin([]) is None
    with pytest.raises(ValueError, match="strength must be an integer from 1 to 3, got 4"):
        strength_margin([2, 4])


def _strength_items_and_labels() -> tuple[dict[int, Item], list[PairVote]]:
    items = {
        1: Item("q1", ["x", "y"]),  # unanimous for y, strengths 3 and 2
        2: Item("q2", ["u", "v"]),  # u wins 2 to 1; the dissenting "much better" is not read
        3: Item("q3", ["s", "t"]),  # imported labels without a strength
        4: Item("q4", ["a", "b", "c"]),  # a ranking of three
    }
    labels = [
        PairVote(1, "a", 0, 1, 1, strength=3),
        PairVote(1, "b", 1, 0, 1, strength=2),
        PairVote(2, "a", 0, 1, 0, strength=1),
        PairVote(2, "b", 1, 0, 0, strength=2),
        PairVote(2, "c", 0, 1, 1, strength=3),
        PairVote(3, "a", 0, 1, 1),
        PairVote(3, "b", 1, 0, 1),
        *ranking_votes(4, "a", "q4", items[4].responses, [2, 0, 1]),
        *ranking_votes(4, "b", "q4", items[4].responses, [2, 1, 0]),
    ]
    return items, labels


def test_strength_margins_on_hand_made_labels():
    items, labels = _strength_items_and_labels()
    confidence = {
        (r["prompt"], r["chosen"], r["rejected"]): r for r in aggregate_pairs(items, labels, "mv", "s").rows
    }
    strength = aggregate_pairs(items, labels, "mv", "s", margin="strength").rows
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in strength] == list(confidence)
    by_item = {}
    for row in strength:
        by_item.setdefault(row["prompt"], []).append(row)
    assert by_item["q1"][0]["margin"] == pytest.approx(5 / 6, abs=1e-4)  # mean 2.5, over 3
    assert by_item["q2"][0]["margin"] == pytest.approx(1 / 2, abs=1e-4)  # mean 1.5 of the winner's two
    assert [r["margin_source"] for r in by_item["q1"] + by_item["q2"]] == ["strength", "strength"]
    # No strength, or a ranking: the confidence margin, as without the option.
    for row in by_item["q3"] + by_item["q4"]:
        key = (row["prompt"], row["chosen"], row["rejected"])
        assert row["margin"] == confidence[key]["margin"] and row["margin_source"] == "confidence"
    assert len(by_item["q4"]) == 2  # c over a and over b; a and b are level
    # The confidence itself stays in every row, and the default rows carry no margin_source.
    assert by_item["q2"][0]["confidence"] == confidence[("q2", "u", "v")]["confidence"]
    assert all("margin_source" not in r for r in confidence.values())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_its_winner_and_takes_the_margin_from_strengths(method):
    items, labels = _strength_items_and_labels()
    plain = aggregate_pairs(items, labels, method, "s").rows
    rows = aggregate_pairs(items, labels, method, "s", margin="strength").rows
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert pairs == [(r["prompt"], r["chosen"], r["rejected"]) for r in plain]
    chosen = {p: c for p, c, _ in pairs}
    expected = {"y": 5 / 6, "u": 1 / 2, "v": 1.0}
    for row in rows:
        if row["prompt"] in ("q1", "q2"):
            assert row["margin"] == pytest.approx(expected[chosen[row["prompt"]]], abs=1e-4), method
        assert 0 <= row["margin"] <= 1


def test_a_winner_no_label_chose_keeps_the_confidence_margin():
    """Dawid-Skene can read an adversary the right way round: then no label chose the winner."""
    items = {1: Item("q", ["x", "y"])}
    aggregates = {1: Aggregate(1, 0, 1, 0.0, 0.8, (0, 1), (math.log(0.8), math.log(0.2)))}
    rows = preference_rows(
        items, aggregates, "s", "ds", margin="strength", labels=[PairVote(1, "z", 0, 1, 1, 3)]
    )
    assert rows[0]["margin"] == pytest.approx(0.6) and rows[0]["margin_source"] == "confidence"


def test_an_unknown_margin_source_is_named():
    items, labels = _strength_items_and_labels()
    with pytest.raises(ValueError, match="unknown margin source 'votes'; choose one of confidence, strength"):
        aggregate_pairs(items, labels, "mv", "s", margin="votes")


def test_stored_labels_carry_their_strength_into_the_margin(tmp_path):
    from rlhfkit.feedback.store import FeedbackStore

    with FeedbackStore(tmp_path / "s.db", seed=0, durable=False) as store:
        project = store.create_project("p", task_type="comparison", overlap=2)
        store.add_items(project, [{"prompt": "q", "responses": ["good", "bad"]}])
        for name, strength in (("a", 3), ("b", 2)):
            annotator = store.add_annotator(name)
            task = store.next_task(project, annotator)
            store.submit_comparison(
                task.token, annotator, "left" if task.order[0] == 0 else "right", strength
            )
        items = {item.item_id: item for item in store.items(project)}
        labels = store.labels(project)
    rows = aggregate_pairs(items, labels, "ds", "s", margin="strength").rows
    assert [(r["chosen"], r["margin"]) for r in rows] == [("good", pytest.approx(5 / 6, abs=1e-4))]


def test_loop_votes_from_raw_rows_keep_the_strength():
    from rlhfkit.loop import votes_from_raw

    raw = [
        {
            "item_id": 1,
            "annotator": "a",
            "prompt": "q",
            "responses": ["x", "y"],
            "order": [1, 0],
            "chosen": 0,
            "strength": 2,
        }
    ]
    votes, _ = votes_from_raw(raw)
    assert votes == [PairVote(1, "a", 1, 0, 0, strength=2)]


def test_cli_feedback_aggregate_margin_strength(tmp_path):
    import json

    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.feedback.store import FeedbackStore

    db = tmp_path / "f.db"
    with FeedbackStore(db, seed=0, durable=False) as store:
        project = store.create_project("p", task_type="comparison", overlap=3)
        store.add_items(
            project,
            [{"prompt": "q1", "responses": ["good", "bad"]}, {"prompt": "q2", "responses": ["fine", "poor"]}],
        )
        answers = {"ann": (3, 1), "bob": (1, 1), "cy": (2, None)}  # strength on q1, on q2 (None: a tie)
        for name, strengths in answers.items():
            annotator = store.add_annotator(name)
            while (task := store.next_task(project, annotator)) is not None:
                strength = strengths[0 if task.prompt == "q1" else 1]
                choice = "tie" if strength is None else "left" if task.order[0] == 0 else "right"
                store.submit_comparison(task.token, annotator, choice, strength or 1)
    runner = CliRunner()

    out = tmp_path / "pairs.jsonl"

    def invoke(*extra: str):
        args = [
            "feedback",
            "aggregate",
            "--db",
            str(db),
            "--project",
            "p",
            "--method",
            "mv",
            "--out",
            str(out),
        ]
        return runner.invoke(app, [*args, *extra])

    def run(*extra: str) -> list[dict]:
        result = invoke(*extra)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    by_prompt = {r["prompt"]: r for r in run("--margin", "strength")}
    assert by_prompt["q1"]["margin"] == pytest.approx(2 / 3, abs=1e-4)  # strengths 3, 1, 2
    assert by_prompt["q2"]["margin"] == pytest.approx(1 / 3, abs=1e-4)  # 1, 1 and a tie
    default = {r["prompt"]: r for r in run()}
    assert default["q1"]["margin"] == pytest.approx(1.0, abs=1e-4)  # unanimous: the confidence's margin
    assert "margin_source" not in default["q1"]
    bad = invoke("--margin", "votes")
    assert bad.exit_code != 0 and "--margin 'votes'" in bad.output
