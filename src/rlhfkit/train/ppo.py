"""PPO stage: policy from SFT, frozen SFT reference, frozen reward model, a critic.

Each iteration: sample responses, score them (reward model, reference log-probs, critic
values), turn scores into KL-penalised per-token rewards and GAE advantages, then run
`ppo_epochs` passes of clipped policy and value updates over mini-batches (A2C: one
on-policy step). The math is in `rlhfkit.algos.ppo`; this file moves tensors between
models and switches the implementation details from `PPOConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import register_fsdp_forward_method

from rlhfkit.algos.masked import masked_mean, masked_whiten
from rlhfkit.algos.ppo import (
    a2c_policy_loss,
    adaptive_kl_coef,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_loss,
    kl_penalised_rewards,
    policy_loss,
    process_scores,
    reward_normalisation,
    running_moments_update,
    value_loss,
)
from rlhfkit.algos.sft import completion_nll
from rlhfkit.config import PPOConfig, RunConfig
from rlhfkit.models.heads import TokenValues, sequence_scores, values_of
from rlhfkit.models.loading import (
    check_cut_sequences,
    check_prompt_room,
    dropout_off,
    enable_gradient_checkpointing,
    learned_position_embedding,
    load_reward_model,
    load_tokenizer,
    position_table,
)
from rlhfkit.models.lora import reference_of
from rlhfkit.models.memory import held_model, print_memory_estimate
from rlhfkit.models.tokenizer import document_token_ids, prompt_token_ids
from rlhfkit.rollout import make_sampler
from rlhfkit.rollout.batch import PromptResponseBatch, in_row_chunks, join_prompt_response
from rlhfkit.rollout.logprobs import gather_logprobs, response_forward
from rlhfkit.rollout.seeded import prompt_seeds
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.distributed import (
    backward,
    clip_grad_norm,
    gather_lists,
    gather_rows,
    load_optimizer_state,
    load_reference,
    loading_whole,
    mean_over_processes,
    optimizer_state,
    prepare_trained,
    pretrained_weights,
    refuse_unsupported_sharding,
    require_divisible,
    save_trained,
    shard,
    weights_are_sharded,
    whole_state_dict,
    whole_weights,
)
from rlhfkit.train.loop import (
    ShuffledBatches,
    Stopwatch,
    make_accelerator,
    make_optimizer,
    progress_bar,
)
from rlhfkit.train.pretrain import pack_blocks
from rlhfkit.train.rewards import build_reward_functions, combined_rewards


@dataclass
class Controllers:
    """The loop's own state beyond weights and optimisers (saved with each checkpoint)."""

    kl_coef: float
    reward_gain: float = 1.0
    reward_bias: float = 0.0
    # Running (mean, var, count) of processed scores, for reward scaling.
    moments: tuple[float, float, int] = (0.0, 1.0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks (Llama/Qwen2 `model.layers`, GPT-2 `transformer.h`, ...)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def freeze_lower_layers(model: torch.nn.Module, n: int) -> None:
    """Detail: freeze the N lowest blocks, the learned position embeddings (GPT-2's wpe) and the
    token embeddings unless tied to the output (freezing them would freeze the LM head too)."""
    if n <= 0:
        return
    blocks = decoder_blocks(model)
    if n > len(blocks):
        raise ValueError(f"ppo.freeze_layers={n} but the model has {len(blocks)} blocks")
    for block in blocks[:n]:
        block.requires_grad_(False)
    # Positions feed only the bottom of the network, below the frozen blocks, like the tokens.
    if (positions := learned_position_embedding(model)) is not None:
        positions[0].requires_grad_(False)
    embeddings = model.get_input_embeddings()
    if embeddings.weight is not model.get_output_embeddings().weight:
        embeddings.requires_grad_(False)


class PolicyValue(torch.nn.Module):
    """The policy, and (critic: shared) a value head on its last hidden state."""

    def __init__(self, policy: torch.nn.Module, value_head: torch.nn.Linear | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    @property
    def _no_split_modules(self) -> list[str] | None:
        # Read by accelerate's FSDP auto-wrap policy: shard each transformer block as its own unit.
        return getattr(self.policy, "_no_split_modules", None)

    def tie_weights(self) -> None:
        """Tie the policy's input and output embeddings again (accelerate's FSDP2 set-up unties them)."""
        self.policy.tie_weights()

    def pretraining_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of whole text blocks (PTX), at every position.

        Registered as a forward of this module under FSDP2 (`register_fsdp_forward_method`), so
        the shards are gathered for it as for `forward`.
        """
        return self.policy(input_ids=input_ids, use_cache=False).logits

    def forward(
        self, batch: PromptResponseBatch, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(response logits / temperature, response values or None)."""
        # Detail: the logits are divided by the sampling temperature, as at rollout.
        logits, hidden = response_forward(
            self.policy,
            batch.input_ids,
            batch.attention_mask,
            batch.n_response,
            temperature,
            with_hidden=self.value_head is not None,
        )
        values = None if hidden is None else self.value_head(hidden).squeeze(-1).float()
        return logits, values


def policy_logprobs_values(
    actor: torch.nn.Module, batch: PromptResponseBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the responses under the actor's policy, and its values (shared critic)."""
    logits, values = actor(batch, temperature)
    return gather_logprobs(logits, batch.response_ids), values


def critic_values(critic: torch.nn.Module, batch: PromptResponseBatch) -> torch.Tensor:
    """V(s_t) for each response token t: a separate critic read at the token before it.

    `critic` is a reward-model-shaped model, or one in TokenValues (possibly wrapped by DDP).
    """
    values = values_of(critic, batch.input_ids, batch.attention_mask)
    return values[:, -batch.n_response - 1 : -1]


def _ptx_blocks(tokenizer: Any, corpus: list[str], block_size: int) -> torch.Tensor:
    return pack_blocks(document_token_ids(tokenizer, corpus), block_size)


def run_ppo(
    config: RunConfig,
    policy_path: Path | str,
    reward_path: Path | str,
    prompts: list[str],
    out_dir: Path,
    show_progress: bool = True,
    *,
    ptx_corpus: list[str] | None = None,
    resume: bool = False,
    fingerprint: str = "",
    reference_path: Path | str | None = None,
) -> dict:
    """Optimise the policy at `policy_path` against the reward model at `reward_path`.

    The KL reference is `reference_path`, or the starting policy itself when unset (the SFT
    model in the demo; the iterated loop starts from a later policy and keeps SFT as reference).

    With `resume`, continue from the newest checkpoint in `out_dir/checkpoints` made with the
    same `fingerprint` (config); the result is bit-identical to an uninterrupted run.
    """
    cfg: PPOConfig = config.ppo
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    device = accelerator.device
    n_proc, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    refuse_unsupported_sharding(accelerator, "ppo", lora=config.lora.enabled)
    sharded = weights_are_sharded(accelerator)
    # Several processes (accelerate launch): each samples and scores its block of every rollout and
    # of every mini-batch (rlhfkit.train.distributed), so both must split evenly.
    require_divisible("ppo.rollout_batch", cfg.rollout_batch, n_proc)
    if cfg.algorithm == "ppo":
        require_divisible("ppo.minibatch", cfg.minibatch, n_proc)
    # Rows of a micro-batch, and the micro-batches each process runs for one optimiser step.
    micro = cfg.minibatch // cfg.grad_accum if cfg.algorithm == "ppo" else cfg.minibatch
    own_rows = (cfg.minibatch if cfg.algorithm == "ppo" else cfg.rollout_batch) // n_proc
    micro_per_step = -(-own_rows // micro)
    if sharded and cfg.ptx_coef > 0:
        # Sharded weights: a forward is a collective, so every process must run a PTX forward in each
        # of its micro-batches, i.e. each of the mini-batch's micro-batch blocks gets PTX rows.
        blocks = micro_per_step * n_proc
        if cfg.ptx_batch < blocks:
            raise ValueError(
                f"ppo.ptx_batch {cfg.ptx_batch} leaves micro-batches without PTX rows; with sharded "
                f"weights every process needs some in each of its micro-batches: set it to >= {blocks}"
            )
    tokenizer = load_tokenizer(policy_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Before any model loads: a prompt and its whole response must fit a learned position table.
    policy_table = position_table(policy_path)
    for table in (policy_table, position_table(reward_path)):
        check_prompt_room(table, tokenizer, prompts, "ppo.max_new_tokens", cfg.max_new_tokens)
    if cfg.ptx_coef > 0:
        block = config.pretrain.block_size
        check_cut_sequences(policy_table, "pretrain.block_size", block, [block], "PTX block")
    # Checkpoints every ppo.save_every iterations and at the end (policies for over-optimisation sweeps).
    ckpt = StageCheckpoints(
        "ppo", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint, at_end=True
    )
    state = ckpt.state
    policy = ckpt.load_trained(policy_path, config)
    reference = None  # LoRA with the starting policy as reference: the policy, adapter off
    if not (config.lora.enabled and reference_path is None):
        # Offloaded, the reference lives on the CPU and visits the device for its forward only.
        ref_home = "cpu" if config.model.offload_reference else device
        reference = load_reference(accelerator, reference_path or policy_path, ref_home)
    with loading_whole():  # frozen, never prepared: whole on every process (ZeRO-3)
        reward_model = load_reward_model(reward_path, pad).to(device).eval().requires_grad_(False)
    freeze_lower_layers(policy, cfg.freeze_layers)
    critic = None
    value_head = None
    if cfg.critic == "separate":
        # Detail: the critic starts from the reward model, which already reads response quality.
        critic = load_reward_model(reward_path, pad)
        if config.model.gradient_checkpointing:
            # Trained like the policy, so checkpointed like it (the memory estimate counts it so).
            enable_gradient_checkpointing(critic)
        # Detail: dropout off by zeroing it, not eval(), which would switch checkpointing off.
        dropout_off(critic)
        if state is not None:
            critic.load_state_dict(state["critic"])
    else:
        # Detail: a value head on the policy, initialised from the reward model's scalar head
        # (same hidden size when the reward model was trained from this policy), else zeros.
        value_head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
        score = reward_model.score.weight
        with torch.no_grad():
            value_head.weight.copy_(score if score.shape == value_head.weight.shape else 0.0)
        if state is not None:
            value_head.load_state_dict(state["value_head"])
    actor = PolicyValue(policy, value_head)
    # Detail: dropout off in every model: rollout and training log-probs are the same function.
    dropout_off(actor)
    held = [held_model("policy", policy, reads_vocab=True)]
    if reference is not None:
        held.append(held_model("reference", reference, True, on_device=not config.model.offload_reference))
    held.append(held_model("reward model", reward_model, reads_vocab=False))
    if critic is not None:
        held.append(held_model("critic", critic, reads_vocab=False))
    # Activations are sized by one micro-batch of the longest prompts plus full responses.
    longest_prompt = max((len(prompt_token_ids(tokenizer, p)) for p in prompts[:256]), default=0)
    print_memory_estimate(
        held,
        cfg.minibatch // cfg.grad_accum * (longest_prompt + cfg.max_new_tokens),
        config.model.dtype,
        config.model.gradient_checkpointing,
        enabled=show_progress and accelerator.is_main_process,
    )

    forward_rows = config.rollout.forward_batch_size

    def reference_logprobs(batch: PromptResponseBatch) -> torch.Tensor:
        """Per-token log-probs of the responses under the reference (no grad), chunked by rows."""

        def chunked(model: torch.nn.Module) -> torch.Tensor:
            ref = PolicyValue(model, None)
            return in_row_chunks(
                lambda mb: policy_logprobs_values(ref, mb, cfg.temperature)[0], batch, forward_rows
            )

        if reference is None:
            with reference_of(accelerator.unwrap_model(actor).policy) as base:
                return chunked(base)
        with torch.no_grad():
            # Offloaded: one visit to the device for all chunks, not one per chunk.
            reference.to(device)
            logp = chunked(reference)
            if config.model.offload_reference:
                reference.to("cpu")
            return logp

    def reward_scores(batch: PromptResponseBatch) -> torch.Tensor:
        """The reward model's score of each whole sequence (no grad), chunked by rows."""
        with torch.no_grad():
            return in_row_chunks(
                lambda mb: sequence_scores(reward_model, mb.input_ids, mb.attention_mask), batch, forward_rows
            )

    trainable = [p for p in actor.parameters() if p.requires_grad]
    updates_per_step = 1 if cfg.algorithm == "a2c" else cfg.ppo_epochs * (cfg.rollout_batch // cfg.minibatch)
    opt_policy, sched_policy = make_optimizer(
        trainable,
        cfg.lr,
        cfg.steps * updates_per_step,
        cfg.warmup_steps * updates_per_step,
        schedule=cfg.lr_schedule,
        eps=cfg.adam_eps,
    )
    # One model per prepare call: accelerate's FSDP2 set-up shards one model (and its optimiser) per call,
    # and DeepSpeed makes one engine per model.
    actor, opt_policy = prepare_trained(
        accelerator, actor, opt_policy, micro, cfg.max_grad_norm, micro_per_step
    )
    # PTX runs the policy through `pretraining_logits`, not `forward`: FSDP2 then treats it as a forward
    # of the root (its shards gathered, inputs cast for mixed precision) instead of relying on the
    # root's weights still being gathered from the forward before it.
    register_fsdp_forward_method(accelerator.unwrap_model(actor), "pretraining_logits")
    opt_critic = sched_critic = None
    if critic is not None:
        opt_critic, sched_critic = make_optimizer(
            critic.parameters(),
            cfg.critic_lr,
            cfg.steps * updates_per_step,
            cfg.warmup_steps * updates_per_step,
            schedule=cfg.lr_schedule,
            eps=cfg.adam_eps,
        )
        # Prepared inside TokenValues so DDP/FSDP see the forward that computes the values.
        critic, opt_critic = prepare_trained(
            accelerator, TokenValues(critic), opt_critic, micro, cfg.max_grad_norm, micro_per_step
        )
    if n_proc > 1:
        # Processes sample different prompts; give them different noise too, not one stream copied.
        torch.manual_seed(config.seed + rank)

    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(config.seed)
    batches = ShuffledBatches(len(prompt_ids), cfg.rollout_batch, gen)
    ptx = None
    if cfg.ptx_coef > 0:
        if not ptx_corpus:
            raise ValueError("ppo.ptx_coef > 0 needs a pretraining corpus, and the task has none")
        ptx = _ptx_blocks(tokenizer, ptx_corpus, config.pretrain.block_size)
    min_new = cfg.max_new_tokens if cfg.response_mode == "fixed" else 0
    # Programmable reward terms (verifiable rewards, penalties) on top of the reward model.
    extra_terms = build_reward_functions(cfg.extra_rewards, reward_path, device) if cfg.extra_rewards else []

    # rollout.backend: HF generate on the policy, or a vLLM engine synced to its weights.
    sample = make_sampler(config.rollout, accelerator.unwrap_model(actor).policy, tokenizer, seed=config.seed)

    def rollout(queries: list[list[int]], step: int) -> PromptResponseBatch:
        """The whole batch, prompts and responses; this process samples its block of the queries."""
        own = shard(len(queries), rank, n_proc)
        seeded: dict[str, list[int]] = {}
        if config.rollout.seed_per_prompt:
            # The same responses whatever the number of processes (or rollout.batch_size).
            seeded["seeds"] = prompt_seeds(config.seed, step, len(queries))[own]
        with whole_weights(actor):  # sharded (FSDP2): gathered once for the whole rollout
            responses = sample(
                queries[own],
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                min_new_tokens=min_new,
                **seeded,
            )
        joined = join_prompt_response(queries, gather_lists(accelerator, responses), pad)
        return PromptResponseBatch(
            *(t.to(device) for t in (joined.input_ids, joined.attention_mask, joined.response_mask))
        )

    if state is not None:
        # The weights (policy, critic, value head) were loaded before they were prepared.
        ctl = Controllers(**state["controllers"])
        ctl.moments = tuple(ctl.moments)  # type: ignore[assignment]
        if critic is not None:
            load_optimizer_state(accelerator, critic, opt_critic, state["opt_critic"])
            sched_critic.load_state_dict(state["sched_critic"])
        load_optimizer_state(accelerator, actor, opt_policy, state["opt_policy"])
        sched_policy.load_state_dict(state["sched_policy"])
        gen.set_state(state["gen"])
        batches.pending = list(state["batch_order"])
    else:
        ctl = Controllers(kl_coef=cfg.kl_coef)
        if cfg.reward_norm:
            # Detail: reward normalisation. Fit gain/bias on samples of the initial (SFT) policy,
            # so its scores have mean 0 and std 1 whatever scale the reward model learned.
            norm_gen = torch.Generator().manual_seed(config.seed + 1)
            idx = torch.randint(len(prompt_ids), (cfg.reward_norm_samples,), generator=norm_gen).tolist()
            norm_batch = rollout([prompt_ids[i] for i in idx], step=0)
            raw = reward_scores(norm_batch)
            ctl.reward_gain, ctl.reward_bias = reward_normalisation(raw)

    # The main process alone writes the run's record: metrics, checkpoints, the model.
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    start_step = ckpt.start_step
    last: dict[str, float] = {}

    def checkpoint_contents() -> tuple[Any, Any, dict[str, torch.Tensor] | None, dict[str, Any]]:
        """The policy and everything else a continuation needs; every process calls this (sharded,
        the weights and optimiser states are gathered whole, which only the main process receives)."""
        weights = pretrained_weights(accelerator, actor, "policy")
        return (
            accelerator.unwrap_model(actor).policy,
            tokenizer,
            weights,
            {
                "controllers": asdict(ctl),
                "value_head": None
                if value_head is None
                else whole_state_dict(accelerator, actor, "value_head"),
                "critic": None if critic is None else whole_state_dict(accelerator, critic, "model"),
                "opt_policy": optimizer_state(accelerator, actor, opt_policy),
                "sched_policy": sched_policy.state_dict(),
                "opt_critic": None
                if opt_critic is None
                else optimizer_state(accelerator, critic, opt_critic),
                "sched_critic": None if sched_critic is None else sched_critic.state_dict(),
                "gen": gen.get_state(),
                "batch_order": list(batches.pending),
            },
        )

    with stop_on_signals() as stop, progress_bar("ppo", cfg.steps, show_progress and main) as bar:
        bar.update(bar.task_ids[0], completed=start_step)
        for step in range(start_step + 1, cfg.steps + 1):
            picked = batches.next()
            queries = [prompt_ids[i] for i in picked]

            # 1. Rollout at the training temperature.
            batch = rollout(queries, step)
            mask = batch.response_mask.float()
            # This process scores its own block of rows; the results are gathered into the batch's.
            own = shard(len(queries), rank, n_proc)
            mine = batch.select(own)

            # 2. Score: old log-probs and values, reference log-probs, reward-model score.
            with torch.no_grad():
                # rollout.forward_batch_size rows per forward: peak memory of one chunk, same numbers.
                old_logp, old_values = in_row_chunks(
                    lambda mb: policy_logprobs_values(actor, mb, cfg.temperature), mine, forward_rows
                )
                if critic is not None:
                    old_values = in_row_chunks(lambda mb: critic_values(critic, mb), mine, forward_rows)
                # Detail: the reference runs in the policy's precision (its prepared forward autocasts
                # under mixed precision), or KL starts off zero and its estimate can go negative.
                with accelerator.autocast():
                    ref_logp = reference_logprobs(mine)
                raw_scores = reward_scores(mine)
                term_means: dict[str, float] = {}
                extra = None
                if extra_terms:
                    texts = tokenizer.batch_decode(mine.response_ids, skip_special_tokens=True)
                    extra_list, term_means = combined_rewards(
                        extra_terms, [prompts[i] for i in picked[own]], texts
                    )
                    extra = torch.tensor(extra_list, dtype=raw_scores.dtype, device=raw_scores.device)
                    term_means = mean_over_processes(accelerator, term_means)  # equal blocks: the batch mean
                old_logp, old_values, ref_logp, raw_scores, extra = gather_rows(
                    accelerator, old_logp, old_values, ref_logp, raw_scores, extra
                )
                has_eos = (batch.response_ids == eos).any(1)
                scores = process_scores(
                    raw_scores,
                    has_eos=has_eos,
                    gain=ctl.reward_gain,
                    bias=ctl.reward_bias,
                    missing_eos_penalty=None if cfg.response_mode == "fixed" else cfg.missing_eos_penalty,
                    clip=cfg.reward_clip,
                )
                if extra is not None:
                    scores = scores + extra
                if cfg.reward_scaling:
                    # Detail: reward scaling by the running std of scores (not their mean).
                    ctl.moments = running_moments_update(ctl.moments, scores)
                    scores = scores / max(ctl.moments[1], 1e-8) ** 0.5
                in_reward = ctl.kl_coef if cfg.kl_mode == "reward" else 0.0
                rewards, kl = kl_penalised_rewards(
                    scores, old_logp, ref_logp, mask, in_reward, cfg.kl_estimator
                )
                if cfg.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)
                advantages, returns = gae(old_values, rewards, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages == "batch":
                    # Detail: whitening keeps the step size independent of the reward scale.
                    advantages = masked_whiten(advantages, mask)

            # 3. Update.
            stats: dict[str, list[float]] = {}
            epochs = 1 if cfg.algorithm == "a2c" else cfg.ppo_epochs
            minibatch = len(queries) if cfg.algorithm == "a2c" else cfg.minibatch
            epochs_run = 0
            for _ in range(epochs):
                perm = torch.randperm(len(queries), generator=gen)
                epoch_kl: list[float] = []
                for start in range(0, len(queries), minibatch):
                    idx = perm[start : start + minibatch].to(device)
                    mb_adv = advantages[idx]
                    if cfg.whiten_advantages == "minibatch":
                        mb_adv = masked_whiten(mb_adv, mask[idx])
                    n_tokens = mask[idx].sum().clamp(min=1.0).item()
                    # This process's block of the mini-batch. DDP averages the processes' gradients,
                    # so each divides its token sums by n_tokens / n_proc: the average is the
                    # gradient of the whole mini-batch over its n_tokens tokens.
                    mb_own = shard(len(idx), rank, n_proc)
                    idx, mb_adv = idx[mb_own], mb_adv[mb_own]
                    starts = range(0, len(idx), micro)
                    ptx_chunks: list[torch.Tensor | None] = [None] * len(starts)
                    if ptx is not None:
                        rows = ptx[torch.randint(len(ptx), (cfg.ptx_batch,), generator=gen)].to(device)
                        # The mini-batch's PTX blocks are spread over every process's micro-batches.
                        ptx_chunks = list(rows.tensor_split(len(starts) * n_proc))
                        ptx_chunks = ptx_chunks[rank * len(starts) : (rank + 1) * len(starts)]
                    for k_micro, (m_start, ptx_chunk) in enumerate(zip(starts, ptx_chunks, strict=True)):
                        sub = slice(m_start, m_start + micro)
                        m_stats = _micro_step(
                            cfg,
                            actor,
                            critic,
                            batch.select(idx[sub]),
                            old_logp[idx][sub],
                            ref_logp[idx][sub],
                            old_values[idx][sub],
                            returns[idx][sub],
                            mb_adv[sub],
                            mask[idx][sub],
                            n_tokens / n_proc,
                            ctl.kl_coef,
                            accelerator,
                            ptx_chunk,
                            ptx_share=0.0 if ptx_chunk is None else len(ptx_chunk) * n_proc / cfg.ptx_batch,
                            last=k_micro == len(starts) - 1,
                        )
                        for k, v in m_stats.items():
                            stats.setdefault(k, []).append(v)
                        epoch_kl.append(m_stats["approxkl"])
                    # Norms before clipping, of the gradient every process holds after DDP's average.
                    norm = clip_grad_norm(accelerator, actor, cfg.max_grad_norm)
                    stats.setdefault("grad_norm", []).append(norm)
                    opt_policy.step()
                    sched_policy.step()
                    opt_policy.zero_grad(set_to_none=True)
                    if critic is not None:
                        norm = clip_grad_norm(accelerator, critic, cfg.max_grad_norm)
                        stats.setdefault("grad_norm/critic", []).append(norm)
                        opt_critic.step()
                        sched_critic.step()
                        opt_critic.zero_grad(set_to_none=True)
                epochs_run += 1
                # Detail: early stopping when the policy moved too far from the rollout policy.
                # Every process takes the same decision, on the mean over all their micro-batches.
                epoch_approxkl = mean_over_processes(accelerator, {"kl": sum(epoch_kl) / len(epoch_kl)})["kl"]
                if cfg.target_kl is not None and epoch_approxkl > cfg.target_kl:
                    break

            mean_kl = kl.sum(1).mean().item()
            kl_coef_used = ctl.kl_coef
            if cfg.kl_target is not None:
                # Detail: adaptive KL controller (Ziegler et al. 2019).
                ctl.kl_coef = adaptive_kl_coef(
                    ctl.kl_coef, mean_kl, cfg.kl_target, cfg.kl_horizon, len(queries)
                )

            last = {
                "reward/score": scores.mean().item(),
                "reward/raw": raw_scores.mean().item(),
                **term_means,
                "reward/total": rewards.sum(1).mean().item(),
                "kl": mean_kl,
                "kl_coef": kl_coef_used,
                **mean_over_processes(accelerator, {k: sum(v) / len(v) for k, v in stats.items()}),
                "explained_variance": explained_variance(old_values, returns, mask),
                "response_length": mask.sum(1).mean().item(),
                "eos_share": has_eos.float().mean().item(),
                "epochs": epochs_run,
                "lr": sched_policy.get_last_lr()[0],
            }
            if log is not None:
                log.log(step, **last)
            bar.update(
                bar.task_ids[0],
                advance=1,
                info=f"score {last['reward/score']:+.3f} kl {last['kl']:.3f} ent {last['entropy']:.2f}",
            )
            ckpt.after_step(step, cfg.steps, stop, log, checkpoint_contents)
    if log is not None:
        log.close()
    save_trained(accelerator, actor, tokenizer, out_dir / "model", part="policy")
    return {
        "wall_seconds": watch.seconds(),
        "steps": cfg.steps,
        "resumed_from": start_step or None,
        "final_score": round(last.get("reward/score", float("nan")), 4),
        "final_kl": round(last.get("kl", float("nan")), 4),
        "reward_gain": round(ctl.reward_gain, 4),
        "reward_bias": round(ctl.reward_bias, 4),
    }


def _micro_step(
    cfg: PPOConfig,
    actor: torch.nn.Module,
    critic: torch.nn.Module | None,
    mb: PromptResponseBatch,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: float,
    kl_coef: float,
    accelerator: Any,
    ptx_rows: torch.Tensor | None,
    ptx_share: float,
    last: bool,
) -> dict[str, float]:
    """Forward and backward of one micro-batch (`last`: of the optimiser step); token sums are divided
    by `n_tokens` (the mini-batch's tokens, divided by the number of processes when DDP averages their
    gradients)."""
    logits, values = actor(mb, cfg.temperature)
    logp = gather_logprobs(logits, mb.response_ids)
    if cfg.algorithm == "a2c":
        pg_loss = a2c_policy_loss(logp, advantages, mask, n_tokens)
        with torch.no_grad():
            log_ratio = logp - old_logp
            pg_stats = {
                "clipfrac": 0.0,
                "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
            }
    else:
        pg_loss, pg_stats = policy_loss(
            logp, old_logp, advantages, mask, cfg.clip_eps, cfg.dual_clip, n_tokens
        )
    entropy = entropy_from_logits(logits)
    loss = pg_loss
    if cfg.ent_coef:
        # Detail: entropy bonus, against collapsing onto one answer.
        loss = loss - cfg.ent_coef * ((entropy * mask).sum() / n_tokens)
    if cfg.kl_mode == "loss" and kl_coef:
        loss = loss + kl_coef * kl_loss(logp, ref_logp, mask, cfg.kl_estimator, n_tokens)
    clip_value = None if cfg.algorithm == "a2c" else cfg.clip_value
    if critic is None:
        vf_loss, vf_stats = value_loss(values, old_values, returns, mask, clip_value, n_tokens)
        loss = loss + cfg.vf_coef * vf_loss
    ptx_loss = None
    if ptx_rows is not None and len(ptx_rows):
        # PPO-ptx (InstructGPT): keep the pretraining distribution's likelihood up.
        ptx_logits = accelerator.unwrap_model(actor).pretraining_logits(ptx_rows)
        ptx_loss = completion_nll(ptx_logits, ptx_rows, torch.ones_like(ptx_rows))
        loss = loss + cfg.ptx_coef * ptx_share * ptx_loss
    backward(accelerator, actor, loss, last)
    if critic is not None:
        values = critic_values(critic, mb)
        vf_loss, vf_stats = value_loss(values, old_values, returns, mask, clip_value, n_tokens)
        backward(accelerator, critic, cfg.vf_coef * vf_loss, last)
    # Losses were divided by the mini-batch's tokens; report this micro-batch's own mean.
    to_mean = n_tokens / mask.sum().clamp(min=1.0).item()
    out = {
        "loss/policy": pg_loss.item() * to_mean,
        "loss/value": vf_loss.item() * to_mean,
        "entropy": masked_mean(entropy.detach(), mask).item(),
        **pg_stats,
        **vf_stats,
    }
    if ptx_loss is not None:
        out["loss/ptx"] = ptx_loss.item()
    return out
