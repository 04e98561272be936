"""Annotator quality: skill, speed, position and length bias, spam probability, and agreement per project.

Pure functions over label records (`feedback.store.LabelRecord` is one); the CLI reads
the store and prints what these return. An annotator is flagged when a measure says
their labels should not train a reward model: a skill below the threshold (accuracy on
golden items when they answered enough of them, else agreement with the aggregate), a
near-certain MACE spam probability, picking the left response almost always, or
going with the longer (or the shorter) response far more often than the crowd does.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.crowd.aggregate import MACE_RESTARTS, TIE_CLASS, Aggregate
from rlhfkit.crowd.agreement import LEVELS, krippendorff_alpha

DEFAULT_THRESHOLD = 0.6
MIN_GOLDEN = 5  # golden answers needed before golden accuracy stands for skill
MAX_LEFT_SHARE = 0.8
MIN_LEFT_LABELS = 10  # non-tie comparisons needed before a position bias is judged
# MACE reads a 30%-noise honest annotator as 60-90% spamming (for two classes its spam share
# is about twice the flip rate, more with a bias), so only a near-certain spammer is flagged on it.
MAX_SPAM = 0.95
# Length bias (`length_bias`) is 0 in expectation for an honest annotator, however noisy, whether
# the better answers tend to be longer or shorter; with 160-180 labels each, its spread for honest
# simulated annotators was about 0.1 (docs/crowd.md). At 0.3, 2 of 245 such measurements were
# flagged, 48 of 49 of annotators who pick the longer response on half the items whatever its
# quality (measured 0.27-0.65), and 6 of 98 of the shipped pools' mildly biased (0.10-0.15) ones.
MAX_LENGTH_BIAS = 0.3
# Labels needed on each side (the longer / the shorter is better) before a length bias is judged:
# with fewer, two rates each from a handful of labels differ by 0.3 by chance too often.
MIN_LENGTH_LABELS = 40


@dataclass(frozen=True)
class LengthBias:
    """How one annotator's choices lean towards the longer response, beyond what quality explains.

    `picks_longer_if_longer_better` (a) and `picks_longer_if_shorter_better` (b) are the
    annotator's Dawid-Skene confusion entries on items where the longer (shorter) response is
    the better one, as the crowd's model infers it; `bias` = a + b - 1 = P(longer | longer is
    better) - P(shorter | shorter is better), in [-1, 1]. An honest annotator, however noisy,
    has a = 1 - b: 0. One who picks the longer response with probability p whatever its
    quality, and judges honestly otherwise (the simulator's `length_bias`), has p; one who
    picks the shorter, -p. A spammer or an adversary has 0 (they are caught by other measures).
    `n_labels` counts the annotator's labels measured; `n_longer_better` and `n_shorter_better`
    split them between the two sides by the model's posterior: what each rate is estimated from.
    """

    bias: float
    picks_longer_if_longer_better: float
    picks_longer_if_shorter_better: float
    n_labels: int
    n_longer_better: float
    n_shorter_better: float


@dataclass(frozen=True)
class AnnotatorQuality:
    """Quality measures of one annotator; None where there is nothing to measure."""

    annotator: str
    n_labels: int
    skill: float | None
    skill_source: str  # "golden", "aggregate" or "none"
    golden_accuracy: float | None
    n_golden: int
    aggregate_agreement: float | None
    n_overlapped: int
    seconds_per_label: float | None
    left_share: float | None
    length: LengthBias | None
    spam_probability: float | None
    flags: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        """Whether any quality check failed."""
        return bool(self.flags)


def label_value(label: Any, level: str) -> Hashable | float | None:
    """A label as one value for Krippendorff's alpha at `level` (None: no value at that level).

    Comparisons: nominal = chosen original index or "tie"; ordinal and interval = the
    strength scale signed towards response 1 (-3..3, 0 for a tie). Rankings: the top
    response (nominal). Likert: the rating. Thumbs: the label (nominal).
    """
    kind = getattr(label, "kind", "comparison")
    value = getattr(label, "value", None) or {}
    if kind == "comparison":
        if level == "nominal":
            return "tie" if label.chosen is None else label.chosen
        if label.chosen is None:
            return 0
        strength = label.strength or 1
        return strength if label.chosen == 1 else -strength
    if kind == "ranking":
        return label.chosen if level == "nominal" else None
    if kind == "likert":
        return value.get("rating")
    if kind == "binary":
        return value.get("label") if level == "nominal" else None
    return None


def agreement_by_level(labels: Iterable[Any]) -> dict[str, float | None]:
    """Krippendorff's alpha of a set of labels at each level that the labels support."""
    labels = list(labels)
    result: dict[str, float | None] = {}
    for level in LEVELS:
        units: dict[int, list[Any]] = defaultdict(list)
        for label in labels:
            value = label_value(label, level)
            if value is not None:
                units[label.item_id].append(value)
        result[level] = krippendorff_alpha(units, level) if units else None
    return result


def mace_spam_probability(labels: Iterable[Any], seed: int = 0) -> dict[str, float]:
    """MACE's posterior probability that each annotator spams, from their comparison labels."""
    import pandas as pd
    from crowdkit.aggregation import MACE

    rows = [
        (lb.item_id, lb.annotator, TIE_CLASS if lb.chosen is None else lb.chosen)
        for lb in labels
        if getattr(lb, "kind", "comparison") == "comparison"
    ]
    if not rows:
        return {}
    frame = pd.DataFrame(rows, columns=["task", "worker", "label"])
    model = MACE(n_restarts=MACE_RESTARTS, random_state=seed).fit(frame)
    # spamming_ rows follow the workers' order of first appearance, column 0 = spamming.
    workers = pd.unique(frame["worker"])
    return {str(w): float(model.spamming_[i, 0]) for i, w in enumerate(workers)}


def length_bias(labels: Iterable[Any], items: Mapping[int, Any]) -> dict[str, LengthBias]:
    """Each annotator's length bias (see `LengthBias`), from Dawid-Skene on "picked the longer / shorter".

    `items` maps an item id to a record with `responses` (the store's ItemRecord). Lengths are
    in characters. Only non-golden comparison labels count, without ties, on two-response
    items whose responses differ in length and that two or more such labels share (a single
    label would be its own evidence). Every annotator's answer becomes "longer" or "shorter"
    and Dawid-Skene learns, with the share of items where the longer is better, one confusion
    matrix per annotator. Learning that share is what keeps honest noise at 0 whether better
    answers tend to be longer or shorter; a rate measured against a fixed aggregate is not: its
    errors pile up on the side the task's answers rarely fall on, so an accurate annotator
    looks biased against it, and an annotator's own vote makes the aggregate agree with them.
    """
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    rows = []
    for label in labels:
        texts = getattr(items.get(label.item_id), "responses", None)
        if (
            getattr(label, "is_golden", False)
            or getattr(label, "kind", "comparison") != "comparison"
            or label.chosen is None
            or texts is None
            or len(texts) != 2
            or len(texts[0]) == len(texts[1])
        ):
            continue
        longer = 0 if len(texts[0]) > len(texts[1]) else 1
        rows.append((label.item_id, label.annotator, "longer" if label.chosen == longer else "shorter"))
    frame = pd.DataFrame(rows, columns=["task", "worker", "label"])
    frame = frame[frame.groupby("task")["worker"].transform("count") >= 2]
    if frame["label"].nunique() < 2:
        return {}  # everyone picked the longer (or the shorter) every time: nothing tells quality apart
    model = DawidSkene(n_iter=100).fit(frame)
    # errors_.loc[(worker, answer), truth] = P(answer | truth); an answer a worker never gave has no row.
    errors, posterior = model.errors_, model.probas_.reindex(columns=["longer", "shorter"], fill_value=0.0)
    weights = frame.join(posterior, on="task").groupby("worker")[["longer", "shorter"]].sum()
    result = {}
    for worker, n_labels in frame["worker"].value_counts().items():
        n_longer, n_shorter = (float(weights.loc[worker, truth]) for truth in ("longer", "shorter"))
        if min(n_longer, n_shorter) < 1.0:
            continue  # seen on one side only: Dawid-Skene fills the other side's rate with a guess
        a, b = (float(errors[truth].get((worker, "longer"), 0.0)) for truth in ("longer", "shorter"))
        result[str(worker)] = LengthBias(
            bias=a + b - 1.0,
            picks_longer_if_longer_better=a,
            picks_longer_if_shorter_better=b,
            n_labels=int(n_labels),
            n_longer_better=n_longer,
            n_shorter_better=n_shorter,
        )
    return result


def _seconds_per_label(labels: Sequence[Any]) -> float | None:
    """Median time per label: the lease-to-submit time, else the gap between consecutive labels."""
    seconds = [lb.seconds for lb in labels if getattr(lb, "seconds", None) is not None]
    if not seconds:
        stamps = sorted(lb.created_at for lb in labels if getattr(lb, "created_at", None) is not None)
        seconds = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(seconds) if seconds else None


def annotator_quality(
    labels: Iterable[Any],
    aggregates: Mapping[int, Aggregate],
    spam: Mapping[str, float] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    items: Mapping[int, Any] | None = None,
) -> list[AnnotatorQuality]:
    """Quality of every annotator of `labels`, judged against `aggregates` (item id -> Aggregate).

    Agreement with the aggregate counts only items with two or more labels (on a single
    label the aggregate is the annotator's own answer) whose aggregate has a winner,
    and only the annotator's non-tie answers. Golden labels carry `is_golden` and
    `correct` (as the store's LabelRecord does). `items` (item id -> record with
    `responses`, as the store's ItemRecord) gives the response lengths behind the length
    bias; without it the length bias is None.
    """
    labels = list(labels)
    lengths = {} if items is None else length_bias(labels, items)
    by_annotator: dict[str, list[Any]] = defaultdict(list)
    n_per_item: dict[int, int] = defaultdict(int)
    for label in labels:
        by_annotator[label.annotator].append(label)
        if not getattr(label, "is_golden", False):
            n_per_item[label.item_id] += 1
    result = []
    for name in sorted(by_annotator):
        mine = by_annotator[name]
        golden = [lb.correct for lb in mine if getattr(lb, "is_golden", False) and lb.correct is not None]
        golden_accuracy = sum(golden) / len(golden) if golden else None
        compared = [
            lb.chosen == aggregates[lb.item_id].winner
            for lb in mine
            if not getattr(lb, "is_golden", False)
            and lb.chosen is not None
            and n_per_item[lb.item_id] >= 2
            and lb.item_id in aggregates
            and aggregates[lb.item_id].winner is not None
        ]
        agreement = sum(compared) / len(compared) if compared else None
        if golden_accuracy is not None and len(golden) >= MIN_GOLDEN:
            skill, source = golden_accuracy, "golden"
        elif agreement is not None:
            skill, source = agreement, "aggregate"
        else:
            skill, source = None, "none"
        positions = [
            lb.order.index(lb.chosen)
            for lb in mine
            if getattr(lb, "kind", "comparison") == "comparison" and lb.chosen is not None
        ]
        left_share = positions.count(0) / len(positions) if positions else None
        spam_probability = None if spam is None else spam.get(name)
        flags = []
        if skill is not None and skill < threshold:
            flags.append(f"skill {skill:.2f} < {threshold:.2f} ({source})")
        if spam_probability is not None and spam_probability > MAX_SPAM:
            flags.append(f"spam {spam_probability:.2f}")
        if left_share is not None and len(positions) >= MIN_LEFT_LABELS and left_share > MAX_LEFT_SHARE:
            flags.append(f"picks left {left_share:.0%}")
        length = lengths.get(name)
        if (
            length is not None
            and min(length.n_longer_better, length.n_shorter_better) >= MIN_LENGTH_LABELS
            and abs(length.bias) > MAX_LENGTH_BIAS
        ):
            towards = "longer" if length.bias > 0 else "shorter"
            flags.append(f"length bias {length.bias:+.2f} (towards the {towards})")
        result.append(
            AnnotatorQuality(
                annotator=name,
                n_labels=len(mine),
                skill=skill,
                skill_source=source,
                golden_accuracy=golden_accuracy,
                n_golden=len(golden),
                aggregate_agreement=agreement,
                n_overlapped=len(compared),
                seconds_per_label=_seconds_per_label(mine),
                left_share=left_share,
                length=length,
                spam_probability=spam_probability,
                flags=tuple(flags),
            )
        )
    return result
