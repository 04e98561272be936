"""`rlhfkit feedback import` / `export` and the store paths they use, on SQLite and PostgreSQL:
bad input is refused whole with an error naming file, line and field; exports are valid training
data read back by rlhfkit's own readers, from one consistent view of the labels."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.data.io import read_records
from rlhfkit.data.records import Message
from rlhfkit.feedback import exports
from rlhfkit.feedback.store import FeedbackStore

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, ["feedback", *args])


def _flat(text: str) -> str:
    return " ".join(text.split())


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _label_all(store: FeedbackStore, project: int, annotator: int, choice: str = "left") -> int:
    n = 0
    while (task := store.next_task(project, annotator)) is not None:
        store.submit_comparison(task.token, annotator, choice)
        n += 1
    return n


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"prompt": "q\x00", "responses": ["a", "b"]}, "prompt"),
        ({"prompt": [{"role": "user", "content": "q\x00"}], "responses": ["a", "b"]}, "prompt"),
        ({"prompt": "q", "responses": ["a", "b\x00"]}, "responses"),
        ({"prompt": "q", "responses": ["a\ud800", "b"]}, "responses"),
        ({"prompt": "q\udfff", "responses": ["a", "b"]}, "prompt"),
        ({"prompt": "q", "responses": ["a", "b"], "meta": {"note": "x\x00"}}, "meta"),
        ({"prompt": "q", "responses": ["a", "b"], "meta": {"k\ud800": 1}}, "meta"),
        # The same check as the API's requests: NaN is no JSON number for any reader after us.
        ({"prompt": "q", "responses": ["a", "b"], "meta": {"score": float("nan")}}, "meta"),
    ],
)
def test_text_the_database_cannot_store_or_export_is_refused_naming_the_field(
    open_store, tmp_path, item, field
):
    # PostgreSQL refuses a NUL in text and jsonb (a driver error, not a ValueError), and a lone
    # surrogate stored (escaped) in SQLite's JSON made every later export of the project fail.
    store = open_store()
    project = store.create_project("p")
    with pytest.raises(ValueError, match=f"item 1: field '{field}'"):
        store.add_items(project, [{"prompt": "fine", "responses": ["a", "b"]}, item])
    assert store.items(project) == []
    store.add_items(project, [{"prompt": "fine", "responses": ["a", "b"]}])
    _label_all(store, project, store.add_annotator("alice"))
    assert store.export(project, tmp_path / "raw.jsonl", "raw") == 1


def test_cli_import_of_a_nul_names_file_line_and_field_and_writes_nothing(db_url, tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text(
        '{"prompt": "q", "completions": ["a", "b"]}\n'
        '{"prompt": "q", "completions": ["a", "b\\u0000c"]}\n'
        '{"prompt": "q", "completions": ["a", "b"]}\n'
    )
    result = _cli("import", "--db", db_url, "--project", "p", "--file", str(bad))
    assert result.exit_code == 2, result.output
    assert f"{bad}:2: field 'completions': [1] holds a NUL character" in _flat(result.output)
    with FeedbackStore(db_url) as store:
        assert store.projects() == []  # not even the project


def test_a_comparison_of_two_identical_responses_is_no_preference_pair(db_url, open_store, tmp_path):
    # Two samples of a policy can be the same text; "x" preferred to "x" says nothing, and a file
    # holding such a row is refused whole by the reader that training uses.
    store = open_store()
    project = store.create_project("same")
    store.add_items(
        project, [{"prompt": "q1", "responses": ["x", "x"]}, {"prompt": "q2", "responses": ["a", "b"]}]
    )
    assert _label_all(store, project, store.add_annotator("alice")) == 2
    assert store.export(project, tmp_path / "pairs.jsonl", "trl-preference") == 1
    (pair,) = read_records(tmp_path / "pairs.jsonl", "preference")
    assert pair.prompt == "q2"
    # The raw export still has both labels.
    assert store.export(project, tmp_path / "raw.jsonl", "raw") == 2
    # How many decided items the pair export skipped for their identical responses.
    items = {item.item_id: item for item in store.items(project)}
    labels = store.labels(project, include_golden=False, include_excluded=False)
    assert exports.identical_comparisons("comparison", items, labels) == 1
    assert exports.identical_comparisons("ranking", items, []) == 0
    skipped: dict = {}
    assert store.export(project, tmp_path / "again.jsonl", "trl-preference", skipped=skipped) == 1
    assert skipped == {"identical_responses": 1}
    # ... and the commands say so.
    result = _cli("export", "--db", db_url, "--project", "same", "--out", str(tmp_path / "cli.jsonl"))
    assert result.exit_code == 0, result.output
    assert "wrote 1 rows" in result.output and "(1 decided items skipped" in _flat(result.output)
    args = [
        "aggregate",
        "--db",
        db_url,
        "--project",
        "same",
        "--method",
        "mv",
        "--out",
        str(tmp_path / "a.jsonl"),
    ]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "0 without a winner, 1 skipped for two identical responses; wrote 1 pairs" in _flat(result.output)


def test_an_export_sees_every_item_its_labels_refer_to(db_url, open_store, tmp_path, monkeypatch):
    # Items are imported and labelled while an admin exports (online, iterated RLHF): a label on an
    # item added after the export read the items made the export fail with a bare KeyError.
    store = open_store()
    other = open_store()
    project = store.create_project("live", overlap=1)
    store.add_items(project, [{"prompt": "q0", "responses": ["a", "b"]}])
    alice = store.add_annotator("alice")
    _label_all(store, project, alice)
    read_items = FeedbackStore.items

    def items_then_more_work(self, project_id):
        found = read_items(self, project_id)
        if self is not other:
            other.add_items(project_id, [{"prompt": "late", "responses": ["c", "d"]}])
            _label_all(other, project_id, alice)
        return found

    monkeypatch.setattr(FeedbackStore, "items", items_then_more_work)
    for format_ in ("trl-preference", "raw"):
        n = store.export(project, tmp_path / f"{format_}.jsonl", format_)
        assert n >= 1 and len(_rows(tmp_path / f"{format_}.jsonl")) == n
    result = _cli(
        "aggregate", "--db", db_url, "--project", "live", "--method", "mv", "--out", str(tmp_path / "a.jsonl")
    )
    assert result.exit_code == 0, result.output


def test_an_export_is_on_disk_before_it_replaces_the_old_file(open_store, tmp_path, monkeypatch):
    # A machine crash right after the rename must not leave an empty or cut file that looks whole.
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, [{"prompt": "q", "responses": ["a", "b"]}])
    _label_all(store, project, store.add_annotator("alice"))
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    out = tmp_path / "new" / "folder" / "raw.jsonl"
    assert store.export(project, out, "raw") == 1
    assert calls[:2] == ["fsync", "replace"]
    assert [p.name for p in out.parent.iterdir()] == ["raw.jsonl"]


def test_raw_export_keeps_golden_labels_flagged_and_training_exports_leave_them_out(open_store, tmp_path):
    store = open_store()
    project = store.create_project("g", task_type="binary", golden_rate=1.0)
    store.add_items(
        project,
        [
            {"prompt": "q", "responses": ["fine"]},
            {"prompt": "gold", "responses": ["good"], "golden": {"label": True}},
        ],
    )
    alice = store.add_annotator("alice")
    while (task := store.next_task(project, alice)) is not None:
        store.submit(task.token, alice, {"label": True})
    assert store.export(project, tmp_path / "raw.jsonl", "raw") == 2
    raw = _rows(tmp_path / "raw.jsonl")
    assert sorted((r["prompt"], r["golden"], r["correct"]) for r in raw) == [
        ("gold", True, True),
        ("q", False, None),
    ]
    assert store.export(project, tmp_path / "u.jsonl", "trl-unpaired") == 1
    assert [(r.prompt, r.completion, r.label) for r in read_records(tmp_path / "u.jsonl", "unpaired")] == [
        ("q", "fine", True)
    ]


def test_cli_import_into_a_project_of_another_task_type_is_refused(tmp_path):
    db = str(tmp_path / "f.db")
    lines = tmp_path / "items.jsonl"
    lines.write_text('{"prompt": "q", "completions": ["a", "b"]}\n')
    assert _cli("import", "--db", db, "--project", "p", "--file", str(lines)).exit_code == 0
    result = _cli("import", "--db", db, "--project", "p", "--file", str(lines), "--task-type", "ranking")
    assert result.exit_code == 2
    assert "project 'p' is a comparison project, not ranking" in _flat(result.output)
    with FeedbackStore(db) as store:
        assert len(store.items(store.project_id("p"))) == 1
    # Without --task-type, the existing project's type is used.
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "q2", "completions": ["a", "b"]}\n')
    assert _cli("import", "--db", db, "--project", "p", "--file", str(other)).exit_code == 0


def test_cli_import_reads_json_lists_parquet_and_saved_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    db = str(tmp_path / "f.db")
    chat = [{"role": "user", "content": "top 5 films?"}]
    rows = [
        {"prompt": "q", "completions": ["a", "b"]},
        {"prompt": chat, "completions": ["c", "d"], "overlap": 2},
    ]
    (tmp_path / "items.json").write_text(json.dumps(rows, indent=2))
    # A table column holds one type: chat prompts in one file, strings (with a null overlap) in the other.
    pq.write_table(pa.Table.from_pylist([rows[1], rows[1]]), tmp_path / "items.parquet")
    Dataset.from_list([{**rows[0], "overlap": None}, {**rows[0], "overlap": 3}]).save_to_disk(
        str(tmp_path / "items_ds")
    )
    expected = {
        "items.json": [("q", ["a", "b"], 1), (chat, ["c", "d"], 2)],
        "items.parquet": [(chat, ["c", "d"], 2)] * 2,
        "items_ds": [("q", ["a", "b"], 1), ("q", ["a", "b"], 3)],
    }
    for name, wanted in expected.items():
        result = _cli("import", "--db", db, "--project", name, "--file", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        with FeedbackStore(db) as store:
            items = store.items(store.project_id(name))
        assert [(i.prompt_text, i.responses, i.overlap) for i in items] == wanted
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"prompt": "q", "completions": ["a", 3]}]))
    result = _cli("import", "--db", db, "--project", "bad", "--file", str(tmp_path / "bad.json"))
    assert result.exit_code == 2
    assert f"{tmp_path / 'bad.json'}: item 2: field 'completions': [1] must be a string" in _flat(
        result.output
    )


def test_cli_import_again_adds_only_the_new_items(tmp_path):
    db = str(tmp_path / "f.db")
    first = tmp_path / "first.jsonl"
    first.write_text(
        '{"prompt": "q1", "completions": ["a", "b"]}\n'
        '{"prompt": [{"role": "user", "content": "q2"}], "completions": ["a", "b"], "meta": {"round": 1}}\n'
        '{"prompt": "g", "completions": ["good", "bad"], "golden": {"chosen": 0}}\n'
    )
    assert _cli("import", "--db", db, "--project", "p", "--file", str(first)).exit_code == 0
    result = _cli("import", "--db", db, "--project", "p", "--file", str(first))
    assert result.exit_code == 0, result.output
    assert "imported 0 items" in _flat(result.output) and "3 already in the project" in _flat(result.output)
    more = tmp_path / "more.jsonl"
    more.write_text(first.read_text() + '{"prompt": "q1", "completions": ["b", "a"]}\n')
    result = _cli("import", "--db", db, "--project", "p", "--file", str(more))
    assert "imported 1 items" in _flat(result.output) and "3 already in the project" in _flat(result.output)
    with FeedbackStore(db) as store:
        assert [i.responses for i in store.items(store.project_id("p"))] == [
            ["a", "b"],
            ["a", "b"],
            ["good", "bad"],
            ["b", "a"],
        ]


def test_export_formats_read_back_as_training_records(open_store, tmp_path):
    # Every training export reads back with rlhfkit's own readers (what `rlhfkit rm`, `kto` and `sft` use).
    store = open_store()
    alice, bob = store.add_annotator("alice"), store.add_annotator("bob")
    chat = [{"role": "user", "content": "top 5 cities?"}]
    comparison = store.create_project("c", overlap=2)
    store.add_items(comparison, [{"prompt": chat, "responses": ["good", "bad"]}])
    for annotator in (alice, bob):
        task = store.next_task(comparison, annotator)
        store.submit_comparison(task.token, annotator, "left" if task.order[0] == 0 else "right", strength=3)
    assert store.export(comparison, tmp_path / "c.jsonl", "trl-preference") == 1
    (pair,) = read_records(tmp_path / "c.jsonl", "preference")
    assert (pair.chosen, pair.rejected, pair.source) == (
        [Message(role="assistant", content="good")],
        [Message(role="assistant", content="bad")],
        "feedback:c",
    )
    assert [m.content for m in pair.prompt] == ["top 5 cities?"]
    edit = store.create_project("e", task_type="edit")
    store.add_items(edit, [{"prompt": "q", "responses": ["draft"]}])
    task = store.next_task(edit, alice)
    store.submit(task.token, alice, {"text": "better"})
    assert store.export(edit, tmp_path / "e.jsonl", "trl-preference") == 1
    (pair,) = read_records(tmp_path / "e.jsonl", "preference")
    assert (pair.chosen, pair.rejected, pair.annotator) == ("better", "draft", "alice")
    assert store.export(edit, tmp_path / "s.jsonl", "sft") == 1
    (demo,) = read_records(tmp_path / "s.jsonl", "demonstration")
    assert (demo.prompt, demo.completion) == ("q", "better")


def test_export_rows_of_a_ranking_tie_are_left_out(open_store, tmp_path):
    store = open_store()
    project = store.create_project("r", task_type="ranking", overlap=2)
    store.add_items(project, [{"prompt": "q", "responses": ["a", "b", "c"]}])
    for name, wanted in (("alice", (0, 1, 2)), ("bob", (1, 0, 2))):
        annotator = store.add_annotator(name)
        task = store.next_task(project, annotator)
        store.submit(task.token, annotator, {"ranking": [task.order.index(i) for i in wanted]})
    assert store.export(project, tmp_path / "r.jsonl", "trl-preference") == 2
    rows = _rows(tmp_path / "r.jsonl")
    # a vs b: one vote each way, no pair; both beat c twice.
    assert sorted((r["chosen"], r["rejected"], r["n_votes"], r["agreement"]) for r in rows) == [
        ("a", "c", 2, 1.0),
        ("b", "c", 2, 1.0),
    ]
    assert exports.FORMATS_BY_TASK_TYPE["ranking"] == ("trl-preference", "raw")


def _labelled_source(path, clock) -> FeedbackStore:
    """An SQLite store with a project of each kind that has labels: chat prompts, meta, golden items
    (and their labels), ties, overlap, several annotators, times that differ."""
    store = FeedbackStore(path, seed=0, clock=clock, durable=False)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Top 5 films?"}]
    answers = {
        # Alice and Bob prefer the first response whatever side it is shown on; carol ties.
        "comparison": [
            lambda task: {"choice": "left" if task.order[0] == 0 else "right", "strength": 3},
            lambda task: {"choice": "left" if task.order[0] == 0 else "right", "strength": 1},
            {"choice": "tie", "strength": 1},
        ],
        "ranking": [
            lambda task: {"ranking": [task.order.index(i) for i in (0, 1, 2)]},
            lambda task: {"ranking": [task.order.index(i) for i in (0, 2, 1)]},
            {"ranking": [2, 0, 1]},
        ],
        "likert": [{"rating": 6}, {"rating": 2}],
        "binary": [{"label": True}, {"label": False}],
        "edit": [{"text": "1. Better"}, {"text": "1. Other"}],
        "demonstration": [{"text": "1. Written"}, {"text": "1. Also written"}],
    }
    responses = {"comparison": ["a", "b"], "ranking": ["a", "b", "c"], "demonstration": []}
    golden = {"comparison": {"chosen": 1}, "ranking": {"ranking": [1, 0, 2]}, "likert": {"rating": 5}}
    golden["binary"] = {"label": False}
    for kind, given in answers.items():
        rate = 0.5 if kind in golden else 0.0
        project = store.create_project(kind, task_type=kind, overlap=2, golden_rate=rate)
        shown = responses.get(kind, ["1. Draft"])
        items = [
            {"prompt": chat, "responses": shown, "meta": {"policy": "sft", "round": 1}},
            {"prompt": "Top 5 cities?", "responses": shown, "overlap": 3},
        ]
        if kind in golden:
            items.append({"prompt": "Known?", "responses": shown, "golden": golden[kind]})
        store.add_items(project, items)
        for n, name in enumerate(("alice", "Bob", "carol")):
            annotator = store.add_annotator(name, "simulated" if name == "carol" else "human")
            while (task := store.next_task(project, annotator)) is not None:
                clock.advance(7 + n)
                answer = given[n % len(given)]
                store.submit(task.token, annotator, answer(task) if callable(answer) else answer)
    return store


def _comparable(rows: list[dict]) -> list[dict]:
    """Raw rows with their store's ids replaced by their order of appearance (the rest as is)."""
    items: dict[int, int] = {}
    return [
        {**row, "label_id": n, "item_id": items.setdefault(row["item_id"], len(items))}
        for n, row in enumerate(rows)
    ]


