"""The feedback store on SQLite and PostgreSQL: leases, overlap, idempotent submission, export."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from rlhfkit.data.io import read_records
from rlhfkit.data.records import Message
from rlhfkit.feedback.store import FeedbackStore


def _items(n: int, overlap: int | None = None) -> list[dict]:
    items = []
    for i in range(n):
        item: dict = {"prompt": f"prompt {i}", "responses": [f"first {i}", f"second {i}"]}
        if overlap is not None:
            item["overlap"] = overlap
        items.append(item)
    return items


def _label_everything(store: FeedbackStore, project: int, annotator: int) -> list[int]:
    labelled = []
    while (task := store.next_task(project, annotator)) is not None:
        store.submit_comparison(task.token, annotator, "left")
        labelled.append(task.item_id)
    return labelled


def test_create_project_is_idempotent(open_store):
    store = open_store()
    first = store.create_project("prefs", guidelines="pick the better list", overlap=2)
    assert store.create_project("prefs") == first
    assert store.project_id("prefs") == first
    assert store.create_project("other") != first
    with pytest.raises(ValueError, match="task_type"):
        store.create_project("prefs", task_type="likert")
    with pytest.raises(KeyError, match="no feedback project named 'missing'"):
        store.project_id("missing")


def test_project_names_are_unique_ignoring_case_spacing_and_unicode_form(open_store):
    store = open_store()
    top5 = store.create_project("Top5", guidelines="five items")
    for look_alike in ["top5 ", " Top5", "TOP5", "\uff34\uff4f\uff50\uff15", "Top5\u00a0"]:
        with pytest.raises(
            ValueError, match=r"project 'Top5' exists, and .* differs from it only in case, spacing"
        ):
            store.create_project(look_alike)
    assert store.create_project("Top5") == top5  # the same name is found, as before
    spaced = store.create_project("Top 5 films")
    for look_alike in ["top  5 films", "Top 5\tfilms", "Top 5 Films"]:
        with pytest.raises(ValueError, match="'Top 5 films' exists"):
            store.create_project(look_alike)
    assert store.create_project("Top 5 films") == spaced
    assert store.create_project("Top6") != top5  # a different name is a different project
    assert [p.name for p in store.projects()] == ["Top5", "Top 5 films", "Top6"]  # stored as given
    # A command's --project finds the project by a name that reads the same.
    assert store.project_id("top5 ") == top5 and store.project_id("TOP 5  FILMS") == spaced
    with pytest.raises(KeyError, match="no feedback project named 'Top7'"):
        store.project_id("Top7")


def _sqlite_at_revision(db: Path, revision: str, rows: list[tuple[str, dict]]):
    """A SQLite database migrated from empty to `revision` only, holding `rows` ((SQL, parameters)
    each): a database made by an older rlhfkit. Returns its engine."""
    from alembic import command
    from alembic.config import Config

    from rlhfkit.feedback.migrate import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        for sql, params in rows:
            conn.execute(text(sql), params)
    return engine


def test_look_alike_projects_from_before_project_keys_keep_working(tmp_path):
    """A database with "films" and "Films " (made before 0005) still opens; each is found by its exact
    name, and no further look-alike can be made."""
    db = tmp_path / "old.db"
    project = (
        "INSERT INTO projects (id, name, task_type, guidelines, overlap, settings, created_at) "
        "VALUES (:id, :name, 'comparison', '', 1, '{}', '2024-01-01 00:00:00')"
    )
    rows = [(project, {"id": i, "name": name}) for i, name in [(1, "films"), (2, "Films "), (3, "plants")]]
    _sqlite_at_revision(db, "0004", rows).dispose()
    with FeedbackStore(db) as store:
        assert [store.project_id(name) for name in ["films", "Films ", "plants"]] == [1, 2, 3]
        assert store.create_project("Films ") == 2
        store.add_items(2, _items(1))
        with pytest.raises(ValueError, match="project 'films' exists"):
            store.create_project("FILMS")
        with pytest.raises(ValueError, match="project 'plants' exists"):
            store.create_project("Plants")


def test_add_items_validation_names_index_and_field(open_store):
    store = open_store()
    project = store.create_project("p")
    good = {"prompt": "q", "responses": ["a", "b"]}
    cases = [
        ({"prompt": "  ", "responses": ["a", "b"]}, "'prompt'"),
        ({"responses": ["a", "b"]}, "'prompt' is missing"),
        ({"prompt": "q", "responses": ["a"]}, "'responses'"),
        ({"prompt": "q", "responses": "ab"}, "'responses'"),
        ({"prompt": "q", "responses": ["a", 3]}, "'responses'"),
        ({"prompt": "q", "responses": ["a", "b", "c"]}, "'responses' needs exactly 2"),
        ({"prompt": "q", "responses": ["a", "b"], "overlap": 0}, "'overlap'"),
        ({"prompt": "q", "responses": ["a", "b"], "meta": {"x": object()}}, "'meta'"),
        ({"prompt": "q", "responses": ["a", "b"], "meta": {"x": float("nan")}}, "'meta'"),
        ({"prompt": "q", "responses": ["a", "b"], "gold": 1.0}, "'gold'"),
    ]
    for bad, field in cases:
        with pytest.raises(ValueError, match=f"item 1: field {field}"):
            store.add_items(project, [good, bad])
    assert store.items(project) == []  # nothing of a rejected batch is stored
    ids = store.add_items(project, [good, {**good, "overlap": 3, "meta": {"policy": "sft"}}])
    records = store.items(project)
    assert [r.item_id for r in records] == ids
    assert [r.overlap for r in records] == [1, 3]
    assert records[1].meta == {"policy": "sft"}


def test_add_items_bulk(open_store):
    store = open_store()
    project = store.create_project("bulk")
    ids = store.add_items(project, _items(3000))
    assert len(ids) == len(set(ids)) == 3000
    assert ids == sorted(ids)
    assert store.progress(project)["n_items"] == 3000


def test_next_task_never_returns_a_labelled_item(open_store):
    store = open_store()
    project = store.create_project("p", overlap=3)
    store.add_items(project, _items(5))
    alice = store.add_annotator("alice")
    labelled = _label_everything(store, project, alice)
    assert sorted(labelled) == sorted(set(labelled))
    assert len(labelled) == 5
    assert store.next_task(project, alice) is None


def test_overlap_gives_distinct_annotators(open_store):
    store = open_store()
    project = store.create_project("p")
    (three,) = store.add_items(project, [{"prompt": "q", "responses": ["a", "b"], "overlap": 3}])
    store.add_items(project, _items(2))
    annotators = [store.add_annotator(f"a{i}") for i in range(5)]
    # Round-robin, as a crowd would arrive.
    while True:
        tasks = 0
        for a in annotators:
            task = store.next_task(project, a)
            if task is not None:
                store.submit_comparison(task.token, a, "right")
                tasks += 1
        if not tasks:
            break
    labels = store.labels(project)
    on_three = [label.annotator for label in labels if label.item_id == three]
    assert len(on_three) == 3 and len(set(on_three)) == 3
    assert len(labels) == 5
    assert store.progress(project) == {
        "n_items": 3,
        "n_labels": 5,
        "n_items_complete": 3,
        "n_annotators": 5,
    }


def test_items_with_labels_are_finished_first(open_store):
    store = open_store()
    project = store.create_project("p", overlap=2)
    first, second = store.add_items(project, _items(2))
    alice, bob = store.add_annotator("alice"), store.add_annotator("bob")
    task = store.next_task(project, alice)
    assert task.item_id == first
    store.submit_comparison(task.token, alice, "left")
    assert store.next_task(project, bob).item_id == first


def test_held_lease_is_returned_again(open_store, clock):
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, _items(3))
    alice = store.add_annotator("alice")
    task = store.next_task(project, alice)
    clock.advance(30)
    assert store.next_task(project, alice) == task


def test_lease_blocks_others_until_it_expires(open_store, clock):
    store = open_store()
    project = store.create_project("p")
    (item,) = store.add_items(project, _items(1))
    alice, bob = store.add_annotator("alice"), store.add_annotator("bob")
    held = store.next_task(project, alice, lease_seconds=60)
    assert held.item_id == item
    assert store.next_task(project, bob) is None
    clock.advance(61)
    again = store.next_task(project, bob)
    assert again is not None and again.item_id == item and again.token != held.token
    store.submit_comparison(again.token, bob, "tie")
    assert store.next_task(project, alice) is None
    # Alice's answer on her expired lease is still real work: it is kept.
    store.submit_comparison(held.token, alice, "left")
    assert sorted(label.annotator for label in store.labels(project)) == ["alice", "bob"]


def test_an_item_is_labelled_once_per_annotator_and_the_refusal_names_no_item(open_store, clock):
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, _items(1))
    alice = store.add_annotator("alice")
    expired = store.next_task(project, alice, lease_seconds=60)
    clock.advance(61)
    again = store.next_task(project, alice, lease_seconds=60)
    assert again.item_id == expired.item_id and again.token != expired.token
    label = store.submit_comparison(again.token, alice, "left")
    # Annotators never see an item id (it would single out golden items), errors included.
    with pytest.raises(ValueError) as refused:
        store.submit_comparison(expired.token, alice, "left")
    assert str(refused.value) == f"this annotator already labelled this task's item (label {label})"
    assert len(store.labels(project)) == 1


def test_submit_is_idempotent(open_store):
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, _items(2))
    alice = store.add_annotator("alice")
    task = store.next_task(project, alice)
    label = store.submit_comparison(task.token, alice, "right", strength=2)
    assert store.submit_comparison(task.token, alice, "right", strength=2) == label
    assert len(store.labels(project)) == 1
    with pytest.raises(ValueError, match="different answer"):
        store.submit_comparison(task.token, alice, "left", strength=2)
    assert store.progress(project)["n_labels"] == 1


def test_submit_refuses_bad_requests(open_store):
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, _items(2))
    alice, mallory = store.add_annotator("alice"), store.add_annotator("mallory")
    task = store.next_task(project, alice)
    with pytest.raises(PermissionError, match="another annotator"):
        store.submit_comparison(task.token, mallory, "left")
    with pytest.raises(ValueError, match="unknown task token"):
        store.submit_comparison("no-such-token", alice, "left")
    with pytest.raises(ValueError, match="choice"):
        store.submit_comparison(task.token, alice, "up")
    with pytest.raises(ValueError, match="strength"):
        store.submit_comparison(task.token, alice, "left", strength=4)
    with pytest.raises(ValueError, match="kind"):
        store.add_annotator("alice", kind="simulated")
    with pytest.raises(KeyError, match="no annotator"):
        store.next_task(project, -1)
    assert store.labels(project) == []


def test_presented_order_maps_back_to_original_index(open_store):
    store = open_store()
    project = store.create_project("p")
    store.add_items(project, _items(40))
    alice = store.add_annotator("alice")
    originals = {item.item_id: item.responses for item in store.items(project)}
    seen_orders = set()
    expected = {}
    choices = ["left", "right", "tie"]
    while (task := store.next_task(project, alice)) is not None:
        seen_orders.add(tuple(task.order))
        assert task.responses == [originals[task.item_id][i] for i in task.order]
        choice = choices[len(expected) % 3]
        store.submit_comparison(task.token, alice, choice)
        position = {"left": 0, "right": 1, "tie": None}[choice]
        expected[task.item_id] = (None if position is None else task.order[position], task.order)
    assert seen_orders == {(0, 1), (1, 0)}  # the order is randomised
    for label in store.labels(project):
        assert (label.chosen, label.order) == expected[label.item_id]


def test_labels_survive_reopening(open_store, clock):
    store = open_store(durable=True)
    project = store.create_project("p")
    store.add_items(project, _items(3))
    alice = store.add_annotator("alice")
    task = store.next_task(project, alice)
    clock.advance(12.5)
    label_id = store.submit_comparison(task.token, alice, "left", strength=3)
    store.close()
    reopened = open_store(durable=True)
    assert reopened.project_id("p") == project
    (label,) = reopened.labels(project)
    assert label.label_id == label_id
    assert label.annotator == "alice"
    assert label.strength == 3
    assert label.seconds == pytest.approx(12.5)
    assert label.created_at == clock.now
    assert reopened.next_task(project, alice).item_id != task.item_id


def test_export_preferences_writes_trl_rows_and_skips_ties(open_store, tmp_path):
    store = open_store()
    project = store.create_project("export", overlap=2)
    win, tie, unlabelled = store.add_items(
        project,
        [
            {"prompt": "p-win", "responses": ["good", "bad"], "meta": {"gold": 1}},
            {"prompt": "p-tie", "responses": ["x", "y"]},
            {"prompt": "p-none", "responses": ["u", "v"]},
        ],
    )
    a, b = store.add_annotator("a"), store.add_annotator("b")
    wanted = {(win, a): 0, (win, b): 0, (tie, a): 0, (tie, b): 1}
    for annotator in (a, b):
        for _ in range(2):
            task = store.next_task(project, annotator)
            target = wanted[(task.item_id, annotator)]
            store.submit_comparison(task.token, annotator, "left" if task.order[0] == target else "right")
    n = store.export_preferences(project, tmp_path / "out" / "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert n == len(rows) == 1
    assert rows[0] == {
        "prompt": "p-win",
        "chosen": "good",
        "rejected": "bad",
        "source": "feedback:export",
        "n_votes": 2,
        "agreement": 1.0,
    }
    with pytest.raises(ValueError, match="method"):
        store.export_preferences(project, tmp_path / "x.jsonl", method="dawid-skene")
    assert unlabelled not in {label.item_id for label in store.labels(project)}


def test_export_raw_keeps_every_annotator(open_store, tmp_path):
    store = open_store()
    project = store.create_project("raw", overlap=3)
    store.add_items(project, _items(2))
    for name in ("a", "b", "c"):
        _label_everything(store, project, store.add_annotator(name))
    n = store.export_raw(project, tmp_path / "raw.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert n == len(rows) == 6
    assert Counter(r["annotator"] for r in rows) == {"a": 2, "b": 2, "c": 2}
    assert set(rows[0]) >= {
        "item_id",
        "prompt",
        "responses",
        "annotator",
        "chosen",
        "order",
        "strength",
        "created_at",
        "seconds",
    }
    assert rows[0]["responses"] == ["first 0", "second 0"]
    assert rows[0]["chosen"] == rows[0]["order"][0]


def test_concurrent_annotators_never_exceed_overlap(open_store):
    store = open_store(clock=None)
    project = store.create_project("busy")
    store.add_items(project, _items(30, overlap=2))
    annotators = [store.add_annotator(f"w{i}") for i in range(4)]
    errors: list[BaseException] = []

    def work(annotator: int) -> None:
        try:
            _label_everything(store, project, annotator)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a,)) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    labels = store.labels(project)
    per_item = Counter(label.item_id for label in labels)
    assert len(labels) == 60 and set(per_item.values()) == {2}
    assert len({(label.item_id, label.annotator) for label in labels}) == 60


@pytest.mark.postgres
def test_schema_argument_keeps_tables_apart(pg_url):
    schemas = [f"rlhfkit_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    try:
        with FeedbackStore(pg_url, schema=schemas[0]) as store:
            store.create_project("in-schema")
        with FeedbackStore(pg_url, schema=schemas[1]) as other:
            with pytest.raises(KeyError):
                other.project_id("in-schema")
        with FeedbackStore(pg_url, schema=schemas[0]) as again:
            assert again.project_id("in-schema") > 0
        with pytest.raises(ValueError, match="identifier"):
            FeedbackStore(pg_url, schema='x"; drop table items; --')
    finally:
        admin = create_engine(pg_url, poolclass=NullPool)
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_plain_path_means_sqlite(tmp_path):
    with FeedbackStore(tmp_path / "sub" / "fb.db") as store:
        store.create_project("p")
    with FeedbackStore(str(tmp_path / "sub" / "fb.db")) as store:
        assert store.project_id("p") == 1
    with pytest.raises(ValueError, match="PostgreSQL"):
        FeedbackStore(tmp_path / "x.db", schema="s")


# -- task types, golden items, exclusion, users (the annotation service) -------------------


def _answer_all(store, project, annotator, answer_of) -> int:
    n = 0
    while (task := store.next_task(project, annotator)) is not None:
        store.submit(task.token, annotator, answer_of(task))
        n += 1
    return n


def test_every_task_type_labels_and_exports(open_store, tmp_path):
    store = open_store()
    alice = store.add_annotator("alice")
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "top 5 cities?"}]
    cases = {
        "ranking": ({"prompt": chat, "responses": ["r0", "r1", "r2"]}, lambda t: {"ranking": [2, 1, 0]}),
        "likert": ({"prompt": "q", "responses": ["one"]}, lambda t: {"rating": 6}),
        "binary": ({"prompt": "q", "responses": ["one"]}, lambda t: {"label": True}),
        "edit": ({"prompt": "q", "responses": ["draft"]}, lambda t: {"text": "fixed"}),
        "demonstration": ({"prompt": "write one"}, lambda t: {"text": "written"}),
    }
    for task_type, (item, answer) in cases.items():
        project = store.create_project(task_type, task_type=task_type)
        store.add_items(project, [item])
        assert _answer_all(store, project, alice, answer) == 1
        (label,) = store.labels(project)
        assert label.kind == task_type
    ranking = store.project_id("ranking")
    (label,) = store.labels(ranking)
    task_order = label.order
    # Presented positions 2 > 1 > 0 are the originals in reverse presented order.
    assert label.value == {"ranking": [task_order[2], task_order[1], task_order[0]]}
    assert store.export(ranking, tmp_path / "r.jsonl", "trl-preference") == 3
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(row["prompt"] == chat for row in rows)
    assert store.export(store.project_id("edit"), tmp_path / "e.jsonl", "trl-preference") == 1
    assert json.loads((tmp_path / "e.jsonl").read_text())["chosen"] == "fixed"
    assert store.export(store.project_id("binary"), tmp_path / "b.jsonl", "trl-unpaired") == 1
    assert store.export(store.project_id("demonstration"), tmp_path / "d.jsonl", "sft") == 1
    assert json.loads((tmp_path / "d.jsonl").read_text())["completion"] == "written"
    with pytest.raises(ValueError, match="trl-unpaired needs"):
        store.export(store.project_id("likert"), tmp_path / "x.jsonl", "trl-unpaired")
    # Likert ratings in raw: the rated completion, the rating and its scale, and the item's meta.
    likert = store.project_id("likert")
    store.add_items(likert, [{"prompt": "p2", "responses": ["two"], "meta": {"policy": "ppo"}}])
    assert _answer_all(store, likert, alice, lambda t: {"rating": 2}) == 1
    assert store.export(likert, tmp_path / "l.jsonl", "raw") == 2
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["rating"], r["scale"]) for r in rows] == [
        ("q", "one", 6, [1, 7]),
        ("p2", "two", 2, [1, 7]),
    ]
    assert rows[1]["meta"] == {"policy": "ppo"} and rows[1]["annotator"] == "alice"
    # ... which read back as rating records; edit labels in raw read back as edit records
    # (an unchanged edit included: the service takes it, only the preference export skips it).
    ratings = read_records(tmp_path / "l.jsonl", "rating")
    assert [(r.prompt, r.completion, r.rating, r.annotator) for r in ratings] == [
        ("q", "one", 6, "alice"),
        ("p2", "two", 2, "alice"),
    ]
    edit = store.project_id("edit")
    store.add_items(edit, [{"prompt": chat, "responses": ["keep me"]}])
    assert _answer_all(store, edit, alice, lambda t: {"text": "keep me"}) == 1
    assert store.export(edit, tmp_path / "e.jsonl", "trl-preference") == 1
    assert store.export(edit, tmp_path / "er.jsonl", "raw") == 2
    edits = read_records(tmp_path / "er.jsonl", "edit")
    assert [(r.prompt, r.completion, r.edited, r.annotator) for r in edits] == [
        ("q", "draft", "fixed", "alice"),
        (
            [Message(role="system", content="be brief"), Message(role="user", content="top 5 cities?")],
            "keep me",
            "keep me",
            "alice",
        ),
    ]
    with pytest.raises(ValueError, match="unknown export format"):
        store.export(ranking, tmp_path / "x.jsonl", "csv")


def test_item_validation_per_task_type(open_store):
    store = open_store()
    likert = store.create_project("l", task_type="likert")
    ranking = store.create_project("r", task_type="ranking")
    with pytest.raises(ValueError, match="item 0: field 'responses' needs exactly 1"):
        store.add_items(likert, [{"prompt": "q", "responses": ["a", "b"]}])
    with pytest.raises(ValueError, match="'responses' \\[1\\] is empty"):
        store.add_items(ranking, [{"prompt": "q", "responses": ["a", " "]}])
    with pytest.raises(ValueError, match="'prompt' \\[0\\].role"):
        store.add_items(ranking, [{"prompt": [{"role": "bot", "content": "x"}], "responses": ["a", "b"]}])
    with pytest.raises(ValueError, match="'golden'"):
        store.add_items(likert, [{"prompt": "q", "responses": ["a"], "golden": {"rating": 9}}])
    with pytest.raises(ValueError, match="golden_rate"):
        store.create_project("e", task_type="edit", golden_rate=0.2)


def test_submit_rejects_wrong_answers_and_is_idempotent(open_store):
    store = open_store()
    project = store.create_project("r", task_type="ranking")
    store.add_items(project, [{"prompt": "q", "responses": ["a", "b", "c"]}])
    alice = store.add_annotator("alice")
    task = store.next_task(project, alice)
    with pytest.raises(ValueError, match="field 'ranking'"):
        store.submit(task.token, alice, {"ranking": [0, 1, 1]})
    with pytest.raises(ValueError, match="not a comparison"):
        store.submit_comparison(task.token, alice, "left")
    first = store.submit(task.token, alice, {"ranking": [1, 0, 2]})
    assert store.submit(task.token, alice, {"ranking": [1, 0, 2]}) == first
    with pytest.raises(ValueError, match="different answer"):
        store.submit(task.token, alice, {"ranking": [0, 1, 2]})
    assert len(store.labels(project)) == 1


def test_golden_items_are_mixed_in_and_scored(open_store, tmp_path):
    store = open_store()
    project = store.create_project("g", golden_rate=0.5)
    store.add_items(project, _items(20))
    golden_ids = set(
        store.add_items(
            project,
            [
                {"prompt": f"gold {i}", "responses": ["good", "bad"], "golden": {"chosen": 0}}
                for i in range(6)
            ],
        )
    )
    alice = store.add_annotator("alice")
    seen_golden = 0
    while (task := store.next_task(project, alice)) is not None:
        is_golden = task.item_id in golden_ids
        seen_golden += is_golden
        good_position = task.responses.index("good") if is_golden else 0
        # Alice answers golden items right except one.
        choice = ["left", "right"][good_position if seen_golden != 1 or not is_golden else 1 - good_position]
        store.submit_comparison(task.token, alice, choice)
    assert 1 <= seen_golden <= 6  # mixed in at about half of the 20 real tasks
    assert store.progress(project)["n_items"] == 20  # golden items are not counted as work
    (stats,) = store.annotator_stats(project)
    assert stats["n_golden"] == seen_golden
    assert stats["golden_accuracy"] == pytest.approx((seen_golden - 1) / seen_golden, abs=1e-4)
    # Exports of training data never contain golden items.
    store.export(project, tmp_path / "p.jsonl", "trl-preference")
    prompts = {json.loads(line)["prompt"] for line in (tmp_path / "p.jsonl").read_text().splitlines()}
    assert not any(p.startswith("gold") for p in prompts)


def test_excluded_annotators_are_left_out_of_every_export(open_store, tmp_path):
    store = open_store()
    project = store.create_project("x", overlap=2)
    store.add_items(project, _items(3))
    good, spam = store.add_annotator("good"), store.add_annotator("spam")
    for annotator, original in ((good, 0), (spam, 1)):
        while (task := store.next_task(project, annotator)) is not None:
            store.submit_comparison(task.token, annotator, "left" if task.order[0] == original else "right")
    store.exclude_annotator("spam")
    assert store.excluded_annotators() == ["spam"]
    store.export_raw(project, tmp_path / "raw.jsonl")
    assert {json.loads(line)["annotator"] for line in (tmp_path / "raw.jsonl").read_text().splitlines()} == {
        "good"
    }
    assert store.export_preferences(project, tmp_path / "p.jsonl") == 3
    store.exclude_annotator("spam", excluded=False)
    # good picks original 0, spam original 1: every item is a tie, so no pairs.
    assert store.export_preferences(project, tmp_path / "p.jsonl") == 0
    with pytest.raises(KeyError, match="nobody"):
        store.exclude_annotator("nobody")


def test_exclusion_finds_the_annotator_by_name_whatever_its_case_and_unicode_form(open_store):
    # Names are unique by name_key (NFKC, then case folding), so "SPAM" and fullwidth "Ｓｐａｍ" can only
    # mean "Spam": exclusion finds it as a login does.
    store = open_store()
    store.add_annotator("Spam")
    store.add_annotator("good")
    store.exclude_annotator("SPAM")
    assert store.excluded_annotators() == ["Spam"]
    store.exclude_annotator("\uff33\uff50\uff41\uff4d", excluded=False)
    assert store.excluded_annotators() == []
    store.exclude_annotator("spam")
    assert store.excluded_annotators() == ["Spam"]
    with pytest.raises(KeyError, match="Spa"):
        store.exclude_annotator("Spa")


def test_users_sessions_and_invites(open_store, clock):
    store = open_store()
    admin = store.add_user("root", "admin", "root-password")
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("root", "annotator", "another-password")
    with pytest.raises(ValueError, match="at least 8"):
        store.add_user("weak", "annotator", "short")
    # Names go into URLs and sit beside other names: no "/", no look-alikes of "root", no "..".
    for bad in ["spam/mer", "root ", " root", "root\u200b", "r\u043eot", "..", ".", "-x", "", "a" * 201]:
        with pytest.raises(ValueError, match="is not allowed"):
            store.add_user(bad, "annotator", "good-password")
    assert [u.name for u in store.users()] == ["root"]
    store.add_user("jo.smith@lab-1_a", "annotator", "good-password")
    assert store.authenticate("root", "root-password").role == "admin"
    assert store.authenticate("root", "wrong-password") is None
    assert store.authenticate("nobody", "root-password") is None
    token, csrf = store.create_session(admin, seconds=60)
    user, session_csrf = store.session_user(token)
    assert user.name == "root" and session_csrf == csrf
    clock.advance(61)
    assert store.session_user(token) is None
    token, _ = store.create_session(admin)
    store.end_session(token)
    assert store.session_user(token) is None
    # Expired sessions are purged when the next one starts.
    store.create_session(admin, seconds=10)
    store.create_session(admin, seconds=100)
    assert store.n_sessions() == 2
    clock.advance(11)
    store.create_session(admin)
    assert store.n_sessions() == 2  # the expired one is gone, the live one stays
    invite = store.create_invite("annotator", admin, seconds=100)
    assert store.invite_role(invite) == "annotator"
    new_user = store.accept_invite(invite, "ann", "ann-password")
    assert store.authenticate("ann", "ann-password").user_id == new_user
    with pytest.raises(PermissionError, match="used or expired"):
        store.accept_invite(invite, "ann2", "ann-password")
    late = store.create_invite("admin", admin, seconds=10)
    clock.advance(11)
    assert store.invite_role(late) is None


def test_a_session_ends_after_its_idle_time_and_at_its_absolute_limit(open_store, clock):
    store = open_store()
    admin = store.add_user("root", "admin", "root-password")
    token, _ = store.create_session(admin, seconds=3600, idle_seconds=600)
    # Activity keeps it alive: each lookup within 600 s of the last.
    for _ in range(6):
        clock.advance(500)
        assert store.session_user(token, idle_seconds=600) is not None
    # The absolute limit holds whatever the activity (t = 3000 s now).
    clock.advance(500)
    assert store.session_user(token, idle_seconds=600) is not None
    clock.advance(101)
    assert store.session_user(token, idle_seconds=600) is None
    # Idle for longer than 600 s: ended, and purged with the expired ones.
    idle, _ = store.create_session(admin, seconds=3600, idle_seconds=600)
    clock.advance(599)
    assert store.session_user(idle, idle_seconds=600) is not None
    clock.advance(601)
    assert store.session_user(idle, idle_seconds=600) is None
    store.create_session(admin)
    assert store.n_sessions() == 1


def test_a_session_lookup_writes_its_idle_deadline_at_most_once_a_minute(open_store, clock):
    store = open_store()
    admin = store.add_user("root", "admin", "root-password")
    token, _ = store.create_session(admin, idle_seconds=600)
    writes = []
    transaction = store._transaction

    def counting(mode="read"):
        writes.append(mode)
        return transaction(mode)

    store._transaction = counting
    for _ in range(12):
        clock.advance(5)
        assert store.session_user(token, idle_seconds=600) is not None
    assert writes.count("write") == 0  # the stored deadline is at most a minute behind: kept
    clock.advance(5)
    assert store.session_user(token, idle_seconds=600) is not None
    assert writes.count("write") == 1  # t = 65 s: the deadline moves to 665 s
    clock.advance(599)
    assert store.session_user(token, idle_seconds=600) is not None
    clock.advance(602)
    assert store.session_user(token, idle_seconds=600) is None
    token, _ = store.create_session(admin, idle_seconds=600)
    clock.advance(3000)
    assert store.session_user(token, idle_seconds=None) is not None  # no idle limit


def test_a_new_password_ends_the_users_sessions(open_store):
    store = open_store()
    alice = store.add_user("alice", "annotator", "old-password")
    bob = store.add_user("bob", "annotator", "bob-password")
    stolen, _ = store.create_session(alice)  # someone who learnt the old password
    kept, _ = store.create_session(bob)
    store.set_password("alice", "new-password")
    assert store.session_user(stolen) is None
    assert store.session_user(kept)[0].name == "bob"
    assert store.authenticate("alice", "old-password") is None
    assert store.authenticate("alice", "new-password").user_id == alice
    assert store.session_user(store.create_session(alice)[0])[0].name == "alice"
    with pytest.raises(KeyError, match="nobody"):
        store.set_password("nobody", "new-password")
    assert store.session_user(kept)[0].user_id == bob


def test_names_are_unique_ignoring_case_and_unicode_form(open_store):
    store = open_store()
    root = store.add_user("root", "admin", "root-password")
    for clash in ["Root", "ROOT", "rOOt"]:
        with pytest.raises(ValueError, match="already exists"):
            store.add_user(clash, "annotator", "good-password")
    for clash in ["Root", "\uff32\uff4f\uff4f\uff54"]:  # fullwidth "Root": NFKC makes it "Root"
        with pytest.raises(ValueError, match="differs from it only in case or Unicode form"):
            store.add_annotator(clash)
    assert store.add_annotator("root") == store.users()[0].annotator_id  # the same name is found
    store.add_annotator("Alice", "simulated")
    with pytest.raises(ValueError, match="only in case"):
        store.add_annotator("alice", "simulated")
    invite = store.create_invite("annotator", root)
    for clash in ["ROOT", "ALICE"]:
        with pytest.raises(ValueError, match=f"the name '{clash}' already exists") as refused:
            store.accept_invite(invite, clash, "mallory-password")
        assert "'root'" not in str(refused.value) and "'Alice'" not in str(refused.value)
    assert store.invite_role(invite) == "annotator"  # a refused name leaves the invite unused
    assert [u.name for u in store.users()] == ["root"]
    # A login finds the user whatever the case the name is typed in; the user keeps their spelling.
    for typed in ["root", "Root", "ROOT", "\uff32\uff4f\uff4f\uff54"]:
        assert store.authenticate(typed, "root-password").user_id == root
        assert store.authenticate(typed, "wrong-password") is None
    assert store.authenticate("ROOT", "root-password").name == "root"
    store.set_password("Root", "new-root-password")
    assert store.authenticate("root", "new-root-password").user_id == root


def test_sign_up_never_takes_over_an_annotator_without_an_account(open_store):
    store = open_store()
    admin = store.add_user("root", "admin", "root-password")
    project = store.create_project("p")
    store.add_items(project, _items(2))
    carol = store.add_annotator("carol")  # a human annotator whose labels came without an account
    task = store.next_task(project, carol)
    store.submit_comparison(task.token, carol, "left")
    store.add_annotator("dave")  # no labels yet: the record alone makes the name taken
    invite = store.create_invite("annotator", admin)
    for name in ["carol", "Carol", "dave"]:
        with pytest.raises(ValueError, match=f"the name '{name}' already exists"):
            store.accept_invite(invite, name, "mallory-password")
    assert store.invite_role(invite) == "annotator"
    assert [u.name for u in store.users()] == ["root"]
    assert store.authenticate("carol", "mallory-password") is None
    assert [label.annotator for label in store.labels(project)] == ["carol"]
    # An admin may give the annotator its account on purpose.
    erin = store.add_annotator("erin")
    store.add_user("erin", "annotator", "erin-password")
    assert store.authenticate("erin", "erin-password").annotator_id == erin


def test_a_database_with_names_that_differ_only_in_case_is_not_upgraded(tmp_path):
    from rlhfkit.feedback.migrate import current_revision

    db = tmp_path / "clash.db"
    annotator = (
        "INSERT INTO annotators (id, name, kind, created_at) VALUES (:id, :name, 'human', '2024-01-01')"
    )
    user = (
        "INSERT INTO users (id, name, role, password_hash, annotator_id, created_at) "
        "VALUES (:id, :name, 'annotator', 'x', :id, '2024-01-01')"
    )
    rows = []
    for id_, name in [(1, "root"), (2, "Root"), (3, "alice")]:
        rows += [(annotator, {"id": id_, "name": name}), (user, {"id": id_, "name": name})]
    engine = _sqlite_at_revision(db, "0002", rows)
    with pytest.raises(ValueError, match=r"users differ only in case.*'root' \(id 1\), 'Root' \(id 2\)"):
        FeedbackStore(db)
    with engine.connect() as conn:
        assert current_revision(conn) == "0002"  # nothing was changed
        assert "name_key" not in {c["name"] for c in inspect(conn).get_columns("users")}
    with engine.begin() as conn:  # what the message asks for: rename one of them
        conn.execute(text("UPDATE users SET name = 'root-2' WHERE id = 2"))
        conn.execute(text("UPDATE annotators SET name = 'root-2' WHERE id = 2"))
    engine.dispose()
    with FeedbackStore(db) as store:
        with pytest.raises(ValueError, match="already exists"):
            store.add_user("ALICE", "annotator", "good-password")
        with pytest.raises(ValueError, match="only in case"):
            store.add_annotator("Root-2")


def test_a_session_from_before_idle_limits_lives_on_and_gets_one(tmp_path):
    """A session stored at revision 0003 (no idle deadline) still logs in after the upgrade; its next
    request sets the deadline, and idleness then ends it."""
    from datetime import UTC, datetime, timedelta

    from alembic import command
    from alembic.config import Config

    from rlhfkit.feedback.auth import token_digest
    from rlhfkit.feedback.migrate import MIGRATIONS

    db = tmp_path / "old.db"
    with FeedbackStore(db) as store:
        store.add_user("root", "admin", "root-password")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{db}")
    start = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
        conn.execute(
            text(
                "INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, expires_at) "
                "VALUES (:digest, 1, 'csrf', '2024-01-01 12:00:00.000000', '2024-01-02 00:00:00.000000')"
            ),
            {"digest": token_digest("old-token")},
        )
    engine.dispose()
    now = [start + timedelta(hours=1)]
    with FeedbackStore(db, clock=lambda: now[0]) as store:
        assert store.session_user("old-token", idle_seconds=600)[0].name == "root"
        now[0] += timedelta(seconds=601)
        assert store.session_user("old-token", idle_seconds=600) is None


def _stored_hash(store: FeedbackStore, name: str) -> str:
    with store._transaction() as conn:
        return conn.scalar(text("SELECT password_hash FROM users WHERE name = :name"), {"name": name})


def test_a_login_rehashes_a_password_hashed_with_older_parameters(open_store, monkeypatch):
    from rlhfkit.feedback.auth import SCRYPT_COST_ENV

    store = open_store()
    monkeypatch.setenv(SCRYPT_COST_ENV, "16384,8,1")  # the parameters rlhfkit used to hash with
    store.add_user("alice", "annotator", "alice-password")
    old = _stored_hash(store, "alice")
    assert old.split("$")[1:4] == ["16384", "8", "1"]
    monkeypatch.delenv(SCRYPT_COST_ENV)  # production parameters from here on
    assert store.authenticate("alice", "wrong-password") is None
    assert _stored_hash(store, "alice") == old  # a failed login changes nothing
    assert store.authenticate("alice", "alice-password").name == "alice"  # the old hash still verifies
    new = _stored_hash(store, "alice")
    assert new.split("$")[1:4] == ["32768", "8", "3"] and new != old
    assert store.authenticate("alice", "alice-password").name == "alice"
    assert _stored_hash(store, "alice") == new  # rehashed once, not at every login


def test_one_invite_makes_one_account_when_two_sign_up_at_once(open_store, monkeypatch):
    store = open_store()
    admin = store.add_user("root", "admin", "root-password")
    invite = store.create_invite("admin", admin)
    # Both sign-ups find the invite unused before either claims it: the race, made certain.
    both_checked = threading.Barrier(2, timeout=30)
    check = store.invite_role

    def checked_together(token):
        role = check(token)
        both_checked.wait()
        return role

    monkeypatch.setattr(store, "invite_role", checked_together)
    outcomes = {}

    def sign_up(name):
        try:
            outcomes[name] = store.accept_invite(invite, name, "mallory-password")
        except PermissionError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=sign_up, args=(name,)) for name in ("mallory1", "mallory2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [name for name, out in outcomes.items() if isinstance(out, PermissionError)]
    assert len(outcomes) == 2 and len(refused) == 1
    assert "used at the same time" in str(outcomes[refused[0]])
    (accepted,) = set(outcomes) - set(refused)
    assert [u.name for u in store.users()] == ["root", accepted]
    assert store.authenticate(refused[0], "mallory-password") is None


def test_migrations_head_and_legacy_database(tmp_path):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from rlhfkit.feedback.migrate import HEAD_REVISION, MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION
    # A database from before migrations: the first schema, made without a version table.
    from alembic import command

    legacy = tmp_path / "legacy.db"
    engine = create_engine(f"sqlite:///{legacy}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text("INSERT INTO projects VALUES (1, 'old', 'comparison', '', 1, '{}', '2024-01-01 00:00:00')")
        )
    engine.dispose()
    with FeedbackStore(legacy) as store:
        assert store.project(1).golden_rate == 0.0
        assert store.project_id("old") == 1
        store.add_items(1, _items(1))


def test_ranking_export_counts_pairs_by_index_when_two_responses_read_the_same(open_store, tmp_path):
    store = open_store()
    project = store.create_project("dup", task_type="ranking")
    store.add_items(project, [{"prompt": "q", "responses": ["same", "best", "same"]}])
    alice = store.add_annotator("alice")
    task = store.next_task(project, alice)
    # Wanted original order: 1 ("best") > 0 ("same") > 2 ("same"); answered in presented positions.
    store.submit(task.token, alice, {"ranking": [task.order.index(i) for i in (1, 0, 2)]})
    assert store.export(project, tmp_path / "r.jsonl", "trl-preference") == 2
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    # Both "same" entries lose to "best"; the pair of the two identical texts says nothing.
    assert [(r["chosen"], r["rejected"], r["n_votes"]) for r in rows] == [("best", "same", 1)] * 2


def test_a_file_that_is_not_an_sqlite_database_is_refused_and_left_as_it_was(tmp_path):
    """The store, not only the CLI, refuses to write its tables into a text file (SQLite would)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    with pytest.raises(ValueError, match="is not an SQLite database"):
        FeedbackStore(notes)
    assert notes.read_text() == "x\n"
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(ValueError, match="is an empty file, not a feedback database"):
        FeedbackStore(empty, create=False)
    with FeedbackStore(empty) as store:  # an empty file is a new database to a store that creates
        assert store.projects() == []


# PostgreSQL only (never skipped): SQLite's write lock orders the two, so the second sees the first
# in its check and there is no race to lose.
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_import_that_loses_the_race_for_its_name_gets_the_clear_error(db_url, open_store):
    # Two imports (or an import and create_project) of look-alike names at once on PostgreSQL: both
    # pass the name check, the unique index stops the second, which surfaced as an IntegrityError
    # (`feedback import`: "the import failed: (psycopg.errors.UniqueViolation) ...").
    from sqlalchemy import event

    assert db_url.startswith("postgresql")
    store, other = open_store(), open_store()
    raced: list[int] = []

    def the_other_gets_there_first(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO projects") and not raced:
            raced.append(other.create_project("Top5"))

    event.listen(store._engines["write"], "before_cursor_execute", the_other_gets_there_first)
    try:
        with pytest.raises(ValueError, match="project 'Top5' exists already"):
            store.import_project("top5 ", "comparison", [{"prompt": "q", "responses": ["a", "b"]}])
    finally:
        event.remove(store._engines["write"], "before_cursor_execute", the_other_gets_there_first)
    assert raced and [p.name for p in store.projects()] == ["Top5"]
    assert store.items(raced[0]) == []
