"""Reward model: the SFT transformer with a scalar head, Bradley-Terry loss on preference pairs.

It learns only from the pairs it is given (exported from the feedback store); it has no
access to any gold judge.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.algos.reward import bradley_terry_loss, pair_correct, soft_label_terms
from rlhfkit.config import RunConfig
from rlhfkit.models.heads import ReadPositions, TokenValues, pair_scores, sequence_scores, takes_pair_masks
from rlhfkit.models.loading import check_cut_sequences, load_tokenizer, position_table
from rlhfkit.models.memory import held_model, print_memory_estimate
from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids
from rlhfkit.rollout.batch import right_pad, shared_prefix_pairs
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


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) for each {prompt, chosen, rejected} pair."""
    out = []
    for pair in pairs:
        p = prompt_token_ids(tokenizer, pair["prompt"])
        out.append(
            (
                (p + completion_token_ids(tokenizer, pair["chosen"]))[:max_length],
                (p + completion_token_ids(tokenizer, pair["rejected"]))[:max_length],
            )
        )
    return out


def pair_margins(pairs: list[dict], mode: str) -> list[float]:
    """Each pair's soft-label margin in [0, 1]; a pair without one is a hard label.

    A hard label has margin 0 as a Bradley-Terry margin and 1 (no smoothing) as a
    confidence, so the default depends on `mode`.
    """
    default = 1.0 if mode == "smoothing" else 0.0
    margins = []
    for i, pair in enumerate(pairs):
        margin = pair.get("margin")
        if margin is None:
            margins.append(default)
        elif mode == "smoothing" and not 0.0 <= margin <= 1.0:
            raise ValueError(f"pair {i}: margin {margin} must be in [0, 1] for rm.soft_labels=smoothing")
        else:
            margins.append(float(margin))
    return margins


