"""Padding token sequences into tensors: prompts on the left, responses on the right."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.rollout.logprobs import position_ids_from_mask


def long_rows(flat: list[int], n_rows: int) -> torch.Tensor:
    """`flat` (row after row, every row as wide) as an [n_rows, width] long tensor. Through a
    buffer: torch.tensor on a Python list costs about 0.3 us an element, and padding runs on every
    training step."""
    if not flat:
        return torch.zeros((n_rows, 0), dtype=torch.long)
    return torch.frombuffer(array("q", flat), dtype=torch.long).view(n_rows, -1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation continues from the right edge."""
    width = max(len(s) for s in seqs)
    ids: list[int] = []
    mask: list[int] = []
    for s in seqs:
        ids += [pad_id] * (width - len(s)) + list(s)
        mask += [0] * (width - len(s)) + [1] * len(s)
    return long_rows(ids, len(seqs)), long_rows(mask, len(seqs))


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (at least one column, so empty responses still batch)."""
    width = max(width or 0, max((len(s) for s in seqs), default=0), 1)
    ids: list[int] = []
    mask: list[int] = []
    for s in seqs:
        ids += list(s) + [pad_id] * (width - len(s))
        mask += [1] * len(s) + [0] * (width - len(s))
    return long_rows(ids, len(seqs)), long_rows(mask, len(seqs))


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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SharedPrefixPairs:
    """Pairs of sequences (a, b), one pair per padded row: the tokens the two share at the start,
    once, then the rest of a, then the rest of b, whose positions continue from the shared part.
    A causal model reads each pair as the two sequences it is: b's tokens attend to the shared part
    and to b, never to a (`allowed`). The shared part is computed once instead of twice."""

    input_ids: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W]
    allowed: torch.Tensor  # [B, 1, W, W] bool: query (dim 2) may attend to key (dim 3)
    lead: torch.Tensor  # [B]: padding columns before each row's tokens
    shared: torch.Tensor  # [B]: how many tokens a and b share at the start
    a_length: torch.Tensor  # [B]
    b_length: torch.Tensor  # [B]

    def attention_mask(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as transformers' attention `kind` takes a ready-made mask."""
        return ready_made_mask(self.allowed, kind, dtype)

    def columns(self, which: int, positions: torch.Tensor) -> torch.Tensor:
        """The columns holding the tokens at `positions` ([B, n], positions within each row's
        sequence) of a (`which` 0) or of b (`which` 1)."""
        lead, shared, a_length = self.lead[:, None], self.shared[:, None], self.a_length[:, None]
        if which == 0:
            return lead + positions
        return lead + torch.where(positions < shared, positions, a_length + positions - shared)

    @property
    def last(self) -> torch.Tensor:
        """[B, 2]: the columns of a's and of b's last token."""
        return torch.cat(
            [self.columns(0, self.a_length[:, None] - 1), self.columns(1, self.b_length[:, None] - 1)], dim=1
        )


def shared_prefix_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, lead: Sequence[int] | None = None
) -> SharedPrefixPairs:
    """Lay out each (a, b) pair in one row sharing their common prefix (see `SharedPrefixPairs`),
    after `lead[i]` padding columns (none by default) and padded on the right to one width.

    Either sequence may be a prefix of the other (or equal to it): its last token then lies in the
    shared part. Padding columns attend only to themselves, so no row of the mask is empty."""
    lead = [0] * len(pairs) if lead is None else list(lead)
    shared_lengths = []
    for a, b in pairs:
        if not a or not b:
            raise ValueError("shared_prefix_pairs: a sequence of a pair is empty")
        shared_lengths.append(common_prefix_length(a, b))
    width = max(n + len(a) + len(b) - s for (a, b), n, s in zip(pairs, lead, shared_lengths, strict=True))
    # Built as flat lists, made tensors once: this runs every training step of rm and DPO.
    rows: list[int] = []
    positions: list[int] = []
    parts: list[int] = []
    for (a, b), pad_before, shared in zip(pairs, lead, shared_lengths, strict=True):
        tail = width - pad_before - len(a) - len(b) + shared
        rows += [pad_id] * pad_before + list(a) + list(b[shared:]) + [pad_id] * tail
        positions += [0] * pad_before + list(range(len(a))) + list(range(shared, len(b))) + [0] * tail
        # -1: padding, 0: shared, 1: a's rest, 2: b's rest
        parts += (
            [-1] * pad_before + [0] * shared + [1] * (len(a) - shared) + [2] * (len(b) - shared) + [-1] * tail
        )
    ids, pos, part = (long_rows(x, len(pairs)) for x in (rows, positions, parts))
    return SharedPrefixPairs(
        ids,
        pos,
        allowed_by_part(part),
        torch.tensor(lead, dtype=torch.long),
        torch.tensor(shared_lengths, dtype=torch.long),
        torch.tensor([len(a) for a, _ in pairs], dtype=torch.long),
        torch.tensor([len(b) for _, b in pairs], dtype=torch.long),
    )


