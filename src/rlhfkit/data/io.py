"""Read and write record files (JSON Lines, JSON lists; Parquet and Hugging Face datasets read)
with precise errors.

Every problem in an input file is reported as a :class:`DataError` that names the file,
the line (or list item) and the field, e.g.::

    data/pairs.jsonl:7: field 'chosen': text is empty

Besides files, every reader takes a Hugging Face ``datasets`` source, whose rows are
numbered like a Parquet file's (``item N``, a null cell is a missing field):

- ``FOLDER``: a folder written by ``Dataset.save_to_disk``;
- ``FOLDER:SPLIT``: one split of a folder written by ``DatasetDict.save_to_disk``;
- ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``: ``datasets.load_dataset(NAME, CONFIG,
  split=SPLIT)``, where NAME is a hub id (``owner/name``) or a local folder of data files;
  SPLIT may carry a slice (``train[:1000]``).

A source with several splits and none named is refused with an error that lists them.

:func:`read_records` validates the whole file before returning anything, so a bad line
near the end can never leave a caller training on the first half of a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from rlhfkit.data.records import KINDS, TEXT_TAGS

__all__ = [
    "DataError",
    "iter_jsonl",
    "read_jsonl",
    "read_records",
    "read_rows",
    "source_digest",
    "strict_json",
    "write_jsonl",
]

JSONL_SUFFIXES = (".jsonl",)
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
# A source starting with this goes through datasets.load_dataset (hub ids, folders of data files).
HUB_PREFIX = "hf:"
HUB_SYNTAX = "hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"

# Collecting every problem in a file helps fixing it in one go, but a file that is wrong
# throughout (say, the wrong kind) should not build a million error objects.
_MAX_ERRORS = 100


class DataError(ValueError):
    """A problem in a data file, located by file, line (or list item) and field.

    ``str(err)`` is ``"{path}:{line}: field '{field}': {problem}"`` with the absent parts
    left out; records of a ``.json`` list are located as ``"{path}: item {n}: ..."``
    (``line`` then holds the 1-based item number and ``unit`` is ``"item"``).
    ``errors`` lists every problem found in the file (up to a cap), this one first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        line: int | None = None,
        field: str | None = None,
        *,
        unit: Literal["line", "item"] = "line",
    ) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.unit = unit
        self.errors: list[DataError] = [self]
        super().__init__(self._format())

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep DataError picklable (e.g. raised inside a DataLoader worker process).
        args = (self.path, self.problem, self.line, self.field)
        return (_rebuild_data_error, (args, self.unit), {"errors": self.errors})

    def _format(self) -> str:
        where = self.path
        if self.line is not None:
            where += f": item {self.line}" if self.unit == "item" else f":{self.line}"
        if self.field is not None:
            return f"{where}: field '{self.field}': {self.problem}"
        return f"{where}: {self.problem}"


def _rebuild_data_error(args: tuple[Any, ...], unit: Literal["line", "item"]) -> DataError:
    return DataError(*args, unit=unit)


def _json_type(value: Any) -> str:
    """Name a Python value by its JSON type, for messages about wrong types."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


_TYPE_EXPECTATIONS = {
    "string_type": "a string",
    "bool_type": "true or false",
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "text_type": "a string or a list of chat messages",
}


def _describe(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """Turn one pydantic error into (dotted field, problem)."""
    loc = [str(part) for part in error["loc"] if part not in TEXT_TAGS]
    ctx = error.get("ctx") or {}
    field = ".".join(loc) if loc else ctx.get("field")
    kind = error["type"]
    value = error.get("input")
    if kind == "missing":
        problem = error["msg"] if error["msg"] != "Field required" else "missing required field"
    elif kind in _TYPE_EXPECTATIONS:
        problem = f"expected {_TYPE_EXPECTATIONS[kind]}, got {_json_type(value)}"
        if kind == "int_from_float" or (kind == "float_type" and isinstance(value, str)):
            problem += f" {value!r}"
    elif kind == "literal_error":
        problem = f"expected {ctx.get('expected', 'one of the allowed values')}, got {value!r}"
    elif kind == "too_short":
        n = ctx.get("min_length")
        plural = "" if n == 1 else "s"
        problem = f"expected at least {n} item{plural}, got {ctx.get('actual_length')}"
    elif kind == "finite_number":
        problem = "expected a finite number"
    else:
        problem = error["msg"].removeprefix("Value error, ")
    return field, problem


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, not a file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read file: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: tolerate the byte-order mark some editors put at the start.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(path, f"not valid UTF-8 ({exc.reason})", line) from None


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed value) for each non-blank line of ``text``."""
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends,
    # which are legal unescaped inside JSON strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", number) from None


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) per non-blank line; DataError on bad JSON or non-objects."""
    path = Path(path)
    for number, value in _iter_jsonl(path, _read_text(path)):
        if not isinstance(value, dict):
            raise DataError(path, f"expected a JSON object, got {_json_type(value)}", number)
        yield number, value


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON Lines file of objects as raw dicts (blank lines skipped; [] if empty)."""
    return [value for _, value in iter_jsonl(path)]


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    """The rows of a Parquet file as (row number from 1, dict) pairs; a column per field."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types (ArrowInvalid, OSError, ...)
        raise DataError(path, f"not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise DataError(path, "file is empty")
    return _numbered_rows(table.to_pylist())


def _numbered_rows(rows: Iterable[dict[str, Any]]) -> list[tuple[int, Any]]:
    """Table rows (Parquet, datasets) as (row number from 1, dict) pairs."""
    # A null cell is a missing field, as an absent key is in a JSON line (a table has no absent).
    return list(enumerate(({k: v for k, v in row.items() if v is not None} for row in rows), start=1))


def _first_line(exc: BaseException) -> str:
    """An exception's message, first line only (library errors can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _split_of(source: Path) -> tuple[Path, str] | None:
    """(folder, split) for a ``FOLDER:SPLIT`` source whose folder exists; else None."""
    folder, colon, split = str(source).rpartition(":")
    if colon and folder and split and Path(folder).is_dir():
        return Path(folder), split
    return None


