"""PPO for language models, as pure functions (read top to bottom).

One rollout gives, per response token t: the policy log-prob at sampling time
(`old_logp`), the reference log-prob (`ref_logp`), the critic value (`old_values`)
and, at the last token, the reward-model score. From those:

1. `kl_penalised_rewards`: r_t = -beta * KL_t, plus the score on the last token
   (InstructGPT / Ziegler et al. 2019: the KL is part of the reward, per token).
2. `gae`: generalised advantage estimation over the response tokens.
3. `policy_loss` / `value_loss`: the clipped surrogate objectives, on mini-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean, masked_var


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (responses are right-padded)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)


def kl_penalised_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards `-kl_coef * KL_t`, with the sequence score added at the last token.

    Returns (rewards, kl), both [batch, T] and zero on padding.
    """
    mask = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    # The reward model judges the whole response, so its score lands where the response ends.
    rows = torch.arange(scores.size(0), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the value
    after the last response token is 0 (the episode ends there). Returns (advantages, returns).
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = values.size(1)
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            # k3 estimate of KL(old || new): the early-stopping signal, >= 0 and low variance.
            "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).item()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over valid tokens: how much of the return the critic predicts."""
    var_r = masked_var(returns, mask)
    if var_r.item() == 0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / var_r).item()
