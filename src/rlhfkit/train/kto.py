"""KTO stage: the SFT policy trained on unpaired thumbs-up/down examples.

Each example i gets a fixed mismatched partner j != i (a seeded derangement); the
log-ratio of (prompt_i, completion_j) estimates the KL reference point z0 of the batch,
as in Ethayarajh et al. 2024. The math is `rlhfkit.algos.kto.kto_loss`. With LoRA (`lora.enabled`)
the reference is the policy with its adapter off, not a second copy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhfkit.algos.kto import kto_loss, mismatched_partners
from rlhfkit.config import RunConfig
from rlhfkit.models.loading import (
    check_cut_sequences,
    check_prompt_room,
    dropout_off,
    load_tokenizer,
    position_table,
)
from rlhfkit.models.lora import reference_of
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.distributed import (
    gather_lists,
    gather_rows,
    in_trained_precision,
    load_reference,
    prepare_trained,
    refuse_sharded_lora,
    require_divisible,
    save_trained,
    shard,
)
from rlhfkit.train.dpo import precompute_logprobs, sequence_logprobs, tokenize_example
from rlhfkit.train.loop import (
    ShuffledBatches,
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)


def unpaired_from_pairs(pairs: list[dict]) -> list[dict]:
    """Thumbs data from preference pairs: each chosen response up, each rejected one down."""
    out = []
    for pair in pairs:
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out


def run_kto(
    config: RunConfig,
    policy_path: Path | str,
    examples: list[dict],
    out_dir: Path,
    show_progress: bool = True,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Train the policy on {prompt, completion, label} examples; saves `out_dir/model`.

    `resume`, `fingerprint`: see `StageCheckpoints` (an interrupted run continued exactly).
    """
    cfg = config.kto
    if len(examples) < 2:
        raise ValueError(f"kto: needs at least 2 examples, got {len(examples)}")
    if cfg.batch_size < 2:
        raise ValueError("kto.batch_size must be >= 2: the KL reference point needs other examples")
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    refuse_sharded_lora(accelerator, "kto", config.lora.enabled)
    device = accelerator.device
    n_proc, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    # Several processes: each trains on its block of every batch; the reference point z0 is a
    # statistic of the whole batch, so the mismatched pairs' log-ratios are gathered for it.
    require_divisible("kto.batch_size", cfg.batch_size, n_proc)
    tokenizer = load_tokenizer(policy_path)
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(config.seed)
    rows = [tokenize_example(tokenizer, e["prompt"], e["completion"], cfg.max_length) for e in examples]
    labels = torch.tensor([bool(e["label"]) for e in examples])
    partners = mismatched_partners(len(examples), gen)
    # (prompt of i, completion of its partner): a response that was never meant for this prompt.
    kl_rows = [
        tokenize_example(tokenizer, examples[i]["prompt"], examples[j]["completion"], cfg.max_length)
        for i, j in enumerate(partners.tolist())
    ]
    table = position_table(policy_path)
    check_prompt_room(table, tokenizer, [e["prompt"] for e in examples], None, 1)
    lengths = [max(sum(map(len, row)), sum(map(len, kl))) for row, kl in zip(rows, kl_rows, strict=True)]
    check_cut_sequences(table, "kto.max_length", cfg.max_length, lengths, "example")
    ckpt = StageCheckpoints("kto", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    policy = ckpt.load_trained(policy_path, config)
    # LoRA: the reference is the policy with its adapter off, not a second copy (resumed, too).
    reference = None if config.lora.enabled else load_reference(accelerator, policy_path, device)
    ref_logp = ref_kl_logp = None
    if cfg.precompute_reference:
        # Each process computes its block; gathered, every process holds them all.
        own = shard(len(rows), rank, n_proc)
        # In the policy's precision (its prepared forward autocasts): the log-ratios start at 0.
        frozen = in_trained_precision(accelerator, policy.to(device)) if reference is None else reference
        with accelerator.autocast(), reference_of(frozen) as ref:
            ref_logp, ref_kl_logp = (
                torch.cat(gather_lists(accelerator, [precompute_logprobs(ref, part[own], pad, device)]))
                for part in (rows, kl_rows)
            )
        reference = None  # one model fewer in memory for the whole run
    total = max(1, round(cfg.epochs * math.ceil(len(rows) / cfg.batch_size)))
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg.lr, total, round(cfg.warmup_ratio * total))
    # The schedule stays unprepared: a prepared one would step once per process at each step.
    policy, optimizer = prepare_trained(accelerator, policy, optimizer, cfg.batch_size // n_proc)
    # Dropout off by zeroing it, as in DPO: policy and reference must be the same function, and
    # eval() would also switch gradient checkpointing off.
    dropout_off(policy)
    batches = ShuffledBatches(len(rows), cfg.batch_size, gen)
    # (The mismatched partners above came first from `gen`; a resume draws them again, then restores.)
    ckpt.trains(tokenizer, policy, optimizer, scheduler, gen, batches)
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    last: dict[str, float] = {}
    with stop_on_signals() as stop, progress_bar("kto", total, show_progress and main) as bar:
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, total + 1):
            batch = batches.next()
            idx = batch[shard(len(batch), rank, n_proc)]
            logp = sequence_logprobs(policy, [rows[i] for i in idx], pad, device)
            with torch.no_grad():
                # z0 is detached inside the loss anyway; no graph needed for the KL pairs.
                kl_logp = sequence_logprobs(policy, [kl_rows[i] for i in idx], pad, device)
                if ref_logp is not None:
                    ref, ref_kl = ref_logp[idx].to(device), ref_kl_logp[idx].to(device)
                else:
                    live = accelerator.unwrap_model(policy) if reference is None else reference
                    with accelerator.autocast(), reference_of(live) as ref_model:
                        ref = sequence_logprobs(ref_model, [rows[i] for i in idx], pad, device)
                        ref_kl = sequence_logprobs(ref_model, [kl_rows[i] for i in idx], pad, device)
                # The whole batch's log-probs: z0 is a statistic of the batch, not of a block.
                all_logp, all_ref, all_kl, all_ref_kl = gather_rows(
                    accelerator, logp.detach(), ref, kl_logp, ref_kl
                )
            weights = (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
            # Equal blocks: DDP's average of the blocks' mean losses is the batch's mean loss.
            loss, _ = kto_loss(logp, ref, labels[idx].to(device), all_kl, all_ref_kl, *weights)
            accelerator.backward(loss)
            apply_gradients(accelerator, policy, optimizer, scheduler)
            # Logged: the loss and statistics of the whole batch (on one process, the same numbers).
            batch_loss, stats = kto_loss(
                all_logp, all_ref, labels[batch].to(device), all_kl, all_ref_kl, *weights
            )
            last = {"loss": batch_loss.item(), **stats, "lr": scheduler.get_last_lr()[0]}
            if log is not None:
                log.log(step, **last)
            bar.update(
                bar.task_ids[0],
                advance=1,
                info=f"loss {last['loss']:.3f} z0 {stats['kl_reference_point']:.3f}",
            )
            ckpt.after_step(step, total, stop, log)
    if log is not None:
        log.close()
    save_trained(accelerator, policy, tokenizer, out_dir / "model")
    n_up = int(labels.sum())
    return {
        "wall_seconds": watch.seconds(),
        "steps": total,
        "resumed_from": ckpt.start_step or None,
        "n_examples": len(examples),
        "n_desirable": n_up,
        "n_undesirable": len(examples) - n_up,
        "final_loss": round(last.get("loss", float("nan")), 4),
        "final_kl_reference_point": round(last.get("kl_reference_point", float("nan")), 4),
    }
