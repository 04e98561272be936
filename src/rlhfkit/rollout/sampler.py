"""One entry point for sampling responses, whichever backend `rollout.backend` names.

The RL loops (PPO, GRPO/RLOO, best-of-n, expert iteration) call the sampler returned by
`make_sampler` instead of a backend directly, so they do not care which one runs: both
return, per prompt, the response token ids ending with EOS unless truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.config import RolloutConfig
from rlhfkit.rollout.generate import sample_responses


class Sampler(Protocol):
    """Samples one response per prompt from the current weights of a policy."""

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        min_new_tokens: int = 0,
    ) -> list[list[int]]: ...


def make_sampler(
    rollout: RolloutConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0
) -> Sampler:
    """The sampler of `rollout.backend` for `model` (the unwrapped policy the loop trains).

    `vllm` starts its engine here, so a missing install or GPU fails before any sampling.
    """
    if rollout.backend == "vllm":
        from rlhfkit.rollout.vllm import VLLMSampler

        return VLLMSampler(rollout, model, tokenizer, seed=seed)
    return partial(
        sample_responses,
        model,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=rollout.batch_size,
    )
