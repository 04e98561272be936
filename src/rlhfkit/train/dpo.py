"""DPO / IPO / conservative DPO stage: the SFT policy trained straight on preference pairs.

No reward model and no sampling: each step computes the sequence log-probs of the chosen
and rejected responses under the policy (one forward over both) and under the frozen
SFT reference, and applies `rlhfkit.algos.dpo.dpo_loss`. Reference log-probs are computed
once before training (`dpo.precompute_reference`, the reference is then freed) or live
per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhfkit.algos.dpo import dpo_loss, sequence_logprob
from rlhfkit.config import RunConfig
from rlhfkit.models.heads import inner_model, takes_pair_masks
from rlhfkit.models.loading import (
    check_cut_sequences,
    check_prompt_room,
    dropout_off,
    load_tokenizer,
    position_table,
)
from rlhfkit.models.lora import reference_of
from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids
from rlhfkit.rollout.batch import join_prompt_response, right_pad, shared_prefix_pairs
from rlhfkit.rollout.logprobs import accepts_logits_to_keep, response_logprobs
from rlhfkit.train.checkpoint import StageCheckpoints, stop_on_signals
from rlhfkit.train.distributed import (
    gather_lists,
    in_trained_precision,
    load_reference,
    mean_over_processes,
    prepare_trained,
    refuse_sharded_lora,
    require_divisible,
    save_trained,
    shard,
)
from rlhfkit.train.loop import (
    ShuffledBatches,
    Stopwatch,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    progress_bar,
)

# (prompt token ids, response token ids)
Example = tuple[list[int], list[int]]


def tokenize_example(tokenizer, prompt, completion: str, max_length: int) -> Example:
    """Prompt ids and completion ids (with EOS), the completion cut to fit `max_length`."""
    p = prompt_token_ids(tokenizer, prompt)
    c = completion_token_ids(tokenizer, completion)
    # The prompt is kept whole: a cut prompt would ask a different question.
    return p, c[: max(1, max_length - len(p))]


def sequence_logprobs(
    model, examples: Sequence[Example], pad_id: int, device, average: bool = False
) -> torch.Tensor:
    """log pi(response | prompt) of each example, summed (or averaged) over response tokens: [n]."""
    batch = join_prompt_response([e[0] for e in examples], [e[1] for e in examples], pad_id)
    ids, attn, mask = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
    token_logp = response_logprobs(model, ids, attn, batch.n_response)
    return sequence_logprob(token_logp, mask, average)


def pair_logprobs(
    model,
    chosen: Sequence[Example],
    rejected: Sequence[Example],
    pad_id: int,
    device,
    average: bool = False,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of the chosen and of the rejected examples of each pair: ([n], [n]).

    With `share_prompt` (and a model whose attention takes ready-made masks) in one forward over
    one row per pair that holds the prompt, and any start the two responses share, once
    (`shared_prefix_pairs`), prompts aligned on their last column so the LM head runs only from
    there on; otherwise over two rows per pair. The log-probs are the same either way."""
    if not (share_prompt and takes_pair_masks(model)):
        logp = sequence_logprobs(model, list(chosen) + list(rejected), pad_id, device, average)
        return logp[: len(chosen)], logp[len(chosen) :]
    prompts = [c[0] for c in chosen]
    if any(list(c[0]) != list(r[0]) for c, r in zip(chosen, rejected, strict=True)):
        raise ValueError("pair_logprobs: the chosen and rejected examples of a pair have different prompts")
    start = max(len(p) for p in prompts)  # every prompt ends at column start - 1
    layout = shared_prefix_pairs(
        [(c[0] + c[1], r[0] + r[1]) for c, r in zip(chosen, rejected, strict=True)],
        pad_id,
        lead=[start - len(p) for p in prompts],
    )
    inner = inner_model(model)
    width = layout.input_ids.size(1)
    # Column start - 1 predicts the first response token; the LM head runs from there on.
    keep = {"logits_to_keep": width - start + 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=layout.input_ids.to(device),
        attention_mask=layout.attention_mask(inner.config._attn_implementation, inner.dtype).to(device),
        position_ids=layout.position_ids.to(device),
        use_cache=False,
        **keep,
    )
    logits = out.logits[:, start - 1 - width :].float()
    normaliser = torch.logsumexp(logits, dim=-1)
    rows = torch.arange(len(prompts), device=device)[:, None]
    result = []
    for which, examples in ((0, chosen), (1, rejected)):
        tokens, valid = right_pad([e[1] for e in examples], pad_id)
        # The token at position len(prompt) + k is predicted at the column of position len(prompt) + k - 1.
        before = torch.tensor([len(p) for p in prompts])[:, None] + torch.arange(tokens.size(1)) - 1
        at = (layout.columns(which, before) - (start - 1)).clamp(0, logits.size(1) - 1).to(device)
        token_logp = logits[rows, at, tokens.to(device)] - normaliser.gather(1, at)
        result.append(sequence_logprob(token_logp, valid.to(device), average))
    return result[0], result[1]


