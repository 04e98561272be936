"""Tests for rlhfkit.data.records and rlhfkit.data.io: schemas, readers, writers, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from rlhfkit.data.io import DataError, read_jsonl, read_records, write_jsonl
from rlhfkit.data.records import (
    KINDS,
    Demonstration,
    Edit,
    Message,
    PreferencePair,
    PromptRecord,
    Ranking,
    Rating,
    UnpairedExample,
)

PAIR = {"prompt": "Name a fruit.", "chosen": "Apple", "rejected": "Carrot"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def write_lines(path: Path, *rows: object) -> Path:
    """Write each row as one line: dicts/lists as JSON, strings verbatim."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_error(path: Path, kind: str = "preference") -> DataError:
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    return info.value


# --- valid files --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "row", "model"),
    [
        ("preference", {**PAIR, "margin": 0.5, "annotator": "a1", "source": "s"}, PreferencePair),
        ("unpaired", {"prompt": "Q", "completion": "A", "label": False}, UnpairedExample),
        ("demonstration", {"prompt": "Q", "completion": "A"}, Demonstration),
        (
            "demonstration",
            {"messages": [*CHAT, {"role": "assistant", "content": "Hello"}]},
            Demonstration,
        ),
        ("prompt", {"prompt": "Q"}, PromptRecord),
        ("ranking", {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}, Ranking),
        ("rating", {"prompt": "Q", "completion": "A", "rating": 7, "annotator": "a1"}, Rating),
        ("rating", {"prompt": CHAT, "completion": "A", "rating": 1}, Rating),
        ("edit", {"prompt": "Q", "completion": "A draft", "edited": "A fix", "annotator": "a1"}, Edit),
        ("edit", {"prompt": CHAT, "completion": "A", "edited": "A"}, Edit),  # unchanged: valid
    ],
)
def test_valid_file_of_each_kind_loads(tmp_path: Path, kind: str, row: dict, model: type) -> None:
    path = write_lines(tmp_path / "data.jsonl", row, "", {**row, "extra_column": 1})
    records = read_records(path, kind)
    assert len(records) == 2  # the blank line is skipped, extra columns are ignored
    assert all(isinstance(r, model) for r in records)


def test_kinds_registry() -> None:
    assert set(KINDS) == {"preference", "unpaired", "demonstration", "prompt", "ranking", "rating", "edit"}


def test_rating_and_edit_round_trip(tmp_path: Path) -> None:
    rows = [
        Rating.model_validate({"prompt": "Q", "completion": "A", "rating": 5, "annotator": "a1"}),
        Rating.model_validate(
            {"prompt": CHAT, "completion": [{"role": "assistant", "content": "A"}], "rating": 2}
        ),
    ]
    assert write_jsonl(tmp_path / "ratings.jsonl", rows) == 2
    assert read_records(tmp_path / "ratings.jsonl", "rating") == rows
    assert read_jsonl(tmp_path / "ratings.jsonl")[0] == {
        "prompt": "Q",
        "completion": "A",
        "rating": 5,
        "annotator": "a1",
    }
    edits = [
        Edit.model_validate({"prompt": "Q", "completion": "1. Fig 2. Fig", "edited": "1. Fig 2. Pear"}),
        Edit.model_validate({"prompt": "Q", "completion": "Same", "edited": "Same"}),
    ]
    assert write_jsonl(tmp_path / "edits.jsonl", edits) == 2
    records = read_records(tmp_path / "edits.jsonl", "edit")
    assert records == edits
    assert [(r.completion, r.edited) for r in records] == [
        ("1. Fig 2. Fig", "1. Fig 2. Pear"),
        ("Same", "Same"),
    ]


