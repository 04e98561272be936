"""Agreement (Krippendorff's alpha), annotator quality and flags, and the quality/aggregate commands."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.crowd.aggregate import aggregate
from rlhfkit.crowd.agreement import krippendorff_alpha, krippendorff_alpha_nominal
from rlhfkit.crowd.quality import (
    MAX_LENGTH_BIAS,
    MIN_LENGTH_LABELS,
    agreement_by_level,
    annotator_quality,
    label_value,
    length_bias,
    mace_spam_probability,
)
from rlhfkit.crowd.simulate import AnnotatorProfile, load_pool, simulate_annotation
from rlhfkit.feedback.store import FeedbackStore

# Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, gaps.
_N = None
_CODERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _N, _N, _N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _N, 3],
    [_N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _N],
]
PAPER_UNITS = {u: [c[u] for c in _CODERS if c[u] is not None] for u in range(12)}


@pytest.mark.parametrize(("level", "expected"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_alpha_matches_krippendorffs_worked_example(level, expected):
    assert krippendorff_alpha(PAPER_UNITS, level) == pytest.approx(expected, abs=5e-4)


# The same paper's two-observer examples without missing data: binary (alpha 0.095) and
# nominal with the values a..e (alpha 0.692).
@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [("0100000010", "1110010000", 0.095), ("aabbdcccedda", "babbbccceddd", 0.692)],
)
def test_alpha_matches_krippendorffs_two_observer_examples(first, second, expected):
    units = {u: [a, b] for u, (a, b) in enumerate(zip(first, second, strict=True))}
    assert krippendorff_alpha_nominal(units) == pytest.approx(expected, abs=5e-4)


def test_a_unit_with_one_value_does_not_count():
    # Unit 12 of the paper's matrix has one value: alpha is the same with and without it.
    without = {u: values for u, values in PAPER_UNITS.items() if len(values) > 1}
    assert len(without) == len(PAPER_UNITS) - 1
    for level in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(PAPER_UNITS, level) == pytest.approx(krippendorff_alpha(without, level))


def test_alpha_edge_cases():
    assert krippendorff_alpha_nominal({1: ["a", "a"], 2: ["b", "b"]}) == 1.0
    assert krippendorff_alpha_nominal({1: ["a"], 2: ["b"]}) is None  # no item labelled twice
    assert krippendorff_alpha_nominal({1: ["a", "a"], 2: ["a", "a"]}) is None  # no variation
    # Two units in perfect disagreement: alpha below zero.
    assert krippendorff_alpha({1: [1, 2], 2: [1, 2]}, "interval") < 0
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha({1: ["a", "b"]}, "interval")
    with pytest.raises(ValueError, match="unknown level"):
        krippendorff_alpha(PAPER_UNITS, "ratio")


T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class L:
    item_id: int
    annotator: str
    chosen: int | None
    order: list[int]
    strength: int | None = 1
    seconds: float | None = None
    created_at: datetime = T0
    is_golden: bool = False
    correct: bool | None = None
    kind: str = "comparison"
    value: dict | None = None


def test_label_values_per_level():
    assert label_value(L(1, "a", 1, [0, 1], strength=3), "nominal") == 1
    assert label_value(L(1, "a", 1, [0, 1], strength=3), "interval") == 3
    assert label_value(L(1, "a", 0, [0, 1], strength=2), "ordinal") == -2
    assert label_value(L(1, "a", None, [0, 1]), "nominal") == "tie"
    assert label_value(L(1, "a", None, [0, 1]), "interval") == 0
    assert label_value(L(1, "a", None, [], kind="likert", value={"rating": 6}), "ordinal") == 6
    alphas = agreement_by_level([L(1, "a", 1, [0, 1], 3), L(1, "b", 1, [0, 1], 2), L(2, "a", 0, [0, 1], 3)])
    assert set(alphas) == {"nominal", "ordinal", "interval"}


def test_annotator_quality_by_hand():
    labels = [
        # item 1: a and b agree on 0, c says 1 (shown on the left).
        L(1, "a", 0, [0, 1], seconds=4.0),
        L(1, "b", 0, [1, 0], seconds=6.0),
        L(1, "c", 1, [1, 0], seconds=1.0),
        # item 2: all three pick 1; b sees it on the left.
        L(2, "a", 1, [0, 1], seconds=8.0),
        L(2, "b", 1, [1, 0], seconds=2.0),
        L(2, "c", 1, [1, 0], seconds=1.0),
        # item 3: only a; not an overlapped item, so it does not count for agreement.
        L(3, "a", 0, [1, 0], seconds=5.0),
        # c's timing comes from timestamps when the lease time is unknown: gaps 10 s and 30 s.
        L(4, "d", 0, [0, 1], created_at=T0),
        L(5, "d", 0, [0, 1], created_at=T0 + timedelta(seconds=10)),
        L(6, "d", 0, [0, 1], created_at=T0 + timedelta(seconds=40)),
    ]
    aggregates = aggregate(labels, "mv")
    report = {q.annotator: q for q in annotator_quality(labels, aggregates, {"c": 0.99}, threshold=0.6)}
    a, b, c, d = report["a"], report["b"], report["c"], report["d"]
    assert (a.aggregate_agreement, a.n_overlapped, a.skill_source) == (1.0, 2, "aggregate")
    assert c.aggregate_agreement == 0.5
    assert a.seconds_per_label == 5.0  # median of 4, 8, 5
    assert d.seconds_per_label == 20.0  # median of the gaps 10 and 30
    assert a.left_share == pytest.approx(1 / 3)  # left on item 1 only
    assert b.left_share == 0.5
    assert c.left_share == 1.0
    assert not a.flagged and not b.flagged
    assert c.flags == ("skill 0.50 < 0.60 (aggregate)", "spam 0.99")
    assert d.skill is None and not d.flagged


def test_golden_accuracy_stands_for_skill_once_there_are_enough():
    labels = [L(100 + i, "g", 0, [0, 1], is_golden=True, correct=i < 3) for i in range(5)]
    labels += [L(1, "g", 0, [0, 1]), L(1, "h", 0, [1, 0])]
    report = {q.annotator: q for q in annotator_quality(labels, aggregate(labels, "mv"))}
    assert (report["g"].skill, report["g"].skill_source, report["g"].n_golden) == (0.6, "golden", 5)
    assert report["h"].skill_source == "aggregate"


@dataclass(frozen=True)
class Item:
    responses: list[str]


def _length_crowd(per_side: int) -> tuple[list[L], dict[int, Item]]:
    """Hand-built labels with known length biases, `per_side` items where the longer response is
    better and as many where the shorter is.

    h1 and h2 always pick the better response (so the crowd's model knows which it is); `lengthy`
    picks the longer where it is better and on half the items where it is not (bias +0.5);
    `brief` mirrors that towards the shorter (-0.5); `noisy` flips a quarter of each side (0).
    The longer response is at index 0 on even items, 1 on odd ones.
    """
    labels, items = [], {}
    for i in range(2 * per_side):
        longer_better, k = i < per_side, i % per_side
        items[i] = Item(["a long response", "short"] if i % 2 == 0 else ["short", "a long response"])
        longer = 0 if i % 2 == 0 else 1
        better = longer if longer_better else 1 - longer
        picks = {
            "h1": better,
            "h2": better,
            "lengthy": longer if longer_better or k % 2 == 0 else better,
            "brief": 1 - longer if not longer_better or k % 2 == 0 else better,
            "noisy": 1 - better if k % 4 == 0 else better,
        }
        labels += [L(i, name, chosen, [0, 1]) for name, chosen in picks.items()]
    return labels, items


def test_length_bias_by_hand():
    labels, items = _length_crowd(per_side=20)
    biases = length_bias(labels, items)
    assert set(biases) == {"h1", "h2", "lengthy", "brief", "noisy"}
    lengthy, brief, noisy = biases["lengthy"], biases["brief"], biases["noisy"]
    # a = P(longer | longer better), b = P(longer | shorter better); bias = a + b - 1.
    assert lengthy.picks_longer_if_longer_better == pytest.approx(1.0)
    assert lengthy.picks_longer_if_shorter_better == pytest.approx(0.5)
    assert lengthy.bias == pytest.approx(0.5)
    assert brief.bias == pytest.approx(-0.5)
    # A quarter flipped on each side: a = 0.75, b = 0.25, no bias.
    assert noisy.picks_longer_if_longer_better == pytest.approx(0.75)
    assert noisy.bias == pytest.approx(0.0, abs=1e-9)
    assert biases["h1"].bias == pytest.approx(0.0, abs=1e-9)
    assert lengthy.n_labels == 40
    assert (lengthy.n_longer_better, lengthy.n_shorter_better) == (pytest.approx(20), pytest.approx(20))


def test_length_bias_leaves_out_ties_equal_lengths_golden_rankings_and_single_labels():
    labels, items = _length_crowd(per_side=20)
    reference = length_bias(labels, items)
    items[100] = Item(["same", "size"])
    items[101] = Item(["a long response", "short"])
    items[102] = Item(["a long response", "short"])
    items[103] = Item(["a long response", "short", "mid"])
    extra = [
        # Equal lengths: nothing to lean towards.
        *(L(100, name, 0, [0, 1]) for name in ("h1", "h2", "lengthy")),
        # Ties say nothing about length; the golden item is not crowd work.
        *(L(101, name, None, [0, 1]) for name in ("h1", "h2", "lengthy")),
        *(L(102, name, 0, [0, 1], is_golden=True) for name in ("h1", "lengthy")),
        # Labelled once: the annotator's own answer would be the only evidence.
        L(104, "lengthy", 0, [0, 1]),
        *(L(103, name, 0, [0, 1, 2], kind="ranking", value={"ranking": [0, 1, 2]}) for name in ("h1", "h2")),
    ]
    items[104] = Item(["a long response", "short"])
    # Seen only where the longer is better (items 0-19): no rate for the other side, no bias.
    extra += [L(i, "partial", 0 if i % 2 == 0 else 1, [0, 1]) for i in range(20)]
    biases = length_bias(labels + extra, items)
    assert {name: b.n_labels for name, b in biases.items()} == {n: b.n_labels for n, b in reference.items()}
    assert biases["lengthy"].bias == pytest.approx(reference["lengthy"].bias)
    assert length_bias([lb for lb in extra if lb.item_id == 101], items) == {}


def test_length_bias_is_flagged_only_with_enough_labels_on_each_side():
    few_labels, few_items = _length_crowd(per_side=MIN_LENGTH_LABELS - 1)
    labels, items = _length_crowd(per_side=MIN_LENGTH_LABELS)
    few_report = annotator_quality(few_labels, aggregate(few_labels, "mv"), items=few_items)
    few = {q.annotator: q for q in few_report}
    assert few["lengthy"].length.bias > MAX_LENGTH_BIAS and few["brief"].length.bias < -MAX_LENGTH_BIAS
    assert not few["lengthy"].flagged and not few["brief"].flagged
    report = {q.annotator: q for q in annotator_quality(labels, aggregate(labels, "mv"), items=items)}
    assert report["lengthy"].flags == ("length bias +0.50 (towards the longer)",)
    assert report["brief"].flags == ("length bias -0.50 (towards the shorter)",)
    assert not any(report[name].flagged for name in ("h1", "h2", "noisy"))
    # Without the items there are no lengths to measure.
    assert all(q.length is None for q in annotator_quality(labels, aggregate(labels, "mv")))


def utility(prompt: str, response: str) -> float:
    """The number written at the end of the response."""
    return float(response.split()[-1])


@pytest.fixture(scope="module")
def crowd_db(tmp_path_factory) -> tuple[str, dict[int, int]]:
    """A store where the crowd10 pool (2 spammers, 1 adversary) labelled 200 items three times each."""
    path = tmp_path_factory.mktemp("crowd") / "crowd.db"
    rng = random.Random(0)
    with FeedbackStore(path, seed=0, durable=False) as store:
        project = store.create_project("crowd", task_type="comparison", overlap=3)
        items = [
            {"prompt": f"q{i}", "responses": [f"first {rng.random():.3f}", f"second {rng.random():.3f}"]}
            for i in range(200)
        ]
        store.add_items(project, items)
        simulate_annotation(store, project, load_pool("crowd10"), utility, seed=0)
        gold = {
            item.item_id: max((0, 1), key=lambda j, item=item: utility("", item.responses[j]))
            for item in store.items(project)
        }
    return str(path), gold


def test_crowd10_spammers_and_adversary_are_flagged_and_ds_beats_mv(crowd_db):
    path, gold = crowd_db
    with FeedbackStore(path) as store:
        labels = store.labels(store.project_id("crowd"))
    mv, ds = aggregate(labels, "mv"), aggregate(labels, "ds")
    assert sum(ds[i].winner == g for i, g in gold.items()) > sum(mv[i].winner == g for i, g in gold.items())
    report = annotator_quality(labels, ds, mace_spam_probability(labels), threshold=0.5)
    flagged = {q.annotator for q in report if q.flagged}
    assert flagged == {"crowd-spammer-random", "crowd-spammer-left", "crowd-adversary"}
    left = next(q for q in report if q.annotator == "crowd-spammer-left")
    assert left.left_share > 0.8 and any("left" in f for f in left.flags)


# A strongly length-biased annotator (half their answers go to the longer response whatever its
# quality) joins crowd10, whose honest annotators have no or mild (0.10) length biases.
LENGTHY = AnnotatorProfile("crowd-lengthy", kind="noisy", flip_prob=0.25, length_bias=0.5)


@pytest.fixture(scope="module")
def length_db(tmp_path_factory) -> str:
    """crowd10 and LENGTHY label 600 items three times each; the longer response is the better one
    on about a third of them (as on the top-5 task, where rambling costs), so a crowd that leans
    to neither side still picks the shorter response more often."""
    path = tmp_path_factory.mktemp("length") / "length.db"
    rng = random.Random(1)
    items = []
    for i in range(600):
        worse, better = sorted(rng.random() for _ in range(2))
        short, long_ = sorted(rng.sample(range(12), 2))
        pads = (long_, short) if rng.random() < 0.35 else (short, long_)  # (better's, worse's)
        responses = [f"{'word ' * pads[0]}{better:.3f}", f"{'word ' * pads[1]}{worse:.3f}"]
        rng.shuffle(responses)
        items.append({"prompt": f"q{i}", "responses": responses})
    with FeedbackStore(path, seed=0, durable=False) as store:
        project = store.create_project("length", task_type="comparison", overlap=3)
        store.add_items(project, items)
        simulate_annotation(store, project, [*load_pool("crowd10"), LENGTHY], utility, seed=0)
    return str(path)


def test_simulated_length_biased_annotator_is_flagged_and_honest_ones_are_not(length_db):
    with FeedbackStore(length_db) as store:
        pid = store.project_id("length")
        labels, items = store.labels(pid), {item.item_id: item for item in store.items(pid)}
    report = {q.annotator: q for q in annotator_quality(labels, aggregate(labels, "ds"), items=items)}
    pool = {p.name: p for p in [*load_pool("crowd10"), LENGTHY]}
    lengthy = report[LENGTHY.name]
    assert min(lengthy.length.n_longer_better, lengthy.length.n_shorter_better) >= MIN_LENGTH_LABELS
    # The measure recovers the simulator's bias, and the crowd's mild biases stay below the threshold.
    assert lengthy.length.bias == pytest.approx(LENGTHY.length_bias, abs=0.15)
    assert lengthy.flags == (f"length bias {lengthy.length.bias:+.2f} (towards the longer)",)
    honest = [name for name, p in pool.items() if p.kind in ("careful", "noisy") and name != LENGTHY.name]
    assert len(honest) == 7
    for name in honest:
        assert abs(report[name].length.bias) < MAX_LENGTH_BIAS, name
        assert not report[name].flagged, (name, report[name].flags)


def test_quality_command_shows_length_bias_in_table_and_json(length_db, tmp_path):
    out = tmp_path / "quality.json"
    flags = ["--db", length_db, "--project", "length", "--json", str(out)]
    result = CliRunner().invoke(app, ["feedback", "quality", *flags])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["project"] == "length" and summary["method"] == "ds"
    assert set(summary["alpha"]) == {"nominal", "ordinal", "interval"}
    rows = {row["annotator"]: row for row in summary["annotators"]}
    lengthy = rows[LENGTHY.name]
    assert lengthy["flagged"] and any(f.startswith("length bias +") for f in lengthy["flags"])
    with FeedbackStore(length_db) as store:
        pid = store.project_id("length")
        expected = length_bias(store.labels(pid), {item.item_id: item for item in store.items(pid)})
    assert lengthy["length"]["bias"] == pytest.approx(expected[LENGTHY.name].bias)
    assert lengthy["length"]["n_labels"] == expected[LENGTHY.name].n_labels
    assert f"{expected[LENGTHY.name].bias:+.2f}" in result.output  # the table's length column
    others = [f for name, row in rows.items() if name != LENGTHY.name for f in row["flags"]]
    assert not any(f.startswith("length") for f in others)
    # A folder is refused before any work, by its option's name.
    folder = ["--db", length_db, "--project", "length", "--json", str(tmp_path)]
    result = CliRunner().invoke(app, ["feedback", "quality", *folder])
    assert result.exit_code == 2 and f"--json {tmp_path}: a directory" in " ".join(result.output.split())


def test_quality_command_flags_and_excludes(crowd_db, tmp_path):
    path, _ = crowd_db
    copy = tmp_path / "copy.db"
    copy.write_bytes(open(path, "rb").read())
    with FeedbackStore(copy) as store:
        assert store.excluded_annotators() == []
    runner = CliRunner()
    flags = ["--db", str(copy), "--project", "crowd", "--threshold", "0.5", "--exclude-flagged"]
    result = runner.invoke(app, ["feedback", "quality", *flags])
    assert result.exit_code == 0, result.output
    assert "Krippendorff's alpha nominal" in result.output
    assert "crowd-adversary" in result.output and "excluded" in result.output
    with FeedbackStore(copy) as store:
        excluded = set(store.excluded_annotators())
    assert {"crowd-adversary", "crowd-spammer-random", "crowd-spammer-left"} <= excluded
    # Aggregation leaves the excluded annotators out.
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(
        app,
        [
            "feedback",
            "aggregate",
            "--db",
            str(copy),
            "--project",
            "crowd",
            "--method",
            "mv",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "margin"} <= set(row) for row in rows)
    assert all(row["n_votes"] <= 3 - 0 for row in rows)
    assert any(row["n_votes"] < 3 for row in rows)  # excluded annotators' votes are gone


def test_commands_name_bad_input(crowd_db, tmp_path):
    path, _ = crowd_db
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["feedback", "aggregate", "--db", path, "--project", "crowd", "--method", "glad", "--out", "x.jsonl"],
    )
    assert result.exit_code == 2 and "--method 'glad'" in result.output
    result = runner.invoke(app, ["feedback", "quality", "--db", path, "--project", "nope"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(
        app, ["feedback", "quality", "--db", path, "--project", "crowd", "--threshold", "2"]
    )
    assert result.exit_code == 2 and "--threshold" in result.output
