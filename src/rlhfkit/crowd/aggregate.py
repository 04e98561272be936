"""Aggregation of disagreeing labels into one outcome per item.

Pure functions over label records; no database. Majority vote (ours, with a tie
outcome) is the baseline; Wawa, Dawid-Skene and MACE (categorical: response 0,
response 1 or tie) and Bradley-Terry / noisy Bradley-Terry (pairwise) come from
crowd-kit, the pairwise two with corrections to its fits (`_bradley_terry`,
`_noisy_bradley_terry`).

Every method ends in the same shape: per response a score on a log scale, so that
P(i beats j) = sigmoid(s_i - s_j). For the categorical methods s is the log of the
class probability (a tie's probability mass is left out of the pair), for BT the log
of the strength, for noisy BT the latent score. The confidence of an item is that
probability for its winner against the runner-up.

Ties: the categorical methods keep "tie" as a third class, so an item whose most
likely class is a tie has no winner. crowd-kit's pairwise models have no tie outcome,
and a tie says nothing about which response is better, so BT and noisy BT drop tie
answers. Counting a tie as a win each way would double the weight of the tie, and
noisy BT would read it as an annotator contradicting themselves (a lower skill for an
honest annotator who saw two equally good answers).

Margins: a preference row's `margin` (in [0, 1], read by `rm.soft_labels`) comes from one of
MARGIN_SOURCES. `confidence` (the default): 2 * P(chosen beats rejected) - 1 under the method.
`strength`: how much better the annotators who chose the winner said it was, on the A/B
interface's 1..3 scale (`strength_margin`), as Llama 2 made its margin from its rating scale.
The winner is the method's either way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rlhfkit.data.records import Ranking, completion_for

CATEGORICAL_METHODS = ("mv", "wawa", "ds", "mace")
PAIRWISE_METHODS = ("bt", "noisy_bt")
METHODS = CATEGORICAL_METHODS + PAIRWISE_METHODS
# Where a preference row's margin comes from (see the module docstring and `preference_rows`).
MARGIN_SOURCES = ("confidence", "strength")
# The top of the A/B strength scale, 1 slightly better .. 3 much better (feedback.answers.MAX_STRENGTH;
# crowd does not import feedback).
STRENGTH_SCALE = 3
# Categorical class of a tie answer (responses are classes 0 and 1).
TIE_CLASS = 2
# Restarts of MACE's variational EM: its estimate is stable with a few at a fraction of the
# default ten's cost.
MACE_RESTARTS = 4
# Floor of a probability before its log: a response nobody picked still gets a finite score.
_MIN_PROB = 1e-6
# Responses per Bradley-Terry fit. Items share no BT parameters, so whole items are fitted a group
# at a time: crowd-kit builds a dense win matrix over all the responses it is given, which for a
# whole project would grow with the square of its size (72 MB at 1,500 items, 29 GB at 30,000).
_BT_GROUP = 128


class Vote(Protocol):
    """What majority vote reads from a label: the item and the chosen original index."""

    @property
    def item_id(self) -> int: ...

    @property
    def chosen(self) -> int | None: ...


class ComparisonLabel(Vote, Protocol):
    """A stored comparison label (`feedback.store.LabelRecord` is one): who, and in which order."""

    @property
    def annotator(self) -> str: ...

    @property
    def order(self) -> list[int]: ...


@dataclass(frozen=True)
class PairVote:
    """One annotator's answer on two responses of an item.

    `left` and `right` are the original indices in the order shown; `chosen` is the
    original index of the preferred one, None for a tie. `strength` is the comparison's
    1..3 strength, None where none was given (a ranking's pairs, imported labels).
    """

    item_id: int
    annotator: str
    left: int
    right: int
    chosen: int | None
    strength: int | None = None


@dataclass(frozen=True)
class Aggregate:
    """The aggregated outcome of one item.

    `winner` is the original index of the preferred response, or None when the item
    is a tie (a tie won, or the top two responses are level). `agreement` is the share
    of votes for the winning outcome (the top count's share when there is no winner).
    `confidence` is the method's probability that the winner beats the runner-up
    (0.5 without a winner); `ranking` lists the response indices best first and
    `scores` are the per-response log-scale scores behind both.
    """

    item_id: int
    winner: int | None
    n_votes: int
    agreement: float
    confidence: float = 0.5
    ranking: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()


def pair_probability(scores: Sequence[float], better: int, worse: int) -> float:
    """P(response `better` beats `worse`) = sigmoid(s_better - s_worse) for log-scale scores."""
    diff = scores[better] - scores[worse]
    # Written both ways so that a large |diff| never overflows exp.
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    e = math.exp(diff)
    return e / (1.0 + e)


def majority_vote(labels: Iterable[Vote]) -> dict[int, Aggregate]:
    """Aggregate comparison labels by plurality; a "tie" label is a vote for the tie outcome."""
    counts: dict[int, Counter[int | None]] = {}
    for label in labels:
        counts.setdefault(label.item_id, Counter())[label.chosen] += 1
    result: dict[int, Aggregate] = {}
    for item_id in sorted(counts):
        votes = counts[item_id]
        ranked = votes.most_common()
        n_votes = sum(n for _, n in ranked)
        top_outcome, top = ranked[0]
        no_majority = len(ranked) > 1 and ranked[1][1] == top
        winner = None if no_majority else top_outcome
        n_responses = max(2, 1 + max((c for c in votes if c is not None), default=1))
        scores = [math.log(max(votes[i] / n_votes, _MIN_PROB)) for i in range(n_responses)]
        result[item_id] = _outcome(item_id, winner, n_votes, top / n_votes, scores)
    return result


def _outcome(
    item_id: int, winner: int | None, n_votes: int, agreement: float, scores: Sequence[float]
) -> Aggregate:
    """An Aggregate whose ranking and confidence follow the scores (ties in score keep index order)."""
    ranking = tuple(sorted(range(len(scores)), key=lambda i: (-scores[i], i)))
    if winner is not None and ranking[0] != winner:
        # The winner was decided by the outcome (e.g. plurality), so it leads the ranking.
        ranking = (winner, *[i for i in ranking if i != winner])
    confidence = 0.5 if winner is None else pair_probability(scores, ranking[0], ranking[1])
    return Aggregate(item_id, winner, n_votes, agreement, confidence, ranking, tuple(scores))


def as_pair_votes(
    labels: Iterable[ComparisonLabel | PairVote], items: Mapping[int, Any] | None = None
) -> list[PairVote]:
    """Stored labels (or PairVotes, passed through) as PairVotes in presented order.

    Comparison labels give one vote; ranking labels (`kind` "ranking", `value["ranking"]`)
    give their C(K, 2) pairs and need `items` (item id -> record with prompt and responses).
    """
    votes: list[PairVote] = []
    for label in labels:
        if isinstance(label, PairVote):
            votes.append(_checked(label))
            continue
        kind = getattr(label, "kind", "comparison")
        if kind == "ranking":
            if items is None or label.item_id not in items:
                raise ValueError(f"item {label.item_id}: a ranking label needs its item's responses")
            item = items[label.item_id]
            ranking = (getattr(label, "value", None) or {}).get("ranking")
            if ranking is None:
                raise ValueError(f"item {label.item_id}: ranking label has no 'ranking' in its value")
            votes += ranking_votes(label.item_id, label.annotator, item.prompt, item.responses, ranking)
            continue
        if kind != "comparison":
            raise ValueError(
                f"item {label.item_id}: {kind!r} labels are not pairwise; "
                "only comparisons and rankings aggregate"
            )
        if len(label.order) != 2:
            raise ValueError(
                f"item {label.item_id}: a comparison label shows 2 responses, got order {label.order}"
            )
        left, right = label.order
        strength = getattr(label, "strength", None)
        votes.append(_checked(PairVote(label.item_id, label.annotator, left, right, label.chosen, strength)))
    return votes


def _checked(vote: PairVote) -> PairVote:
    """The vote, if it compares two responses and chose one of them (or a tie); ValueError otherwise."""
    if vote.left == vote.right:
        raise ValueError(f"item {vote.item_id}: a vote compares response {vote.left} with itself")
    if vote.chosen is not None and vote.chosen not in (vote.left, vote.right):
        raise ValueError(
            f"item {vote.item_id}: annotator {vote.annotator!r} chose response {vote.chosen}, "
            f"which is neither of the two shown ({vote.left}, {vote.right})"
        )
    return vote


def ranking_votes(
    item_id: int, annotator: str, prompt: str, responses: list[str], ranking: list[int]
) -> list[PairVote]:
    """One annotator's ranking of K responses as its C(K, 2) pairwise votes (see `ranked_pairs`).

    Shown order of a pair is by original index (a ranking has no left and right), so a
    noisy BT position bias is not learnt from rankings.
    """
    Ranking(prompt=prompt, responses=responses, ranking=ranking)  # a permutation of non-empty texts
    return [
        PairVote(item_id, annotator, min(better, worse), max(better, worse), better)
        for better, worse in ranked_pairs(responses, ranking)
    ]


def ranked_pairs(responses: Sequence[str], ranking: Sequence[int]) -> list[tuple[int, int]]:
    """The (better, worse) response indices of a ranking's C(K, 2) pairs, in `ranking_to_pairs` order.

    By index, not by text: two responses with the same text are two entries of the ranking
    (mapping texts back to indices would merge them and turn their pairs around); the pair of
    the two identical texts says nothing and is skipped, as `ranking_to_pairs` skips it.
    """
    return [
        (better, worse)
        for i, better in enumerate(ranking)
        for worse in ranking[i + 1 :]
        if responses[better] != responses[worse]
    ]


def aggregate(
    labels: Iterable[ComparisonLabel | PairVote],
    method: str,
    seed: int = 0,
    items: Mapping[int, Any] | None = None,
) -> dict[int, Aggregate]:
    """One outcome per item (winner, confidence, ranking) by `method`, one of METHODS.

    `items` (item id -> record with prompt and responses) is needed only for ranking labels.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")
    votes = as_pair_votes(labels, items)
    if not votes:
        return {}
    if method in CATEGORICAL_METHODS:
        return _aggregate_categorical(votes, method, seed)
    return _aggregate_pairwise(votes, method, seed)


def _class_probabilities(frame: Any, method: str, seed: int) -> Any:
    """crowd-kit's per-task class probabilities (a DataFrame indexed by task) for a categorical method."""
    from crowdkit.aggregation import MACE, DawidSkene, MajorityVote, Wawa

    if method == "mv":
        return MajorityVote().fit(frame).probas_
    if method == "wawa":
        # Wawa's own predict goes through a scikit-learn check that fails on scikit-learn >= 1.6;
        # its prediction is this weighted vote with the skills it fitted.
        return MajorityVote().fit(frame, skills=Wawa().fit(frame).skills_).probas_
    if method == "ds":
        return DawidSkene(n_iter=100).fit_predict_proba(frame)
    return MACE(n_restarts=MACE_RESTARTS, random_state=seed).fit_predict_proba(frame)


def _aggregate_categorical(votes: Sequence[PairVote], method: str, seed: int) -> dict[int, Aggregate]:
    import pandas as pd

    if any({vote.left, vote.right} != {0, 1} for vote in votes):
        return _aggregate_categorical_pairs(votes, method, seed)
    if method == "mv":
        return majority_vote(votes)
    frame = pd.DataFrame(
        [(v.item_id, v.annotator, TIE_CLASS if v.chosen is None else v.chosen) for v in votes],
        columns=["task", "worker", "label"],
    )
    probas = _class_probabilities(frame, method, seed)
    counts = _vote_counts(votes)
    result: dict[int, Aggregate] = {}
    for item_id in sorted(counts):
        row = probas.loc[item_id]
        p = {c: float(row.get(c, 0.0)) for c in (0, 1, TIE_CLASS)}
        top = max(p.values())
        leaders = [c for c, v in p.items() if v == top]
        winner = leaders[0] if len(leaders) == 1 and leaders[0] != TIE_CLASS else None
        scores = [math.log(max(p[0], _MIN_PROB)), math.log(max(p[1], _MIN_PROB))]
        result[item_id] = _outcome(item_id, winner, *_agreement(counts[item_id], winner), scores)
    return result


def _aggregate_categorical_pairs(votes: Sequence[PairVote], method: str, seed: int) -> dict[int, Aggregate]:
    """Categorical aggregation of items with more than two responses (rankings split into pairs).

    Each pair (i, j), i < j, of an item is one task with the classes "i wins", "j wins" and
    tie, so Dawid-Skene or MACE learn one confusion matrix per annotator from all pairs of
    all items. An item's scores are then the least-squares fit of s_i - s_j to the log-odds
    log P(i wins) / P(j wins) of its pairs: on a complete set of pairs that is the mean of
    row i of the log-odds matrix (with zero for a pair nobody compared). The winner is the
    top of that ranking, or none when the top two scores are level, or, for an item of two
    responses (a comparison aggregated beside rankings), when a tie is its most likely class.
    """
    import pandas as pd

    rows = []
    for vote in votes:
        low, high = sorted((vote.left, vote.right))
        label = TIE_CLASS if vote.chosen is None else int(vote.chosen == high)
        rows.append((f"{vote.item_id}:{low}:{high}", vote.annotator, label))
    probas = _class_probabilities(pd.DataFrame(rows, columns=["task", "worker", "label"]), method, seed)
    log_odds: dict[int, dict[tuple[int, int], float]] = {}
    tie_leads: set[int] = set()
    for task, row in probas.iterrows():
        item_id, low, high = (int(x) for x in str(task).split(":"))
        p_low, p_high = (max(float(row.get(c, 0.0)), _MIN_PROB) for c in (0, 1))
        log_odds.setdefault(item_id, {})[(low, high)] = math.log(p_low) - math.log(p_high)
        if float(row.get(TIE_CLASS, 0.0)) >= max(p_low, p_high):
            tie_leads.add(item_id)
    counts = _vote_counts(votes)
    result: dict[int, Aggregate] = {}
    for item_id in sorted(counts):
        pairs = log_odds[item_id]
        k = 1 + max(high for _, high in pairs)
        scores = [0.0] * k
        for (low, high), d in pairs.items():
            scores[low] += d / k
            scores[high] -= d / k
        best = sorted(range(k), key=lambda i: (-scores[i], i))
        winner = best[0] if scores[best[0]] > scores[best[1]] else None
        if k == 2 and item_id in tie_leads:
            # A two-response item (a comparison) whose most likely class is a tie has no winner, as
            # in `_aggregate_categorical`: its one pair's log-odds leave the tie's probability out.
            winner = None
        result[item_id] = _outcome(item_id, winner, *_agreement(counts[item_id], winner), scores)
    return result


def _vote_counts(votes: Sequence[PairVote]) -> dict[int, Counter[int | None]]:
    counts: dict[int, Counter[int | None]] = {}
    for vote in votes:
        counts.setdefault(vote.item_id, Counter())[vote.chosen] += 1
    return counts


def _agreement(counts: Counter[int | None], winner: int | None) -> tuple[int, float]:
    """(number of votes, share of votes for the winning outcome; the top share without a winner)."""
    n = sum(counts.values())
    share = counts[winner] / n if winner is not None else max(counts.values()) / n
    return n, share


def _aggregate_pairwise(votes: Sequence[PairVote], method: str, seed: int) -> dict[int, Aggregate]:
    import pandas as pd

    counts = _vote_counts(votes)
    n_responses: dict[int, int] = {}
    rows = []
    for vote in votes:
        n_responses[vote.item_id] = max(n_responses.get(vote.item_id, 2), vote.left + 1, vote.right + 1)
        if vote.chosen is None:
            continue  # no tie outcome in BT: see the module docstring
        left, right = (vote.item_id, vote.left), (vote.item_id, vote.right)
        rows.append((vote.annotator, left, right, (vote.item_id, vote.chosen)))
    log_scores: dict[tuple[int, int], float] = {}
    if rows and method == "bt":
        log_scores = _bradley_terry(rows)
    elif rows:
        frame = pd.DataFrame(rows, columns=["worker", "left", "right", "label"])
        latent = _noisy_bradley_terry(frame, seed).scores_
        # crowd-kit reports sigmoid(latent score); its logit is the BT scale again.
        log_scores = {key: _logit(float(v)) for key, v in latent.items()}
    result: dict[int, Aggregate] = {}
    for item_id in sorted(counts):
        scores = [log_scores.get((item_id, i), math.log(_MIN_PROB)) for i in range(n_responses[item_id])]
        decided = [(item_id, i) in log_scores for i in range(len(scores))]
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        winner = best[0] if any(decided) and scores[best[0]] > scores[best[1]] else None
        result[item_id] = _outcome(item_id, winner, *_agreement(counts[item_id], winner), scores)
    return result


def _bradley_terry(rows: Sequence[tuple[str, Any, Any, Any]]) -> dict[tuple[int, int], float]:
    """Log BT strength of each (item, response) of `rows` (worker, left, right, label), per item summing to 1.

    Fitted _BT_GROUP responses at a time. tol=0 runs all n_iter MM steps: crowd-kit's stopping
    test compares the estimate with itself after the second step (its p_old is p_new), so any
    positive tol stops there, short of the maximum-likelihood strengths of an item with K > 2.
    Normalising per item keeps the _MIN_PROB floor relative to the item, not to the project.
    """
    import pandas as pd
    from crowdkit.aggregation import BradleyTerry

    by_item: dict[int, list[tuple[str, Any, Any, Any]]] = {}
    for row in rows:
        by_item.setdefault(row[1][0], []).append(row)
    groups: list[list[tuple[str, Any, Any, Any]]] = [[]]
    responses: set[Any] = set()
    for item_rows in by_item.values():
        if len(responses) >= _BT_GROUP:
            groups.append([])
            responses = set()
        groups[-1] += item_rows
        responses.update(key for row in item_rows for key in row[1:3])
    log_scores: dict[tuple[int, int], float] = {}
    for group in groups:
        frame = pd.DataFrame(group, columns=["worker", "left", "right", "label"])
        strengths = BradleyTerry(n_iter=200, tol=0.0).fit(frame).scores_
        totals: dict[int, float] = {}
        for (item_id, _), v in strengths.items():
            totals[item_id] = totals.get(item_id, 0.0) + float(v)
        for key, v in strengths.items():
            log_scores[key] = math.log(max(float(v) / totals[key[0]], _MIN_PROB))
    return log_scores


def _noisy_bradley_terry(frame: Any, seed: int) -> Any:
    """crowd-kit's NoisyBradleyTerry fitted with a loss and a gradient that agree (see `_noisy_bt_loss`).

    crowd-kit 1.4.2's gradient is not that of its loss: each annotator's skill and bias entries
    are overwritten by every comparison instead of summed, one slot off, so L-BFGS stops far
    from the optimum, where an always-left annotator keeps a middling skill and decides every
    item its fellows split. Its loss also adds the regulariser with the sign opposite to its
    gradient's.
    """
    from crowdkit.aggregation import NoisyBradleyTerry

    class Fitted(NoisyBradleyTerry):
        _compute_log_likelihood = staticmethod(_noisy_bt_loss)
        _compute_gradient = staticmethod(_noisy_bt_gradient)

    return Fitted(n_iter=200, random_state=seed).fit(frame)


def _noisy_bt_terms(x: Any, data: Any, workers: Any, n_labels: int, n_workers: int) -> tuple[Any, ...]:
    """Per comparison: y (+1 left won, -1 right), sigmoid(skill) a, sigmoid(y (s_left - s_right)) A,
    sigmoid(y bias) B, and P = a A + (1 - a) B, the probability of the answer given.

    `x` is crowd-kit's layout: [virtual score, scores..., biases..., skills...]; `data` holds the
    (left, right, winner) score indices into `x`, `workers` each comparison's annotator index.
    """
    from scipy.special import expit

    y = (data[:, 0] == data[:, 2]) * 2.0 - 1.0
    a = expit(x[1 + n_labels + n_workers + workers])
    big_a = expit(y * (x[data[:, 0]] - x[data[:, 1]]))
    big_b = expit(y * x[1 + n_labels + workers])
    return y, a, big_a, big_b, a * big_a + (1 - a) * big_b


def _noisy_bt_loss(x: Any, data: Any, workers: Any, n_labels: int, n_workers: int, ratio: float) -> float:
    """Noisy BT's negative log-likelihood, plus `ratio` times the regulariser's: one win and one
    loss of every response against a virtual one (score x[0]), which keeps separable items finite."""
    import numpy as np
    from scipy.special import log_expit

    *_, p = _noisy_bt_terms(x, data, workers, n_labels, n_workers)
    d = x[1 : n_labels + 1] - x[0]
    return float(-np.log(p).sum() - ratio * (log_expit(d) + log_expit(-d)).sum())


def _noisy_bt_gradient(x: Any, data: Any, workers: Any, n_labels: int, n_workers: int, ratio: float) -> Any:
    """The gradient of `_noisy_bt_loss` with respect to `x`."""
    import numpy as np

    y, a, big_a, big_b, p = _noisy_bt_terms(x, data, workers, n_labels, n_workers)
    n = x.size
    d_score = a * big_a * (1 - big_a) * y / p  # d log P / d s_left (and minus d / d s_right)
    gradient = np.bincount(data[:, 1], d_score, n) - np.bincount(data[:, 0], d_score, n)
    gradient -= np.bincount(1 + n_labels + workers, (1 - a) * big_b * (1 - big_b) * y / p, n)
    gradient -= np.bincount(1 + n_labels + n_workers + workers, a * (1 - a) * (big_a - big_b) / p, n)
    pull = ratio * np.tanh((x[1 : n_labels + 1] - x[0]) / 2)
    gradient[1 : n_labels + 1] += pull
    gradient[0] -= pull.sum()
    return gradient


def _logit(p: float) -> float:
    p = min(max(p, _MIN_PROB), 1.0 - _MIN_PROB)
    return math.log(p / (1.0 - p))


def strength_margin(strengths: Iterable[int | None]) -> float | None:
    """A pair's margin from the strengths of the labels that chose its winner: mean strength / 3.

    Slightly better (1) gives 1/3, better (2) 2/3, much better (3) 1: in proportion to the grade,
    as Llama 2's margin grows with its grade (Touvron et al. 2023, section 3.2.2, where the lowest
    grade, "negligibly better / unsure", gets none; our scale leaves that to a tie), and within
    [0, 1] as `rm.soft_labels=smoothing` needs. Not (mean - 1) / 2: that gives "slightly better" a
    margin of 0, which under smoothing is the target 0.5, a pair that teaches nothing although
    every annotator picked the same side. Strengths of None (labels without one) are left out;
    None when no strength is left.
    """
    given = []
    for strength in strengths:
        if strength is None:
            continue
        if isinstance(strength, bool) or not isinstance(strength, int) or not 1 <= strength <= STRENGTH_SCALE:
            raise ValueError(f"strength must be an integer from 1 to {STRENGTH_SCALE}, got {strength!r}")
        given.append(strength)
    return sum(given) / (STRENGTH_SCALE * len(given)) if given else None


def _winning_strengths(
    labels: Iterable[ComparisonLabel | PairVote],
) -> dict[tuple[int, int], list[int | None]]:
    """(item id, chosen response) -> the strengths of the comparison labels that chose it."""
    chose: dict[tuple[int, int], list[int | None]] = {}
    for label in labels:
        if getattr(label, "kind", "comparison") != "comparison" or label.chosen is None:
            continue
        chose.setdefault((label.item_id, label.chosen), []).append(getattr(label, "strength", None))
    return chose


def preference_rows(
    items: Mapping[int, Any],
    aggregates: Mapping[int, Aggregate],
    source: str,
    method: str,
    margin: str = "confidence",
    labels: Iterable[ComparisonLabel | PairVote] = (),
) -> list[dict[str, Any]]:
    """TRL preference rows from aggregated items, with margin = 2 * P(chosen beats rejected) - 1.

    `items` maps an item id to a record with `prompt` and `responses`; a record with a
    `prompt_text` (the store's ItemRecord) gives that, a chat prompt's messages, as every
    export does, and then `chosen` and `rejected` are one assistant message each (TRL's
    conversational preference format). A two-response item without a winner (a tie) gives no row; an item of K
    responses gives the C(K, 2) pairs of its aggregated ranking (`ranked_pairs`), each with its
    own margin, except a pair the aggregate leaves level (P = 0.5: no preference, as a tie gives
    none), so a ranking whose top two are level still gives its decided pairs.

    With `margin="strength"` a two-response item's margin is `strength_margin` of the `labels`
    (the ones aggregated) that chose its winner, and each row says in `margin_source` where its
    margin came from: the confidence stays for items of K > 2 responses (rankings have no
    strength), for winners whose labels carry no strength (imports), and for a winner no label
    chose (Dawid-Skene reading an adversary backwards).
    """
    if margin not in MARGIN_SOURCES:
        raise ValueError(f"unknown margin source {margin!r}; choose one of {', '.join(MARGIN_SOURCES)}")
    chose = _winning_strengths(labels) if margin == "strength" else {}
    rows = []
    for item_id, agg in aggregates.items():
        item = items[item_id]
        # No winner: a tie (two responses), or a ranking whose top two are level, whose other
        # pairs may still be decided (the level ones are skipped below).
        if agg.winner is None and len(item.responses) == 2:
            continue
        for better, worse in ranked_pairs(item.responses, agg.ranking):
            if agg.scores[better] == agg.scores[worse]:
                continue
            p = pair_probability(agg.scores, better, worse)
            prompt = getattr(item, "prompt_text", item.prompt)
            row = {
                "prompt": prompt,
                "chosen": completion_for(prompt, item.responses[better]),
                "rejected": completion_for(prompt, item.responses[worse]),
                "margin": round(2.0 * p - 1.0, 4),
                "source": source,
                "method": method,
                "n_votes": agg.n_votes,
                "agreement": round(agg.agreement, 4),
                "confidence": round(p, 4),
            }
            if margin == "strength":
                m = strength_margin(chose.get((item_id, better), ())) if len(item.responses) == 2 else None
                row["margin_source"] = "confidence" if m is None else "strength"
                if m is not None:
                    row["margin"] = round(m, 4)
            rows.append(row)
    return rows


def same_two_responses(responses: Sequence[str]) -> bool:
    """Whether an item is two responses with the same text: preferring one to the other says nothing,
    so it makes no preference pair (`ranked_pairs` leaves such a pair out)."""
    return len(responses) == 2 and responses[0] == responses[1]


@dataclass(frozen=True)
class AggregatedPairs:
    """TRL preference rows from aggregated labels, and what the items that made none were.

    `n_items` items had labels; `n_undecided` of them have no winner (a tie); `n_identical` have a
    winner but two responses with the same text, so they make no pair either. The two counts
    never overlap: an identical item without a winner is undecided.
    """

    rows: list[dict[str, Any]]
    n_items: int
    n_undecided: int
    n_identical: int

    def summary(self) -> dict[str, int]:
        """The counts, as a command prints them and writes them into its JSON."""
        return {
            "n_items": self.n_items,
            "n_pairs": len(self.rows),
            "n_undecided": self.n_undecided,
            "n_identical_skipped": self.n_identical,
        }


def aggregate_pairs(
    items: Mapping[int, Any],
    labels: Iterable[ComparisonLabel | PairVote],
    method: str,
    source: str,
    seed: int = 0,
    margin: str = "confidence",
) -> AggregatedPairs:
    """Aggregate labels by `method` into TRL preference rows (`preference_rows`, their margins from
    `margin`, one of MARGIN_SOURCES), counting the items that give none: undecided ones, and decided
    ones whose two responses are the same text."""
    if margin not in MARGIN_SOURCES:
        raise ValueError(f"unknown margin source {margin!r}; choose one of {', '.join(MARGIN_SOURCES)}")
    labels = list(labels)
    aggregates = aggregate(labels, method, seed=seed, items=items)
    undecided = sum(agg.winner is None for agg in aggregates.values())
    identical = sum(
        agg.winner is not None and same_two_responses(items[item_id].responses)
        for item_id, agg in aggregates.items()
    )
    rows = preference_rows(items, aggregates, source, method, margin, labels)
    return AggregatedPairs(rows, len(aggregates), undecided, identical)