def test_chat_message_prompts_load(tmp_path: Path) -> None:
    row = {"prompt": CHAT, "chosen": "Hello", "rejected": "Go away"}
    chat_completions = {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    path = write_lines(tmp_path / "chat.jsonl", row, chat_completions)
    first, second = read_records(path, "preference")
    assert first.prompt == [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi?"),
    ]
    assert second.chosen[0].content == "Hello"


def test_demonstration_helpers() -> None:
    chat = Demonstration.model_validate({"messages": [*CHAT, {"role": "assistant", "content": "Hello"}]})
    prompt, completion = chat.as_prompt_completion()
    assert [m.role for m in prompt] == ["system", "user"] and completion == "Hello"
    assert chat.is_chat
    plain = Demonstration.model_validate({"prompt": "Q", "completion": "A"})
    assert plain.as_prompt_completion() == ("Q", "A") and not plain.is_chat


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR, {**PAIR, "chosen": "Pear"}]), encoding="utf-8")
    records = read_records(path, "preference")
    assert [r.chosen for r in records] == ["Apple", "Pear"]


def test_json_list_error_names_item(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR, {**PAIR, "chosen": ""}]), encoding="utf-8")
    err = read_error(path)
    assert str(err) == f"{path}: item 2: field 'chosen': text is empty"
    assert (err.line, err.field, err.unit) == (2, "chosen", "item")


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    chat = [{"role": "user", "content": "Top 5 fruits?"}]
    rows = [{**PAIR, "margin": 0.5}, {**PAIR, "prompt": None, "chosen": "Pear", "margin": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    err = read_error(path)  # row 2 has a null prompt: a missing field, named by row
    assert str(err) == f"{path}: item 2: field 'prompt': missing required field"
    pq.write_table(
        pa.Table.from_pylist([{**PAIR, "margin": 0.5}, {**PAIR, "chosen": "Pear", "margin": None}]), path
    )
    records = read_records(path, "preference")
    assert [(r.chosen, r.margin) for r in records] == [("Apple", 0.5), ("Pear", None)]
    demos = tmp_path / "demos.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": chat, "completion": "1. Fig"}]), demos)
    (demo,) = read_records(demos, "demonstration")
    assert demo.prompt[0].content == "Top 5 fruits?"
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet", encoding="utf-8")
    assert str(read_error(broken)).startswith(f"{broken}: not a readable Parquet file")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), empty)
    assert str(read_error(empty)) == f"{empty}: file is empty"


def test_reads_trls_implicit_prompt_conversational_preferences(tmp_path: Path) -> None:
    """TRL's implicit-prompt form: whole conversations, the shared first messages are the prompt;
    and TRL's *-trl-style rows (a string prompt beside conversations that repeat it)."""
    user = {"role": "user", "content": "What color is the sky?"}
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "It is blue."}],
        "rejected": [user, {"role": "assistant", "content": "It is green."}],
    }
    trl_style = {"prompt": "What color is the sky?", **implicit}
    multi_turn = {
        "chosen": [
            *CHAT,
            {"role": "assistant", "content": "Hello."},
            user,
            {"role": "assistant", "content": "Blue."},
        ],
        "rejected": [
            *CHAT,
            {"role": "assistant", "content": "Hello."},
            user,
            {"role": "assistant", "content": "No."},
        ],
    }
    path = write_lines(tmp_path / "pairs.jsonl", implicit, trl_style, multi_turn)
    first, second, third = read_records(path, "preference")
    for pair in (first, second):
        assert pair.model_dump(exclude_none=True) == {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}],
        }
    assert [m.content for m in third.prompt] == ["Be brief.", "Hi?", "Hello.", "What color is the sky?"]
    assert (third.chosen[0].content, third.rejected[0].content) == ("Blue.", "No.")
    # Conversations that share nothing have no prompt: an error, not a guess.
    apart = {
        "chosen": [user, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "user", "content": "B"}],
    }
    err = read_error(write_lines(tmp_path / "apart.jsonl", apart))
    assert (err.line, err.field) == (1, "prompt")


