"""Record schemas for every kind of training and feedback data rlhfkit reads.

The shapes follow TRL's dataset formats (see ARCHITECTURE.md, "Contract: data formats"):
a text is either a plain string or a list of chat messages ``{"role", "content"}``.

Validation problems are raised as pydantic errors whose location names the offending
field. Checks that span several fields (and therefore carry no location of their own)
put the dotted field name in the error context under ``"field"``; ``rlhfkit.data.io``
uses both to build messages of the form ``file:line: field 'x': problem``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "KINDS",
    "LIKERT_MAX",
    "TEXT_TAGS",
    "Demonstration",
    "Edit",
    "Message",
    "PreferencePair",
    "PromptRecord",
    "Ranking",
    "Rating",
    "Text",
    "UnpairedExample",
    "check_rating",
]

Role = Literal["system", "user", "assistant"]

# The top of the rating scale (a 1-7 Likert scale); the feedback service asks on the same scale.
LIKERT_MAX = 7

# Tags of the two Text variants. Pydantic puts the tag into error locations
# (e.g. ``prompt.list[Message].0.role``); readers drop these parts when naming a field.
TEXT_TAGS: frozenset[str] = frozenset({"str", "list[Message]"})


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "text is empty")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


def record_error(field: str, error_type: str, message: str, **ctx: Any) -> PydanticCustomError:
    """Build a validation error for a cross-field check, naming ``field`` in its context."""
    return PydanticCustomError(error_type, message, {"field": field, **ctx})


class _Record(BaseModel):
    # Real datasets carry extra columns (ids, metadata); they are not errors.
    model_config = ConfigDict(extra="ignore")


class Message(_Record):
    """One chat message."""

    role: Role
    content: NonEmptyStr


def _non_empty_list(value: list[Message]) -> list[Message]:
    if not value:
        raise PydanticCustomError("empty_text", "message list is empty")
    return value


Messages = Annotated[list[Message], AfterValidator(_non_empty_list)]


def _text_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list[Message]"
    return None


# A discriminated union (rather than a plain ``str | list``) so that a wrong type gives
# one clear error instead of one error per union member.
Text = Annotated[
    Annotated[NonEmptyStr, Tag("str")] | Annotated[Messages, Tag("list[Message]")],
    Discriminator(
        _text_tag,
        custom_error_type="text_type",
        custom_error_message="expected a string or a list of chat messages",
    ),
]


def _check_completion_messages(value: Any) -> Any:
    """A completion given as chat messages must be exactly one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise PydanticCustomError(
                "completion_messages",
                "a completion given as chat messages must be exactly one assistant message, got {count}",
                {"count": len(value)},
            )
        if value[0].role != "assistant":
            raise PydanticCustomError(
                "completion_messages",
                "a completion message must have role 'assistant', got '{role}'",
                {"role": value[0].role},
            )
    return value


# Completion fields (chosen, rejected, completion) accept the same forms as prompts.
Completion = Annotated[Text, AfterValidator(_check_completion_messages)]


