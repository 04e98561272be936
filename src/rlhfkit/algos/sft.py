"""Supervised fine-tuning loss: next-token cross-entropy on completion tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of tokens where `loss_mask` is 1.

    `logits[:, t]` predicts `input_ids[:, t + 1]`, so the mask is read from position 1 on;
    prompt and padding tokens carry mask 0 and teach nothing.
    """
    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)
