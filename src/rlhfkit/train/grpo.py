"""One critic-free loop for GRPO, RLOO and REINFORCE++ (no value model anywhere).

Each step: take `prompts_per_step` prompts, sample `group_size` responses to each from the
policy, score them with the configured reward terms (`train/rewards.py`), compute old and
reference log-probs, turn scores into advantages with the section's estimator, then run
`update_epochs` passes of clipped updates over mini-batches. The math is in
`rlhfkit.algos.grpo`; this file moves tensors between models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.algos.grpo import (
    aggregate_token_loss,
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean
from rlhfkit.config import GRPOConfig, RLOOConfig, RunConfig
from rlhfkit.models.loading import dropout_off, load_causal_lm, load_tokenizer, make_trainable, save_model
from rlhfkit.models.lora import reference_of
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout import make_sampler
from rlhfkit.rollout.batch import PromptResponseBatch, join_prompt_response
from rlhfkit.rollout.logprobs import response_logprobs
from rlhfkit.train.distributed import require_one_process
from rlhfkit.train.loop import (
    MetricsLog,
    ShuffledBatches,
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)
from rlhfkit.train.rewards import RewardTerm, combined_rewards


def advantage_name(cfg: GRPOConfig | RLOOConfig) -> str:
    """Which estimator a section runs: grpo, dr_grpo, rloo or reinforce_pp."""
    if isinstance(cfg, GRPOConfig):
        return "grpo" if cfg.scale_rewards else "dr_grpo"
    return cfg.advantage


def critic_free_advantages(
    cfg: GRPOConfig | RLOOConfig,
    scores: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ([batch] per sequence, or [batch, T] per token) and the per-token KL used."""
    g = cfg.group_size
    if isinstance(cfg, GRPOConfig):
        # GRPO keeps the KL out of the reward: it is a loss term (k3) instead.
        kl = kl_estimate(old_logp, ref_logp, "k1") * mask
        return group_advantages(scores.view(-1, g), scale=cfg.scale_rewards).reshape(-1), kl
    if cfg.advantage == "reinforce_pp":
        return reinforce_pp_advantages(scores, old_logp, ref_logp, mask, cfg.kl_coef, cfg.kl_estimator)
    # RLOO: the sequence KL is part of the reward each sample's baseline is taken over.
    kl = kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
    penalised = scores - cfg.kl_coef * kl.sum(1)
    return rloo_advantages(penalised.view(-1, g)).reshape(-1), kl


