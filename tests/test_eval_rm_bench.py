"""Tests for rlhfkit.eval.rm_bench: pair accuracy (a tie counts half), length buckets, reliability and ECE."""

import math

import pytest
import torch

from rlhfkit.eval.rm_bench import (
    GoldPairs,
    benchmark_on_pairs,
    benchmark_report,
    length_bucket,
    pair_accuracy,
    pair_outcomes,
    reliability,
    seen_topic_subset,
)


def test_pair_accuracy_counts_a_tie_as_half_correct():
    # As the win rate counts a tie as half a win: 1 + 0 + 0.5 + 1 over 4 pairs.
    assert pair_outcomes([1.0, -0.5, 0.0, 2.0]).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert pair_accuracy([1.0, -0.5, 0.0, 2.0]) == pytest.approx(0.625)
    assert pair_accuracy([0.0, 0.0]) == pytest.approx(0.5)
    assert pair_accuracy([]) is None


def test_pair_accuracy_follows_the_win_rate_rule():
    from rlhfkit.eval.winrate import win_rate

    better, worse = [3.0, 1.0, 2.0, 5.0, 0.0], [1.0, 1.0, 4.0, 5.0, -1.0]
    margins = [b - w for b, w in zip(better, worse, strict=True)]
    assert pair_accuracy(margins) == pytest.approx(win_rate(better, worse, tol=0.0)["rate"])


def test_length_buckets():
    assert [length_bucket(g) for g in (0, 4, 5, 14, 15, 90)] == [
        "length gap <5",
        "length gap <5",
        "length gap 5-14",
        "length gap 5-14",
        "length gap >=15",
        "length gap >=15",
    ]
    with pytest.raises(ValueError):
        length_bucket(-1)


def test_reliability_hand_computed():
    # margin 0 -> confidence 0.5 (a tie: half correct); 2 -> sigmoid(2) = 0.880797 (right); -2 -> same, wrong.
    result = reliability([0.0, 2.0, -2.0], n_bins=5)
    high = 1 / (1 + math.exp(-2))
    first, fourth = result["bins"][0], result["bins"][3]
    assert (first["n"], first["accuracy"], first["confidence"]) == (1, 0.5, 0.5)
    assert fourth["n"] == 2 and fourth["accuracy"] == 0.5 and fourth["confidence"] == pytest.approx(high)
    # ECE = 1/3 * |0.5 - 0.5| + 2/3 * |0.5 - 0.880797|.
    assert result["ece"] == pytest.approx(2 / 3 * (high - 0.5))
    assert sum(b["n"] for b in result["bins"]) == 3


def test_report_groups_by_every_label():
    report = benchmark_report([1.0, -1.0, 2.0], [["a", "x"], ["a"], ["x"]])
    assert report["accuracy"] == pytest.approx(2 / 3) and report["n_pairs"] == 3
    assert report["subsets"]["a"] == {"accuracy": 0.5, "n": 2}
    assert report["subsets"]["x"] == {"accuracy": 1.0, "n": 2}


def test_seen_topic_subset():
    topic_of = {"films?": "film", "plants?": "plant"}.get
    subset = seen_topic_subset(topic_of, [{"prompt": "films?", "completion": "1. x"}])
    assert subset("films?") == "topic seen" and subset("plants?") == "topic unseen" and subset("?") is None


class _LastTokenReward(torch.nn.Module):
    """A stand-in reward model whose value at every position is the token id there."""

    def forward(self, input_ids, attention_mask):
        return input_ids.float()


def test_benchmark_on_pairs_scores_the_judged_pairs_by_their_gold_side():
    # The reward of a response is its last token id: 9 > 4, 2 < 7, 5 == 5 (a tied score: half correct).
    pairs = GoldPairs(
        prompt_ids=[[1, 1], [1], [1, 1, 1], [1]],
        a=[[3, 9], [2], [5], [8]],
        b=[[4], [6, 7], [5], [8]],
        judged=[(0, True), (1, False), (2, True)],  # pair 3 was a gold tie, left out
        subsets=[["x"], ["x"], ["y"]],
        n_gold_ties_dropped=1,
        pad_id=0,
    )
    report = benchmark_on_pairs(_LastTokenReward(), pairs)
    assert report["accuracy"] == pytest.approx(2.5 / 3) and report["n_pairs"] == 3
    assert report["subsets"] == {"x": {"accuracy": 1.0, "n": 2}, "y": {"accuracy": 0.5, "n": 1}}
    assert report["n_gold_ties_dropped"] == 1