def test_a_raw_export_imports_into_another_store_and_exports_the_same_rows(db_url, clock, tmp_path):
    # Moving a project between stores (SQLite -> SQLite or PostgreSQL): items, annotators and labels,
    # golden flags, times and names kept, and the raw export of the copy is the raw export it came from.
    source = _labelled_source(tmp_path / "source.db", clock)
    progress = {p.name: source.progress(p.project_id) for p in source.projects()}
    source.close()
    for name in progress:
        before, after = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-again.jsonl"
        args = ("--project", name, "--format", "raw", "--out")
        assert _cli("export", "--db", str(tmp_path / "source.db"), *args, str(before)).exit_code == 0
        rows = _rows(before)
        assert len(rows) >= 4 and any(r["golden"] for r in rows) == (name not in ("edit", "demonstration"))
        result = _cli("import", "--db", db_url, "--project", f"copy-{name}", "--raw", str(before))
        assert result.exit_code == 0, result.output
        n_items = len({r["item_id"] for r in rows})
        assert (
            f"imported {n_items} items with {len(rows)} labels into project 'copy-{name}' ({name})"
            in _flat(result.output)
        )
        result = _cli(
            "export", "--db", db_url, "--project", f"copy-{name}", "--format", "raw", "--out", str(after)
        )
        assert result.exit_code == 0, result.output
        assert _comparable(_rows(after)) == _comparable(rows)
    with FeedbackStore(db_url) as copy:
        # Annotators, not accounts: nobody logs in as an imported annotator until an admin says so.
        assert copy.users() == []
        assert copy.authenticate("alice", "") is None
        # The queue goes on where it was: items keep their overlap and their label counts.
        assert {name: copy.progress(copy.project_id(f"copy-{name}")) for name in progress} == progress


