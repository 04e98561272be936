"""Hugging Face `datasets` sources in rlhfkit.data.io: saved folders, splits, hf:NAME:SPLIT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.data.convert import convert_file
from rlhfkit.data.io import DataError, read_records, read_rows
from rlhfkit.data.records import Demonstration, PreferencePair, Rating

datasets = pytest.importorskip("datasets")

PAIR = {"prompt": "Name a fruit.", "chosen": "Apple", "rejected": "Carrot"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub requests (there is no network here) and a cache of the test's own."""
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def save(path: Path, *rows: dict) -> Path:
    """Write rows as a Dataset folder (save_to_disk); return the folder."""
    datasets.Dataset.from_list(list(rows)).save_to_disk(str(path))
    return path


def save_splits(path: Path, **splits: list[dict]) -> Path:
    """Write a DatasetDict folder with one split per keyword; return the folder."""
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(path)
    )
    return path


def read_error(source: str | Path, kind: str = "preference") -> DataError:
    with pytest.raises(DataError) as info:
        read_records(source, kind)
    return info.value


# --- folders written by save_to_disk --------------------------------------------------


def test_saved_dataset_round_trip(tmp_path: Path) -> None:
    rows = [
        {**PAIR, "margin": 0.5, "annotator": "a1"},
        {**PAIR, "chosen": "Pear", "margin": None, "annotator": None},  # null cells: absent
    ]
    folder = save(tmp_path / "pairs", *rows)
    records = read_records(folder, "preference")
    assert records == [
        PreferencePair.model_validate(rows[0]),
        PreferencePair.model_validate({**PAIR, "chosen": "Pear"}),
    ]
    assert read_rows(folder) == ([(1, rows[0]), (2, {**PAIR, "chosen": "Pear"})], "item")


def test_saved_dataset_chat_messages(tmp_path: Path) -> None:
    conversation = [*CHAT, {"role": "assistant", "content": "Hello"}]
    folder = save(tmp_path / "demos", {"messages": conversation}, {"messages": conversation[1:]})
    first, second = read_records(folder, "demonstration")
    assert isinstance(first, Demonstration) and first.as_prompt_completion()[1] == "Hello"
    assert [m.role for m in second.messages] == ["user", "assistant"]


def test_dataset_dict_split(tmp_path: Path) -> None:
    folder = save_splits(
        tmp_path / "dd",
        train=[PAIR, {**PAIR, "chosen": "Pear"}],
        test=[{**PAIR, "chosen": "Fig"}],
    )
    assert [r.chosen for r in read_records(f"{folder}:train", "preference")] == ["Apple", "Pear"]
    assert [r.chosen for r in read_records(f"{folder}:test", "preference")] == ["Fig"]
    # Each reader takes the same form: the row reader too.
    assert read_rows(f"{folder}:test") == ([(1, {**PAIR, "chosen": "Fig"})], "item")


def test_dataset_dict_without_split_names_the_splits(tmp_path: Path) -> None:
    folder = save_splits(tmp_path / "dd", train=[PAIR], test=[PAIR])
    err = read_error(folder)
    assert str(err) == f"{folder}: a dataset with splits train, test: choose one as {folder}:SPLIT"
    assert (err.path, err.line, err.field) == (str(folder), None, None)


def test_dataset_dict_unknown_split(tmp_path: Path) -> None:
    folder = save_splits(tmp_path / "dd", train=[PAIR], test=[PAIR])
    assert str(read_error(f"{folder}:dev")) == f"{folder}:dev: unknown split 'dev' (splits: train, test)"


def test_split_of_a_single_dataset_is_refused(tmp_path: Path) -> None:
    folder = save(tmp_path / "pairs", PAIR)
    assert str(read_error(f"{folder}:train")) == (
        f"{folder}:train: a saved Dataset has no splits: give the folder without ':train'"
    )


@pytest.mark.parametrize(
    ("kind", "good", "bad", "field", "problem"),
    [
        ("preference", PAIR, {**PAIR, "prompt": None}, "prompt", "missing required field"),
        ("preference", PAIR, {**PAIR, "chosen": " "}, "chosen", "text is empty"),
        (
            "unpaired",
            {"prompt": "Q", "completion": "A", "label": True},
            None,
            "label",
            "missing required field",
        ),
        (
            "rating",
            {"prompt": "Q", "completion": "A", "rating": 4},
            {"prompt": "Q", "completion": "A", "rating": 9},
            "rating",
            "must be an integer from 1 to 7, got 9",
        ),
        (
            "edit",
            {"prompt": "Q", "completion": "A", "edited": "B"},
            {"prompt": "Q", "completion": "A", "edited": ""},
            "edited",
            "text is empty",
        ),
    ],
)
def test_bad_row_in_saved_dataset_names_row_and_field(
    tmp_path: Path, kind: str, good: dict, bad: dict | None, field: str, problem: str
) -> None:
    # bad=None: the row has the good row's columns but a null label (an int/bool column cannot mix).
    bad = bad if bad is not None else {**good, "label": None}
    folder = save(tmp_path / "data", good, bad)
    err = read_error(folder, kind)
    assert str(err) == f"{folder}: item 2: field '{field}': {problem}"
    assert (err.line, err.field, err.unit) == (2, field, "item")


