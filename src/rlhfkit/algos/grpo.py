"""Critic-free policy gradients: GRPO, RLOO and REINFORCE++ (read top to bottom).

All three sample several responses, score each with a scalar reward, and replace PPO's
learned critic with a baseline computed from the samples themselves:

1. GRPO (Shao et al. 2024): G responses per prompt; the advantage of each is its reward
   minus the group mean, divided by the group std (`group_advantages`). The loss is the
   clipped ratio objective plus beta * k3 KL to the reference as a *loss* term
   (`grpo_loss`). Dr. GRPO (Liu et al. 2025) drops the std division and sums token losses
   divided by a constant, because per-sequence length normalisation favours long wrong
   answers and short right ones.
2. RLOO (Ahmadian et al. 2024): the baseline of sample i is the mean reward of the *other*
   G - 1 samples of its prompt (`leave_one_out_baseline`); the KL is part of the reward.
3. REINFORCE++ (Hu 2025): per-token rewards -beta * KL_t with the score at the last token,
   returns summed to the end, whitened over the whole batch instead of per group
   (`reinforce_pp_advantages`).

Tensors: `scores` are [n_prompts, G] (or [batch] for REINFORCE++); per-token tensors are
[batch, T] with batch = n_prompts * G, rows of one prompt adjacent.
"""

from __future__ import annotations

import torch

from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean, masked_whiten
from rlhfkit.algos.ppo import clipped_surrogate, kl_penalised_rewards

LOSS_NORMALISATIONS = ("sequence", "token", "constant")


def group_advantages(scores: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages of [n_prompts, G] rewards: (r - group mean) [/ (group std + eps)].

    A group whose rewards are all equal gets zero advantages: it carries no signal about
    which response is better. `scale=False` is Dr. GRPO (the std favours easy/hard prompts).
    """
    if scores.dim() != 2 or scores.size(1) < 2:
        raise ValueError(
            f"group_advantages needs [n_prompts, G >= 2] rewards, got shape {tuple(scores.shape)}"
        )
    centred = scores - scores.mean(dim=1, keepdim=True)
    # Exactly zero for a tied group, even where float rounding leaves mean != value.
    tied = scores.amax(dim=1, keepdim=True) == scores.amin(dim=1, keepdim=True)
    centred = centred.masked_fill(tied, 0.0)
    if not scale:
        return centred
    std = scores.std(dim=1, keepdim=True).masked_fill(tied, 1.0)
    return centred / (std + eps)


def leave_one_out_baseline(scores: torch.Tensor) -> torch.Tensor:
    """Baseline of each sample: the mean reward of the other G - 1 samples of its prompt."""
    if scores.dim() != 2 or scores.size(1) < 2:
        raise ValueError(f"RLOO needs [n_prompts, G >= 2] rewards, got shape {tuple(scores.shape)}")
    g = scores.size(1)
    baseline = (scores.sum(dim=1, keepdim=True) - scores) / (g - 1)
    # A tied group's baseline is its reward exactly: (sum - r) / (G - 1) can round away from r,
    # and an advantage of rounding noise would still move the policy (Adam rescales it).
    tied = scores.amax(dim=1, keepdim=True) == scores.amin(dim=1, keepdim=True)
    return torch.where(tied, scores, baseline)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """RLOO advantages: reward minus the leave-one-out baseline, [n_prompts, G]."""
    return scores - leave_one_out_baseline(scores)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ per-token advantages: KL-penalised returns, whitened over the whole batch.

    Returns (advantages, kl), both [batch, T] and zero on padding. gamma is 1: the reward
    arrives at the end of the response, so discounting would only shrink early tokens.
    """
    rewards, kl = kl_penalised_rewards(scores, logp, ref_logp, mask, kl_coef, estimator)
    # Return to go: the reversed cumulative sum of the rewards from token t to the end.
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    # Global (not per-prompt) whitening is REINFORCE++'s point: a per-group baseline over-fits
    # to easy prompts; the batch statistics are a steadier baseline and scale.
    return masked_whiten(returns, mask), kl


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's per-token clipped surrogate, [batch, T]; per-sequence advantages spread over tokens."""
    return clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    normalisation: str = "sequence",
    constant: float = 1.0,
    n_rows: float | None = None,
    n_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce a [batch, T] token loss to a scalar.

    sequence: mean over each response's tokens, then over responses (GRPO);
    token: mean over all tokens of the batch (DAPO);
    constant: sum over each response's tokens / `constant`, mean over responses (Dr. GRPO).

    `n_rows` / `n_tokens` replace this batch's own counts of responses / valid tokens in those
    means. A process that holds one block of a mini-batch passes the mini-batch's counts divided
    by the number of processes: DDP averages the processes' gradients, so the average is then the
    gradient of the whole mini-batch's loss (a per-block mean would weigh short blocks' tokens more).
    """
    mask = mask.to(per_token.dtype)
    if normalisation == "sequence":
        per_row = masked_mean(per_token, mask, dim=1)
        return per_row.mean() if n_rows is None else per_row.sum() / n_rows
    if normalisation == "token":
        return masked_mean(per_token, mask) if n_tokens is None else (per_token * mask).sum() / n_tokens
    if normalisation == "constant":
        per_row = (per_token * mask).sum(1) / constant
        return per_row.mean() if n_rows is None else per_row.sum() / n_rows
    raise ValueError(
        f"unknown loss normalisation {normalisation!r}; choose one of {', '.join(LOSS_NORMALISATIONS)}"
    )


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    normalisation: str = "sequence",
    constant: float = 1.0,
    n_rows: float | None = None,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss: clipped surrogate + kl_coef * k3 KL(pi || pi_ref) per token, aggregated.

    k3 is unbiased and never negative per token, so the penalty cannot turn into a bonus.
    `n_rows` / `n_tokens`: the counts to divide by, as in `aggregate_token_loss`.
    """
    per_token, stats = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps)
    kl = kl_estimate(logp, ref_logp, "k3")
    loss = aggregate_token_loss(per_token + kl_coef * kl, mask, normalisation, constant, n_rows, n_tokens)
    with torch.no_grad():
        stats["kl"] = masked_mean(kl, mask).item()
    return loss, stats