def test_a_raw_import_refuses_a_bad_row_naming_file_line_and_field_and_stores_nothing(
    db_url, clock, tmp_path
):
    source = _labelled_source(tmp_path / "source.db", clock)
    source.export(source.project_id("comparison"), tmp_path / "raw.jsonl", "raw")
    source.close()
    good = _rows(tmp_path / "raw.jsonl")
    golden_row = next(n for n, r in enumerate(good) if r["golden"])
    bad_rows = [
        (1, "chosen", {"chosen": 5}),
        (2, "strength", {"strength": 9}),
        (1, "annotator", {"annotator": ""}),
        (2, "created_at", {"created_at": "yesterday"}),
        (1, "order", {"order": [0, 0]}),
        (2, "kind", {"kind": "ranking"}),
        (1, "extra", {"extra": 1}),
        (golden_row, "correct", {"correct": not good[golden_row]["correct"]}),
        (golden_row, "golden_key", {"golden_key": None}),
        (1, "value", {"value": {"rating": 3}}),
    ]
    first, second = (n for n, r in enumerate(good) if r["item_id"] == good[0]["item_id"])
    bad_rows += [
        (second, "prompt", {"prompt": "another prompt"}),  # disagrees with the first row of its item
        (second, "annotator", {"annotator": good[first]["annotator"]}),  # labelled one item twice
    ]
    for index, field, change in bad_rows:
        rows = [dict(r) for r in good]
        rows[index].update(change)
        _assert_raw_import_refused(db_url, tmp_path, rows, index + 1, field)
    # A raw import recreates a project: into an existing one it is refused.
    assert (
        _cli("import", "--db", db_url, "--project", "copy", "--raw", str(tmp_path / "raw.jsonl")).exit_code
        == 0
    )
    result = _cli("import", "--db", db_url, "--project", "copy", "--raw", str(tmp_path / "raw.jsonl"))
    assert result.exit_code == 2 and "exists already" in _flat(result.output)


