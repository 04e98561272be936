"""Kahneman-Tversky optimisation for unpaired thumbs-up/down data (Ethayarajh et al. 2024).

With the implicit reward r = log pi(y|x) - log pi_ref(y|x) and a reference point
z0 = KL(pi || pi_ref) estimated on *mismatched* (prompt, completion) pairs of the batch,
the value of an example is

    desirable:   lambda_D * sigmoid(beta * (r - z0))
    undesirable: lambda_U * sigmoid(beta * (z0 - r))

and the loss is lambda_y - value, averaged over examples. z0 is detached: it is a
baseline that says what "no better than drifting" means, not something to optimise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mismatched_partners(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each example i, the index of another example j != i whose completion estimates z0.

    A random cyclic shift of a random order (a derangement), so no example is its own partner.
    """
    if n < 2:
        raise ValueError(f"KTO needs at least 2 examples to estimate its KL reference point, got {n}")
    order = torch.randperm(n, generator=generator)
    partners = torch.empty(n, dtype=torch.long)
    partners[order] = order.roll(1)
    return partners


def kto_reference_point(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi - log pi_ref)) over mismatched pairs, detached (a scalar)."""
    # KL is >= 0; the batch estimate can dip below zero by noise, which would reward drift.
    return (kl_policy - kl_reference).mean().clamp(min=0.0).detach()


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logp: torch.Tensor,
    kl_ref_logp: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO loss averaged over examples; inputs are sequence log-probs, [batch] each.

    `desirable` is a bool tensor (thumbs up); `kl_*_logp` are the log-probs of each prompt
    with a mismatched completion, used only for the reference point z0.
    """
    z0 = kto_reference_point(kl_policy_logp, kl_ref_logp)
    rewards = policy_logp - ref_logp
    desirable = desirable.bool()
    weights = torch.where(
        desirable,
        torch.full_like(rewards, desirable_weight),
        torch.full_like(rewards, undesirable_weight),
    )
    # sigmoid(beta * (r - z0)) for thumbs up, sigmoid(beta * (z0 - r)) for thumbs down.
    sign = torch.where(desirable, 1.0, -1.0).to(rewards.dtype)
    value = weights * torch.sigmoid(sign * beta * (rewards - z0))
    loss = (weights - value).mean()
    with torch.no_grad():
        logsig = F.logsigmoid(sign * beta * (rewards - z0))
        stats = {
            "kl_reference_point": z0.item(),
            "reward/desirable": rewards[desirable].mean().item() if desirable.any() else float("nan"),
            "reward/undesirable": rewards[~desirable].mean().item() if (~desirable).any() else float("nan"),
            "log_value": logsig.mean().item(),
        }
    return loss, stats
