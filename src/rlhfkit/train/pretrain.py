"""Stage 0: train a tokenizer and pretrain a tiny causal LM from scratch on a corpus."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.algos.sft import completion_nll
from rlhfkit.config import RunConfig
from rlhfkit.models.loading import (
    check_cut_sequences,
    learned_position_table,
    load_causal_lm,
    load_tokenizer,
    save_model,
    tiny_causal_lm,
)
from rlhfkit.models.tokenizer import document_token_ids, train_tokenizer
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.loop import (
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)


def pack_blocks(token_lists: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate documents (each already ending in EOS) and cut into equal blocks."""
    flat = [t for tokens in token_lists for t in tokens]
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus has {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.tensor(flat[: n_blocks * block_size]).view(n_blocks, block_size)


def run_pretrain(
    config: RunConfig,
    corpus: list[str],
    out_dir: Path,
    show_progress: bool = True,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Tokenizer + random-init model + next-token training; saves `out_dir/model`. `resume` and
    `fingerprint`: see `StageCheckpoints` (a resumed run takes the checkpoint's tokenizer too)."""
    cfg, mcfg = config.pretrain, config.model
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed)
    ckpt = StageCheckpoints("pretrain", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    if ckpt.path is not None:
        tokenizer, model = load_tokenizer(ckpt.path), load_causal_lm(ckpt.path)
    else:
        tokenizer = train_tokenizer(corpus, vocab_size=mcfg.vocab_size, superwords=mcfg.superwords)
        model = tiny_causal_lm(
            tokenizer,
            arch=mcfg.arch,
            hidden_size=mcfg.hidden_size,
            num_layers=mcfg.num_layers,
            num_heads=mcfg.num_heads,
            intermediate_size=mcfg.intermediate_size,
            max_positions=mcfg.max_positions,
            seed=config.seed,
        )
    table = learned_position_table(model, f"the tiny {mcfg.arch} model (model.max_positions)")
    check_cut_sequences(table, "pretrain.block_size", cfg.block_size, [cfg.block_size], "block")
    blocks = pack_blocks(document_token_ids(tokenizer, corpus), cfg.block_size)
    optimizer, scheduler = make_optimizer(
        model.parameters(), cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    gen = torch.Generator().manual_seed(config.seed)
    ckpt.trains(tokenizer, model, optimizer, scheduler, gen)
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    loss_value = float("nan")
    ones = torch.ones(cfg.batch_size, cfg.block_size, dtype=torch.long, device=accelerator.device)
    with stop_on_signals() as stop, progress_bar("pretrain", cfg.steps, show_progress) as bar:
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, cfg.steps + 1):
            idx = torch.randint(len(blocks), (cfg.batch_size,), generator=gen)
            batch = blocks[idx].to(accelerator.device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = completion_nll(logits, batch, ones)
            accelerator.backward(loss)
            apply_gradients(accelerator, model, optimizer, scheduler)
            loss_value = loss.item()
            if log is not None and (step % 10 == 0 or step == cfg.steps):
                log.log(step, loss=loss_value, lr=scheduler.get_last_lr()[0])
            bar.update(bar.task_ids[0], advance=1, info=f"loss {loss_value:.3f}")
            ckpt.after_step(step, cfg.steps, stop, log)
    if log is not None:
        log.close()
    save_model(accelerator.unwrap_model(model), tokenizer, out_dir / "model")
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "wall_seconds": watch.seconds(),
        "final_loss": round(loss_value, 4),
        "resumed_from": ckpt.start_step or None,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "n_docs": len(corpus),
        "n_tokens": int(blocks.numel()),
    }
