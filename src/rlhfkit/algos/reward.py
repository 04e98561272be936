"""Reward-model loss: Bradley-Terry on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected [- margin]), averaged over pairs.

    Equal rewards give ln 2: the model is indifferent. The optional margin (Llama 2)
    asks for a larger gap on pairs labelled as strongly preferred.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    # logsigmoid is the stable form of log(1 / (1 + exp(-diff))).
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher."""
    return (chosen_rewards > rejected_rewards).float().mean().item()
