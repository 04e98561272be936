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
from rlhfkit.models.heads import inner_model, takes_pair_masks
from rlhfkit.models.loading import check_prompt_room, dropout_off, load_tokenizer, position_table
from rlhfkit.models.lora import reference_of
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout import make_sampler
from rlhfkit.rollout.batch import (
    PromptResponseBatch,
    every_row_has_a_prompt,
    join_prompt_response,
    prompt_groups,
    shared_prompt_groups,
)
from rlhfkit.rollout.logprobs import accepts_logits_to_keep, gather_logprobs, response_logprobs
from rlhfkit.rollout.seeded import prompt_seeds
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.distributed import (
    gather_lists,
    gather_rows,
    load_reference,
    mean_over_processes,
    prepare_trained,
    refuse_unsupported_sharding,
    require_divisible,
    save_trained,
    shard,
    whole_weights,
)
from rlhfkit.train.loop import (
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


def batch_logprobs(
    model, batch: PromptResponseBatch, temperature: float = 1.0, share_prompt: bool = True
) -> torch.Tensor:
    """`response_logprobs` of each row of `batch`: [B, R] (masked positions unspecified).

    With `share_prompt` (and a model whose attention takes ready-made masks), rows that share a
    prompt are one row holding the prompt once and each response after it (`shared_prompt_groups`),
    the LM head only from the prompt's last column on. The log-probs are the same either way."""
    R = batch.n_response
    P = batch.input_ids.size(1) - R
    # Every row needs a prompt token to read its first response token from.
    if share_prompt and takes_pair_masks(model) and every_row_has_a_prompt(batch):
        groups = prompt_groups(batch)
        width = P + max(len(rows) for rows in groups) * R
        # Fewer rows, and at most twice the attention scores (a width x width square per row): long
        # responses with short prompts would cost more attention (and mask memory) than they save.
        n, rows_width = batch.input_ids.shape
        if len(groups) < n and len(groups) * width**2 <= 2 * n * rows_width**2:
            layout = shared_prompt_groups(batch, groups)
            inner = inner_model(model)
            mask = layout.attention_mask(inner.config._attn_implementation, inner.dtype)
            keep = {"logits_to_keep": width - P + 1} if accepts_logits_to_keep(model) else {}
            out = model(
                input_ids=layout.input_ids,  # on the batch's device, as is the layout
                attention_mask=mask,
                position_ids=layout.position_ids,
                use_cache=False,
                **keep,
            )
            logits = out.logits[:, P - 1 - width :].float()  # from column P - 1 on
            if temperature != 1.0:
                logits = logits / temperature
            # A response's first token is predicted at the prompt's last column (0 here), its
            # token t > 0 at the column of token t - 1 in the row's slot.
            t = torch.arange(R, device=batch.input_ids.device)
            at = torch.where(t == 0, 0, layout.slot[:, None] * R + t)
            return gather_logprobs(logits[layout.group[:, None], at], batch.response_ids)
    return response_logprobs(model, batch.input_ids, batch.attention_mask, R, temperature)


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
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Optimise the policy at `policy_path` with config section `section` ("grpo" or "rloo").

    `resume`, `fingerprint`: see `StageCheckpoints` (an interrupted run continued exactly).
    """
    cfg: GRPOConfig | RLOOConfig = getattr(config, section)
    if not prompts:
        raise ValueError(f"{section}: no prompts to train on")
    name = advantage_name(cfg)
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    device = accelerator.device
    n_proc, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    refuse_unsupported_sharding(accelerator, section, lora=config.lora.enabled)
    # Several processes (accelerate launch): each samples and scores whole groups of its block of
    # the step's prompts, and trains on its block of every mini-batch, so both must split evenly.
    require_divisible(f"{section}.prompts_per_step", cfg.prompts_per_step, n_proc)
    require_divisible(f"{section}.minibatch", cfg.minibatch, n_proc)
    tokenizer = load_tokenizer(policy_path)
    pad = tokenizer.pad_token_id
    key = f"{section}.max_new_tokens"
    check_prompt_room(position_table(policy_path), tokenizer, prompts, key, cfg.max_new_tokens)
    ckpt = StageCheckpoints(section, out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    policy = ckpt.load_trained(policy_path, config)
    # LoRA: the reference is the policy with its adapter off, not a second copy.
    reference = None if config.lora.enabled else load_reference(accelerator, policy_path, device)
    dropout_off(policy)  # sampling and training log-probs must be the same function
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg.lr, cfg.steps, 0, schedule="linear")
    # The schedule stays unprepared: a prepared one would step once per process at each step.
    policy, optimizer = prepare_trained(
        accelerator, policy, optimizer, cfg.minibatch // n_proc, cfg.max_grad_norm
    )
    if n_proc > 1:
        # Processes sample different prompts; give them different noise too, not one stream copied.
        torch.manual_seed(config.seed + rank)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(config.seed)
    batches = ShuffledBatches(len(prompts), cfg.prompts_per_step, gen)
    ckpt.trains(tokenizer, policy, optimizer, scheduler, gen, batches)
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    last: dict[str, float] = {}
    # rollout.backend: HF generate on the policy, or a vLLM engine synced to its weights.
    sample = make_sampler(config.rollout, accelerator.unwrap_model(policy), tokenizer, seed=config.seed)
    g = cfg.group_size
    batch_size = cfg.prompts_per_step * g
    single_update = cfg.update_epochs == 1 and cfg.minibatch >= batch_size
    # This process's rows of every step's batch: whole groups, so each group's baseline is whole.
    own_prompts = shard(cfg.prompts_per_step, rank, n_proc)
    own = slice(own_prompts.start * g, own_prompts.stop * g)
    with stop_on_signals() as stop, progress_bar(name, cfg.steps, show_progress and main) as bar:
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, cfg.steps + 1):
            chosen = batches.next()
            # Each epoch's order of the samples, drawn up front (the generator's sequence is unchanged):
            # with a single update, the first one says which rows each process scores with gradient.
            perms = [torch.randperm(batch_size, generator=gen) for _ in range(cfg.update_epochs)]
            # G copies of each prompt, adjacent, so a [n_prompts, G] view groups them.
            group_prompts = [prompts[i] for i in chosen for _ in range(g)]
            queries = [prompt_ids[i] for i in chosen for _ in range(g)]

            # 1. This process samples G responses to each of its prompts and scores the texts; the
            # responses and scores are gathered, so every process holds the whole batch.
            seeded: dict[str, list[int]] = {}
            if config.rollout.seed_per_prompt:
                # The same responses whatever the number of processes (or rollout.batch_size).
                seeded["seeds"] = prompt_seeds(config.seed, step, batch_size)[own]
            with whole_weights(policy):  # sharded (FSDP2): gathered once for the whole rollout
                responses = sample(
                    queries[own], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, **seeded
                )
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            own_scores, term_means = combined_rewards(reward_terms, group_prompts[own], texts)
            term_means = mean_over_processes(accelerator, term_means)  # equal blocks: the batch mean
            scores = torch.tensor(gather_lists(accelerator, own_scores), device=device)
            batch = join_prompt_response(queries, gather_lists(accelerator, responses), pad)
            batch = PromptResponseBatch(
                *(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
            )
            mask = batch.response_mask.float()

            # 2. Reference and old log-probs: each process computes its block of rows, gathered back.
            # With a single update its block is its share of the only mini-batch (the whole batch in
            # the epoch's order), and the forward that gives the old log-probs is the update's own:
            # a separate no-grad forward would repeat it exactly.
            order = (perms[0] if single_update else torch.arange(batch_size)).to(device)
            mine = order[shard(batch_size, rank, n_proc)]
            rows = batch.select(mine)
            # In the policy's precision (its prepared forward autocasts): KL is 0 where they are equal.
            live = accelerator.unwrap_model(policy) if reference is None else reference
            with accelerator.autocast(), reference_of(live) as ref:
                ref_mine = batch_logprobs(ref, rows, cfg.temperature, cfg.share_prompt)
            logp_mine = None
            if single_update:
                logp_mine = batch_logprobs(policy, rows, cfg.temperature, cfg.share_prompt)
                old_mine = logp_mine.detach()
            else:
                with torch.no_grad():
                    old_mine = batch_logprobs(policy, rows, cfg.temperature, cfg.share_prompt)
            # Gathered in rank order, i.e. in `order`; put back in batch order.
            old_all, ref_all = gather_rows(accelerator, old_mine, ref_mine)
            old_logp, ref_logp = torch.empty_like(old_all), torch.empty_like(ref_all)
            old_logp[order], ref_logp[order] = old_all, ref_all
            with torch.no_grad():
                # On the whole batch, identically on every process: group baselines, batch whitening.
                advantages, kl = critic_free_advantages(cfg, scores, old_logp, ref_logp, mask)

            # 3. Clipped updates on mini-batches of responses, each split in blocks over the processes.
            losses, clipfracs = [], []
            for perm in perms:
                for start in range(0, batch_size, cfg.minibatch):
                    idx = perm[start : start + cfg.minibatch].to(device)
                    # The mini-batch's counts per process (see aggregate_token_loss): DDP's average of
                    # the blocks' gradients is then the gradient of the whole mini-batch's loss.
                    n_rows = len(idx) / n_proc
                    n_tokens = mask[idx].sum().clamp(min=1.0).item() / n_proc
                    idx = idx[shard(len(idx), rank, n_proc)]
                    if logp_mine is not None:
                        logp = logp_mine  # idx is `mine`: the single update's rows
                    else:
                        logp = batch_logprobs(policy, batch.select(idx), cfg.temperature, cfg.share_prompt)
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
                            n_rows=n_rows,
                            n_tokens=n_tokens,
                        )
                    else:
                        per_token, stats = clipped_policy_loss(
                            logp, old_logp[idx], advantages[idx], mask[idx], cfg.clip_eps
                        )
                        loss = aggregate_token_loss(per_token, mask[idx], "token", n_tokens=n_tokens)
                    accelerator.backward(loss)
                    apply_gradients(accelerator, policy, optimizer, None, cfg.max_grad_norm)
                    losses.append(loss.item())
                    # A token mean over this block, weighed by its share of the mini-batch's tokens:
                    # the mean over processes is then the mini-batch's token mean.
                    clipfracs.append(stats["clipfrac"] * mask[idx].sum().item() / n_tokens)
            scheduler.step()

            last = {
                "reward/total": scores.mean().item(),
                **term_means,
                "kl": kl.sum(1).mean().item(),
                **mean_over_processes(
                    accelerator,
                    {"loss": sum(losses) / len(losses), "clipfrac": sum(clipfracs) / len(clipfracs)},
                ),
                "response_length": mask.sum(1).mean().item(),
                "entropy_proxy": -masked_mean(old_logp, mask).item(),
                "lr": scheduler.get_last_lr()[0],
            }
            if log is not None:
                log.log(step, **last)
            bar.update(
                bar.task_ids[0], advance=1, info=f"reward {last['reward/total']:+.3f} kl {last['kl']:.3f}"
            )
            ckpt.after_step(step, cfg.steps, stop, log)
    if log is not None:
        log.close()
    save_trained(accelerator, policy, tokenizer, out_dir / "model")
    return {
        "wall_seconds": watch.seconds(),
        "steps": cfg.steps,
        "resumed_from": ckpt.start_step or None,
        "advantage": name,
        "samples": cfg.steps * cfg.prompts_per_step * cfg.group_size,
        "final_reward": round(last.get("reward/total", float("nan")), 4),
        "final_kl": round(last.get("kl", float("nan")), 4),
    }
