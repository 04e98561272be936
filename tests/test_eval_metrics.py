"""Tests for rlhfkit.eval.metrics: distinct-n, ROUGE-L and BLEU against hand-computed values."""

import math

import pytest

from rlhfkit.eval.metrics import corpus_bleu, distinct_n, lcs_length, rouge_l, text_metrics

CAT = "the cat sat on the mat"
REF = "the cat sat on a mat"


def test_distinct_n():
    # Unigrams the, cat, the, dog: 3 unique of 4. Bigrams stay within a text: "the cat", "the dog".
    texts = ["the cat", "the dog"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 4)
    assert distinct_n(texts, 2) == pytest.approx(2 / 2)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n([""], 1) == 0.0


def test_rouge_l_hand_computed():
    # LCS = "the cat sat on mat" (5 tokens); P = R = 5/6, F1 = 5/6.
    assert lcs_length(CAT.split(), REF.split()) == 5
    assert rouge_l(CAT, [REF]) == pytest.approx(5 / 6)
    # Best of several references; case-insensitive.
    assert rouge_l("The Cat", ["dog", "the cat"]) == pytest.approx(1.0)
    assert rouge_l("x", ["y"]) == 0.0


def test_bleu_hand_computed():
    # Clipped precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu([CAT], [[REF]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.537285, abs=1e-6)


def test_bleu_brevity_penalty_and_zero_match():
    # "the cat" vs a 6-token reference, bigram BLEU: precisions 1 and 1, BP = exp(1 - 6/2).
    assert corpus_bleu(["the cat"], [[CAT]], max_n=2) == pytest.approx(math.exp(-2))
    assert corpus_bleu(["zebra"], [[CAT]]) == 0.0


def test_bleu_needs_matching_lists():
    with pytest.raises(ValueError, match="2 candidates and 1 reference"):
        corpus_bleu(["a", "b"], [["a"]])


def test_text_metrics_only_scores_texts_with_references():
    out = text_metrics([CAT, "zebra"], [[REF], []])
    assert out["n_with_references"] == 1
    assert out["rouge_l"] == pytest.approx(round(5 / 6, 4))
    assert out["length_words"] == pytest.approx(3.5)
    assert "bleu" not in text_metrics([CAT], None)
    assert "rouge_l" not in text_metrics([CAT], [[]])
