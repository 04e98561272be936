"""Direct preference optimisation: the policy is its own reward model (read top to bottom).

Every loss here takes *sequence* log-probabilities of the chosen and rejected responses
under the policy and under the frozen reference, and works on the implicit reward
`beta * (log pi(y|x) - log pi_ref(y|x))` (Rafailov et al. 2023).

1. `dpo_loss(..., loss_type="sigmoid")`: -log sigmoid(beta * h), h the log-ratio margin;
   with `label_smoothing` eps > 0 it is the conservative DPO of Mitchell (2023), which
   assumes a share eps of the labels is flipped.
2. `dpo_loss(..., loss_type="ipo")`: (h - 1 / (2 beta))^2 (Azar et al. 2023): regresses the
   margin to a fixed target instead of pushing it to infinity, so it cannot over-fit a
   deterministic preference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.algos.reward import pairwise_accuracy

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, with `average`) of per-token log-probs over valid tokens: [batch]."""
    mask = mask.to(token_logp.dtype)
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO / conservative DPO / IPO loss averaged over pairs, and the implicit-reward statistics.

    Inputs are sequence log-probs, [batch] each. Policy equal to reference gives ln 2
    for the sigmoid loss (the model is indifferent) and 1 / (4 beta^2) for IPO.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margin = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        # logsigmoid stays finite for margins of any size; the smoothed term is the same
        # loss with the label flipped, weighted by the assumed flip rate.
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
            -beta * margin
        )
    else:
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio
        rejected_reward = beta * rejected_logratio
        stats = {
            "reward/chosen": chosen_reward.mean().item(),
            "reward/rejected": rejected_reward.mean().item(),
            "reward/margin": (chosen_reward - rejected_reward).mean().item(),
            "reward/accuracy": pairwise_accuracy(chosen_reward, rejected_reward),
        }
    return losses.mean(), stats
