"""Items for a feedback project: from a file of prompts with completions, or sampled from a policy.

A file line (of JSONL; or an item of a JSON list, a row of Parquet or of a dataset) is
{"prompt": str or chat messages, "completions": [str, ...]} with optional "overlap", "meta"
and "golden". How a line becomes items depends on the
project's task type: comparison and ranking show all completions in one item;
likert, thumbs and edit projects get one item per completion; demonstration projects
take the prompt alone.

A raw export (`rlhfkit feedback export --format raw`) reads back too (`read_raw_file`): its rows
recreate a project's items, annotators and labels in another store (`FeedbackStore.import_project`).

Files are read whole into memory, so an import refuses a file (or dataset folder) larger than
`MAX_IMPORT_BYTES` unless told otherwise (`check_import_size`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rlhfkit.data.io import HUB_PREFIX, DataError, read_rows
from rlhfkit.feedback.answers import CHOICES, AnswerError, is_correct, store_answer
from rlhfkit.feedback.store import (
    RESPONSES_PER_TYPE,
    TASK_TYPES,
    ItemError,
    ItemRecord,
    unstorable,
    validate_item,
)

LINE_FIELDS = {"prompt", "completions", "overlap", "meta", "golden"}
# An import reads its whole file into memory (the rows, then the items built from them), a few
# times the file's size: larger files are refused unless the limit is raised (--max-file-mb).
MAX_IMPORT_BYTES = 1 << 30


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


def source_bytes(path: str | os.PathLike[str]) -> int | None:
    """The size on disk of an import source: a file, or every file of a dataset folder (`FOLDER`,
    `FOLDER:SPLIT`, `hf:FOLDER...`); None for a hub dataset (`hf:NAME`), whose size is unknown
    before it is downloaded, and for a source that is not there (the reader says so)."""
    text = os.fspath(path)
    target = Path(text)
    if text.startswith(HUB_PREFIX):
        target = Path(text.removeprefix(HUB_PREFIX).partition(":")[0])
    elif not target.exists():
        folder, colon, _ = text.rpartition(":")
        target = Path(folder) if colon and folder else target
    if target.is_file():
        return target.stat().st_size
    if target.is_dir():
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def check_import_size(path: str | os.PathLike[str], max_bytes: int | None = MAX_IMPORT_BYTES) -> None:
    """Refuse (DataError) an import source larger than `max_bytes` (None: no limit): an import
    reads it whole into memory."""
    size = source_bytes(path)
    if max_bytes is not None and size is not None and size > max_bytes:
        raise DataError(
            path,
            f"is {_size(size)}, over the import limit of {_size(max_bytes)} (an import "
            "reads the whole file into memory); split the file, or raise the limit with --max-file-mb",
        )


# Fields of a raw export row (`exports.raw_rows`). `completion`, `rating`, `scale` and `edited` repeat
# what `responses` and `value` hold: the import reads them from there.
RAW_FIELDS = {
    "label_id", "item_id", "prompt", "responses", "annotator", "kind", "chosen", "order", "strength",
    "value", "golden", "golden_key", "correct", "created_at", "seconds", "meta", "overlap",
    "completion", "rating", "scale", "edited",
}  # fmt: skip
# What makes a row's item: rows of one item_id must agree on all of it.
_RAW_ITEM_FIELDS = ("prompt", "responses", "meta", "golden", "golden_key", "overlap")
_ANNOTATOR_NAME_CHARS = 200
# A label's time is when the service stored it, never later than the import; this much room is left
# for the exporting machine's clock running ahead of this one's.
CLOCK_SKEW = timedelta(minutes=5)


class _RowError(ValueError):
    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field {field!r}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _presented_answer(kind: str, row: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """The answer as the annotator gave it (in presented positions), rebuilt from a raw row."""
    value, chosen = row.get("value"), row.get("chosen")
    if kind == "comparison":
        if value is not None:
            raise _RowError("value", f"must be null in a comparison label, got {value!r}")
        if chosen is not None and (not _is_int(chosen) or chosen not in order):
            raise _RowError("chosen", f"must be null (a tie) or the index of a response, got {chosen!r}")
        choice = "tie" if chosen is None else next(c for c, p in CHOICES.items() if p == order.index(chosen))
        return {"choice": choice, "strength": row.get("strength")}
    if not isinstance(value, dict):
        raise _RowError("value", f"must be an object (the {kind} answer), got {value!r}")
    if kind == "ranking":
        ranking = value.get("ranking")
        if not isinstance(ranking, list) or not all(_is_int(i) and i in order for i in ranking):
            raise _RowError("value", f"'ranking' must list response indices, got {ranking!r}")
        return {**value, "ranking": [order.index(i) for i in ranking]}
    return value


def _raw_label(kind: str, row: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """One raw row's label as `FeedbackStore.import_project` stores it; _RowError names the field."""
    annotator = row.get("annotator")
    if not isinstance(annotator, str) or not annotator.strip():
        raise _RowError("annotator", f"must be a non-empty string, got {annotator!r}")
    if len(annotator) > _ANNOTATOR_NAME_CHARS:
        raise _RowError("annotator", f"is longer than {_ANNOTATOR_NAME_CHARS} characters")
    if (problem := unstorable(annotator)) is not None:
        raise _RowError("annotator", problem)
    order = row.get("order")
    n = len(item["responses"])
    if not isinstance(order, list) or not all(map(_is_int, order)) or sorted(order) != list(range(n)):
        raise _RowError("order", f"must list each response index 0..{n - 1} once, got {order!r}")
    try:
        stored = store_answer(kind, _presented_answer(kind, row, order), order)
    except AnswerError as exc:
        field = {"choice": "chosen", "strength": "strength"}.get(exc.field, "value")
        raise _RowError(field, str(exc).removeprefix(f"field {exc.field!r}: ")) from None
    if (problem := unstorable(stored.value)) is not None:
        raise _RowError("value", problem)
    for field, have in (("chosen", stored.chosen), ("strength", stored.strength), ("value", stored.value)):
        if row.get(field) != have:
            raise _RowError(field, f"is {row.get(field)!r}, but the answer makes it {have!r}")
    correct = row.get("correct")
    if item.get("golden") is not None:
        if correct is not is_correct(kind, item["golden"], stored):
            raise _RowError("correct", f"is {correct!r}, which the golden key does not give")
    elif correct is not None:
        raise _RowError("correct", "must be null on a label of an item that is not golden")
    created_at = row.get("created_at")
    if created_at is not None:  # an export always has it; a hand-made file may leave it out
        try:
            created_at = datetime.fromisoformat(created_at)
        except (TypeError, ValueError):
            raise _RowError("created_at", f"must be an ISO 8601 time, got {created_at!r}") from None
        if created_at.tzinfo is None:
            raise _RowError("created_at", f"must carry its time zone (as +00:00), got {row['created_at']!r}")
        if created_at > datetime.now(UTC) + CLOCK_SKEW:
            raise _RowError("created_at", f"is {row['created_at']!r}, a time still to come")
    seconds = row.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise _RowError("seconds", f"must be a number >= 0 or null, got {seconds!r}")
    return {
        "annotator": annotator,
        "chosen": stored.chosen,
        "order": order,
        "position": stored.position,
        "strength": stored.strength,
        "value": stored.value,
        "created_at": created_at,
        "seconds": seconds,
        "correct": correct,
    }