def run_critic_free(
    config: RunConfig,
    section: str,
    policy_path: Path | str,
    reward_terms: list[RewardTerm],
    prompts: list,
    out_dir: Path,
    show_progress: bool = True,
) -> dict:
    """Optimise the policy at `policy_path` with config section `section` ("grpo" or "rloo")."""
    cfg: GRPOConfig | RLOOConfig = getattr(config, section)
    if not prompts:
        raise ValueError(f"{section}: no prompts to train on")
    name = advantage_name(cfg)
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    device = accelerator.device
    require_one_process(accelerator, section)
    tokenizer = load_tokenizer(policy_path)
    pad = tokenizer.pad_token_id
    policy = make_trainable(load_causal_lm(policy_path), config)
    # LoRA: the reference is the policy with its adapter off, not a second copy.
    reference = None if config.lora.enabled else load_causal_lm(policy_path).to(device).eval()
    dropout_off(policy)  # sampling and training log-probs must be the same function
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg.lr, cfg.steps, 0, schedule="linear")
    policy, optimizer = accelerator.prepare(policy, optimizer)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(config.seed)
    batches = ShuffledBatches(len(prompts), cfg.prompts_per_step, gen)
    log = MetricsLog(out_dir / "metrics.jsonl")
    last: dict[str, float] = {}
    # rollout.backend: HF generate on the policy, or a vLLM engine synced to its weights.
    sample = make_sampler(config.rollout, accelerator.unwrap_model(policy), tokenizer, seed=config.seed)
    batch_size = cfg.prompts_per_step * cfg.group_size
    single_update = cfg.update_epochs == 1 and cfg.minibatch >= batch_size
    with progress_bar(name, cfg.steps, show_progress) as bar:
        for step in range(1, cfg.steps + 1):
            chosen = batches.next()
            # G copies of each prompt, adjacent, so a [n_prompts, G] view groups them.
            group_prompts = [prompts[i] for i in chosen for _ in range(cfg.group_size)]
            queries = [prompt_ids[i] for i in chosen for _ in range(cfg.group_size)]

            # 1. Sample G responses per prompt and score the texts.
            responses = sample(queries, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            score_list, term_means = combined_rewards(reward_terms, group_prompts, texts)
            scores = torch.tensor(score_list, device=device)
            batch = join_prompt_response(queries, responses, pad)
            batch = PromptResponseBatch(
                *(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
            )
            mask = batch.response_mask.float()
            R = batch.n_response

            # 2. Reference and old log-probs, advantages.
            with reference_of(accelerator.unwrap_model(policy) if reference is None else reference) as ref:
                ref_logp = response_logprobs(ref, batch.input_ids, batch.attention_mask, R, cfg.temperature)
            whole_logp = None
            if single_update:
                # The only gradient step sees the weights that sampled: its forward (with grad) gives
                # the old log-probs too, and a separate no-grad forward would repeat it exactly.
                whole_logp = response_logprobs(
                    policy, batch.input_ids, batch.attention_mask, R, cfg.temperature
                )
                old_logp = whole_logp.detach()
            else:
                with torch.no_grad():
                    old_logp = response_logprobs(
                        policy, batch.input_ids, batch.attention_mask, R, cfg.temperature
                    )
            with torch.no_grad():
                advantages, kl = critic_free_advantages(cfg, scores, old_logp, ref_logp, mask)

            # 3. Clipped updates on mini-batches of responses.
            losses, clipfracs = [], []
            for _ in range(cfg.update_epochs):
                perm = torch.randperm(len(queries), generator=gen)
                for start in range(0, len(queries), cfg.minibatch):
                    idx = perm[start : start + cfg.minibatch].to(device)
                    if whole_logp is not None:
                        logp = whole_logp[idx]
                    else:
                        mb = batch.select(idx)
                        logp = response_logprobs(policy, mb.input_ids, mb.attention_mask, R, cfg.temperature)
                    if isinstance(cfg, GRPOConfig):
                        loss, stats = grpo_loss(
                            logp,
                            old_logp[idx],
                            ref_logp[idx],
                            advantages[idx],
                            mask[idx],
                            cfg.clip_eps,
                            cfg.kl_coef,
                            cfg.loss_normalisation,
                            constant=float(cfg.max_new_tokens),
                        )
                    else:
                        per_token, stats = clipped_policy_loss(
                            logp, old_logp[idx], advantages[idx], mask[idx], cfg.clip_eps
                        )
                        loss = aggregate_token_loss(per_token, mask[idx], "token")
                    accelerator.backward(loss)
                    apply_gradients(accelerator, policy, optimizer, None, cfg.max_grad_norm)
                    losses.append(loss.item())
                    clipfracs.append(stats["clipfrac"])
            scheduler.step()

            last = {
                "reward/total": scores.mean().item(),
                **term_means,
                "kl": kl.sum(1).mean().item(),
                "loss": sum(losses) / len(losses),
                "clipfrac": sum(clipfracs) / len(clipfracs),
                "response_length": mask.sum(1).mean().item(),
                "entropy_proxy": -masked_mean(old_logp, mask).item(),
                "lr": scheduler.get_last_lr()[0],
            }
            log.log(step, **last)
            bar.update(
                bar.task_ids[0], advance=1, info=f"reward {last['reward/total']:+.3f} kl {last['kl']:.3f}"
            )
    log.close()
    save_model(accelerator.unwrap_model(policy), tokenizer, out_dir / "model")
    return {
        "wall_seconds": watch.seconds(),
        "steps": cfg.steps,
        "advantage": name,
        "samples": cfg.steps * cfg.prompts_per_step * cfg.group_size,
        "final_reward": round(last.get("reward/total", float("nan")), 4),
        "final_kl": round(last.get("kl", float("nan")), 4),
    }