def _dataset_rows(source: Path, dataset: Any, split: str | None, how_to_choose: str) -> list[tuple[int, Any]]:
    """The rows of a loaded Dataset, or of the chosen split of a DatasetDict."""
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        names = ", ".join(dataset)
        if split is None:
            raise DataError(source, f"a dataset with splits {names}: choose one as {how_to_choose}")
        if split not in dataset:
            raise DataError(source, f"unknown split '{split}' (splits: {names})")
        dataset = dataset[split]
    elif split is not None:
        # Only reachable for a saved Dataset folder: load_dataset applies the split itself.
        raise DataError(source, f"a saved Dataset has no splits: give the folder without ':{split}'")
    if dataset.num_rows == 0:
        raise DataError(source, "dataset is empty")
    return _numbered_rows(dataset.to_list())


def _saved_dataset_rows(source: Path, folder: Path, split: str | None) -> list[tuple[int, Any]]:
    """The rows of a folder written by Dataset.save_to_disk (or one split of a DatasetDict's)."""
    # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a DatasetDict); checking
    # for them first gives a plain message rather than datasets' own for any other folder.
    if not (folder / "state.json").is_file() and not (folder / "dataset_dict.json").is_file():
        raise DataError(
            source,
            "not a saved Hugging Face dataset: expected a folder written by Dataset.save_to_disk "
            "or DatasetDict.save_to_disk (with state.json or dataset_dict.json); a folder of data "
            f"files reads as {HUB_PREFIX}{folder}:SPLIT",
        )
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except Exception as exc:  # datasets and pyarrow raise many types for a damaged folder
        raise DataError(source, f"cannot read the saved dataset: {_first_line(exc)}") from None
    return _dataset_rows(source, dataset, split, f"{folder}:SPLIT")


def _hub_rows(source: Path) -> list[tuple[int, Any]]:
    """The rows of ``hf:NAME[:CONFIG]:SPLIT``, loaded by datasets.load_dataset."""
    spec = str(source).removeprefix(HUB_PREFIX)
    # Only the split may hold a slice ("train[:100]"), whose colons are not separators.
    head, bracket, tail = spec.partition("[")
    parts = head.split(":")
    parts[-1] += bracket + tail
    if len(parts) > 3 or not all(parts):
        raise DataError(source, f"expected {HUB_SYNTAX}")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else None
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as exc:  # hub, network, builder and split errors all come as library types
        raise DataError(source, f"cannot load dataset '{name}': {_first_line(exc)}") from None
    return _dataset_rows(source, dataset, None, f"{HUB_PREFIX}{spec}:SPLIT")


