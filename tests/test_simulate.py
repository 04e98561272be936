"""Simulated annotators: honest, flipping, biased and spamming judgments, and a full run."""

from __future__ import annotations

import random
import re

import pytest

from rlhfkit.crowd.aggregate import aggregate, majority_vote, preference_rows
from rlhfkit.crowd.simulate import (
    AnnotatorProfile,
    default_pool,
    judge,
    load_pool,
    rank,
    simulate_annotation,
)
from rlhfkit.feedback.store import FeedbackStore

GOOD, BAD = "a good answer", "a bad answer that is longer"


def utility(prompt: str, response: str) -> float:
    """Prefers the response containing "good"."""
    return 1.0 if "good" in response else 0.0


def _picks(profile: AnnotatorProfile, responses: list[str], n: int = 200) -> set[str]:
    rng = random.Random(0)
    return {judge(profile, "q", responses, utility, rng)[0] for _ in range(n)}


def test_careful_annotator_without_noise_follows_utility_in_any_order():
    careful = AnnotatorProfile("c", flip_prob=0.0)
    assert _picks(careful, [GOOD, BAD]) == {"left"}
    assert _picks(careful, [BAD, GOOD]) == {"right"}
    assert judge(careful, "q", [BAD, GOOD], utility, random.Random(0)) == ("right", 3)


def test_flip_one_always_picks_the_other():
    flipper = AnnotatorProfile("f", kind="noisy", flip_prob=1.0)
    assert _picks(flipper, [GOOD, BAD]) == {"right"}
    assert _picks(flipper, [BAD, GOOD]) == {"left"}


def test_adversarial_inverts_and_ties_within_margin():
    adversary = AnnotatorProfile("a", kind="adversarial", flip_prob=0.0)
    assert _picks(adversary, [GOOD, BAD]) == {"right"}
    lenient = AnnotatorProfile("t", flip_prob=0.0, tie_margin=2.0)
    assert _picks(lenient, [GOOD, BAD]) == {"tie"}


def test_spammers_ignore_content():
    always_left = AnnotatorProfile("s", kind="spammer", position_bias=1.0)
    assert _picks(always_left, [GOOD, BAD]) == {"left"}
    assert _picks(always_left, [BAD, GOOD]) == {"left"}
    random_spammer = AnnotatorProfile("r", kind="spammer")
    assert _picks(random_spammer, [GOOD, BAD]) == {"left", "right"}
    strengths = {judge(random_spammer, "q", [GOOD, BAD], utility, random.Random(i))[1] for i in range(50)}
    assert strengths == {1, 2, 3}


def test_length_bias_prefers_the_longer_response():
    lengthy = AnnotatorProfile("l", flip_prob=0.0, length_bias=1.0)
    assert _picks(lengthy, [GOOD, BAD]) == {"right"}


def test_profiles_are_validated():
    with pytest.raises(ValueError, match="kind"):
        AnnotatorProfile("x", kind="lazy")
    with pytest.raises(ValueError, match="flip_prob"):
        AnnotatorProfile("x", flip_prob=1.5)
    with pytest.raises(ValueError, match="2 responses"):
        judge(AnnotatorProfile("x"), "q", ["a"], utility, random.Random(0))


def test_default_pool_shape():
    pool = default_pool()
    honest = [p for p in pool if p.kind != "spammer"]
    assert 7 <= len(pool) <= 10
    assert len({p.name for p in pool}) == len(pool)
    assert 1 <= len(pool) - len(honest) <= 2
    assert sum(p.flip_prob for p in honest) / len(honest) == pytest.approx(0.25, abs=0.02)
    assert sum(p.length_bias > 0 for p in pool) >= 2
    assert sum(0 < p.position_bias < 1 for p in pool) >= 2


def _project_with_items(store: FeedbackStore) -> int:
    project = store.create_project("sim")
    rng = random.Random(1)
    items = []
    for i in range(200):
        responses = [f"a good list {i}", f"a poor list {i}"]
        rng.shuffle(responses)
        items.append({"prompt": f"prompt {i}", "responses": responses, "overlap": 3 if i % 10 < 3 else 1})
    store.add_items(project, items)
    return project


def test_simulate_annotation_through_the_store(open_store):
    store = open_store(clock=None)
    project = _project_with_items(store)
    seen = []
    stats = simulate_annotation(store, project, default_pool(), utility, seed=3, progress=seen.append)
    assert stats["n_labels"] == 60 * 3 + 140 == len(store.labels(project))
    assert seen == list(range(1, stats["n_labels"] + 1))
    assert stats["n_annotators"] == len(default_pool())
    assert sum(stats["per_annotator"].values()) == stats["n_labels"]
    assert store.progress(project)["n_items_complete"] == 200
    items = {item.item_id: item for item in store.items(project)}
    aggregates = majority_vote(store.labels(project))
    right = sum(
        agg.winner is not None and "good" in items[agg.item_id].responses[agg.winner]
        for agg in aggregates.values()
    )
    assert right / len(aggregates) > 0.65
    # Nobody has anything left to do.
    annotator = store.add_annotator("sim-careful-1", kind="simulated")
    assert store.next_task(project, annotator) is None


def test_simulate_annotation_is_deterministic(tmp_path):
    runs = []
    for name in ("one", "two"):
        with FeedbackStore(tmp_path / f"{name}.db", seed=0, durable=False) as store:
            project = _project_with_items(store)
            simulate_annotation(store, project, default_pool(), utility, seed=5)
            runs.append(
                [(lb.item_id, lb.annotator, lb.chosen, lb.order, lb.strength) for lb in store.labels(project)]
            )
    assert runs[0] == runs[1]