# --- errors name file, line and field -----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bad", "field", "problem"),
    [
        ("preference", {"prompt": "Q", "chosen": "A"}, "rejected", "missing required field"),
        (
            "preference",
            {**PAIR, "chosen": 42},
            "chosen",
            "expected a string or a list of chat messages, got number",
        ),
        ("preference", {**PAIR, "prompt": "   "}, "prompt", "text is empty"),
        ("preference", {**PAIR, "prompt": []}, "prompt", "message list is empty"),
        ("preference", {**PAIR, "rejected": "Apple"}, "rejected", "identical to 'chosen'"),
        ("preference", {**PAIR, "margin": "big"}, "margin", "expected a number, got string"),
        ("preference", {**PAIR, "annotator": 7}, "annotator", "expected a string, got number"),
        (
            "preference",
            {**PAIR, "prompt": [{"role": "bot", "content": "x"}]},
            "prompt.0.role",
            "expected 'system', 'user' or 'assistant', got 'bot'",
        ),
        (
            "preference",
            {**PAIR, "prompt": [{"role": "user"}]},
            "prompt.0.content",
            "missing required field",
        ),
        (
            "demonstration",
            {"prompt": None, "completion": "A"},
            "prompt",
            "expected a string or a list of chat messages, got null",
        ),
        (
            "unpaired",
            {"prompt": "Q", "completion": "A", "label": 1},
            "label",
            "expected true or false, got number",
        ),
        (
            "unpaired",
            {"prompt": "Q", "completion": "A", "label": "true"},
            "label",
            "expected true or false, got string",
        ),
        ("unpaired", {"prompt": "Q", "completion": "A"}, "label", "missing required field"),
        ("demonstration", {"prompt": "Q"}, "completion", "missing required field"),
        (
            "demonstration",
            {"messages": CHAT},
            "messages.1.role",
            "the last message must be from the assistant",
        ),
        (
            "ranking",
            {"prompt": "Q", "responses": ["a"], "ranking": [0]},
            "responses",
            "expected at least 2 items, got 1",
        ),
        (
            "ranking",
            {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]},
            "ranking",
            "must list each response index 0..1 exactly once, got [0, 0]",
        ),
        ("prompt", {"text": "Q"}, "prompt", "missing required field"),
        ("rating", {"prompt": "Q", "completion": "A"}, "rating", "missing required field"),
        ("rating", {"prompt": "Q", "rating": 3}, "completion", "missing required field"),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": 8},
            "rating",
            "must be an integer from 1 to 7, got 8",
        ),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": 0},
            "rating",
            "must be an integer from 1 to 7, got 0",
        ),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": 3.5},
            "rating",
            "must be an integer from 1 to 7, got 3.5",
        ),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": "5"},
            "rating",
            "must be an integer from 1 to 7, got '5'",
        ),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": True},
            "rating",
            "must be an integer from 1 to 7, got True",
        ),
        ("rating", {"prompt": "Q", "completion": " ", "rating": 4}, "completion", "text is empty"),
        ("edit", {"prompt": "Q", "completion": "A"}, "edited", "missing required field"),
        ("edit", {"prompt": "Q", "edited": "B"}, "completion", "missing required field"),
        ("edit", {"prompt": "Q", "completion": "A", "edited": "  "}, "edited", "text is empty"),
        (
            "edit",
            {"prompt": "Q", "completion": "A", "edited": 42},
            "edited",
            "expected a string or a list of chat messages, got number",
        ),
        (
            "edit",
            {"prompt": CHAT, "completion": "A", "edited": [{"role": "assistant", "content": "B"}]},
            "edited",
            "'completion' and 'edited' must both be strings or both be chat messages",
        ),
        (
            "edit",
            {"prompt": "Q", "completion": "A", "edited": [{"role": "assistant", "content": "B"}]},
            "edited",
            "completion is a list of chat messages but the prompt is a plain string",
        ),
    ],
)
def test_bad_field_names_file_line_and_field(
    tmp_path: Path, kind: str, bad: dict, field: str, problem: str
) -> None:
    good = {
        "preference": PAIR,
        "unpaired": {"prompt": "Q", "completion": "A", "label": True},
        "demonstration": {"prompt": "Q", "completion": "A"},
        "ranking": {"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 0]},
        "prompt": {"prompt": "Q"},
        "rating": {"prompt": "Q", "completion": "A", "rating": 4},
        "edit": {"prompt": "Q", "completion": "A", "edited": "B"},
    }[kind]
    path = write_lines(tmp_path / "data.jsonl", good, "", bad)
    err = read_error(path, kind)
    assert str(err).startswith(f"{path}:3: field '{field}': ")
    assert problem in str(err)
    assert (err.path, err.line, err.field) == (str(path), 3, field)


def test_broken_json_names_line_and_json_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", PAIR, '{"prompt": "Q", "chosen": ')
    err = read_error(path)
    assert str(err).startswith(f"{path}:2: invalid JSON: Expecting value")
    assert err.line == 2 and err.field is None


def test_broken_json_list_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "Q"},\n  {"prompt": }\n]\n', encoding="utf-8")
    err = read_error(path, "prompt")
    assert str(err).startswith(f"{path}:3: invalid JSON: ")


