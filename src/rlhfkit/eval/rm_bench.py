"""Reward-model benchmark in the style of RewardBench: pairwise accuracy by subset, calibration.

Pairs are two fresh samples of a policy on held-out prompts, labelled by the gold judge
(pairs it scores equal are dropped: neither answer is right). A pair counts as correct
when the RM scores the gold-preferred response higher, and as half correct when the RM
gives both exactly the same score (`pair_outcomes`: the win rate's rule, a tie is half a
win). Every RM accuracy here (held-out benchmark, subsets, calibration, probes) follows
it. Calibration reads sigmoid(score difference) as the RM's probability that its
preferred response is the better one (the Bradley-Terry reading of a reward model) and
compares it with how often the gold judge agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.algos.reward import pair_correct

Utility = Callable[[str, str], float]
# Token-count gap between the two responses: a small gap means the RM cannot lean on length.
LENGTH_GAP_BUCKETS = ((0, 5, "length gap <5"), (5, 15, "length gap 5-14"), (15, None, "length gap >=15"))
CALIBRATION_BINS = 5


def pair_outcomes(margins: Sequence[float]) -> np.ndarray:
    """Per pair 1 if its margin (score of the better response minus the other's) is > 0, 0.5 if it
    is exactly 0 (the RM cannot tell them apart: half correct, as a tie is half a win in `win_rate`),
    else 0."""
    m = torch.as_tensor(np.asarray(margins, dtype=np.float64))
    return pair_correct(m, torch.zeros_like(m)).numpy()


def pair_accuracy(margins: Sequence[float]) -> float | None:
    """Mean of `pair_outcomes`: the share of pairs the RM orders right, a tied score counting half;
    None without pairs."""
    outcomes = pair_outcomes(margins)
    return float(outcomes.mean()) if outcomes.size else None


def length_bucket(gap: int) -> str:
    """The LENGTH_GAP_BUCKETS label of an absolute token-count gap."""
    for lo, hi, label in LENGTH_GAP_BUCKETS:
        if gap >= lo and (hi is None or gap < hi):
            return label
    raise ValueError(f"length gap must be >= 0, got {gap}")


def reliability(margins: Sequence[float], n_bins: int = CALIBRATION_BINS) -> dict:
    """Reliability bins of confidence sigmoid(|margin|) over [0.5, 1] against accuracy, and the ECE.

    ECE = sum over bins of (n_bin / n) * |accuracy_bin - mean confidence_bin| (Guo et al. 2017);
    accuracy counts a tied score as half correct (`pair_outcomes`).
    """
    m = np.asarray(margins, dtype=np.float64)
    confidence = 1.0 / (1.0 + np.exp(-np.abs(m)))
    # A tied score is confidence 0.5 and half correct (`pair_outcomes`): perfectly calibrated.
    correct = pair_outcomes(m)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    # The last bin is closed on the right so a confidence of exactly 1.0 has a home.
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = index == b
        n = int(sel.sum())
        entry = {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "n": n,
            "confidence": None,
            "accuracy": None,
        }
        if n:
            conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
            entry.update(confidence=conf, accuracy=acc)
            ece += n / m.size * abs(acc - conf)
        bins.append(entry)
    return {"bins": bins, "ece": ece if m.size else None}


def benchmark_report(margins: Sequence[float], subsets: Sequence[Sequence[str]]) -> dict:
    """Accuracy (`pair_accuracy`) overall and per subset label (a pair may carry several labels),
    plus calibration."""
    out: dict = {"accuracy": pair_accuracy(margins), "n_pairs": len(margins), "subsets": {}}
    by_label: dict[str, list[float]] = {}
    for margin, labels in zip(margins, subsets, strict=True):
        for label in labels:
            by_label.setdefault(label, []).append(margin)
    for label in sorted(by_label):
        out["subsets"][label] = {"accuracy": pair_accuracy(by_label[label]), "n": len(by_label[label])}
    out["calibration"] = reliability(margins)
    return out


def heldout_skip_reason(has_gold: bool, heldout_pairs: int, has_reward_model: bool) -> str | None:
    """Why the eval stage measures no held-out RM accuracy, or None when it does."""
    if not has_gold:
        return "the task has no gold utility to label held-out pairs"
    if heldout_pairs <= 0:
        return f"eval.heldout_pairs is {heldout_pairs}"
    if not has_reward_model:
        return "the run has no reward model (rm/model)"
    return None


def heldout_report(bench: dict | None, reason: str | None = None) -> dict:
    """report.json's rm keys of the held-out benchmark: `heldout_accuracy` always (the contract
    lists it), with `n_heldout_pairs` and `bench` when measured; null with `heldout_accuracy_reason`
    when not (`heldout_skip_reason`, or every pair a gold tie)."""
    if bench is None:
        return {"heldout_accuracy": None, "heldout_accuracy_reason": reason or "not measured"}
    out = {"heldout_accuracy": bench["accuracy"], "n_heldout_pairs": bench["n_pairs"], "bench": bench}
    if bench["accuracy"] is None:
        out["heldout_accuracy_reason"] = (
            f"the gold judge scored all {bench.get('n_gold_ties_dropped', 0)} held-out pairs equal"
        )
    return out


@dataclass(frozen=True)
class GoldPairs:
    """Gold-labelled pairs of two policy samples per prompt, as token ids.

    Every sampled pair is kept with its prompt (`a[i]`, `b[i]` answer `prompt_ids[i]`), so
    that a reward model scores them all in the same batches; `judged` lists the pairs the
    gold judge decided, as (index, whether a is the better one), with their subset labels.
    """

    prompt_ids: list[list[int]]
    a: list[list[int]]
    b: list[list[int]]
    judged: list[tuple[int, bool]]
    subsets: list[list[str]]
    n_gold_ties_dropped: int
    pad_id: int


@torch.no_grad()
def gold_pairs(
    policy_path,
    prompts: list[str],
    gold: Utility,
    *,
    n_pairs: int,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    topic_subset: Callable[[str], str | None] | None = None,
) -> GoldPairs:
    """Sample n_pairs pairs from the policy on `prompts` and label them with the gold judge.

    `topic_subset(prompt)` names a subset such as "topic seen" (None for no label).
    """
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_responses

    tokenizer = load_tokenizer(policy_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy = load_causal_lm(policy_path).eval()
    pair_prompts = [prompts[i % len(prompts)] for i in range(n_pairs)]
    ids = [prompt_token_ids(tokenizer, p) for p in pair_prompts]
    torch.manual_seed(seed + 1)
    a, b = (
        sample_responses(
            policy, ids, eos_id=eos, pad_id=pad, max_new_tokens=max_new_tokens, temperature=temperature
        )
        for _ in range(2)
    )
    text_a, text_b = (tokenizer.batch_decode(r, skip_special_tokens=True) for r in (a, b))
    judged, subsets, dropped = [], [], 0
    for i, prompt in enumerate(pair_prompts):
        ga, gb = gold(prompt, text_a[i]), gold(prompt, text_b[i])
        if abs(ga - gb) < 1e-9:
            dropped += 1
            continue
        judged.append((i, ga > gb))
        labels = [length_bucket(abs(len(a[i]) - len(b[i])))]
        topic = topic_subset(prompt) if topic_subset else None
        if topic:
            labels.append(topic)
        subsets.append(labels)
    return GoldPairs(ids, a, b, judged, subsets, dropped, pad)


@torch.no_grad()
def benchmark_on_pairs(reward_model, pairs: GoldPairs) -> dict:
    """The RewardBench-style report (accuracy, subsets, calibration) of a reward model on `pairs`."""
    from rlhfkit.eval.evaluate import score_with_reward_model

    was_training = reward_model.training
    reward_model.eval()
    score_a, score_b = (
        score_with_reward_model(reward_model, pairs.prompt_ids, r, pairs.pad_id) for r in (pairs.a, pairs.b)
    )
    reward_model.train(was_training)
    margins = [
        score_a[i] - score_b[i] if a_better else score_b[i] - score_a[i] for i, a_better in pairs.judged
    ]
    report = benchmark_report(margins, pairs.subsets)
    report["n_gold_ties_dropped"] = pairs.n_gold_ties_dropped
    return report


def rm_benchmark(
    policy_path,
    reward_path,
    prompts: list[str],
    gold: Utility,
    *,
    n_pairs: int,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    topic_subset: Callable[[str], str | None] | None = None,
) -> dict:
    """Benchmark the saved reward model at `reward_path` on fresh gold-labelled pairs (`gold_pairs`)."""
    from rlhfkit.models.loading import load_reward_model

    pairs = gold_pairs(
        policy_path,
        prompts,
        gold,
        n_pairs=n_pairs,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        topic_subset=topic_subset,
    )
    return benchmark_on_pairs(load_reward_model(reward_path, pairs.pad_id), pairs)


def seen_topic_subset(
    topic_of: Callable[[str], object], demonstrations: Sequence[dict]
) -> Callable[[str], str | None]:
    """A topic_subset labelling a prompt "topic seen" when demonstrations cover its topic, else "unseen"."""
    seen = {topic_of(d["prompt"]) for d in demonstrations if isinstance(d.get("prompt"), str)}
    seen.discard(None)

    def subset(prompt: str) -> str | None:
        topic = topic_of(prompt) if isinstance(prompt, str) else None
        if topic is None:
            return None
        return "topic seen" if topic in seen else "topic unseen"

    return subset


@torch.no_grad()
def probe_accuracies(
    reward_model, policy, tokenizer, probes: dict[str, list[tuple[str, str, str]]], batch_size: int = 64
) -> dict[str, dict]:
    """Per probe kind: how often the reward model, and the policy's log-likelihood, prefer the better answer.

    `probes` maps a kind to (prompt, better, worse) triples that differ in one known way. A tie
    counts as half right (`pair_accuracy`). The policy column (log pi(y|x) summed over the
    response) shows what the model the reward model started from already tells apart without
    any feedback.
    """
    from rlhfkit.eval.evaluate import score_with_reward_model, sequence_logprobs
    from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids

    pad = tokenizer.pad_token_id
    was_training = reward_model.training, policy.training
    reward_model.eval()
    policy.eval()
    report = {}
    for kind, triples in probes.items():
        if not triples:
            continue
        prompt_ids = [prompt_token_ids(tokenizer, p) for p, _, _ in triples]
        better, worse = ([completion_token_ids(tokenizer, t[side]) for t in triples] for side in (1, 2))
        rm_b, rm_w = (
            score_with_reward_model(reward_model, prompt_ids, r, pad, batch_size) for r in (better, worse)
        )
        ll_b, ll_w = (sequence_logprobs(policy, prompt_ids, r, pad, 1.0, batch_size) for r in (better, worse))
        report[kind] = {
            "n": len(triples),
            "reward_model": round(pair_accuracy(np.subtract(rm_b, rm_w)), 4),
            "policy_loglik": round(pair_accuracy(np.subtract(ll_b, ll_w)), 4),
        }
    reward_model.train(was_training[0])
    policy.train(was_training[1])
    return report