def test_verbosity_bias_prefers_the_response_with_more_lines():
    wordy = AnnotatorProfile("v", flip_prob=0.0, verbosity_bias=1.0)
    short, long_ = "a good answer", "a bad\nanswer\non lines"
    assert _picks(wordy, [short, long_]) == {"right"}
    assert _picks(wordy, [long_, short]) == {"left"}


def test_shipped_pools_load():
    assert [p.name for p in load_pool("default")] == [p.name for p in default_pool()]
    crowd = load_pool("crowd10")
    kinds = [p.kind for p in crowd]
    assert len(crowd) == 10 and kinds.count("spammer") == 2 and kinds.count("adversarial") == 1
    assert any(p.verbosity_bias > 0 for p in crowd)


def _pool_file(tmp_path, text: str):
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("annotators: []", "non-empty list under 'annotators'"),
        ("annotators: [{type: careful}]", r"annotators\[0\]: field 'name'"),
        ("annotators: [{name: a}]", "annotator 'a': field 'type' is missing"),
        ("annotators: [{name: a, type: lazy}]", "annotator 'a': field 'type' must be one of"),
        ("annotators: [{name: a, type: noisy, noise: 1.5}]", "annotator 'a': field 'noise' must be in"),
        (
            "annotators: [{name: a, type: noisy, noise: high}]",
            "annotator 'a': field 'noise' must be a number",
        ),
        ("annotators: [{name: a, type: noisy, flips: 0.1}]", "annotator 'a': unknown field 'flips'"),
        ("annotators: [{name: a, type: noisy, biases: {size: 0.1}}]", "unknown field 'biases.size'"),
        ("annotators: [{name: a, type: noisy, biases: {length: 2}}]", "field 'biases.length' must be in"),
        ("annotators: [{name: a, type: noisy}, {name: a, type: careful}]", "repeated: a"),
        ("annotators: [a, b", "not valid YAML"),
    ],
)
def test_pool_errors_name_the_file_annotator_and_field(tmp_path, text, message):
    path = _pool_file(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_pool(path)
    assert str(path) in str(info.value)


def test_missing_pool_file_lists_the_shipped_pools(tmp_path):
    with pytest.raises(ValueError, match="pool file not found.*crowd10"):
        load_pool(tmp_path / "nope.yaml")


def _score(prompt: str, response: str) -> float:
    """Utility of "rN": N / 10."""
    return int(response[1:]) / 10


def test_rank_orders_by_utility_and_carries_the_annotators_noise():
    responses = ["r3", "r9", "r1", "r5"]
    careful = AnnotatorProfile("c", flip_prob=0.0)
    assert rank(careful, "q", responses, _score, random.Random(0)) == [1, 3, 0, 2]
    adversary = AnnotatorProfile("a", kind="adversarial", flip_prob=0.0)
    assert rank(adversary, "q", responses, _score, random.Random(0)) == [2, 0, 3, 1]
    keeper = AnnotatorProfile("s", kind="spammer", position_bias=1.0)
    assert rank(keeper, "q", responses, _score, random.Random(0)) == [0, 1, 2, 3]
    shuffler = AnnotatorProfile("r", kind="spammer")
    orders = {tuple(rank(shuffler, "q", responses, _score, random.Random(i))) for i in range(40)}
    assert len(orders) > 10
    # All tied: every order is a random tie-break, never a fixed one.
    lenient = AnnotatorProfile("t", flip_prob=0.0, tie_margin=1.0)
    tied = {tuple(rank(lenient, "q", responses, _score, random.Random(i))) for i in range(40)}
    assert len(tied) > 10
    # A noisy annotator's top choice is right more often than chance and less than always.
    noisy = AnnotatorProfile("n", flip_prob=0.25)
    rng = random.Random(1)
    top_right = sum(rank(noisy, "q", responses, _score, rng)[0] == 1 for _ in range(400))
    assert 0.5 < top_right / 400 < 0.95
    with pytest.raises(ValueError, match="at least 2"):
        rank(careful, "q", ["r1"], _score, random.Random(0))


def test_simulated_pool_ranks_through_the_store(open_store):
    store = open_store(clock=None)
    project = store.create_project("rank", task_type="ranking")
    rng = random.Random(2)
    items = []
    for i in range(60):
        responses = [f"r{v}" for v in rng.sample(range(10), 4)]
        items.append({"prompt": f"prompt {i}", "responses": responses, "overlap": 3})
    store.add_items(project, items)
    stats = simulate_annotation(store, project, default_pool(), _score, seed=1)
    labels = store.labels(project)
    assert stats["n_labels"] == 180 == len(labels)
    assert {label.kind for label in labels} == {"ranking"}
    by_id = {item.item_id: item for item in store.items(project)}
    # Each ranking of 4 gives 6 pairs; with 25% flips per comparison and two spammers in the
    # pool, about three pairs in four of the aggregate agree with the utility (0.74 measured).
    rows = preference_rows(by_id, aggregate(labels, "noisy_bt", items=by_id), "test", "noisy_bt")
    assert len(rows) > 300
    agree = sum(_score("", row["chosen"]) > _score("", row["rejected"]) for row in rows)
    assert agree / len(rows) > 0.65


def test_pool_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_bytes(b"\xff\xfeannotators: []\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0"):
        load_pool(path)
