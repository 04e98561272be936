"""Supervised fine-tuning on demonstrations; the loss covers completion tokens only."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhfkit.algos.sft import completion_nll
from rlhfkit.config import RunConfig
from rlhfkit.models.loading import check_cut_sequences, load_tokenizer, position_table
from rlhfkit.models.memory import held_model, print_memory_estimate
from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids
from rlhfkit.rollout.batch import right_pad
from rlhfkit.rollout.logprobs import position_ids_from_mask
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.distributed import prepare_trained, refuse_sharded_lora, save_trained
from rlhfkit.train.loop import (
    ShuffledBatches,
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)


def tokenize_demonstrations(
    tokenizer, demos: list[dict], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, loss mask) per demonstration: prompt tokens 0, completion tokens 1."""
    out = []
    for demo in demos:
        p = prompt_token_ids(tokenizer, demo["prompt"])
        c = completion_token_ids(tokenizer, demo["completion"])
        ids = (p + c)[:max_length]
        out.append((ids, ([0] * len(p) + [1] * len(c))[:max_length]))
    return out


def run_sft(
    config: RunConfig,
    init_path: Path | str,
    demos: list[dict],
    out_dir: Path,
    show_progress: bool = True,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Fine-tune the model at `init_path` on demonstrations; saves `out_dir/model`.

    `resume`, `fingerprint`: see `StageCheckpoints` (an interrupted run continued exactly).
    """
    cfg = config.sft
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    refuse_sharded_lora(accelerator, "sft", config.lora.enabled)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % n_proc:
        raise ValueError(f"sft.batch_size {cfg.batch_size} is not divisible by the {n_proc} processes")
    tokenizer = load_tokenizer(init_path)
    examples = tokenize_demonstrations(tokenizer, demos, cfg.max_length)
    lengths = [len(ids) for ids, _ in examples]
    check_cut_sequences(position_table(init_path), "sft.max_length", cfg.max_length, lengths, "demonstration")
    ckpt = StageCheckpoints("sft", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    model = ckpt.load_trained(init_path, config)
    print_memory_estimate(
        [held_model("policy", model, reads_vocab=True)],
        (cfg.batch_size // n_proc) * cfg.max_length,
        config.model.dtype,
        config.model.gradient_checkpointing,
        enabled=show_progress and accelerator.is_main_process,
    )
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer, scheduler = make_optimizer(model.parameters(), cfg.lr, total, round(cfg.warmup_ratio * total))
    # The schedule stays unprepared: accelerate would step a prepared one once per process per call
    # (it expects per-process batches); each of our steps is already one global batch.
    model, optimizer = prepare_trained(accelerator, model, optimizer, cfg.batch_size // n_proc)
    model.train()
    gen = torch.Generator().manual_seed(config.seed)
    # Every process draws the same global batch (same seed) and trains on its own rows of it.
    batches = ShuffledBatches(len(examples), cfg.batch_size, gen)
    ckpt.trains(tokenizer, model, optimizer, scheduler, gen, batches)
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    loss_value = float("nan")
    with (
        stop_on_signals() as stop,
        progress_bar("sft", total, show_progress and accelerator.is_main_process) as bar,
    ):
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, total + 1):
            rows = [examples[i] for i in batches.next()[rank::n_proc]]
            ids, attn = right_pad([r[0] for r in rows], tokenizer.pad_token_id)
            loss_mask, _ = right_pad([r[1] for r in rows], 0, width=ids.size(1))
            ids, attn, loss_mask = (t.to(accelerator.device) for t in (ids, attn, loss_mask))
            logits = model(
                input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False
            ).logits
            local_mean = completion_nll(logits, ids, loss_mask)
            # Normalise by the global batch's completion tokens: the gradient averaged over
            # processes is then exactly the one-process gradient of the whole batch.
            local_tokens = loss_mask[:, 1:].sum().float()
            global_tokens = accelerator.reduce(local_tokens.clone(), "sum").clamp(min=1.0)
            loss = local_mean * local_tokens / global_tokens * n_proc
            accelerator.backward(loss)
            apply_gradients(accelerator, model, optimizer, scheduler)
            loss_value = accelerator.reduce(loss.detach() / n_proc, "sum").item()
            if log is not None and (step % 5 == 0 or step == total):
                log.log(step, loss=loss_value, lr=scheduler.get_last_lr()[0])
            bar.update(bar.task_ids[0], advance=1, info=f"loss {loss_value:.3f}")
            ckpt.after_step(step, total, stop, log)
    if log is not None:
        log.close()
    save_trained(accelerator, model, tokenizer, out_dir / "model")
    return {
        "wall_seconds": watch.seconds(),
        "final_loss": round(loss_value, 4),
        "n_demonstrations": len(demos),
        "steps": total,
        "resumed_from": ckpt.start_step or None,
    }