def read_raw_file(
    path: str | os.PathLike[str], task_type: str | None = None, default_overlap: int = 1
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(task type, items, labels) of a raw export, every row checked first; DataError names the
    file, line (or item) and field.

    Rows of one `item_id` make one item and must agree on its prompt, responses, meta, golden flag
    and key; every row's `kind` is the project's task type (`task_type`, when given, must be it). A
    label's answer is checked as the service checks an annotator's, its `correct` against the golden
    key; `created_at` (else the import's time; never a time still to come) and `seconds` are kept. A
    non-golden item has no more labels than its overlap. Labels come back in file order, each with
    "item": the index of its item.
    """
    path = Path(path)
    rows, unit = read_rows(path)
    items: list[dict[str, Any]] = []
    checked: list[dict[str, Any]] = []  # items[i] as the store keeps it
    labels: list[dict[str, Any]] = []
    first_of_item: dict[Any, tuple[int, dict[str, Any]]] = {}  # item_id -> (index, first row)
    labelled: dict[tuple[int, str], int] = {}  # (item index, annotator) -> line
    n_labels: dict[int, int] = {}  # item index -> labels so far
    kind = task_type
    for number, row in rows:
        try:
            unknown = sorted(set(row) - RAW_FIELDS)
            if unknown:
                raise _RowError(unknown[0], "is not a field of a raw export row")
            for field in ("item_id", "kind", "prompt", "annotator"):
                if field not in row:
                    raise _RowError(field, "is missing")
            if row["kind"] not in TASK_TYPES:
                raise _RowError("kind", f"must be one of {', '.join(TASK_TYPES)}, got {row['kind']!r}")
            if kind is None:
                kind = row["kind"]
            elif row["kind"] != kind:
                why = "the --task-type" if task_type is not None else "the first row's"
                raise _RowError("kind", f"is {row['kind']!r}, not {kind!r} ({why})")
            item_id = row["item_id"]
            if not _is_int(item_id):
                raise _RowError("item_id", f"must be an integer, got {item_id!r}")
            golden = row.get("golden", False)
            if not isinstance(golden, bool):
                raise _RowError("golden", f"must be true or false, got {golden!r}")
            if item_id in first_of_item:
                index, first = first_of_item[item_id]
                for field in _RAW_ITEM_FIELDS:
                    if row.get(field) != first.get(field):
                        raise _RowError(field, f"differs from the first row of item_id {item_id}")
            else:
                if golden and row.get("golden_key") is None:
                    raise _RowError(
                        "golden_key",
                        "is missing: a golden label needs its item's key (raw exports before "
                        "'golden_key' cannot recreate golden items)",
                    )
                raw_item = {"prompt": row["prompt"], "responses": row.get("responses")}
                raw_item.update({f: row[f] for f in ("meta", "overlap") if row.get(f) is not None})
                if golden:
                    raw_item["golden"] = row["golden_key"]
                try:
                    checked.append(validate_item(0, raw_item, default_overlap, kind))
                except ItemError as exc:
                    field = "golden_key" if exc.field == "golden" else exc.field
                    raise _RowError(field, exc.problem) from None
                index = len(items)
                first_of_item[item_id] = (index, row)
                items.append(raw_item)
            label = _raw_label(kind, row, checked[index])
            if (index, label["annotator"]) in labelled:
                raise _RowError(
                    "annotator",
                    f"{label['annotator']!r} labelled item_id {item_id} already "
                    f"({unit} {labelled[index, label['annotator']]})",
                )
            labelled[index, label["annotator"]] = number
            # The service never gives an item more labels than its overlap (golden items are
            # outside it: every annotator may see one).
            n_labels[index] = n_labels.get(index, 0) + 1
            if not checked[index]["is_golden"] and n_labels[index] > checked[index]["overlap"]:
                given = " (the default: give the project's, --overlap)" if row.get("overlap") is None else ""
                raise _RowError(
                    "overlap",
                    f"is {checked[index]['overlap']}{given}, but item_id {item_id} has more labels than that",
                )
            labels.append({**label, "item": index})
        except _RowError as exc:
            raise DataError(path, exc.problem, number, exc.field, unit=unit) from None
    assert kind is not None  # read_rows refuses a file without rows
    return kind, items, labels


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
