"""Items for a feedback project: from a file of prompts with completions, or sampled from a policy.

A file line (of JSONL; or an item of a JSON list, a row of Parquet or of a dataset) is
{"prompt": str or chat messages, "completions": [str, ...]} with optional "overlap", "meta"
and "golden". How a line becomes items depends on the
project's task type: comparison and ranking show all completions in one item;
likert, thumbs and edit projects get one item per completion; demonstration projects
take the prompt alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data.io import DataError, read_rows
from rlhfkit.feedback.store import RESPONSES_PER_TYPE, ItemError, ItemRecord, validate_item

LINE_FIELDS = {"prompt", "completions", "overlap", "meta", "golden"}


def line_to_items(row: dict[str, Any], task_type: str) -> list[dict[str, Any]]:
    """The items one import line makes in a project of `task_type` (not yet validated)."""
    unknown = sorted(set(row) - LINE_FIELDS)
    if unknown:
        raise ItemError(0, unknown[0], f"is not an import field (allowed: {sorted(LINE_FIELDS)})")
    extra = {key: row[key] for key in ("overlap", "meta", "golden") if key in row}
    if "prompt" not in row:
        raise ItemError(0, "prompt", "is missing")
    _, most = RESPONSES_PER_TYPE[task_type]
    if most == 0:
        return [{"prompt": row["prompt"], **extra}]
    completions = row.get("completions")
    if completions is None:
        raise ItemError(0, "completions", "is missing")
    if not isinstance(completions, list) or not completions:
        raise ItemError(0, "completions", "must be a non-empty list of strings")
    if most == 1:
        if "golden" in row and len(completions) != 1:
            raise ItemError(
                0, "golden", "a golden line of a single-response project needs exactly 1 completion"
            )
        return [{"prompt": row["prompt"], "responses": [c], **extra} for c in completions]
    return [{"prompt": row["prompt"], "responses": completions, **extra}]


def read_import_file(
    path: str | os.PathLike[str], task_type: str, default_overlap: int = 1
) -> list[dict[str, Any]]:
    """Every item of an import file, validated; DataError names file, line (or item) and field.

    The file is read as every data file is (`rlhfkit.data.io.read_rows`): JSONL, a JSON list,
    Parquet, or a Hugging Face dataset folder (`save_to_disk`, `FOLDER:SPLIT`, `hf:NAME:SPLIT`).
    """
    path = Path(path)
    rows, unit = read_rows(path)
    items: list[dict[str, Any]] = []
    for number, row in rows:
        try:
            for item in line_to_items(row, task_type):
                validate_item(0, item, default_overlap, task_type)
                items.append(item)
        except ItemError as exc:
            field = "completions" if exc.field == "responses" else exc.field
            raise DataError(path, exc.problem, number, field, unit=unit) from None
    if not items:
        raise DataError(path, "file has no items")
    return items


def _item_key(prompt: str, messages: Any, responses: list[str], golden: Any) -> str:
    return json.dumps([prompt, messages, responses, golden], sort_keys=True)


def items_not_in(
    items: Sequence[dict[str, Any]], existing: Sequence[ItemRecord], task_type: str
) -> tuple[list[dict[str, Any]], int]:
    """The items that are not already among `existing` (same prompt, responses and golden key;
    `meta` and overlap aside), and how many were; re-importing a file adds nothing twice."""
    have = {_item_key(i.prompt, i.messages, i.responses, i.golden) for i in existing}
    new = []
    for item in items:
        row = validate_item(0, item, 1, task_type)
        if _item_key(row["prompt"], row["messages"], row["responses"], row["golden"]) not in have:
            new.append(item)
    return new, len(items) - len(new)


def sample_items(
    checkpoint: str | os.PathLike[str],
    prompts: Sequence[str],
    k: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prompts with k completions each, sampled from a local causal-LM checkpoint."""
    import torch

    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_texts

    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    tokenizer, policy = load_tokenizer(checkpoint), load_causal_lm(checkpoint)
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    torch.manual_seed(seed)
    samples = [
        sample_texts(policy, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature)
        for _ in range(k)
    ]
    return [
        {"prompt": prompt, "completions": [s[i] for s in samples], "meta": {"policy": str(checkpoint)}}
        for i, prompt in enumerate(prompts)
    ]