def _load_items(path: Path) -> tuple[list[tuple[int, Any]], Literal["line", "item"]]:
    """Parse a .jsonl, .json or .parquet file, or a Hugging Face dataset source, into
    (location, value) pairs, checking its shape."""
    if str(path).startswith(HUB_PREFIX):
        return _hub_rows(path), "item"
    if path.is_dir():
        return _saved_dataset_rows(path, path, None), "item"
    folder_split = _split_of(path)
    if folder_split is not None:
        return _saved_dataset_rows(path, *folder_split), "item"
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES:
        expected = ", ".join(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
        raise DataError(
            path,
            f"unsupported file extension '{path.suffix}' (expected one of {expected}; or a folder "
            "written by save_to_disk, FOLDER:SPLIT, or hf:NAME:SPLIT)",
        )
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows(path), "item"
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, "file is empty")
    if suffix in JSONL_SUFFIXES:
        return list(_iter_jsonl(path, text)), "line"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    if not isinstance(value, list):
        raise DataError(path, f"expected a JSON list of objects, got {_json_type(value)}")
    return list(enumerate(value, start=1)), "item"


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)


def source_digest(source: str | os.PathLike[str]) -> str:
    """A digest of what a data source holds, to tell whether a finished stage read the same data.

    A file: its bytes. A folder (``save_to_disk``, or ``FOLDER:SPLIT``'s, or a local folder named by
    ``hf:``): the relative name and bytes of every file in it. A hub id (``hf:NAME...``): the id as
    written, since its rows live on the hub (a new revision under the same id is not seen). A source
    that does not exist: ``"missing"`` (the stage that reads it reports that)."""
    text = str(source)
    target = Path(text)
    if text.startswith(HUB_PREFIX):
        name = text.removeprefix(HUB_PREFIX).partition(":")[0]
        if not Path(name).is_dir():
            return hashlib.sha256(text.encode()).hexdigest()
        target = Path(name)
    elif not target.exists() and (folder_split := _split_of(target)) is not None:
        target = folder_split[0]
    digest = hashlib.sha256()
    if target.is_file():
        _hash_file(digest, target)
    elif target.is_dir():
        for path in sorted(p for p in target.rglob("*") if p.is_file()):
            digest.update(path.relative_to(target).as_posix().encode() + b"\0")
            _hash_file(digest, path)
            digest.update(b"\0")
    else:
        return "missing"
    return digest.hexdigest()


def read_rows(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[int, dict[str, Any]]], Literal["line", "item"]]:
    """The objects of a .jsonl, .json or .parquet file (or a Hugging Face dataset source, see the
    module docstring) with their line (or item) numbers, and which of the two the numbers are; a
    DataError for a file with none or a value that is not an object."""
    path = Path(path)
    items, unit = _load_items(path)
    if not items:
        raise DataError(path, "file contains no records")
    for number, value in items:
        if not isinstance(value, dict):
            raise DataError(path, f"expected a JSON object, got {_json_type(value)}", number, unit=unit)
    return items, unit


def read_records(path: str | os.PathLike[str], kind: str) -> list[BaseModel]:
    """Read and validate every record of ``kind`` (a key of ``KINDS``) from a .jsonl, .json or
    .parquet file, or a Hugging Face dataset source (see the module docstring); in a table (one
    column per field) a row's number is its item number in errors.

    Raises DataError naming file, line (or item) and field for the first problem found;
    its ``errors`` attribute lists all problems (up to a cap). Nothing is returned
    unless the whole file is valid.
    """
    model = KINDS.get(kind)
    if model is None:
        raise ValueError(f"unknown record kind {kind!r}; expected one of: {', '.join(KINDS)}")
    path = Path(path)
    items, unit = _load_items(path)
    if not items:
        raise DataError(path, "file contains no records")
    records: list[BaseModel] = []
    errors: list[DataError] = []
    for number, value in items:
        if not isinstance(value, dict):
            problem = f"expected a JSON object, got {_json_type(value)}"
            errors.append(DataError(path, problem, number, unit=unit))
        else:
            try:
                records.append(model.model_validate(value))
            except ValidationError as exc:
                # One problem per record: later ones are often consequences of the first.
                field, problem = _describe(exc.errors()[0])
                errors.append(DataError(path, problem, number, field, unit=unit))
        if len(errors) >= _MAX_ERRORS:
            break
    if errors:
        first = errors[0]
        first.errors = errors
        raise first
    return records


def _to_row(row: Mapping[str, Any] | BaseModel) -> Any:
    if isinstance(row, BaseModel):
        return row.model_dump(mode="json", exclude_none=True)
    return dict(row)


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: JSON has no NaN or Infinity, and strict
    parsers (browsers' JSON.parse, jq, Go, Rust) refuse the `NaN` Python writes by default."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any] | BaseModel]) -> int:
    """Write rows as JSON Lines atomically (temp file + os.replace); return the row count.

    Parent directories are created. Pydantic models are dumped without None fields.
    If anything fails midway, an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is an atomic rename on one filesystem; plain open()
    # (unlike mkstemp's 0600) gives the file the usual umask-based permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    count = 0
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(_to_row(row), ensure_ascii=False))
                handle.write("\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