def test_probe_accuracies_compare_each_pair_and_count_ties_as_half():
    from rlhfkit.eval.rm_bench import probe_accuracies
    from rlhfkit.models.loading import tiny_causal_lm
    from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids, train_tokenizer
    from rlhfkit.rollout.logprobs import response_logprobs

    texts = [f"1. item {i}\n2. thing {i * 7}\nsome words about lists {i}" for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    policy = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    triples = [
        ("List five things.", "1. item 3\n2. thing 9", "1. item 4"),
        ("Top 5 items?", "1. thing 12", "some words about lists 5 and more words"),
        ("Name five.", "2. item 8", "2. item 8"),  # the same answer twice: a tie, counted as half
    ]

    class SumReward(torch.nn.Module):
        """A stand-in reward model: the sum of the token ids so far (read at the last token)."""

        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).cumsum(1).float()

    def alone(prompt: str, response: str) -> tuple[float, int]:
        """Log-likelihood of one unpadded sequence, and its response's token-id sum (its reward)."""
        p, r = prompt_token_ids(tokenizer, prompt), completion_token_ids(tokenizer, response)
        ids = torch.tensor([p + r])
        lp = response_logprobs(policy, ids, torch.ones_like(ids), len(r), 1.0)
        return lp.sum().item(), sum(r)

    expected_ll, expected_rm = [], []
    for prompt, better, worse in triples:
        (lb, rb), (lw, rw) = alone(prompt, better), alone(prompt, worse)
        expected_ll.append(1.0 if lb > lw else 0.5 if lb == lw else 0.0)
        expected_rm.append(1.0 if rb > rw else 0.5 if rb == rw else 0.0)
    assert 1.0 in expected_ll and 1.0 in expected_rm  # the pairs are not all decided the same way
    assert expected_rm[2] == 0.5  # the identical answers tie
    report = probe_accuracies(SumReward(), policy, tokenizer, {"kind": triples, "empty": []})
    assert set(report) == {"kind"}
    assert report["kind"]["n"] == 3
    assert report["kind"]["policy_loglik"] == pytest.approx(sum(expected_ll) / 3, abs=1e-4)
    assert report["kind"]["reward_model"] == pytest.approx(sum(expected_rm) / 3, abs=1e-4)
    # Swapping the sides turns every right answer wrong and back, except the tie, half right both ways.
    swapped = probe_accuracies(SumReward(), policy, tokenizer, {"kind": [(p, w, b) for p, b, w in triples]})
    for column in ("policy_loglik", "reward_model"):
        assert report["kind"][column] + swapped["kind"][column] == pytest.approx(1.0, abs=1e-4)


def test_heldout_report_always_has_the_accuracy_key():
    from rlhfkit.eval.rm_bench import heldout_report, heldout_skip_reason

    assert heldout_skip_reason(True, 400, True) is None
    reason = heldout_skip_reason(True, 0, True)
    assert reason == "eval.heldout_pairs is 0"
    assert "gold" in heldout_skip_reason(False, 400, True)
    assert "reward model" in heldout_skip_reason(True, 400, False)
    assert heldout_report(None, reason) == {"heldout_accuracy": None, "heldout_accuracy_reason": reason}
    bench = benchmark_report([1.0, -1.0], [["a"], ["a"]])
    assert heldout_report(bench) == {"heldout_accuracy": 0.5, "n_heldout_pairs": 2, "bench": bench}
    # Every sampled pair a gold tie: nothing judged, the key is null and says why.
    empty = {**benchmark_report([], []), "n_gold_ties_dropped": 6}
    out = heldout_report(empty)
    assert out["heldout_accuracy"] is None and "all 6 held-out pairs equal" in out["heldout_accuracy_reason"]
