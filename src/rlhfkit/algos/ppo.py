"""PPO (and A2C) for language models, as pure functions, read top to bottom.

One rollout gives, per response token t: the policy log-prob at sampling time
(`old_logp`), the reference log-prob (`ref_logp`), the critic value (`old_values`)
and, at the last token, the reward-model score. From those:

1. `process_scores`: reward-model normalisation (gain/bias fitted on SFT samples),
   the missing-EOS penalty, clipping.
2. `kl_penalised_rewards`: r_t = -beta * KL_t, plus the score on the last token
   (Ziegler et al. 2019, InstructGPT: the KL is part of the reward, per token);
   `adaptive_kl_coef` moves beta towards a KL target.
3. `gae`: generalised advantage estimation over the response tokens.
4. `policy_loss` (clipped, optionally dual-clipped) or `a2c_policy_loss`, `value_loss`
   (clipped), `kl_loss` (the KL as a loss term instead of a reward term), on mini-batches.

The detail catalogue ("The N Implementation Details of RLHF with PPO", Huang et al.
2022, and its TL;DR follow-up) names each detail where it happens; the training loop in
`rlhfkit.train.ppo` switches them from `PPOConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean, masked_var


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (responses are right-padded)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: float | None) -> torch.Tensor:
    """Masked mean; with `n_tokens`, the masked sum over that count instead.

    Dividing every micro-batch by the token count of the whole mini-batch is what makes
    gradient accumulation equal one large batch.
    """
    if n_tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / n_tokens


# --- 1. Scores ----------------------------------------------------------------------------


def process_scores(
    scores: torch.Tensor,
    *,
    has_eos: torch.Tensor | None = None,
    gain: float = 1.0,
    bias: float = 0.0,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Reward-model scores made ready for RL: `gain * s + bias`, EOS penalty, then clipping.

    - gain/bias: fitted so the SFT policy's samples score mean 0, std 1 (detail: reward
      normalisation), which makes kl_coef and learning rates transfer between reward models.
    - missing_eos_penalty: subtracted from responses that never ended (detail: EOS trick), so
      truncated rambling cannot score well.
    - clip: scores clamped to [-clip, clip], bounding the damage of a reward-model outlier.
    """
    out = scores.float() * gain + bias
    if missing_eos_penalty is not None:
        if has_eos is None:
            raise ValueError("missing_eos_penalty needs has_eos")
        out = out - missing_eos_penalty * (~has_eos.bool()).to(out.dtype)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def reward_normalisation(scores: torch.Tensor, target_std: float = 1.0) -> tuple[float, float]:
    """(gain, bias) with gain * scores + bias of mean 0 and std `target_std`."""
    mean, std = scores.float().mean().item(), scores.float().std().item()
    gain = target_std / std if std > 0 else 1.0
    return gain, -mean * gain


def running_moments_update(state: tuple[float, float, int], values: torch.Tensor) -> tuple[float, float, int]:
    """Fold a batch into a running (mean, variance, count) (Chan et al.'s parallel update)."""
    mean, var, count = state
    n = values.numel()
    if n == 0:
        return state
    b_mean = values.float().mean().item()
    b_var = values.float().var(unbiased=False).item()
    total = count + n
    delta = b_mean - mean
    new_mean = mean + delta * n / total
    m2 = var * count + b_var * n + delta**2 * count * n / total
    return new_mean, m2 / total, total


# --- 2. KL-penalised rewards ------------------------------------------------------------------


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


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(KL/target - 1, +-0.2) * n/horizon."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return coef * (1.0 + error * n_samples / horizon)


# --- 3. Advantages ----------------------------------------------------------------------------


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


# --- 4. Losses --------------------------------------------------------------------------------


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped surrogate max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), [batch, T].

    dual_clip = c > 1 (Ye et al. 2020) also caps the loss of a negative-advantage token at
    -c * A, so one token whose ratio exploded cannot dominate the update. Advantages of shape
    [batch] (one per sequence, as in GRPO) are spread over every token of the response.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    # Clamp the log-ratio before exp: a token whose probability collapsed must not give inf.
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    losses = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.minimum(losses, -dual_clip * advantages)
        losses = torch.where(advantages < 0, capped, losses)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float().expand_as(mask), mask).item(),
            # k3 estimate of KL(old || new): the early-stopping signal, >= 0 and low variance.
            "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
        }
    return losses, stats


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate averaged over valid tokens (or summed over `n_tokens`)."""
    losses, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, dual_clip)
    return _token_mean(losses, mask, n_tokens), stats


def a2c_policy_loss(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None
) -> torch.Tensor:
    """Advantage actor-critic (the on-policy variant DeepMind used): -mean(A * log pi)."""
    return _token_mean(-advantages * logp, mask, n_tokens)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    clip_range None gives the plain squared error (what A2C uses).
    """
    loss_unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * _token_mean(loss_unclipped, mask, n_tokens), {"vf_clipfrac": 0.0}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(loss_unclipped, loss_clipped), mask, n_tokens)
    with torch.no_grad():
        # Clipped where the clipped term is the larger one and V really left the range: inside it,
        # V_old + (V - V_old) can round away from V and make that term larger by an ulp.
        clipped = (loss_clipped > loss_unclipped) & ((values - old_values).abs() > clip_range)
        stats = {"vf_clipfrac": masked_mean(clipped.float(), mask).item()}
    return loss, stats


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    n_tokens: float | None = None,
) -> torch.Tensor:
    """Mean per-token KL to the reference, differentiable in `logp` (KL as a loss term)."""
    return _token_mean(kl_estimate(logp, ref_logp, estimator), mask, n_tokens)


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
