"""PPO stage: policy from SFT, frozen SFT reference, frozen reward model, critic from the RM.

Each iteration: sample responses, score them (reward model, reference log-probs, critic
values), turn scores into KL-penalised per-token rewards and GAE advantages, then run
`ppo_epochs` passes of clipped policy and value updates over mini-batches. The math is
in `rlhfkit.algos.ppo`; this file only moves tensors between models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.algos.masked import masked_mean, masked_whiten
from rlhfkit.algos.ppo import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalised_rewards,
    policy_loss,
    value_loss,
)
from rlhfkit.config import RunConfig
from rlhfkit.models.heads import sequence_scores, token_values
from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer, save_model
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout.batch import PromptResponseBatch, join_prompt_response
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.logprobs import gather_logprobs, response_logits, response_logprobs
from rlhfkit.train.loop import (
    MetricsLog,
    ShuffledBatches,
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)


def critic_values(critic, batch: PromptResponseBatch) -> torch.Tensor:
    """V(s_t) for each response token t: the critic read at the token before it."""
    values = token_values(critic, batch.input_ids, batch.attention_mask)
    return values[:, -batch.n_response - 1 : -1]


def run_ppo(
    config: RunConfig,
    policy_path: Path | str,
    reward_path: Path | str,
    prompts: list[str],
    out_dir: Path,
    show_progress: bool = True,
) -> dict:
    """Optimise the policy at `policy_path` against the reward model at `reward_path`."""
    cfg = config.ppo
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed)
    device = accelerator.device
    tokenizer = load_tokenizer(policy_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy = load_causal_lm(policy_path)
    reference = load_causal_lm(policy_path).to(device).eval().requires_grad_(False)
    reward_model = load_reward_model(reward_path, pad).to(device).eval().requires_grad_(False)
    # Critic initialised from the reward model: it already reads the response's quality.
    critic = load_reward_model(reward_path, pad)
    # Dropout off in every model: log-probs at rollout and at training must be the same function.
    policy.eval()
    critic.eval()
    opt_policy, sched_policy = make_optimizer(policy.parameters(), cfg.lr, cfg.steps, 0, schedule="linear")
    opt_critic, sched_critic = make_optimizer(
        critic.parameters(), cfg.critic_lr, cfg.steps, 0, schedule="linear"
    )
    policy, critic, opt_policy, opt_critic = accelerator.prepare(policy, critic, opt_policy, opt_critic)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(config.seed)
    batches = ShuffledBatches(len(prompt_ids), cfg.rollout_batch, gen)
    log = MetricsLog(out_dir / "metrics.jsonl")
    last: dict[str, float] = {}
    with progress_bar("ppo", cfg.steps, show_progress) as bar:
        for step in range(1, cfg.steps + 1):
            queries = [prompt_ids[i] for i in batches.next()]

            # 1. Rollout: sample at the training temperature.
            responses = sample_responses(
                accelerator.unwrap_model(policy),
                queries,
                eos_id=eos,
                pad_id=pad,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                batch_size=cfg.rollout_batch,
            )
            batch = join_prompt_response(queries, responses, pad)
            batch = PromptResponseBatch(
                *(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
            )
            mask = batch.response_mask.float()
            R = batch.n_response

            # 2. Score: old log-probs, reference log-probs, values, reward-model score.
            with torch.no_grad():
                old_logp = response_logprobs(
                    policy, batch.input_ids, batch.attention_mask, R, cfg.temperature
                )
                ref_logp = response_logprobs(
                    reference, batch.input_ids, batch.attention_mask, R, cfg.temperature
                )
                old_values = critic_values(critic, batch)
                scores = sequence_scores(reward_model, batch.input_ids, batch.attention_mask)
                rewards, kl = kl_penalised_rewards(
                    scores, old_logp, ref_logp, mask, cfg.kl_coef, cfg.kl_estimator
                )
                advantages, returns = gae(old_values, rewards, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    # Whitening keeps the step size independent of the reward scale.
                    advantages = masked_whiten(advantages, mask)

            # 3. Update: ppo_epochs passes over shuffled mini-batches.
            stats: dict[str, list[float]] = {
                k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approxkl", "entropy", "vf_clipfrac")
            }
            for _ in range(cfg.ppo_epochs):
                perm = torch.randperm(len(queries), generator=gen)
                for start in range(0, len(queries), cfg.minibatch):
                    idx = perm[start : start + cfg.minibatch].to(device)
                    mb = batch.select(idx)
                    logits = response_logits(policy, mb.input_ids, mb.attention_mask, R, cfg.temperature)
                    logp = gather_logprobs(logits, mb.response_ids)
                    pg_loss, pg_stats = policy_loss(
                        logp, old_logp[idx], advantages[idx], mask[idx], cfg.clip_eps
                    )
                    accelerator.backward(pg_loss)
                    apply_gradients(accelerator, policy, opt_policy, None, cfg.max_grad_norm)

                    values = critic_values(critic, mb)
                    vf_loss, vf_stats = value_loss(
                        values, old_values[idx], returns[idx], mask[idx], cfg.clip_value
                    )
                    accelerator.backward(cfg.vf_coef * vf_loss)
                    apply_gradients(accelerator, critic, opt_critic, None, cfg.max_grad_norm)

                    with torch.no_grad():
                        stats["entropy"].append(masked_mean(entropy_from_logits(logits), mask[idx]).item())
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(vf_loss.item())
                    stats["clipfrac"].append(pg_stats["clipfrac"])
                    stats["approxkl"].append(pg_stats["approxkl"])
                    stats["vf_clipfrac"].append(vf_stats["vf_clipfrac"])
            sched_policy.step()
            sched_critic.step()

            lengths = mask.sum(1)
            last = {
                "reward/score": scores.mean().item(),
                "reward/total": rewards.sum(1).mean().item(),
                "kl": kl.sum(1).mean().item(),
                "entropy": sum(stats["entropy"]) / len(stats["entropy"]),
                "loss/policy": sum(stats["policy_loss"]) / len(stats["policy_loss"]),
                "loss/value": sum(stats["value_loss"]) / len(stats["value_loss"]),
                "clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
                "approxkl": sum(stats["approxkl"]) / len(stats["approxkl"]),
                "explained_variance": explained_variance(old_values, returns, mask),
                "response_length": lengths.mean().item(),
                "eos_share": (batch.response_ids == eos).any(1).float().mean().item(),
                "lr": sched_policy.get_last_lr()[0],
            }
            log.log(step, **last)
            bar.update(
                bar.task_ids[0], advance=1, info=f"score {last['reward/score']:+.3f} kl {last['kl']:.3f}"
            )
    log.close()
    save_model(accelerator.unwrap_model(policy), tokenizer, out_dir / "model")
    return {
        "wall_seconds": watch.seconds(),
        "steps": cfg.steps,
        "final_score": round(last.get("reward/score", float("nan")), 4),
        "final_kl": round(last.get("kl", float("nan")), 4),
    }
