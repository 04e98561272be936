"""The label-efficiency curve: nested shares of the labels, re-aggregated, one reward model each."""

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError, RunConfig, load_config
from rlhfkit.eval.rm_bench import GoldPairs
from rlhfkit.feedback.store import FeedbackStore, LabelRecord
from rlhfkit.label_curve import CURVE_DIR, label_subsets, measure_label_curve
from rlhfkit.pipeline import (
    Run,
    feedback_pairs,
    feedback_project_name,
    feedback_store_url,
    training_labels,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _comparison(item_id: int, annotator: str, chosen: int | None, order=(0, 1)) -> LabelRecord:
    return LabelRecord(0, item_id, annotator, chosen, list(order), 1, T0, 1.0)


def _ranking(item_id: int, annotator: str, ranking: list[int]) -> LabelRecord:
    order = list(range(len(ranking)))
    return LabelRecord(0, item_id, annotator, None, order, None, T0, 1.0, "ranking", {"ranking": ranking})


class _Item:
    def __init__(self, prompt: str, responses: list[str]):
        self.prompt, self.responses = prompt, responses


def test_label_subsets_are_nested_prefixes_of_whole_items():
    # Items 1..8 with 3, 1, 1, 3, 1, 2, 3, 1 labels: 15 in all.
    counts = {1: 3, 2: 1, 3: 1, 4: 3, 5: 1, 6: 2, 7: 3, 8: 1}
    labels = [_comparison(i, f"a{k}", 0) for i, n in counts.items() for k in range(n)]
    subsets = label_subsets(labels, [0.5, 0.2], seed=3)
    assert [s.fraction for s in subsets] == [0.2, 0.5]
    small, large = subsets
    # One seeded order serves every share: the smaller share is a prefix of the larger.
    assert large.item_ids[: len(small.item_ids)] == small.item_ids
    assert len(small.item_ids) < len(large.item_ids)
    for subset in subsets:
        # Whole items: every label of a chosen item, in the given order, and nothing else.
        assert subset.labels == [label for label in labels if label.item_id in subset.item_ids]
        target = math.ceil(subset.fraction * len(labels))
        # The shortest such prefix: without its last item it falls short of the target.
        assert len(subset.labels) >= target > len(subset.labels) - counts[subset.item_ids[-1]]
    assert label_subsets(labels, [0.2, 0.5], seed=3) == subsets
    everything = label_subsets(labels, [1.0], seed=3)[0]
    assert set(everything.item_ids) == set(counts) and len(everything.labels) == 15
    # Another seed, another order (8! orders: these two seeds differ).
    assert label_subsets(labels, [0.5], seed=4)[0].item_ids != large.item_ids


def test_label_subsets_round_the_target_honestly():
    # 0.1 * 30 is 3.0000000000000004 in floating point: three one-label items, not four.
    labels = [_comparison(i, "a", 0) for i in range(30)]
    assert len(label_subsets(labels, [0.1], seed=0)[0].labels) == 3


@pytest.mark.parametrize(
    ("labels", "fractions", "message"),
    [
        ([], [0.5], "no labels"),
        ([_comparison(1, "a", 0)], [0.0], r"\(0, 1\]"),
        ([_comparison(1, "a", 0)], [1.5], "1.5"),
    ],
)
def test_label_subsets_reject_bad_input(labels, fractions, message):
    with pytest.raises(ValueError, match=message):
        label_subsets(labels, fractions, seed=0)


def test_a_share_of_comparisons_and_rankings_is_aggregated_from_its_own_labels():
    """Majority vote on hand-made labels: each item's pairs come from its labels only."""
    config = RunConfig.model_validate({"feedback": {"aggregate": "mv"}})
    items = {
        1: _Item("p1", ["short", "much longer"]),
        2: _Item("p2", ["x", "y"]),
        3: _Item("p3", ["a", "bb", "ccc"]),
    }
    labels = [
        # Item 1: two of three prefer response 1 (shown in either order).
        _comparison(1, "ann", 1),
        _comparison(1, "bob", 1, order=(1, 0)),
        _comparison(1, "cy", 0),
        # Item 2: one vote for response 0.
        _comparison(2, "ann", 0),
        # Item 3: a ranking of three, 2 > 0 > 1 by two annotators against one.
        _ranking(3, "ann", [2, 0, 1]),
        _ranking(3, "bob", [2, 0, 1]),
        _ranking(3, "cy", [1, 0, 2]),
    ]
    subset = [label for label in labels if label.item_id in (1, 3)]
    rows = feedback_pairs(config, {i: items[i] for i in (1, 3)}, subset).rows
    got = {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
    assert got == {
        ("p1", "much longer", "short"),
        ("p3", "ccc", "a"),
        ("p3", "ccc", "bb"),
        ("p3", "a", "bb"),
    }
    assert all(r["method"] == "mv" and r["source"] == "feedback:top5-comparisons" for r in rows)


def test_a_share_is_not_the_full_aggregate_cut_down():
    """Dawid-Skene on a share learns annotator skills from that share's labels alone."""
    config = RunConfig.model_validate({"feedback": {"aggregate": "ds"}})
    items = {i: _Item(f"p{i}", [f"left{i}", f"right{i}"]) for i in range(1, 13)}
    labels = []
    # Items 1-10 (outside the share): ann and bob agree, cy always answers the opposite.
    for i in range(1, 11):
        labels += [
            _comparison(i, "ann", i % 2),
            _comparison(i, "bob", i % 2),
            _comparison(i, "cy", 1 - i % 2),
        ]
    # Items 11-12 (the share): ann stands alone each time, bob and cy outvote her.
    labels += [_comparison(11, "ann", 0), _comparison(11, "bob", 1), _comparison(11, "cy", 1)]
    labels += [_comparison(12, "ann", 1), _comparison(12, "bob", 0), _comparison(12, "cy", 0)]
    share = [label for label in labels if label.item_id in (11, 12)]
    full = {r["prompt"]: r["chosen"] for r in feedback_pairs(config, items, labels).rows}
    part = {
        r["prompt"]: r["chosen"] for r in feedback_pairs(config, {11: items[11], 12: items[12]}, share).rows
    }
    # With every label, cy is known to answer backwards, so ann (and cy's answer read backwards)
    # outweigh bob; the share alone shows nothing of the kind, and the majority wins.
    assert (full["p11"], full["p12"]) == ("left11", "right12")
    assert part == {"p11": "right11", "p12": "left12"}


@pytest.mark.parametrize("value", ["[1.0]", "[0]", "[-0.2, 0.5]", "[0.5, 0.5]", "0.5x"])
def test_bad_label_curve_is_rejected_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"rm\.label_curve"):
        load_config(overrides=[f"rm.label_curve={value}"])


def test_config_show_describes_the_key():
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    result = CliRunner().invoke(app, ["config", "show", "rm"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "label_curve: [0.25, 0.5]" in text and "label-efficiency curve" in text and "[] = off" in text
    bad = CliRunner().invoke(app, ["config", "show", "rm", "--set", "rm.label_curve=[0.5, 2]"])
    assert bad.exit_code != 0 and "rm.label_curve" in bad.output and "got 2.0" in bad.output


def test_label_curve_config_is_sorted_and_can_be_switched_off():
    assert load_config(overrides=["rm.label_curve=[0.5, 0.1]"]).rm.label_curve == [0.1, 0.5]
    assert load_config(overrides=["rm.label_curve=[]"]).rm.label_curve == []


def test_label_curve_changes_only_the_eval_stage(tmp_path):
    before = Run(tmp_path / "a", RunConfig())
    after = Run(tmp_path / "b", RunConfig.model_validate({"rm": {"label_curve": [0.3]}}))
    for stage in ("feedback", "rm", "ppo", "dpo", "bon"):
        assert before.fingerprint(stage) == after.fingerprint(stage)
    assert before.fingerprint("eval") != after.fingerprint("eval")
    # Any other rm key still re-runs rm.
    epochs = Run(tmp_path / "c", RunConfig.model_validate({"rm": {"epochs": 1.0}}))
    assert before.fingerprint("rm") != epochs.fingerprint("rm")


# -- the reward models of the curve, on a tiny run --------------------------------------------

PROMPTS = [f"Top 5 {topic}?" for topic in ("films", "plants", "games", "cities", "meals", "books")]
ITEMS = ["Pothos", "Fern", "Ivy", "Aloe", "Cactus"]


def _response(n: int) -> str:
    return " ".join(f"{i + 1}. {name}" for i, name in enumerate(ITEMS[:n]))


def _tiny_run(tmp_path: Path, task_type: str, aggregate: str) -> Run:
    """A run directory with an SFT model and a feedback project labelled by the simulated crowd."""
    from rlhfkit.crowd.simulate import default_pool, simulate_annotation
    from rlhfkit.models.loading import save_model, tiny_causal_lm
    from rlhfkit.models.tokenizer import train_tokenizer

    config = RunConfig.model_validate(
        {
            "feedback": {
                "aggregate": aggregate,
                "completions_per_prompt": 2 if task_type == "comparison" else 3,
            },
            "rm": {"epochs": 1, "batch_size": 8, "max_length": 48, "label_curve": [0.25, 0.5]},
        }
    )
    run = Run(tmp_path / "run", config, show_progress=False)
    tokenizer = train_tokenizer([p + " " + _response(5) for p in PROMPTS] * 10, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, run.stage_dir("sft") / "model")
    k = 2 if task_type == "comparison" else 3
    items = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "responses": [_response(1 + (i + j) % 5) for j in range(k)]}
        for i in range(40)
    ]
    for i, item in enumerate(items):
        item["responses"] = list(dict.fromkeys(item["responses"]))
        item["overlap"] = 3 if i % 2 else 1
    store = FeedbackStore(feedback_store_url(run), seed=0, durable=False)
    try:
        project = store.create_project(feedback_project_name(run), task_type=task_type, overlap=1)
        store.add_items(project, items)
        # The gold judge here: a complete list of five is best, then the longer the better.
        simulate_annotation(store, project, default_pool(), lambda p, t: t.count("."), seed=0)
        rows = feedback_pairs(config, *training_labels(store, project)).rows
    finally:
        store.close()
    run.stage_dir("feedback").mkdir()
    (run.stage_dir("feedback") / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run.stage_dir("feedback") / "summary.json").write_text("{}")
    run.stage_dir("rm").mkdir()
    (run.stage_dir("rm") / "summary.json").write_text(json.dumps({"n_train_pairs": len(rows) - 1}))
    return run


def _heldout(run: Run) -> GoldPairs:
    """Gold pairs of a five-item list against a shorter one, the better one on either side."""
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids

    tokenizer = load_tokenizer(run.stage_dir("sft") / "model")
    prompt_ids, a, b, judged = [], [], [], []
    for i, prompt in enumerate(PROMPTS * 2):
        good, bad = (
            completion_token_ids(tokenizer, _response(5)),
            completion_token_ids(tokenizer, _response(1 + i % 3)),
        )
        prompt_ids.append(prompt_token_ids(tokenizer, prompt))
        a.append(good if i % 2 else bad)
        b.append(bad if i % 2 else good)
        judged.append((i, bool(i % 2)))
    return GoldPairs(prompt_ids, a, b, judged, [[] for _ in judged], 0, tokenizer.pad_token_id)


@pytest.mark.parametrize(("task_type", "aggregate"), [("comparison", "ds"), ("ranking", "noisy_bt")])
def test_curve_trains_one_unsaved_reward_model_per_share(tmp_path, task_type, aggregate):
    run = _tiny_run(tmp_path, task_type, aggregate)
    heldout = _heldout(run)
    points = measure_label_curve(run, heldout, 0.75)
    assert points is not None and [p["fraction"] for p in points] == [0.25, 0.5, 1.0]
    store = FeedbackStore(feedback_store_url(run), seed=0)
    try:
        project = store.project_id(feedback_project_name(run))
        items, labels = training_labels(store, project)
    finally:
        store.close()
    subsets = label_subsets(labels, [0.25, 0.5], run.config.seed)
    out = run.stage_dir("eval") / CURVE_DIR
    for point, subset in zip(points, subsets, strict=False):
        assert (point["n_items"], point["n_labels"]) == (len(subset.item_ids), len(subset.labels))
        # The share's own aggregate is what its reward model learnt from.
        expected = feedback_pairs(run.config, {i: items[i] for i in subset.item_ids}, subset.labels).rows
        written = [json.loads(line) for line in (out / f"{subset.fraction:g}" / "pairs.jsonl").open()]
        assert written == expected and point["n_pairs"] == len(expected) > 0
        assert 0 < point["n_train_pairs"] <= point["n_pairs"]
        assert 0.0 <= point["heldout_accuracy"] <= 1.0
        assert (out / f"{subset.fraction:g}" / "metrics.jsonl").stat().st_size > 0
    if task_type == "ranking":
        assert any(len(items[i].responses) == 3 for i in subsets[0].item_ids)
    full = points[-1]
    assert full["n_labels"] == len(labels) and full["heldout_accuracy"] == 0.75
    assert full["n_pairs"] == sum(1 for _ in (run.stage_dir("feedback") / "pairs.jsonl").open())
    assert points[0]["n_labels"] < points[1]["n_labels"] < full["n_labels"]
    # Trained, measured, not saved as models.
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("config.json"))


