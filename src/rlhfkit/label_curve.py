"""Label-efficiency curve: reward-model held-out accuracy against the number of labels.

The eval stage trains extra reward models (the run's rm config; not saved) on growing shares
of the feedback stage's labels (`rm.label_curve`), and measures each on the same gold-labelled
held-out pairs as the run's own reward model, which is the curve's full-data point.

A share is taken in whole items: the labelled items are put in one seeded order, and share f
is the shortest prefix of that order holding at least f of the labels. An item keeps all its
labels (three annotators stay three), so a subset is a smaller crowd labelled the same way,
and the subsets are nested, so the curve shows what more labels add rather than which labels
were drawn. Each subset is aggregated again from its own raw labels with feedback.aggregate
(its margins from feedback.margin, through `pipeline.feedback_pairs`), exactly as the full set
was: Dawid-Skene, MACE and noisy BT estimate annotator skill from the
labels they see, so the full aggregate cut down to fewer items would know more than a run with
that many labels. Comparisons and rankings of K responses aggregate alike (a ranking label is
one label, worth its C(K, 2) pairs).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from rlhfkit.data.io import write_jsonl
from rlhfkit.eval.rm_bench import GoldPairs, benchmark_on_pairs
from rlhfkit.pipeline import (
    Run,
    _preference_path,
    _read_pairs,
    feedback_pairs,
    feedback_project_name,
    feedback_store_url,
    training_labels,
)

console = Console()

CURVE_DIR = "label_curve"


class ItemLabel(Protocol):
    """What a share is cut by: the item a label belongs to."""

    @property
    def item_id(self) -> int: ...


@dataclass(frozen=True)
class LabelSubset:
    """The labels of the first items of the seeded order that hold `fraction` of all labels.

    `item_ids` are those items in that order; `labels` keep the order they were given in.
    """

    fraction: float
    item_ids: tuple[int, ...]
    labels: list[Any]


def label_subsets(labels: Sequence[ItemLabel], fractions: Sequence[float], seed: int) -> list[LabelSubset]:
    """One nested subset of whole items per fraction (ascending), each with its labels in the given order."""
    if not labels:
        raise ValueError("no labels to take shares of")
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"a share of the labels must be in (0, 1], got {fraction}")
    counts = Counter(label.item_id for label in labels)
    order = sorted(counts)
    random.Random(f"label-curve-{seed}").shuffle(order)
    total = sum(counts.values())
    subsets = []
    for fraction in sorted(fractions):
        # Rounded first: 0.1 * 30 is 3.0000000000000004 in floating point, and must need 3 labels.
        target = math.ceil(round(fraction * total, 9))
        taken: list[int] = []
        n = 0
        for item_id in order:
            if n >= target:
                break
            taken.append(item_id)
            n += counts[item_id]
        chosen = set(taken)
        subsets.append(
            LabelSubset(fraction, tuple(taken), [label for label in labels if label.item_id in chosen])
        )
    return subsets


def _skip(reason: str) -> None:
    console.print(f"[yellow]rm.label_curve: no label-efficiency curve: {reason}[/yellow]", highlight=False)


def measure_label_curve(
    run: Run, heldout: GoldPairs | None, full_accuracy: float | None
) -> list[dict] | None:
    """The curve's points, smallest share first, the run's own reward model last; None if impossible.

    Each point: fraction, n_items, n_labels (those aggregation reads: golden items and excluded
    annotators left out), n_pairs (after aggregation), n_train_pairs (after the rm.val_share
    split) and heldout_accuracy (strict accuracy on `heldout`). The shares' points are kept in
    RUN/eval/label_curve/points.json and reused while what they depend on is unchanged.
    """
    from rlhfkit.feedback.store import FeedbackStore

    if heldout is None or full_accuracy is None:
        _skip(
            "no gold-labelled held-out pairs (a task without gold, eval.heldout_pairs: 0, or no reward model)"
        )
        return None
    if run.config.data.preferences is not None:
        _skip("the reward model learnt from data.preferences, not from the feedback stage's labels")
        return None
    if not (run.stage_dir("feedback") / "summary.json").is_file():
        _skip("the feedback stage has not run in this run directory")
        return None
    store = FeedbackStore(feedback_store_url(run), seed=run.config.seed)
    try:
        name = feedback_project_name(run)
        try:
            project = store.project_id(name)
        except KeyError:
            _skip(f"the feedback store {store.url} has no project {name!r}")
            return None
        items, labels = training_labels(store, project)
    finally:
        store.close()
    if not labels:
        _skip(f"project {name!r} has no labels to train on")
        return None

    out = run.stage_dir("eval") / CURVE_DIR
    key = _curve_key(run, labels, heldout)
    points = _finished_points(out, key)
    if points is not None:
        console.print(f"[dim]label curve: reusing the shares' reward models in {out}[/dim]", highlight=False)
    else:
        shutil.rmtree(out, ignore_errors=True)  # shares of an earlier config must not linger
        points = [
            _share_point(run, subset, items, heldout, out / f"{subset.fraction:g}")
            for subset in label_subsets(labels, run.config.rm.label_curve, run.config.seed)
        ]
        (out / "points.json").write_text(json.dumps({"key": key, "points": points}, indent=2))
    rm_summary = run.stage_dir("rm") / "summary.json"
    points.append(
        {
            "fraction": 1.0,
            "n_items": len({label.item_id for label in labels}),
            "n_labels": len(labels),
            "n_pairs": len(_read_pairs(_preference_path(run))),
            "n_train_pairs": json.loads(rm_summary.read_text()).get("n_train_pairs")
            if rm_summary.is_file()
            else None,
            "heldout_accuracy": full_accuracy,
        }
    )
    return points


def _curve_key(run: Run, labels: Sequence[Any], heldout: GoldPairs) -> str:
    """What the shares' reward models depend on: everything up to the rm stage, the shares, the
    labels (an annotator excluded since changes them) and the held-out pairs they are judged on.

    Not the ppo or eval settings otherwise: tuning PPO, or evaluating other policies, re-runs the
    eval stage without training these reward models again.
    """
    blob = json.dumps(
        {
            "rm": run.fingerprint("rm"),
            "shares": run.config.rm.label_curve,
            "labels": [label.label_id for label in labels],
            "heldout": [heldout.prompt_ids, heldout.a, heldout.b, heldout.judged],
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished_points(out: Path, key: str) -> list[dict] | None:
    path = out / "points.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["points"] if saved.get("key") == key else None


def _share_point(
    run: Run, subset: LabelSubset, items: dict[int, Any], heldout: GoldPairs, folder: Path
) -> dict[str, Any]:
    """Aggregate one share's labels, train a reward model on its pairs, judge it on `heldout`."""
    from rlhfkit.train.rm import train_reward_model

    folder.mkdir(parents=True, exist_ok=True)
    rows = feedback_pairs(run.config, {i: items[i] for i in subset.item_ids}, subset.labels).rows
    point: dict[str, Any] = {
        "fraction": subset.fraction,
        "n_items": len(subset.item_ids),
        "n_labels": len(subset.labels),
        "n_pairs": len(rows),
        "n_train_pairs": None,
        "heldout_accuracy": None,
    }
    if rows:
        # Written and read back as the full set's pairs.jsonl is, so both reach the RM alike.
        write_jsonl(folder / "pairs.jsonl", rows)
        # Not saved, so no periodic checkpoints either (a signal still stops it cleanly).
        config = run.config.model_copy(update={"rm": run.config.rm.model_copy(update={"save_every": 0})})
        model, _, summary = train_reward_model(
            config, run.model_path("sft"), _read_pairs(folder / "pairs.jsonl"), folder, run.show_progress
        )
        point["n_train_pairs"] = summary["n_train_pairs"]
        # On the CPU, where the eval stage scores the run's own reward model.
        point["heldout_accuracy"] = benchmark_on_pairs(model.cpu(), heldout)["accuracy"]
    accuracy = point["heldout_accuracy"]
    console.print(
        f"label curve: {point['n_labels']} labels ({subset.fraction:g} of them) -> {point['n_pairs']} "
        f"pairs, held-out accuracy {'-' if accuracy is None else f'{accuracy:.3f}'}",
        highlight=False,
    )
    return point
