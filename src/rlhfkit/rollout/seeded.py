"""Sampling where each prompt draws from its own seed (Gumbel-max inside greedy `generate`).

Plain sampling draws every row's noise from one RNG, so a response depends on which other
prompts share its batch: the number of processes, the process a prompt lands on and
`rollout.batch_size` all change it. Here row i's noise comes from a generator seeded with
`seeds[i]`, and argmax(logits / T + Gumbel noise) is an exact sample of softmax(logits / T):
a response then depends only on its prompt, its seed and the weights (up to float ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Seeds are mixed into one 63-bit integer; these odd multipliers spread (run, step, row).
_STEP_MIX = 0x9E3779B97F4A7C15
_ROW_MIX = 0xBF58476D1CE4E5B9
_SEED_MASK = (1 << 63) - 1


def prompt_seeds(run_seed: int, step: int, n: int) -> list[int]:
    """One seed per position 0..n-1 of step `step`'s global rollout batch."""
    if n < 0:
        raise ValueError(f"prompt_seeds: n must be >= 0, got {n}")
    base = (run_seed * _STEP_MIX + step) & _SEED_MASK
    return [(base * _ROW_MIX + i) & _SEED_MASK for i in range(n)]


def gumbel_noise(generator: torch.Generator, size: int, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel samples, -log(-log(u)), with u kept inside (0, 1)."""
    u = torch.rand(size, generator=generator, device=device)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


class PerRowGumbel:
    """A `generate` logits processor: scores / temperature + Gumbel noise from each row's generator.

    Used with greedy decoding, the argmax is a sample at `temperature` whose randomness is the
    row's own. Masked tokens (-inf, e.g. EOS before min_new_tokens) stay impossible.
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        if temperature <= 0:
            raise ValueError(
                f"per-prompt seeds need sampling (temperature > 0), got temperature {temperature}"
            )
        self.seeds, self.temperature = [int(s) for s in seeds], temperature
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.size(0) != len(self.seeds):
            raise ValueError(f"PerRowGumbel: {len(self.seeds)} seeds for a batch of {scores.size(0)} rows")
        if not self.generators:
            # Made on the first call, on the device the logits live on.
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        noise = torch.stack([gumbel_noise(g, scores.size(1), scores.device) for g in self.generators])
        return scores / self.temperature + noise.to(scores.dtype)