def ready_made_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as transformers' attention `kind` takes a ready-made one: as it is for "sdpa",
    additive (0 or the dtype's minimum) for "eager"."""
    if kind == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def allowed_by_part(part: torch.Tensor) -> torch.Tensor:
    """[B, 1, W, W] bool attention mask of rows whose columns belong to parts ([B, W]): -1 padding,
    0 the shared start, k > 0 the rest of the k-th sequence. A token attends, causally, to the
    shared start and to its own sequence; padding attends only to itself, so no row is empty."""
    width = part.size(1)
    column = torch.arange(width, device=part.device)
    causal = column[:, None] >= column[None, :]
    q_part, k_part = part[:, :, None], part[:, None, :]
    allowed = causal & (q_part >= 0) & (k_part >= 0) & ((k_part == 0) | (k_part == q_part))
    allowed |= (part < 0)[:, :, None] & torch.eye(width, dtype=torch.bool, device=part.device)
    return allowed.unsqueeze(1)


@dataclass
class SharedPromptGroups:
    """The rows of a `PromptResponseBatch` that share a prompt, as one row per prompt: the prompt
    once (its columns as in the batch), then each row's response in a slot of `n_response`
    columns, positions continuing from the prompt. Each response attends to the prompt and to
    itself (`allowed`), so every response token sees what it sees in its own row, and the prompt
    is computed once instead of once per response."""

    input_ids: torch.Tensor  # [N, W]: N prompts; W = P prompt columns + K slots of R columns
    position_ids: torch.Tensor  # [N, W]
    allowed: torch.Tensor  # [N, 1, W, W] bool
    group: torch.Tensor  # [B]: the grouped row holding each batch row
    slot: torch.Tensor  # [B]: which slot of it

    def attention_mask(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as transformers' attention `kind` takes a ready-made mask."""
        return ready_made_mask(self.allowed, kind, dtype)


def every_row_has_a_prompt(batch: PromptResponseBatch) -> bool:
    """Whether each row holds at least one prompt token (its last prompt column is real)."""
    P = batch.input_ids.size(1) - batch.n_response
    return P > 0 and bool(batch.attention_mask[:, P - 1].all())


def prompt_groups(batch: PromptResponseBatch) -> list[list[int]]:
    """The rows of `batch` grouped by their prompt's tokens, in order of first appearance."""
    if not every_row_has_a_prompt(batch):
        raise ValueError("prompt_groups: every row needs a prompt, left-padded to the response")
    P = batch.input_ids.size(1) - batch.n_response
    prompt_mask = batch.attention_mask[:, :P]
    members: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, mask) in enumerate(zip(batch.input_ids[:, :P].tolist(), prompt_mask.tolist(), strict=True)):
        members.setdefault(tuple(t for t, m in zip(ids, mask, strict=True) if m), []).append(i)
    return list(members.values())


def shared_prompt_groups(
    batch: PromptResponseBatch, groups: list[list[int]] | None = None
) -> SharedPromptGroups:
    """Lay out `batch` with one row per distinct prompt (see `SharedPromptGroups`); `groups`:
    `prompt_groups(batch)`, computed when not given."""
    groups = prompt_groups(batch) if groups is None else groups
    R = batch.n_response
    P = batch.input_ids.size(1) - R
    prompt_mask = batch.attention_mask[:, :P]
    k_max = max(len(rows) for rows in groups)
    device = batch.input_ids.device
    first = torch.tensor([rows[0] for rows in groups], device=device)
    # Each batch row's grouped row and slot, listed group by group, then put in batch order.
    listed = torch.tensor([i for rows in groups for i in rows], device=device)
    group, slot = torch.empty_like(listed), torch.empty_like(listed)
    group[listed] = torch.tensor([g for g, rows in enumerate(groups) for _ in rows], device=device)
    slot[listed] = torch.tensor([k for rows in groups for k in range(len(rows))], device=device)
    positions = position_ids_from_mask(batch.attention_mask)
    # Padding columns hold any id (0): they attend only to themselves and are never read.
    ids = batch.input_ids.new_zeros((len(groups), P + k_max * R))
    pos = torch.zeros_like(ids)
    part = torch.full_like(ids, -1)
    ids[:, :P] = batch.input_ids[first, :P]
    pos[:, :P] = positions[first, :P]
    part[:, :P] = torch.where(prompt_mask[first].bool(), 0, -1)
    columns = P + slot[:, None] * R + torch.arange(R, device=device)  # [B, R]: each response's columns
    rows = group[:, None].expand(-1, R)
    ids[rows, columns] = batch.input_ids[:, P:]
    pos[rows, columns] = positions[:, P:]
    part[rows, columns] = torch.where(batch.response_mask.bool(), slot[:, None] + 1, -1)
    return SharedPromptGroups(ids, pos, allowed_by_part(part), group, slot)