def test_curve_is_reused_until_what_it_depends_on_changes(tmp_path):
    run = _tiny_run(tmp_path, "comparison", "mv")
    heldout = _heldout(run)
    points = measure_label_curve(run, heldout, 0.75)
    metrics = run.stage_dir("eval") / CURVE_DIR / "0.25" / "metrics.jsonl"
    trained = metrics.stat().st_mtime_ns
    # The eval stage runs again (other policies, new PPO settings): the shares' models are not retrained,
    # and the full-data point is the run's reward model as measured now.
    again = measure_label_curve(run, heldout, 0.8)
    assert again[:-1] == points[:-1] and again[-1]["heldout_accuracy"] == 0.8
    assert metrics.stat().st_mtime_ns == trained
    # Other held-out pairs (the first six judged): measured again, on the same shares.
    fewer = GoldPairs(
        heldout.prompt_ids, heldout.a, heldout.b, heldout.judged[:6], heldout.subsets[:6], 0, heldout.pad_id
    )
    remeasured = measure_label_curve(run, fewer, 0.75)
    assert metrics.stat().st_mtime_ns != trained
    assert [p["n_pairs"] for p in remeasured] == [p["n_pairs"] for p in points]
    # Seeded: from scratch, the same curve.
    (run.stage_dir("eval") / CURVE_DIR / "points.json").unlink()
    assert measure_label_curve(run, heldout, 0.75) == points


