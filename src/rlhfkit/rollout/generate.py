"""Sampling responses from a Hugging Face model (the default rollout backend).

The model runs in our own KV-cache loop (`rollout.decode`), not `generate`: the same
pure temperature sampling (`generation_config` spells it out for `generate` and vLLM) at
a fraction of `generate`'s per-token overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.rollout.batch import left_pad
from rlhfkit.rollout.decode import decode, sample_categorical
from rlhfkit.rollout.seeded import PerRowGumbel


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


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS: what was sampled. A row is padded only after
    its EOS; a pad token before it (pad != EOS) was sampled by the policy and stays, since the
    tokens after it were conditioned on it."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def token_picker(
    temperature: float, seeds: Sequence[int] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """How `decode` turns next-token logits into tokens: a sample at `temperature`, greedy at 0.

    With `seeds`, row i's randomness is its own generator's Gumbel noise (argmax of
    logits / T + Gumbel is a sample at T), so a row's tokens do not depend on its batch.
    """
    if seeds is not None:
        noise = PerRowGumbel(seeds, temperature)
        return lambda logits: noise(None, logits).argmax(-1)
    if temperature <= 0:
        return lambda logits: logits.argmax(-1)
    return lambda logits: sample_categorical(logits / temperature)


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
    seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Sample one response per prompt (token ids, ending with EOS unless truncated).

    With `seeds` (one per prompt, temperature > 0), each prompt samples from its own seed
    (`rlhfkit.rollout.seeded`): its response no longer depends on the rest of the batch.
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"sample_responses: {len(seeds)} seeds for {len(prompts)} prompts")
    was_training = model.training
    model.eval()  # dropout off while sampling: the log-probs must match the training forward
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        pick = token_picker(temperature, None if seeds is None else seeds[start : start + batch_size])
        new = decode(
            model,
            ids.to(device),
            mask.to(device),
            pick,
            eos_id=eos_id,
            pad_id=pad_id,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
        )
        responses.extend(cut_at_eos(row, eos_id) for row in new.tolist())
        if on_batch:
            on_batch(len(chunk))
    model.train(was_training)
    return responses


def sample_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """`sample_responses` decoded to text for people to read and databases to store: special tokens
    dropped, and a NUL byte (a byte-level tokenizer can sample one; PostgreSQL cannot store it, and
    the feedback store refuses it everywhere) as U+FFFD, the replacement character."""
    drawn = sample_responses(
        model,
        prompts,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        on_batch=on_batch,
    )
    return [t.replace("\x00", "\ufffd") for t in tokenizer.batch_decode(drawn, skip_special_tokens=True)]