def _assert_raw_import_refused(db_url: str, tmp_path, rows: list[dict], line: int, field: str) -> None:
    """`feedback import --raw` of `rows` fails naming the file, `line` and `field`, and stores nothing
    (not even the project)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _cli("import", "--db", db_url, "--project", "copy", "--raw", str(bad))
    assert result.exit_code == 2, (field, result.output)
    assert f"{bad}:{line}: field '{field}': " in _flat(result.output), (field, result.output)
    with FeedbackStore(db_url) as store:
        assert store.projects() == []


def test_a_raw_import_refuses_a_time_to_come_and_more_labels_than_the_overlap(db_url, clock, tmp_path):
    # Neither comes out of the service: it stamps a label with its own clock, and never leases an
    # item to more annotators than its overlap. A crafted file had both stored.
    source = _labelled_source(tmp_path / "source.db", clock)
    source.export(source.project_id("comparison"), tmp_path / "raw.jsonl", "raw")
    source.close()
    good = _rows(tmp_path / "raw.jsonl")
    plain = [n for n, r in enumerate(good) if not r["golden"] and r["item_id"] == good[0]["item_id"]]
    assert len(plain) == good[0]["overlap"] == 2
    extra = {**good[plain[0]], "label_id": 999, "annotator": "zed"}  # a third label, overlap 2
    cases = [
        (good[:1] + [{**good[1], "created_at": "2999-01-01T00:00:00+00:00"}] + good[2:], 2, "created_at"),
        (good + [extra], len(good) + 1, "overlap"),
    ]
    for rows, line, field in cases:
        _assert_raw_import_refused(db_url, tmp_path, rows, line, field)
    # An export from before 'overlap' was written: the message points at --overlap, which fixes it.
    old = [{k: v for k, v in r.items() if k != "overlap"} for r in good]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    result = _cli("import", "--db", db_url, "--project", "copy", "--raw", str(tmp_path / "old.jsonl"))
    assert result.exit_code == 2 and "--overlap" in _flat(result.output), result.output
    result = _cli(
        "import", "--db", db_url, "--project", "copy", "--raw", str(tmp_path / "old.jsonl"), "--overlap", "3"
    )
    assert result.exit_code == 0, result.output


def test_a_raw_row_without_created_at_gets_the_import_time(db_url, clock, tmp_path):
    # The documented default: it failed on the NOT NULL column instead.
    source = _labelled_source(tmp_path / "source.db", clock)
    source.export(source.project_id("comparison"), tmp_path / "raw.jsonl", "raw")
    source.close()
    rows = [{k: v for k, v in r.items() if k != "created_at"} for r in _rows(tmp_path / "raw.jsonl")]
    rows[0]["created_at"] = None
    (tmp_path / "timeless.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from datetime import UTC, datetime

    before = datetime.now(UTC)
    result = _cli("import", "--db", db_url, "--project", "copy", "--raw", str(tmp_path / "timeless.jsonl"))
    assert result.exit_code == 0, result.output
    after = datetime.now(UTC)
    with FeedbackStore(db_url) as store:
        labels = store.labels(store.project_id("copy"))
        assert len(labels) == len(rows) and all(before <= label.created_at <= after for label in labels)


@pytest.mark.parametrize("fail_at", ["INSERT INTO items", "INSERT INTO labels"])
def test_an_import_that_fails_midway_leaves_no_project_behind(db_url, clock, tmp_path, fail_at):
    # A connection lost after the project was created and before its items were stored left an
    # empty project, which the next import then filled as an existing one.
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.exc import OperationalError

    source = _labelled_source(tmp_path / "source.db", clock)
    source.export(source.project_id("comparison"), tmp_path / "raw.jsonl", "raw")
    source.close()
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "q", "completions": ["a", "b"]}\n')
    source_args = ["--raw", str(tmp_path / "raw.jsonl")] if "labels" in fail_at else ["--file", str(items)]

    def lose_the_connection(conn, cursor, statement, *args):
        if statement.startswith(fail_at):
            raise OperationalError(statement, {}, Exception("server closed the connection unexpectedly"))

    event.listen(Engine, "before_cursor_execute", lose_the_connection)
    try:
        result = _cli("import", "--db", db_url, "--project", "p", *source_args)
    finally:
        event.remove(Engine, "before_cursor_execute", lose_the_connection)
    assert result.exit_code == 2, result.output
    assert "the import failed, and nothing of it was stored" in _flat(result.output)
    with FeedbackStore(db_url) as store:
        assert store.projects() == []
        with store._transaction() as conn:  # nor the annotators of a raw import's labels
            assert conn.exec_driver_sql("SELECT count(*) FROM annotators").scalar() == 0
    # The same import, run again, goes through: nothing is in its way.
    result = _cli("import", "--db", db_url, "--project", "p", *source_args)
    assert result.exit_code == 0, result.output


def test_cli_import_refuses_a_file_over_the_size_limit_before_reading_it(tmp_path):
    db = str(tmp_path / "f.db")
    lines = tmp_path / "items.jsonl"
    lines.write_text('{"prompt": "q", "completions": ["a", "b"]}\n' * 100)  # 4.3 KB
    folder = tmp_path / "items_ds"
    from datasets import Dataset

    Dataset.from_list([{"prompt": "q", "completions": ["a", "b"]}] * 100).save_to_disk(str(folder))
    for source in (lines, folder):
        for flag in ("--file", "--raw"):
            result = _cli("import", "--db", db, "--project", "p", flag, str(source), "--max-file-mb", "0.001")
            assert result.exit_code == 2, result.output
            assert f"{source}: is " in _flat(result.output)
            assert "bytes, over the import limit of 1048 bytes" in _flat(result.output)
            assert "--max-file-mb" in _flat(result.output)
        with FeedbackStore(db) as store:
            assert store.projects() == []
    # The default (1 GiB) takes it, and so does no limit (0).
    assert _cli("import", "--db", db, "--project", "p", "--file", str(lines)).exit_code == 0
    result = _cli("import", "--db", db, "--project", "q", "--file", str(folder), "--max-file-mb", "0")
    assert result.exit_code == 0, result.output


def test_a_chat_project_exports_trl_conversational_rows_that_read_back_for_training(db_url, clock, tmp_path):
    # TRL pairs a conversational prompt with completions that are messages too: a chat prompt beside
    # plain-string chosen/rejected is neither of its formats (its chat template cannot apply to it).
    source = _labelled_source(tmp_path / "source.db", clock)
    source.close()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Top 5 films?"}]
    formats = [
        ("comparison", "trl-preference", "preference"),
        ("ranking", "trl-preference", "preference"),
        ("edit", "trl-preference", "preference"),
        ("binary", "trl-unpaired", "unpaired"),
        ("demonstration", "sft", "demonstration"),
        ("edit", "sft", "demonstration"),
    ]
    for project, format_, kind in formats:
        out = tmp_path / f"{project}-{format_}.jsonl"
        args = ("--project", project, "--format", format_, "--out", str(out))
        assert _cli("export", "--db", str(tmp_path / "source.db"), *args).exit_code == 0
        rows = _rows(out)
        records = read_records(out, kind)
        assert len(records) == len(rows) > 0
        for row, record in zip(rows, records, strict=True):
            completions = ("chosen", "rejected") if kind == "preference" else ("completion",)
            if row["prompt"] == chat:
                assert [m.model_dump() for m in record.prompt] == chat
                for field in completions:
                    (message,) = row[field]
                    assert message["role"] == "assistant"
                    assert [m.model_dump() for m in getattr(record, field)] == [message]
            else:  # a plain-string prompt keeps plain-string completions
                assert all(isinstance(row[field], str) for field in completions)
                assert [getattr(record, field) for field in completions] == [row[f] for f in completions]
        assert any(row["prompt"] == chat for row in rows), project
    # The aggregate command's rows (crowd.aggregate.preference_rows) take the same form.
    out = tmp_path / "aggregated.jsonl"
    args = ("--project", "comparison", "--method", "mv", "--out", str(out))
    assert _cli("aggregate", "--db", str(tmp_path / "source.db"), *args).exit_code == 0
    pairs = {json.dumps(row["prompt"]): row for row in _rows(out)}
    assert pairs[json.dumps(chat)]["chosen"] == [{"role": "assistant", "content": "a"}]
    chat_pair = next(p for p in read_records(out, "preference") if isinstance(p.prompt, list))
    assert [m.content for m in chat_pair.chosen + chat_pair.rejected] == ["a", "b"]
