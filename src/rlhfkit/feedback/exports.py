"""Training data from labels: TRL preference pairs, TRL unpaired rows, SFT rows, raw labels.

Pure functions over item and label records (no database); the store selects the
labels (golden items and excluded annotators left out) and writes the rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rlhfkit.crowd.aggregate import majority_vote, ranked_pairs, same_two_responses
from rlhfkit.data.records import LIKERT_MAX, completion_for

if TYPE_CHECKING:
    from rlhfkit.feedback.store import ItemRecord, LabelRecord

Items = Mapping[int, "ItemRecord"]
Labels = Sequence["LabelRecord"]


def preference_rows(task_type: str, project: str, items: Items, labels: Labels) -> Iterator[dict[str, Any]]:
    """TRL {"prompt", "chosen", "rejected"} rows; after a chat prompt, `chosen` and `rejected` are one
    assistant message each, as TRL's conversational preference format has them (`completion_for`).

    comparison: one row per item by majority vote, ties skipped; ranking: each of the
    C(K,2) pairs that more annotators ordered one way than the other; edit: (edited >
    original) per label whose edit changed the text. Two responses with the same text
    make no row: preferring one to the other says nothing.
    """
    source = f"feedback:{project}"
    if task_type == "comparison":
        for item_id, agg in majority_vote(labels).items():
            item = items[item_id]
            if agg.winner is None or same_two_responses(item.responses):
                continue
            yield {
                "prompt": item.prompt_text,
                "chosen": completion_for(item.prompt_text, item.responses[agg.winner]),
                "rejected": completion_for(item.prompt_text, item.responses[1 - agg.winner]),
                "source": source,
                "n_votes": agg.n_votes,
                "agreement": agg.agreement,
            }
    elif task_type == "ranking":
        yield from _ranking_rows(source, items, labels)
    elif task_type == "edit":
        for label in labels:
            item = items[label.item_id]
            edited = (label.value or {}).get("text", "")
            if edited.strip() == item.responses[0].strip():
                continue  # left unchanged: no preference
            yield {
                "prompt": item.prompt_text,
                "chosen": completion_for(item.prompt_text, edited),
                "rejected": completion_for(item.prompt_text, item.responses[0]),
                "annotator": label.annotator,
                "source": source,
            }
    else:
        raise ValueError(
            f"a {task_type} project has no preference pairs; export it as trl-unpaired, sft or raw"
        )


def identical_comparisons(task_type: str, items: Items, labels: Labels) -> int:
    """Comparison items that `preference_rows` skips although majority vote decided them: their two
    responses are the same text. 0 for other task types."""
    if task_type != "comparison":
        return 0
    return sum(
        agg.winner is not None and same_two_responses(items[item_id].responses)
        for item_id, agg in majority_vote(labels).items()
    )


def _ranking_rows(source: str, items: Items, labels: Labels) -> Iterator[dict[str, Any]]:
    votes: dict[int, Counter[tuple[int, int]]] = {}
    for label in labels:
        item = items[label.item_id]
        order = (label.value or {})["ranking"]
        # By index: two responses with the same text are two entries of the ranking.
        for better, worse in ranked_pairs(item.responses, order):
            votes.setdefault(label.item_id, Counter())[(better, worse)] += 1
    for item_id in sorted(votes):
        item, counts = items[item_id], votes[item_id]
        for (better, worse), n in sorted(counts.items()):
            against = counts.get((worse, better), 0)
            if n > against:
                yield {
                    "prompt": item.prompt_text,
                    "chosen": completion_for(item.prompt_text, item.responses[better]),
                    "rejected": completion_for(item.prompt_text, item.responses[worse]),
                    "source": source,
                    "n_votes": n + against,
                    "agreement": n / (n + against),
                }


def unpaired_rows(task_type: str, project: str, items: Items, labels: Labels) -> Iterator[dict[str, Any]]:
    """TRL unpaired {"prompt", "completion", "label"} rows, one per thumbs label (the completion as
    one assistant message after a chat prompt)."""
    if task_type != "binary":
        raise ValueError(f"trl-unpaired needs a binary (thumbs) project, not a {task_type} project")
    for label in labels:
        item = items[label.item_id]
        yield {
            "prompt": item.prompt_text,
            "completion": completion_for(item.prompt_text, item.responses[0]),
            "label": (label.value or {})["label"],
            "annotator": label.annotator,
        }


def sft_rows(task_type: str, project: str, items: Items, labels: Labels) -> Iterator[dict[str, Any]]:
    """{"prompt", "completion"} rows from written demonstrations and edited responses (the
    completion as one assistant message after a chat prompt)."""
    if task_type not in ("demonstration", "edit"):
        raise ValueError(f"sft needs a demonstration or edit project, not a {task_type} project")
    for label in labels:
        item = items[label.item_id]
        yield {
            "prompt": item.prompt_text,
            "completion": completion_for(item.prompt_text, (label.value or {})["text"]),
            "annotator": label.annotator,
        }


def raw_rows(items: Items, labels: Labels) -> Iterator[dict[str, Any]]:
    """Every label with its annotator, item (its meta, overlap and golden key) and answer.

    Likert rows also carry the rated `completion`, the `rating` and its `scale`, and edit
    rows the original `completion` and the `edited` text, so that they can be used (as
    rewards, thresholded into thumbs, as edit pairs) without decoding `value`: such rows
    read back as `rating` and `edit` records (`rlhfkit.data.records.Rating`, `Edit`).
    """
    for label in labels:
        item = items[label.item_id]
        row = {
            "label_id": label.label_id,
            "item_id": label.item_id,
            "prompt": item.prompt_text,
            "responses": item.responses,
            "annotator": label.annotator,
            "kind": label.kind,
            "chosen": label.chosen,
            "order": label.order,
            "strength": label.strength,
            "value": label.value,
            "golden": label.is_golden,
            "correct": label.correct,
            "created_at": label.created_at.isoformat(),
            "seconds": label.seconds,
            "meta": item.meta,
            # The item's settings, so that a raw export recreates the project elsewhere
            # (`rlhfkit feedback import --raw`, `importing.read_raw_file`).
            "overlap": item.overlap,
            "golden_key": item.golden,
        }
        if label.kind == "likert":
            row.update(
                completion=item.responses[0], rating=(label.value or {})["rating"], scale=[1, LIKERT_MAX]
            )
        elif label.kind == "edit":
            row.update(completion=item.responses[0], edited=(label.value or {})["text"])
        yield row


ExportBuilder = Callable[[str, str, Items, Labels], Iterator[dict[str, Any]]]
# Formats other than raw (which the store writes itself, with every label).
EXPORT_FORMATS: dict[str, ExportBuilder | None] = {
    "trl-preference": preference_rows,
    "trl-unpaired": unpaired_rows,
    "sft": sft_rows,
    "raw": None,
}
# The formats that make sense for each task type (raw always does).
FORMATS_BY_TASK_TYPE: dict[str, tuple[str, ...]] = {
    "comparison": ("trl-preference", "raw"),
    "ranking": ("trl-preference", "raw"),
    "likert": ("raw",),
    "binary": ("trl-unpaired", "raw"),
    "edit": ("trl-preference", "sft", "raw"),
    "demonstration": ("sft", "raw"),
}