@torch.no_grad()
def precompute_logprobs(
    model, examples: Sequence[Example], pad_id: int, device, average: bool = False, batch_size: int = 32
) -> torch.Tensor:
    """Sequence log-probs of every example under a frozen model, in batches: [n] on the CPU."""
    out = [
        sequence_logprobs(model, examples[s : s + batch_size], pad_id, device, average).cpu()
        for s in range(0, len(examples), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def precompute_pair_logprobs(
    model,
    chosen: Sequence[Example],
    rejected: Sequence[Example],
    pad_id: int,
    device,
    average: bool = False,
    share_prompt: bool = True,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logprobs` of every pair under a frozen model, in batches: ([n], [n]) on the CPU."""
    parts = [
        pair_logprobs(
            model,
            chosen[s : s + batch_size],
            rejected[s : s + batch_size],
            pad_id,
            device,
            average,
            share_prompt,
        )
        for s in range(0, len(chosen), batch_size)
    ]
    if not parts:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat([c.cpu() for c, _ in parts]), torch.cat([r.cpu() for _, r in parts])


def run_dpo(
    config: RunConfig,
    policy_path: Path | str,
    pairs: list[dict],
    out_dir: Path,
    show_progress: bool = True,
    *,
    resume: bool = False,
    fingerprint: str = "",
) -> dict:
    """Train the policy at `policy_path` on {prompt, chosen, rejected} pairs; saves `out_dir/model`.

    `resume`, `fingerprint`: see `StageCheckpoints` (an interrupted run continued exactly).
    """
    cfg = config.dpo
    if not pairs:
        raise ValueError("dpo: no preference pairs (is the preference file empty?)")
    watch = Stopwatch()
    accelerator = make_accelerator(config.seed, config.model.dtype)
    refuse_sharded_lora(accelerator, "dpo", config.lora.enabled)
    device = accelerator.device
    n_proc, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    # Several processes: each trains on its block of every batch (and precomputes its block of
    # the reference log-probs); pairs weigh equally, so the mean of the blocks' means is the batch's.
    require_divisible("dpo.batch_size", cfg.batch_size, n_proc)
    tokenizer = load_tokenizer(policy_path)
    pad = tokenizer.pad_token_id
    chosen = [tokenize_example(tokenizer, p["prompt"], p["chosen"], cfg.max_length) for p in pairs]
    rejected = [tokenize_example(tokenizer, p["prompt"], p["rejected"], cfg.max_length) for p in pairs]
    table = position_table(policy_path)
    check_prompt_room(table, tokenizer, [p["prompt"] for p in pairs], None, 1)
    lengths = [len(p) + max(len(c), len(r)) for (p, c), (_, r) in zip(chosen, rejected, strict=True)]
    check_cut_sequences(table, "dpo.max_length", cfg.max_length, lengths, "pair")
    # IPO regresses the margin to a fixed target, so it is defined on length-averaged log-probs
    # (as in its reference implementation); DPO uses sums, the sequence's real probability.
    average = cfg.loss_type == "ipo"
    ckpt = StageCheckpoints("dpo", out_dir, accelerator, cfg, resume=resume, fingerprint=fingerprint)
    policy = ckpt.load_trained(policy_path, config)
    # LoRA: the reference is the policy with its adapter off, not a second copy (resumed, too).
    reference = None if config.lora.enabled else load_reference(accelerator, policy_path, device)
    ref_chosen = ref_rejected = None
    if cfg.precompute_reference:
        own = shard(len(pairs), rank, n_proc)
        # In the policy's precision (its prepared forward autocasts): the log-ratios start at 0.
        frozen = in_trained_precision(accelerator, policy.to(device)) if reference is None else reference
        with accelerator.autocast(), reference_of(frozen) as ref:
            ref_chosen, ref_rejected = precompute_pair_logprobs(
                ref, chosen[own], rejected[own], pad, device, average, cfg.share_prompt
            )
        ref_chosen, ref_rejected = (
            torch.cat(gather_lists(accelerator, [t])) for t in (ref_chosen, ref_rejected)
        )
        reference = None  # one model fewer in memory for the whole run
    total = max(1, round(cfg.epochs * math.ceil(len(pairs) / cfg.batch_size)))
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg.lr, total, round(cfg.warmup_ratio * total))
    # The schedule stays unprepared: accelerate would step a prepared one once per process per call
    # (it expects per-process batches); each of our steps is already one global batch.
    policy, optimizer = prepare_trained(accelerator, policy, optimizer, cfg.batch_size // n_proc)
    # Dropout off: the implicit reward compares policy and reference as the same function.
    dropout_off(policy)
    gen = torch.Generator().manual_seed(config.seed)
    batches = ShuffledBatches(len(pairs), cfg.batch_size, gen)
    ckpt.trains(tokenizer, policy, optimizer, scheduler, gen, batches)
    log = ckpt.begin(config.seed, out_dir / "metrics.jsonl")
    last: dict[str, float] = {}
    bar_name = f"dpo ({cfg.loss_type})"
    with stop_on_signals() as stop, progress_bar(bar_name, total, show_progress and main) as bar:
        bar.update(bar.task_ids[0], completed=ckpt.start_step)
        for step in range(ckpt.start_step + 1, total + 1):
            idx = batches.next()
            idx = idx[shard(len(idx), rank, n_proc)]
            batch_chosen, batch_rejected = [chosen[i] for i in idx], [rejected[i] for i in idx]
            logp_c, logp_r = pair_logprobs(
                policy, batch_chosen, batch_rejected, pad, device, average, cfg.share_prompt
            )
            if ref_chosen is not None:
                ref_c, ref_r = ref_chosen[idx].to(device), ref_rejected[idx].to(device)
            else:
                live = accelerator.unwrap_model(policy) if reference is None else reference
                with accelerator.autocast(), reference_of(live) as ref_model:
                    ref_c, ref_r = pair_logprobs(
                        ref_model, batch_chosen, batch_rejected, pad, device, average, cfg.share_prompt
                    )
            loss, stats = dpo_loss(logp_c, logp_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing)
            accelerator.backward(loss)
            apply_gradients(accelerator, policy, optimizer, scheduler)
            last = {
                **mean_over_processes(accelerator, {"loss": loss.item(), **stats}),
                "lr": scheduler.get_last_lr()[0],
            }
            if log is not None:
                log.log(step, **last)
            bar.update(
                bar.task_ids[0], advance=1, info=f"loss {last['loss']:.3f} acc {last['reward/accuracy']:.2f}"
            )
            ckpt.after_step(step, total, stop, log)
    if log is not None:
        log.close()
    save_trained(accelerator, policy, tokenizer, out_dir / "model")
    return {
        "wall_seconds": watch.seconds(),
        "steps": total,
        "resumed_from": ckpt.start_step or None,
        "n_pairs": len(pairs),
        "loss_type": cfg.loss_type,
        "final_loss": round(last.get("loss", float("nan")), 4),
        "final_reward_accuracy": round(last.get("reward/accuracy", float("nan")), 4),
        "final_reward_margin": round(last.get("reward/margin", float("nan")), 4),
    }