def completion_for(prompt: Any, text: str) -> str | list[dict[str, str]]:
    """`text` as the completion of `prompt` in TRL's formats: one assistant message after a chat
    prompt (TRL's conversational preference, unpaired and prompt-completion rows), else the string."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _completion_text(value: str | list[Message]) -> str:
    return value if isinstance(value, str) else value[0].content


def _check_forms(prompt: Any, completions: dict[str, Any]) -> None:
    """Reject a chat-message completion after a plain-string prompt (no template fits)."""
    if isinstance(prompt, str):
        for name, value in completions.items():
            if isinstance(value, list):
                raise record_error(
                    name,
                    "mixed_forms",
                    "completion is a list of chat messages but the prompt is a plain string",
                )


def _check_same_form(first: str, first_value: Any, second: str, second_value: Any) -> None:
    """Two completions of one record must both be strings or both be chat messages."""
    if isinstance(first_value, str) != isinstance(second_value, str):
        raise record_error(
            second,
            "mixed_forms",
            f"'{first}' and '{second}' must both be strings or both be chat messages",
        )


def _extract_implicit_prompt(data: Any) -> Any:
    """TRL's implicit-prompt conversational form: ``chosen`` and ``rejected`` are whole
    conversations, the messages they share first are the prompt.

    As TRL reads it: taken when there is no prompt, or when the prompt is a plain string beside
    chat-message conversations (TRL's *-trl-style datasets carry such a copy of the first user
    message). A row where nothing is shared, or one side is all prompt, is left as it is, for
    validation to name what is wrong. Plain-string implicit prompts are not split: a character
    prefix can end inside a word.
    """
    if not isinstance(data, dict):
        return data
    chosen, rejected, prompt = data.get("chosen"), data.get("rejected"), data.get("prompt")
    if not (isinstance(chosen, list) and isinstance(rejected, list)) or not (
        prompt is None or isinstance(prompt, str)
    ):
        return data
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        return data
    return {**data, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


class PreferencePair(_Record):
    """A pairwise comparison in TRL's preference format: ``chosen`` beat ``rejected``.

    Also read: TRL's implicit-prompt conversational form (see ``_extract_implicit_prompt``).
    """

    prompt: Text
    chosen: Completion
    rejected: Completion
    margin: Annotated[float, Field(strict=True, allow_inf_nan=False)] | None = None
    annotator: str | None = None
    source: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _implicit_prompt(cls, data: Any) -> Any:
        return _extract_implicit_prompt(data)

    @model_validator(mode="after")
    def _check_pair(self) -> PreferencePair:
        _check_forms(self.prompt, {"chosen": self.chosen, "rejected": self.rejected})
        _check_same_form("chosen", self.chosen, "rejected", self.rejected)
        if self.chosen == self.rejected:
            raise record_error("rejected", "identical", "identical to 'chosen'")
        return self


class UnpairedExample(_Record):
    """A single completion with a thumbs-up (``True``) or thumbs-down (``False``) label."""

    prompt: Text
    completion: Completion
    # Strict: 1, "true" or "yes" are data errors, not labels.
    label: StrictBool

    @model_validator(mode="after")
    def _check_shape(self) -> UnpairedExample:
        _check_forms(self.prompt, {"completion": self.completion})
        return self


class Demonstration(_Record):
    """A supervised example: ``{"prompt", "completion"}`` or ``{"messages": [...]}``."""

    prompt: Text | None = None
    completion: Completion | None = None
    messages: Messages | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> Demonstration:
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise record_error(
                    "messages",
                    "ambiguous",
                    "give either 'messages' or 'prompt' and 'completion', not both",
                )
            if len(self.messages) < 2:
                raise record_error(
                    "messages",
                    "too_short",
                    "a conversation needs at least one message before the assistant's reply",
                )
            last = len(self.messages) - 1
            if self.messages[last].role != "assistant":
                raise record_error(
                    f"messages.{last}.role",
                    "last_role",
                    "the last message must be from the assistant",
                )
            return self
        for name in ("prompt", "completion"):
            if getattr(self, name) is None:
                if name in self.model_fields_set:
                    raise record_error(
                        name, "null_text", "expected a string or a list of chat messages, got null"
                    )
                raise record_error(
                    name,
                    "missing",
                    "missing required field (a demonstration needs 'prompt' and 'completion', or 'messages')",
                )
        _check_forms(self.prompt, {"completion": self.completion})
        return self

    @property
    def is_chat(self) -> bool:
        """Whether the prompt is a list of chat messages rather than a plain string."""
        return self.messages is not None or isinstance(self.prompt, list)

    def as_prompt_completion(self) -> tuple[str | list[Message], str]:
        """Split into (prompt, completion text); for ``messages``, the last one is the reply."""
        if self.messages is not None:
            return self.messages[:-1], self.messages[-1].content
        assert self.prompt is not None and self.completion is not None  # checked above
        return self.prompt, _completion_text(self.completion)


class PromptRecord(_Record):
    """A prompt with no response (for rollouts and evaluation)."""

    prompt: Text


class Ranking(_Record):
    """K responses to one prompt, ranked: ``ranking`` lists response indices, best first."""

    prompt: Text
    responses: Annotated[list[NonEmptyStr], Field(min_length=2)]
    ranking: list[StrictInt]

    @model_validator(mode="after")
    def _check_permutation(self) -> Ranking:
        k = len(self.responses)
        if sorted(self.ranking) != list(range(k)):
            raise record_error(
                "ranking",
                "not_permutation",
                "must list each response index 0..{last} exactly once, got {ranking}",
                last=k - 1,
                ranking=str(self.ranking),
            )
        return self


def check_rating(value: Any) -> int:
    """``value`` if it is an integer from 1 to LIKERT_MAX, else a ValueError saying so.

    The one rule for ratings: record files (``Rating``) and the feedback service's answers
    and golden items both check with it.
    """
    # bool is an int subclass, but true is not a rating; nor is 3.0 or "3".
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIKERT_MAX:
        raise ValueError(f"must be an integer from 1 to {LIKERT_MAX}, got {value!r}")
    return value


class Rating(_Record):
    """One response rated on the 1..LIKERT_MAX scale (higher is better)."""

    prompt: Text
    completion: Completion
    rating: Annotated[int, PlainValidator(check_rating)]
    annotator: str | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> Rating:
        _check_forms(self.prompt, {"completion": self.completion})
        return self


class Edit(_Record):
    """A response (``completion``) and the annotator's edited version of it (``edited``).

    An edit that leaves the response as it was is a valid answer ("nothing to improve"),
    as the feedback service takes it; it just says nothing about which text is better.
    """

    prompt: Text
    completion: Completion
    edited: Completion
    annotator: str | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> Edit:
        _check_forms(self.prompt, {"completion": self.completion, "edited": self.edited})
        _check_same_form("completion", self.completion, "edited", self.edited)
        return self


KINDS: dict[str, type[BaseModel]] = {
    "preference": PreferencePair,
    "unpaired": UnpairedExample,
    "demonstration": Demonstration,
    "prompt": PromptRecord,
    "ranking": Ranking,
    "rating": Rating,
    "edit": Edit,
}