def test_no_curve_without_heldout_pairs_or_feedback_labels(tmp_path, capsys):
    run = Run(tmp_path / "run", RunConfig(), show_progress=False)
    assert measure_label_curve(run, None, None) is None
    assert "no gold-labelled held-out pairs" in capsys.readouterr().out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    external = Run(tmp_path / "ext", RunConfig.model_validate({"data": {"preferences": str(pairs)}}))
    heldout = GoldPairs([[1]], [[2]], [[3]], [(0, True)], [[]], 0, 0)
    assert measure_label_curve(external, heldout, 0.5) is None
    assert "data.preferences" in capsys.readouterr().out
    assert measure_label_curve(run, heldout, 0.5) is None
    assert "feedback stage has not run" in capsys.readouterr().out


def test_feedback_margin_strength_makes_the_feedback_stages_margins_from_strengths(tmp_path):
    """feedback_pairs (the feedback stage, the loop's first round, the label curve) reads feedback.margin."""
    from rlhfkit.crowd.aggregate import strength_margin
    from rlhfkit.crowd.simulate import default_pool, simulate_annotation

    items = [
        {"prompt": f"q{i}", "responses": ["1. a. 2. b. 3. c. 4. d. 5. e.", "a" * (1 + i % 3)]}
        for i in range(12)
    ]
    with FeedbackStore(tmp_path / "f.db", seed=0, durable=False) as store:
        project = store.create_project("p", task_type="comparison", overlap=3)
        store.add_items(project, items)
        simulate_annotation(store, project, default_pool(), lambda p, t: t.count("."), seed=0)
        items_by_id, labels = training_labels(store, project)
    plain = feedback_pairs(load_config(), items_by_id, labels).rows
    config = load_config(overrides=["feedback.margin=strength"])
    assert config.feedback.margin == "strength" and load_config().feedback.margin == "confidence"
    rows = feedback_pairs(config, items_by_id, labels).rows
    assert [(r["prompt"], r["chosen"]) for r in rows] == [(r["prompt"], r["chosen"]) for r in plain]
    prompt_of = {item.item_id: item.prompt for item in items_by_id.values()}
    chose = {}
    for label in labels:
        if label.chosen is not None:
            text = items_by_id[label.item_id].responses[label.chosen]
            chose.setdefault((prompt_of[label.item_id], text), []).append(label.strength)
    assert rows and all(r["margin_source"] == "strength" for r in rows)
    for row in rows:
        assert row["margin"] == pytest.approx(
            strength_margin(chose[(row["prompt"], row["chosen"])]), abs=1e-4
        )
    # The simulator's strengths vary with the utility gap, so the margins are not the confidence's.
    assert {r["margin"] for r in rows} != {r["margin"] for r in plain}


def test_a_bad_feedback_margin_is_named():
    with pytest.raises(ConfigError, match=r"feedback\.margin: Input should be 'confidence' or 'strength'"):
        load_config(overrides=["feedback.margin=votes"])
