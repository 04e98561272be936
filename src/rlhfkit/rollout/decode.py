"""A KV-cache decoding loop for the HF backend, and an exact categorical sampler for it.

For a small model, `transformers.generate` spends a large share of each decode step outside
the model: logits processors, stopping criteria, input preparation, and `torch.multinomial`,
which on CPU costs about nine times an inverse-CDF draw from the same softmax (3.5 ms vs
0.4 ms for 16 rows of 4096 logits). The loop here keeps only what pure temperature sampling needs:
one prefill forward, then one forward per new token on the model's own KV cache, a
token chosen by `pick`, EOS bookkeeping, and a stop once every row has ended.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.rollout.logprobs import accepts_logits_to_keep, position_ids_from_mask


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One exact sample per row of softmax(`logits`) ([rows, vocab] -> [rows]), by inverse CDF.

    One uniform per row against the cumulative probabilities, instead of one random draw
    per vocabulary entry. The sum runs in float64 so its rounding is far below any
    probability that matters; a token with probability 0 (logit -inf) spans an empty
    interval and is never drawn.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_categorical needs [rows, vocab] logits, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    u = torch.rand(logits.size(0), 1, dtype=torch.float64, device=logits.device, generator=generator)
    # u < 1, yet u * total may round up to total; the largest float below it still lands on
    # the last token with probability > 0 (searchsorted right=True skips empty intervals).
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.size(1) - 1)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """New tokens after left-padded prompts, [rows, <= max_new_tokens]; pad_id after a row's EOS.

    `pick` maps the next-token logits ([rows, vocab], float32) to token ids ([rows]). EOS
    gets logit -inf until `min_new_tokens` tokens exist. The loop ends early once every
    row has produced EOS, so the result can be narrower than `max_new_tokens`.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    rows = input_ids.size(0)
    # Prefill: the LM head only at the last position when the model allows it.
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=True,
        **keep,
    )
    cache = out.past_key_values
    # The next position of each row: how many real tokens it has so far.
    position = attention_mask.long().sum(1, keepdim=True)
    ended = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if t < min_new_tokens:
            logits[:, eos_id] = float("-inf")
        token = pick(logits).masked_fill(ended, pad_id)
        new_tokens.append(token)
        ended = ended | (token == eos_id)
        if t == max_new_tokens - 1 or bool(ended.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=attention_mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        position = position + 1
    return torch.stack(new_tokens, dim=1)