def test_wrong_column_type_names_the_field(tmp_path: Path) -> None:
    folder = save(tmp_path / "pairs", {**PAIR, "chosen": 1}, {**PAIR, "chosen": 2})
    err = read_error(folder)
    assert (
        str(err)
        == f"{folder}: item 1: field 'chosen': expected a string or a list of chat messages, got number"
    )
    assert [(e.line, e.field) for e in err.errors] == [(1, "chosen"), (2, "chosen")]


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n", encoding="utf-8")
    assert str(read_error(folder)) == (
        f"{folder}: not a saved Hugging Face dataset: expected a folder written by Dataset.save_to_disk "
        "or DatasetDict.save_to_disk (with state.json or dataset_dict.json); a folder of data files "
        f"reads as hf:{folder}:SPLIT"
    )
    # The hint is right: the same folder loads through datasets.load_dataset.
    assert read_records(f"hf:{folder}:train", "preference") == [PreferencePair.model_validate(PAIR)]


def test_damaged_saved_dataset(tmp_path: Path) -> None:
    folder = save(tmp_path / "pairs", PAIR)
    for arrow in folder.glob("*.arrow"):
        arrow.unlink()
    assert str(read_error(folder)).startswith(f"{folder}: cannot read the saved dataset: ")
    assert "\n" not in str(read_error(folder))


def test_empty_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    # One shard: save_to_disk's default for no rows is no shards, which load_from_disk cannot read.
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(folder), num_shards=1)
    assert str(read_error(folder, "prompt")) == f"{folder}: dataset is empty"


def test_missing_folder_or_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert str(read_error(missing)).startswith(f"{missing}: unsupported file extension '' (expected one of ")
    assert str(read_error(f"{missing}:train")).startswith(f"{missing}:train: unsupported file extension")


# --- hf:NAME[:CONFIG]:SPLIT through datasets.load_dataset -----------------------------


def test_hub_syntax_loads_a_local_folder_of_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    rows = [{"prompt": "Q", "completion": f"A{i}", "rating": i} for i in range(1, 5)]
    (folder / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = read_records(f"hf:{folder}:train", "rating")
    assert records == [Rating.model_validate(r) for r in rows]
    # A split may be sliced, as in load_dataset (the slice's colon is not a separator).
    assert [r.rating for r in read_records(f"hf:{folder}:train[1:3]", "rating")] == [2, 3]
    # The config name (here the builder's only one, "default") goes between name and split.
    assert len(read_records(f"hf:{folder}:default:train", "rating")) == 4


def test_hub_syntax_bad_rows_and_splits(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(
        json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "rejected": "Apple"}) + "\n", encoding="utf-8"
    )
    source = f"hf:{folder}:train"
    assert str(read_error(source)) == f"{source}: item 2: field 'rejected': identical to 'chosen'"
    assert str(read_error(f"hf:{folder}")) == (
        f"hf:{folder}: a dataset with splits train: choose one as hf:{folder}:SPLIT"
    )
    assert str(read_error(f"hf:{folder}:test")) == (
        f"hf:{folder}:test: cannot load dataset '{folder}': "
        "Unknown split \"test\". Should be one of ['train']."
    )


def test_missing_hub_dataset_is_one_line_naming_the_id() -> None:
    err = read_error("hf:nobody/no-such-dataset:train")
    assert str(err).startswith(
        "hf:nobody/no-such-dataset:train: cannot load dataset 'nobody/no-such-dataset': "
    )
    assert "\n" not in str(err) and err.line is None


@pytest.mark.parametrize("source", ["hf:", "hf:a::train", "hf:a:b:c:d", "hf::train"])
def test_hub_syntax_errors(source: str) -> None:
    assert str(read_error(source)) == f"{source}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"


# --- every reader of data files takes the new forms ----------------------------------


def test_config_paths_keep_the_dataset_forms(tmp_path: Path) -> None:
    folder = save_splits(tmp_path / "dd", train=[PAIR])
    config = load_config(overrides=[f"data.preferences={folder}:train", "data.prompts=hf:owner/name:train"])
    # Config values are Paths: the split suffix and the hf: prefix come through unchanged.
    assert str(config.data.prompts) == "hf:owner/name:train"
    assert read_records(config.data.preferences, "preference") == [PreferencePair.model_validate(PAIR)]


def test_convert_reads_a_saved_dataset(tmp_path: Path) -> None:
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}
    folder = save(tmp_path / "hh", hh, {"chosen": hh["chosen"]})
    with pytest.raises(DataError) as info:
        convert_file(folder, "hh")
    assert str(info.value).startswith(f"{folder}: item 2: ")
    (pair,) = convert_file(save(tmp_path / "hh-good", hh), "hh")
    assert (pair.chosen, pair.rejected) == ("Hello!", "Go.")
