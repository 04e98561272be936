"""What an annotator may answer for each task type, and what the store keeps of it.

Pure functions, no database. An answer refers to the responses in the order the
annotator saw them (`order[j]` is the original index of the response shown at
position j); the store keeps it in terms of the original responses, so that labels
of different annotators, who saw different orders, compare directly.

Answers by task type (presented positions):
- comparison: {"choice": "left" | "right" | "tie", "strength": 1..3}
- ranking: {"ranking": [positions, best first]}, a permutation of 0..K-1
- likert: {"rating": 1..7}
- binary (thumbs): {"label": true | false}
- edit: {"text": the edited response}
- demonstration: {"text": the written response}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The rating rule lives with the Rating record schema: one check for data files and answers.
from rlhfkit.data.records import check_rating

CHOICES: dict[str, int | None] = {"left": 0, "right": 1, "tie": None}
MAX_STRENGTH = 3
MAX_TEXT_CHARS = 20_000
ANSWER_FIELDS: dict[str, tuple[str, ...]] = {
    "comparison": ("choice", "strength"),
    "ranking": ("ranking",),
    "likert": ("rating",),
    "binary": ("label",),
    "edit": ("text",),
    "demonstration": ("text",),
}
# Task types whose answers can be checked against a known (golden) answer.
GOLDEN_TYPES = ("comparison", "ranking", "likert", "binary")
# A Likert answer within this distance of the golden rating counts as correct.
LIKERT_TOLERANCE = 1


class AnswerError(ValueError):
    """An answer that does not fit the task; `field` names the offending field."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"field {field!r}: {problem}")


@dataclass(frozen=True)
class StoredAnswer:
    """An answer in the terms the store keeps.

    `chosen`: original index of the preferred (comparison) or top-ranked response,
    None otherwise or for a tie; `position`: the presented position of that response;
    `strength`: comparisons only; `value`: the payload of other task types, in
    original indices ({"ranking": [...]}, {"rating": n}, {"label": b}, {"text": s}).
    """

    chosen: int | None
    position: int | None
    strength: int | None
    value: dict[str, Any] | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(answer: Mapping[str, Any]) -> str:
    text = answer.get("text")
    if not isinstance(text, str):
        raise AnswerError("text", "must be a string" if "text" in answer else "is missing")
    if not text.strip():
        raise AnswerError("text", "is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise AnswerError("text", f"is longer than {MAX_TEXT_CHARS} characters")
    return text


def _permutation(field: str, ranking: Any, k: int) -> list[int]:
    if not isinstance(ranking, list | tuple) or not all(_is_int(r) for r in ranking):
        raise AnswerError(field, "must be a list of response positions")
    if sorted(ranking) != list(range(k)):
        raise AnswerError(
            field, f"must list each of the positions 0..{k - 1} exactly once, got {list(ranking)}"
        )
    return list(ranking)


def _rating(field: str, rating: Any) -> int:
    try:
        return check_rating(rating)
    except ValueError as exc:
        raise AnswerError(field, str(exc)) from None


def store_answer(task_type: str, answer: Mapping[str, Any], order: Sequence[int]) -> StoredAnswer:
    """Validate an answer given in presented positions; return it in original indices."""
    if not isinstance(answer, Mapping):
        raise AnswerError("answer", f"must be an object, got {type(answer).__name__}")
    allowed = ANSWER_FIELDS.get(task_type)
    if allowed is None:
        raise ValueError(f"unknown task type {task_type!r}")
    unknown = sorted(set(answer) - set(allowed))
    if unknown:
        raise AnswerError(
            unknown[0], f"is not an answer field of {task_type} tasks (fields: {list(allowed)})"
        )
    if task_type == "comparison":
        choice = answer.get("choice")
        if not isinstance(choice, str) or choice not in CHOICES:
            raise AnswerError("choice", f"must be one of {sorted(CHOICES)}, got {choice!r}")
        strength = answer.get("strength", 1)
        if not _is_int(strength) or not 1 <= strength <= MAX_STRENGTH:
            raise AnswerError("strength", f"must be an integer from 1 to {MAX_STRENGTH}, got {strength!r}")
        if len(order) != 2:
            raise AnswerError("choice", f"a comparison needs exactly 2 responses, the item has {len(order)}")
        position = CHOICES[choice]
        chosen = None if position is None else order[position]
        return StoredAnswer(chosen, position, strength, None)
    if task_type == "ranking":
        ranking = _permutation("ranking", answer.get("ranking"), len(order))
        original = [order[p] for p in ranking]
        return StoredAnswer(original[0], ranking[0], None, {"ranking": original})
    if task_type == "likert":
        return StoredAnswer(None, None, None, {"rating": _rating("rating", answer.get("rating"))})
    if task_type == "binary":
        label = answer.get("label")
        if not isinstance(label, bool):
            raise AnswerError("label", f"must be true (thumbs up) or false (thumbs down), got {label!r}")
        return StoredAnswer(None, None, None, {"label": label})
    return StoredAnswer(None, None, None, {"text": _text(answer)})


def validate_golden(task_type: str, golden: Any, n_responses: int) -> dict[str, Any]:
    """Check a known answer (in original indices) for a golden item; return it normalised.

    comparison: {"chosen": 0 | 1 | null (tie)}; ranking: {"ranking": [...]};
    likert: {"rating": 1..7}; binary: {"label": true | false}.
    """
    if task_type not in GOLDEN_TYPES:
        raise ValueError(f"a {task_type} project cannot have golden items (free-text answers have no key)")
    if not isinstance(golden, Mapping):
        raise ValueError(f"must be an object, got {type(golden).__name__}")
    if task_type == "comparison":
        if (
            "chosen" not in golden
            or golden["chosen"] not in (0, 1, None)
            or isinstance(golden["chosen"], bool)
        ):
            raise ValueError("needs 'chosen': 0, 1 or null (a tie)")
        return {"chosen": golden["chosen"]}
    if task_type == "ranking":
        try:
            return {"ranking": _permutation("ranking", golden.get("ranking"), n_responses)}
        except AnswerError as exc:
            raise ValueError(str(exc)) from None
    if task_type == "likert":
        try:
            return {"rating": _rating("rating", golden.get("rating"))}
        except AnswerError as exc:
            raise ValueError(str(exc)) from None
    if not isinstance(golden.get("label"), bool):
        raise ValueError("needs 'label': true or false")
    return {"label": golden["label"]}


def is_correct(task_type: str, golden: Mapping[str, Any], stored: StoredAnswer) -> bool:
    """Whether an answer matches a golden item's known answer.

    Rankings count as correct when the best response is the golden best; Likert
    ratings when within LIKERT_TOLERANCE of the golden rating.
    """
    value = stored.value or {}
    if task_type == "comparison":
        return stored.chosen == golden["chosen"]
    if task_type == "ranking":
        return value["ranking"][0] == golden["ranking"][0]
    if task_type == "likert":
        return abs(value["rating"] - golden["rating"]) <= LIKERT_TOLERANCE
    if task_type == "binary":
        return value["label"] == golden["label"]
    raise ValueError(f"a {task_type} task has no golden answers")


def nominal_value(kind: str, chosen: int | None, value: Mapping[str, Any] | None) -> Hashable | None:
    """The label as one nominal category for agreement (None: free text, no category)."""
    if kind == "comparison":
        return "tie" if chosen is None else chosen
    if kind == "ranking":
        return chosen
    if kind == "likert" and value is not None:
        return value["rating"]
    if kind == "binary" and value is not None:
        return value["label"]
    return None
