"""Reward-model loss: Bradley-Terry on preference pairs, with optional soft labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFT_LABELS = ("none", "margin", "smoothing")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    smoothing: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected [- margin]), averaged over pairs; optionally label-smoothed.

    Equal rewards give ln 2: the model is indifferent. The optional margin (Llama 2)
    asks for a larger gap on pairs labelled as strongly preferred. `smoothing` is the
    per-pair probability that the label is wrong: the loss becomes the cross-entropy
    against the soft target (1 - smoothing) for chosen > rejected, so a pair the crowd
    was unsure about pulls the rewards apart less.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    # logsigmoid is the stable form of log(1 / (1 + exp(-diff))).
    loss = -F.logsigmoid(diff)
    if smoothing is not None:
        loss = (1.0 - smoothing) * loss - smoothing * F.logsigmoid(-diff)
    return loss.mean()


def soft_label_terms(margins: torch.Tensor, mode: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(margin, smoothing) arguments of `bradley_terry_loss` for a pair's margin in [0, 1] under `mode`.

    A margin m = 2p - 1 encodes the probability p that chosen is better (the aggregate's
    confidence, or the strength scale); "smoothing" turns it back into the label-noise
    rate 1 - p = (1 - m) / 2.
    """
    if mode == "none":
        return None, None
    if mode == "margin":
        return margins, None
    if mode == "smoothing":
        return None, (1.0 - margins.clamp(0.0, 1.0)) / 2.0
    raise ValueError(f"unknown soft-label mode {mode!r}; choose one of {', '.join(SOFT_LABELS)}")


def pair_correct(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair 1.0 where the chosen response scores higher, 0.5 where the two score exactly the
    same (the model cannot tell them apart: half correct, as a tie is half a win in a win rate),
    else 0.0; in the rewards' floating dtype."""
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    higher = (chosen_rewards > rejected_rewards).to(dtype)
    return higher + 0.5 * (chosen_rewards == rejected_rewards).to(dtype)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs the rewards order right, a tied score counting half (`pair_correct`)."""
    return pair_correct(chosen_rewards, rejected_rewards).mean().item()