def score_pairs(
    model,
    rows: list[tuple[list[int], list[int]]],
    pad_id: int,
    device,
    share_prompt: bool = True,
    reads: ReadPositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, in one forward over both.

    With `share_prompt` (and a model whose attention takes ready-made masks), each pair is one row
    whose common prefix, the prompt at least, is computed once (`shared_prefix_pairs`); otherwise
    chosen and rejected are separate padded rows. The rewards are the same either way. `reads`:
    see `ReadPositions` (the last block's MLP only where the rewards are read; shared rows only)."""
    if share_prompt and takes_pair_masks(model):
        scores = pair_scores(model, shared_prefix_pairs(rows, pad_id), device, reads)
        return scores[:, 0], scores[:, 1]
    ids, mask = right_pad([r[0] for r in rows] + [r[1] for r in rows], pad_id)
    scores = sequence_scores(model, ids.to(device), mask.to(device))
    return scores[: len(rows)], scores[len(rows) :]


@torch.no_grad()
def pair_accuracy(
    model,
    rows,
    pad_id: int,
    device,
    batch_size: int = 64,
    share_prompt: bool = True,
    reads: ReadPositions | None = None,
) -> float:
    """Share of pairs whose chosen response gets the higher reward, a tie counting half (`pair_correct`)."""
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chosen, rejected = score_pairs(
            model, rows[start : start + batch_size], pad_id, device, share_prompt, reads
        )
        correct += pair_correct(chosen, rejected).sum().item()
    model.train(was_training)
    return correct / len(rows)


def run_rm(
    config: RunConfig,
    init_path: Path | str,
    pairs: list[dict],
    out_dir: Path,
    show_progress: bool = True,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Train a reward model from `init_path` on `pairs`; saves `out_dir/model`.

    `resume`, `fingerprint`: see `StageCheckpoints` (an interrupted run continued exactly).
    """
    watch = Stopwatch()
    _, _, summary = train_reward_model(
        config,
        init_path,
        pairs,
        out_dir,
        show_progress,
        save_to=out_dir / "model",
        resume=resume,
        fingerprint=fingerprint,
    )
    return {**summary, "wall_seconds": watch.seconds()}


def train_reward_model(
    config: RunConfig,
    init_path: Path | str,
    pairs: list[dict],
    out_dir: Path,
    show_progress: bool = True,
    save_to: Path | None = None,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Train a reward model from `init_path` on `pairs`: (the model, its tokenizer, a summary).

    Nothing is saved but `out_dir/metrics.jsonl`, and the model in `save_to` when given (saved
    here, where its weights are gathered if FSDP or ZeRO-3 sharded them: the returned model
    then holds this process's shards only). Checkpoints go to `out_dir/checkpoints` (`run_rm`).
    """
    cfg = config.rm
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    refuse_sharded_lora(accelerator, "rm", config.lora.enabled)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % n_proc:
        raise ValueError(f"rm.batch_size {cfg.batch_size} is not divisible by the {n_proc} processes")
    tokenizer = load_tokenizer(init_path)
    rows = tokenize_pairs(tokenizer, pairs, cfg.max_length)
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected in rows]
    check_cut_sequences(position_table(init_path), "rm.max_length", cfg.max_length, lengths, "pair")
    ckpt = StageCheckpoints("rm", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    model = ckpt.load_trained(init_path, config, "reward", tokenizer.pad_token_id)
    print_memory_estimate(
        [held_model("reward model", model, reads_vocab=False)],
        2 * (cfg.batch_size // n_proc) * cfg.max_length,  # chosen and rejected in one forward
        config.model.dtype,
        config.model.gradient_checkpointing,
        enabled=show_progress and accelerator.is_main_process,
    )
    margins = pair_margins(pairs, cfg.soft_labels)
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(rows), generator=gen).tolist()
    n_val = int(cfg.val_share * len(rows))
    val = [rows[i] for i in perm[:n_val]]
    train = [rows[i] for i in perm[n_val:]]
    train_margins = [margins[i] for i in perm[n_val:]]
    if not train:
        raise ValueError("reward model: no training pairs (is the preference file empty?)")
    total = max(1, round(cfg.epochs * math.ceil(len(train) / cfg.batch_size)))
    optimizer, scheduler = make_optimizer(model.parameters(), cfg.lr, total, round(cfg.warmup_ratio * total))
    # Prepared inside TokenValues so DDP/FSDP see the forward that computes the scores.
    # The schedule stays unprepared: accelerate would step a prepared one once per process per call
    # (it expects per-process batches); each of our steps is already one global batch.
    model, optimizer = prepare_trained(accelerator, TokenValues(model), optimizer, cfg.batch_size // n_proc)
    model.train()
    # Every process draws the same global batch (same seed) and trains on its equal share of it,
    # so the mean of the processes' mean losses is the global batch's mean loss.
    batches = ShuffledBatches(len(train), cfg.batch_size, gen)
    ckpt.trains(tokenizer, model, optimizer, scheduler, gen, batches, part="model")
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    eval_every = max(1, total // 8)

    def val_accuracy(reads: ReadPositions | None = None) -> float:
        return pair_accuracy(
            model, val, tokenizer.pad_token_id, accelerator.device, share_prompt=cfg.share_prompt, reads=reads
        )

    with (
        stop_on_signals() as stop,
        progress_bar("reward model", total, show_progress and accelerator.is_main_process) as bar,
        ReadPositions(model) as reads,
    ):
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, total + 1):
            picked = batches.next()[rank::n_proc]
            batch = [train[i] for i in picked]
            chosen, rejected = score_pairs(
                model, batch, tokenizer.pad_token_id, accelerator.device, cfg.share_prompt, reads
            )
            margin, smoothing = soft_label_terms(
                torch.tensor([train_margins[i] for i in picked], device=chosen.device), cfg.soft_labels
            )
            loss = bradley_terry_loss(chosen, rejected, margin, smoothing)
            accelerator.backward(loss)
            apply_gradients(accelerator, model, optimizer, scheduler)
            both = torch.stack([loss.detach(), pair_correct(chosen.detach(), rejected.detach()).mean()])
            both = accelerator.reduce(both, "mean")
            row = {"loss": both[0].item(), "accuracy": both[1].item()}
            if val and (step % eval_every == 0 or step == total):
                row["val_accuracy"] = val_accuracy(reads)
            if log is not None:
                log.log(step, **row)
            bar.update(bar.task_ids[0], advance=1, info=f"loss {row['loss']:.3f}")
            ckpt.after_step(step, total, stop, log)
    if log is not None:
        log.close()
    val_acc = val_accuracy() if val else None
    if save_to is not None:
        save_trained(accelerator, model, tokenizer, save_to, part="model")
    accelerator.wait_for_everyone()
    summary = {
        "wall_seconds": watch.seconds(),
        "n_train_pairs": len(train),
        "n_val_pairs": len(val),
        "val_accuracy": None if val_acc is None else round(val_acc, 4),
        "steps": total,
        "resumed_from": ckpt.start_step or None,
    }
    return accelerator.unwrap_model(model).model, tokenizer, summary
