"""Soft labels in the reward-model loss: margin and label smoothing from a pair's confidence."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.algos.reward import bradley_terry_loss, soft_label_terms
from rlhfkit.train.rm import pair_margins

ZERO = torch.tensor([0.0])


def test_plain_loss_is_ln2_at_equal_scores_with_or_without_smoothing():
    assert bradley_terry_loss(ZERO, ZERO).item() == pytest.approx(math.log(2))
    # Any mix of log sigmoid(0) is still ln 2.
    assert bradley_terry_loss(ZERO, ZERO, smoothing=torch.tensor([0.3])).item() == pytest.approx(math.log(2))


def test_margin_loss_by_hand():
    # -log sigmoid(0 - 1) = log(1 + e).
    assert bradley_terry_loss(ZERO, ZERO, margin=torch.tensor([1.0])).item() == pytest.approx(
        math.log(1 + math.e)
    )
    # diff 2, margin 0.5: -log sigmoid(1.5) = log(1 + e^-1.5).
    loss = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=torch.tensor([0.5]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)))


def test_smoothing_loss_by_hand():
    # diff 2, eps 0.25: 0.75 * log(1 + e^-2) + 0.25 * log(1 + e^2).
    loss = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), smoothing=torch.tensor([0.25]))
    expected = 0.75 * math.log(1 + math.exp(-2)) + 0.25 * math.log(1 + math.exp(2))
    assert loss.item() == pytest.approx(expected)
    # The smoothed loss is smallest where sigmoid(diff) = 1 - eps, i.e. diff = log 3 for eps 0.25.
    diffs = torch.linspace(0, 3, 301)
    losses = [bradley_terry_loss(d.view(1), ZERO, smoothing=torch.tensor([0.25])).item() for d in diffs]
    assert diffs[losses.index(min(losses))].item() == pytest.approx(math.log(3), abs=0.01)


def test_soft_label_terms_map_margins_to_each_mode():
    m = torch.tensor([0.0, 0.5, 1.0])
    assert soft_label_terms(m, "none") == (None, None)
    margin, smoothing = soft_label_terms(m, "margin")
    assert torch.equal(margin, m) and smoothing is None
    margin, smoothing = soft_label_terms(m, "smoothing")
    assert margin is None and torch.allclose(smoothing, torch.tensor([0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="soft-label mode 'fuzzy'"):
        soft_label_terms(m, "fuzzy")


def test_pairs_without_a_margin_are_hard_labels():
    pairs = [{"margin": 0.5}, {"margin": None}, {}]
    assert pair_margins(pairs, "margin") == [0.5, 0.0, 0.0]
    assert pair_margins(pairs, "smoothing") == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="pair 0: margin 2.0"):
        pair_margins([{"margin": 2.0}], "smoothing")
