"""Sampling responses with Hugging Face `generate` (the default rollout backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel

from rlhfkit.rollout.batch import left_pad


def generation_config(
    eos_id: int, pad_id: int, max_new_tokens: int, temperature: float, min_new_tokens: int = 0
) -> GenerationConfig:
    """Pure sampling at `temperature` (no top-k/top-p: PPO's log-probs assume the full softmax).

    min_new_tokens suppresses EOS until that many tokens exist (fixed-length responses).
    """
    if temperature <= 0:
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def cut_at_eos(tokens: Sequence[int], eos_id: int, pad_id: int) -> list[int]:
    """Tokens up to and including the first EOS, with padding removed."""
    out = []
    for t in tokens:
        if t == eos_id:
            out.append(t)
            break
        if t != pad_id or pad_id == eos_id:
            out.append(t)
    return out


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Sample one response per prompt (token ids, ending with EOS unless truncated)."""
    was_training = model.training
    model.eval()  # dropout off while sampling: the log-probs must match the training forward
    config = generation_config(eos_id, pad_id, max_new_tokens, temperature, min_new_tokens)
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        responses.extend(cut_at_eos(row.tolist(), eos_id, pad_id) for row in out[:, ids.size(1) :])
        if on_batch:
            on_batch(len(chunk))
    model.train(was_training)
    return responses
