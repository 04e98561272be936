"""Padding token sequences into tensors: prompts on the left, responses on the right."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation continues from the right edge."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (at least one column, so empty responses still batch)."""
    width = max(width or 0, max((len(s) for s in seqs), default=0), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class PromptResponseBatch:
    """[left-padded prompt | right-padded response] with masks for the whole and the response."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R]

    @property
    def n_response(self) -> int:
        return self.response_mask.size(1)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.n_response :]

    def select(self, index: torch.Tensor | slice) -> PromptResponseBatch:
        """The rows at `index`."""
        return PromptResponseBatch(
            self.input_ids[index], self.attention_mask[index], self.response_mask[index]
        )


def join_prompt_response(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> PromptResponseBatch:
    """Batch prompts and their responses so response tokens sit in the same columns."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    r_ids, r_mask = right_pad(responses, pad_id)
    return PromptResponseBatch(torch.cat([p_ids, r_ids], dim=1), torch.cat([p_mask, r_mask], dim=1), r_mask)


def in_row_chunks(
    fn: Callable[[PromptResponseBatch], Any], batch: PromptResponseBatch, rows: int | None
) -> Any:
    """fn over `rows` rows of `batch` at a time, outputs concatenated along rows (None: one call).

    `fn` returns a tensor or a tuple of tensors (or None, kept as None), each with rows first.
    Chunks keep the batch's padded width, so every row sees the same positions as in one call.
    """
    if rows is not None and rows <= 0:
        raise ValueError(f"rows per chunk must be > 0, got {rows}")
    n = batch.input_ids.size(0)
    if rows is None or rows >= n:
        return fn(batch)
    parts = [fn(batch.select(slice(start, start + rows))) for start in range(0, n, rows)]
    if isinstance(parts[0], tuple):
        return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts, strict=True))
    return torch.cat(parts)