def test_non_object_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", PAIR, ["not", "an", "object"])
    assert str(read_error(path)) == f"{path}:2: expected a JSON object, got array"


def test_all_errors_collected_and_nothing_returned(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", PAIR, {**PAIR, "chosen": ""}, PAIR, {"x": 1})
    err = read_error(path)
    assert err.line == 2
    assert [(e.line, e.field) for e in err.errors] == [(2, "chosen"), (4, "prompt")]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert str(read_error(path)) == f"{path}: file not found"


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert str(read_error(path)) == f"{path}: file is empty"


def test_empty_json_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]", encoding="utf-8")
    assert str(read_error(path)) == f"{path}: file contains no records"


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen\n", encoding="utf-8")
    assert str(read_error(path)).startswith(f"{path}: unsupported file extension '.csv'")


def test_unknown_kind_lists_kinds(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="preference, unpaired, demonstration, prompt, ranking, rating, edit"
    ):
        read_records(tmp_path / "x.jsonl", "comparisons")


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b'\n{"prompt": "\xff"}\n')
    assert str(read_error(path)).startswith(f"{path}:2: not valid UTF-8")


def test_unicode_line_separator_inside_string(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{**PAIR, "chosen": "a\u2028b"}])
    assert read_records(path, "preference")[0].chosen == "a\u2028b"


def test_data_error_formats() -> None:
    assert str(DataError("f.jsonl", "boom")) == "f.jsonl: boom"
    assert str(DataError("f.jsonl", "boom", 4)) == "f.jsonl:4: boom"
    assert str(DataError("f.jsonl", "boom", 4, "a.b")) == "f.jsonl:4: field 'a.b': boom"
    assert isinstance(DataError("f", "x"), ValueError)


# --- writing ------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path: Path) -> None:
    pairs = [
        PreferencePair.model_validate(PAIR),
        PreferencePair.model_validate({"prompt": CHAT, "chosen": "Hé ✓", "rejected": "x", "margin": 1.5}),
    ]
    path = tmp_path / "nested" / "dir" / "pairs.jsonl"
    assert write_jsonl(path, pairs) == 2
    assert read_records(path, "preference") == pairs
    raw = read_jsonl(path)
    assert raw[0] == PAIR  # None fields are dropped
    assert "Hé ✓" in path.read_text(encoding="utf-8")  # not \u-escaped


def test_write_mappings_and_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, ({"step": i, "loss": 1.0 / (i + 1)} for i in range(3))) == 3
    assert read_jsonl(path) == [{"step": i, "loss": 1.0 / (i + 1)} for i in range(3)]


def test_read_jsonl_reports_broken_json(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rows.jsonl", {"a": 1}, "{oops")
    with pytest.raises(DataError, match=r"rows\.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]

    def rows():
        yield {"a": 2}
        raise RuntimeError("generator failed midway")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    # The old file is untouched and no temp file is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert read_jsonl(path) == [{"a": 1}]

    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": object()}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_data_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DataError("f.json", "boom", 2, "x", unit="item")))
    assert (str(err), err.line, err.field, err.unit) == (
        "f.json: item 2: field 'x': boom",
        2,
        "x",
        "item",
    )
