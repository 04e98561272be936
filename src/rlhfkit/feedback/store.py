"""The feedback store: projects, items, annotators, leases and labels in one SQL database.

The same code runs on an embedded SQLite file (the default) and on PostgreSQL by URL.
Humans (through the web app) and simulated annotators (`rlhfkit.crowd.simulate`) label
through the same two calls: `next_task` leases an item, `submit_comparison` commits
the label. Per-annotator labels are kept forever; aggregation happens on export.

Schema, designed for the annotation service to come:
- projects: one labelling job (task type, guidelines, default overlap, settings).
- items: a prompt with its responses, how many labels it needs (overlap) and a
  denormalised label count, kept in the same transaction as the label insert, that
  makes picking the next item an index range scan instead of a scan of all items.
- annotators: humans and simulated annotators by unique name.
- leases: one row per item handed to an annotator, with a random token (also the
  idempotency key of the submission), the random presentation order of the
  responses, the lease start and expiry, and when it was completed.
- labels: one row per answer, never overwritten; a `kind` and a JSON `value` column
  leave room for rankings, Likert ratings, thumbs and edits.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    exists,
    false,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from rlhfkit.crowd.aggregate import majority_vote

TASK_TYPES = ("comparison", "ranking", "likert", "binary", "edit")
ANNOTATOR_KINDS = ("human", "simulated")
# Presented position of each comparison choice; None is a tie.
CHOICES: dict[str, int | None] = {"left": 0, "right": 1, "tie": None}
MAX_STRENGTH = 3
_ITEM_FIELDS = {"prompt", "responses", "overlap", "meta"}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Execution option of write transactions: True = the commit must survive a power loss.
_DURABLE_OPTION = "rlhfkit_durable"

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; the store needs timezone-aware times")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text, so every stored value has one format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the feedback tables."""

    # Named constraints, so that later Alembic migrations can refer to them.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Project(Base):
    """A labelling job."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task_type: Mapped[str] = mapped_column(String(32))
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int]
    # Options of task types still to come (Likert scale, ranking size, ...).
    settings: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Item(Base):
    """A prompt with the responses to judge."""

    __tablename__ = "items"
    __table_args__ = (Index("ix_items_queue", "project_id", "is_complete", "n_labels", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[str]] = mapped_column(JsonType)
    overlap: Mapped[int]
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    n_labels: Mapped[int] = mapped_column(default=0)
    is_complete: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Annotator(Base):
    """A human or simulated annotator."""

    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Lease(Base):
    """An item handed to an annotator until it expires or is submitted."""

    __tablename__ = "leases"
    __table_args__ = (
        Index("ix_leases_item_open", "item_id", "completed_at", "expires_at"),
        Index("ix_leases_annotator_open", "annotator_id", "project_id", "completed_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    # presented_order[j] is the original index of the response shown at position j.
    presented_order: Mapped[list[int]] = mapped_column(JsonType)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Label(Base):
    """One annotator's answer on one item; rows are only ever added."""

    __tablename__ = "labels"
    __table_args__ = (
        Index("ix_labels_project", "project_id", "id"),
        Index("ix_labels_item", "item_id"),
        Index("ix_labels_annotator_item", "annotator_id", "item_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    # Unique: the lease token is the idempotency key; imported labels have no lease.
    lease_id: Mapped[int | None] = mapped_column(ForeignKey("leases.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    chosen: Mapped[int | None]  # original index of the preferred response; None = tie
    presented_order: Mapped[list[int]] = mapped_column(JsonType)
    position: Mapped[int | None]  # presented position chosen; None = tie
    strength: Mapped[int | None]
    # Payload of label kinds other than comparisons (ranking, rating, edited text).
    value: Mapped[Any | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seconds: Mapped[float | None]


@dataclass(frozen=True)
class AnnotationTask:
    """An item leased to an annotator, with its responses in the presented order."""

    token: str
    item_id: int
    prompt: str
    responses: list[str]
    order: list[int]  # original index of each presented response


@dataclass(frozen=True)
class LabelRecord:
    """One stored comparison label."""

    label_id: int
    item_id: int
    annotator: str
    chosen: int | None
    order: list[int]
    strength: int | None
    created_at: datetime
    seconds: float | None


@dataclass(frozen=True)
class ItemRecord:
    """One stored item."""

    item_id: int
    prompt: str
    responses: list[str]
    overlap: int
    meta: dict[str, Any]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _database_url(url: str | os.PathLike[str]) -> URL:
    """A SQLAlchemy URL; a plain filesystem path means an SQLite file."""
    if isinstance(url, os.PathLike) or "://" not in url:
        return URL.create("sqlite", database=str(Path(url).expanduser().resolve()))
    return make_url(url)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below); pysqlite's implicit one skips SELECTs.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers (the web app, exports) run while one writer commits.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        durable = conn.get_execution_options().get(_DURABLE_OPTION)
        if durable is None:
            conn.exec_driver_sql("BEGIN")
            return
        # In WAL mode a FULL commit fsyncs the log, and with it every NORMAL commit
        # before it; a NORMAL commit survives a crash of the process, not of the machine.
        conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        # Writers take the write lock up front, so that their read-then-write is
        # atomic across processes and never fails half-way on a lock upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_DURABLE_OPTION) is False:
            # Like SQLite's NORMAL: the commit does not wait for the WAL flush.
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO off")


def _configure_schema(engine: Engine, schema: str) -> None:
    @event.listens_for(engine, "connect", insert=True)
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute(f'SET SESSION search_path TO "{schema}"')
        cursor.close()
        dbapi_connection.autocommit = autocommit


def _validate_item(index: int, raw: Any, default_overlap: int, task_type: str) -> dict[str, Any]:
    """One item as table values; ValueError names the item index and the field."""

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"item {index}: field {field!r} {problem}")

    if not isinstance(raw, Mapping):
        raise ValueError(f"item {index}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ITEM_FIELDS
    if unknown:
        raise bad(
            sorted(unknown)[0],
            f"is not an item field (allowed: {sorted(_ITEM_FIELDS)}; put extra data under 'meta')",
        )
    if "prompt" not in raw:
        raise bad("prompt", "is missing")
    prompt = raw["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "must be a non-empty string")
    if "responses" not in raw:
        raise bad("responses", "is missing")
    responses = raw["responses"]
    if isinstance(responses, str | bytes) or not isinstance(responses, Iterable):
        raise bad("responses", "must be a list of strings")
    responses = list(responses)
    if len(responses) < 2:
        raise bad("responses", f"needs at least 2 responses, got {len(responses)}")
    if task_type == "comparison" and len(responses) != 2:
        raise bad("responses", f"needs exactly 2 responses in a comparison project, got {len(responses)}")
    for j, response in enumerate(responses):
        if not isinstance(response, str):
            raise bad("responses", f"[{j}] must be a string, got {type(response).__name__}")
    overlap = raw.get("overlap", default_overlap)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
        raise bad("overlap", f"must be an integer >= 1, got {overlap!r}")
    meta = raw.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise bad("meta", f"must be a mapping, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as exc:
        raise bad("meta", f"must be JSON-serialisable: {exc}") from exc
    return {"prompt": prompt, "responses": responses, "overlap": overlap, "meta": meta}


def _write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON lines atomically (a reader never sees half a file); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


# -- the hot statements of the annotation loop, built once -------------------------------
# Prebuilt with bind parameters: building a statement costs more than running it on SQLite.

_LOCK_ANNOTATOR = select(Annotator.id).where(Annotator.id == bindparam("annotator_id")).with_for_update()
_HELD_LEASE = (
    select(Lease.token, Lease.item_id, Lease.presented_order)
    .where(
        Lease.annotator_id == bindparam("annotator_id"),
        Lease.project_id == bindparam("project_id"),
        Lease.completed_at.is_(None),
        Lease.expires_at > bindparam("now"),
    )
    .order_by(Lease.id)
    .limit(1)
)
_ACTIVE_LEASES = (
    select(func.count(Lease.id))
    .where(Lease.item_id == Item.id, Lease.completed_at.is_(None), Lease.expires_at > bindparam("now"))
    .correlate(Item)
    .scalar_subquery()
)
_NEEDS_LABELS = select(Item.id).where(
    Item.project_id == bindparam("project_id"),
    Item.is_complete == false(),
    Item.n_labels + _ACTIVE_LEASES < Item.overlap,
    Item.id > bindparam("after"),
)
# Finish items that already have labels first, then fresh items by id: two queries,
# so that each is a short range scan of ix_items_queue rather than a scan of all items.
_PICK_PHASES = tuple(
    query.order_by(Item.id).limit(1).with_for_update(skip_locked=True, of=Item)
    for query in (
        _NEEDS_LABELS.where(
            Item.n_labels > 0,
            ~exists().where(Label.item_id == Item.id, Label.annotator_id == bindparam("annotator_id")),
        ),
        _NEEDS_LABELS.where(Item.n_labels == 0),
    )
)
_ITEM_DEMAND = select(
    Item.n_labels,
    Item.overlap,
    select(func.count(Lease.id))
    .where(
        Lease.item_id == bindparam("item_id"),
        Lease.completed_at.is_(None),
        Lease.expires_at > bindparam("now"),
    )
    .scalar_subquery()
    .label("n_active"),
).where(Item.id == bindparam("item_id"))
_ITEM_CONTENT = select(Item.prompt, Item.responses).where(Item.id == bindparam("item_id"))
_INSERT_LEASE = insert(Lease)
_LEASE_BY_TOKEN = (
    select(
        Lease.id,
        Lease.annotator_id,
        Lease.project_id,
        Lease.item_id,
        Lease.presented_order,
        Lease.started_at,
        Lease.completed_at,
    )
    .where(Lease.token == bindparam("token"))
    .with_for_update()
)
_LABEL_OF_LEASE = select(Label.id, Label.position, Label.strength).where(
    Label.lease_id == bindparam("lease_id")
)
_LOCK_ITEM = select(Item.n_labels, Item.overlap).where(Item.id == bindparam("item_id")).with_for_update()
_LABEL_BY_ANNOTATOR = (
    select(Label.id)
    .where(Label.item_id == bindparam("item_id"), Label.annotator_id == bindparam("annotator_id"))
    .limit(1)
)
_INSERT_LABEL = insert(Label).returning(Label.id)
_COMPLETE_LEASE = update(Lease).where(Lease.id == bindparam("lease_id")).values(completed_at=bindparam("now"))
# SET expressions all read the row before the update, so both see the old n_labels.
_COUNT_LABEL = (
    update(Item)
    .where(Item.id == bindparam("item_id"))
    .values(n_labels=Item.n_labels + 1, is_complete=Item.n_labels + 1 >= Item.overlap)
)


class FeedbackStore:
    """Projects, items, annotators, leases and labels in SQLite or PostgreSQL."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        schema: str | None = None,
        seed: int | None = None,
        clock: Callable[[], datetime] | None = None,
        durable: bool = True,
    ):
        """Open a store, creating its tables if needed.

        `url`: "sqlite:///path.db", "postgresql+psycopg://user@host/db", or a plain
        path (an SQLite file). `schema`: a PostgreSQL schema to keep the tables in
        (created if missing). `seed`: seeds the presentation order of responses
        (None: unpredictable). `clock`: returns the current timezone-aware time.
        `durable`: labels and items are on disk when a call returns, even if the
        machine loses power next (leases never wait for the disk: losing one is
        harmless); False trades that for speed, for simulations, keeping them safe
        against a crash of the process only.
        """
        sa_url = _database_url(url)
        backend = sa_url.get_backend_name()
        self.url = sa_url.render_as_string(hide_password=True)
        self._clock = clock or _utcnow
        self._rng: random.Random = random.Random(seed) if seed is not None else random.SystemRandom()
        self._rng_lock = threading.Lock()
        # Projects are never renamed or retyped, so their name and type can be cached.
        self._projects: dict[int, tuple[str, str]] = {}
        kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            database = sa_url.database or ""
            if database in ("", ":memory:"):
                # One shared connection, or every checkout would see its own empty database.
                kwargs["poolclass"] = StaticPool
            elif not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        engine = create_engine(sa_url, **kwargs)
        self._is_sqlite = backend == "sqlite"
        if self._is_sqlite:
            _configure_sqlite(engine)
        elif backend == "postgresql":
            _configure_postgresql(engine)
        if schema is not None:
            if backend != "postgresql":
                engine.dispose()
                raise ValueError(f"schema={schema!r} is only supported on PostgreSQL")
            if not _IDENTIFIER.match(schema):
                engine.dispose()
                raise ValueError(f"schema {schema!r} is not a plain SQL identifier")
            _configure_schema(engine, schema)
        self._engine = engine
        self._engines = {
            "read": engine,
            "write": engine.execution_options(**{_DURABLE_OPTION: durable}),
            "lease": engine.execution_options(**{_DURABLE_OPTION: False}),
        }
        try:
            if schema is not None:
                with engine.begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            Base.metadata.create_all(engine)
        except BaseException:
            engine.dispose()
            raise

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def _transaction(self, mode: str = "read") -> AbstractContextManager[Connection]:
        """A transaction ("read", "write", or "lease": a write that need not be durable).

        It commits when the block ends, that is before the caller sees any result.
        """
        return self._engines[mode].begin()

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the store's clock must return timezone-aware datetimes")
        return now

    def _project(self, conn: Connection, project_id: int) -> tuple[str, str]:
        """(name, task_type) of a project; KeyError if there is none."""
        if project_id not in self._projects:
            row = conn.execute(
                select(Project.name, Project.task_type).where(Project.id == project_id)
            ).one_or_none()
            if row is None:
                raise KeyError(f"no feedback project with id {project_id}")
            self._projects[project_id] = (row.name, row.task_type)
        return self._projects[project_id]

    # -- projects, items, annotators ---------------------------------------------------

    def create_project(
        self, name: str, task_type: str = "comparison", guidelines: str = "", overlap: int = 1
    ) -> int:
        """Create a project, or return the id of the existing project of that name.

        An existing project keeps its guidelines and overlap; a different task type
        is an error.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError("project name must be a non-empty string")
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
            raise ValueError(f"overlap must be an integer >= 1, got {overlap!r}")
        values = {
            "name": name,
            "task_type": task_type,
            "guidelines": guidelines,
            "overlap": overlap,
            "settings": {},
            "created_at": self._now(),
        }
        project_id = self._get_or_create(Project, values, "task_type")
        return project_id

    def project_id(self, name: str) -> int:
        """The id of the project called `name`; KeyError if there is none."""
        with self._transaction() as conn:
            found = conn.scalar(select(Project.id).where(Project.name == name))
        if found is None:
            raise KeyError(f"no feedback project named {name!r}; create it with create_project")
        return found

    def add_annotator(self, name: str, kind: str = "human") -> int:
        """Get or create the annotator called `name`; return its id."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("annotator name must be a non-empty string")
        if kind not in ANNOTATOR_KINDS:
            raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {kind!r}")
        values = {"name": name, "kind": kind, "created_at": self._now()}
        return self._get_or_create(Annotator, values, "kind")

    def _get_or_create(
        self, model: type[Project] | type[Annotator], values: dict[str, Any], must_match: str
    ) -> int:
        """Id of the row named values["name"], inserting it if missing (race-safe)."""
        name = values["name"]
        what = model.__tablename__[:-1]
        for attempt in range(2):
            try:
                with self._transaction("write") as conn:
                    row = conn.execute(
                        select(model.id, getattr(model, must_match)).where(model.name == name)
                    ).one_or_none()
                    if row is None:
                        return conn.scalar(insert(model).returning(model.id), values)
                if row[1] != values[must_match]:
                    raise ValueError(
                        f"{what} {name!r} exists with {must_match} {row[1]!r}, not {values[must_match]!r}"
                    )
                return row[0]
            except IntegrityError:
                # Another process inserted it between our read and our insert.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def add_items(self, project_id: int, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """Validate and bulk-insert items; return their ids in input order.

        Each item: {"prompt": str, "responses": [str, ...], "overlap": int (optional,
        default the project's), "meta": dict (optional)}.
        """
        with self._transaction() as conn:
            _, task_type = self._project(conn, project_id)
            default_overlap = conn.scalar(select(Project.overlap).where(Project.id == project_id))
        assert default_overlap is not None
        now = self._now()
        rows = []
        for index, raw in enumerate(items):
            row = _validate_item(index, raw, default_overlap, task_type)
            row.update(project_id=project_id, n_labels=0, is_complete=False, created_at=now)
            rows.append(row)
        if not rows:
            return []
        with self._transaction("write") as conn:
            ids = conn.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), rows).all()
        return list(ids)

    # -- the annotation loop -----------------------------------------------------------

    def next_task(
        self, project_id: int, annotator_id: int, lease_seconds: float = 600
    ) -> AnnotationTask | None:
        """Lease the next item this annotator should label; None when there is none.

        An annotator who already holds an unexpired lease in the project gets that
        same task back (same token, same order).
        """
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        with self._transaction("lease") as conn:
            self._project(conn, project_id)
            now = self._now()
            # Serialises one annotator's requests, so two browser tabs never hold two leases.
            if conn.scalar(_LOCK_ANNOTATOR, {"annotator_id": annotator_id}) is None:
                raise KeyError(f"no annotator with id {annotator_id}")
            params = {"annotator_id": annotator_id, "project_id": project_id, "now": now}
            held = conn.execute(_HELD_LEASE, params).one_or_none()
            if held is not None:
                item = conn.execute(_ITEM_CONTENT, {"item_id": held.item_id}).one()
                return _task(held.token, held.item_id, item.prompt, item.responses, held.presented_order)
            item_id = self._pick_item(conn, params)
            if item_id is None:
                return None
            item = conn.execute(_ITEM_CONTENT, {"item_id": item_id}).one()
            order = list(range(len(item.responses)))
            with self._rng_lock:
                self._rng.shuffle(order)
            token = secrets.token_urlsafe(24)
            conn.execute(
                _INSERT_LEASE,
                {
                    "token": token,
                    "project_id": project_id,
                    "item_id": item_id,
                    "annotator_id": annotator_id,
                    "presented_order": order,
                    "started_at": now,
                    "expires_at": now + timedelta(seconds=lease_seconds),
                    "completed_at": None,
                },
            )
        return _task(token, item_id, item.prompt, item.responses, order)

    def _pick_item(self, conn: Connection, params: dict[str, Any]) -> int | None:
        """Lock and return the next item that still needs this annotator's label."""
        for phase in _PICK_PHASES:
            after = 0
            while True:
                item_id = conn.scalar(phase, {**params, "after": after})
                if item_id is None:
                    break
                if self._is_sqlite:
                    return item_id
                # PostgreSQL (READ COMMITTED): the pick may have read a snapshot taken
                # before a concurrent lease on this item committed and released the row
                # lock; a new statement sees that lease.
                demand = conn.execute(_ITEM_DEMAND, {**params, "item_id": item_id}).one()
                if demand.n_labels + demand.n_active < demand.overlap:
                    return item_id
                after = item_id
        return None

    def submit_comparison(self, token: str, annotator_id: int, choice: str, strength: int = 1) -> int:
        """Commit the answer to a leased comparison; return the label id.

        `choice` ("left", "right" or "tie") refers to the presented order; `strength`
        is 1 (slight) to 3 (strong). A retry with the same token and answer returns the
        same label id. An expired lease is still accepted (the answer is real work)
        unless the annotator has labelled the item since.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {sorted(CHOICES)}, got {choice!r}")
        if isinstance(strength, bool) or not isinstance(strength, int) or not 1 <= strength <= MAX_STRENGTH:
            raise ValueError(f"strength must be an integer from 1 to {MAX_STRENGTH}, got {strength!r}")
        position = CHOICES[choice]
        with self._transaction("write") as conn:
            conn.execute(_LOCK_ANNOTATOR, {"annotator_id": annotator_id})
            lease = conn.execute(_LEASE_BY_TOKEN, {"token": token}).one_or_none()
            if lease is None:
                raise ValueError(f"unknown task token {token!r}")
            if lease.annotator_id != annotator_id:
                raise PermissionError(
                    f"task token {token!r} was issued to another annotator, not to annotator {annotator_id}"
                )
            if lease.completed_at is not None:
                done = conn.execute(_LABEL_OF_LEASE, {"lease_id": lease.id}).one()
                if (done.position, done.strength) != (position, strength):
                    raise ValueError(
                        f"task {token!r} was already submitted with a different answer (label {done.id})"
                    )
                return done.id
            name, task_type = self._project(conn, lease.project_id)
            if task_type != "comparison":
                raise ValueError(f"project {name!r} is a {task_type!r} project, not a comparison")
            if len(lease.presented_order) != 2:
                raise ValueError(
                    f"item {lease.item_id} has {len(lease.presented_order)} responses; "
                    "a comparison needs exactly 2"
                )
            # Locks the item row (PostgreSQL) for the n_labels update below.
            conn.execute(_LOCK_ITEM, {"item_id": lease.item_id}).one()
            twice = conn.scalar(_LABEL_BY_ANNOTATOR, {"item_id": lease.item_id, "annotator_id": annotator_id})
            if twice is not None:
                raise ValueError(
                    f"annotator {annotator_id} already labelled item {lease.item_id} (label {twice})"
                )
            now = self._now()
            label_id = conn.scalar(
                _INSERT_LABEL,
                {
                    "project_id": lease.project_id,
                    "item_id": lease.item_id,
                    "annotator_id": annotator_id,
                    "lease_id": lease.id,
                    "kind": "comparison",
                    "chosen": None if position is None else lease.presented_order[position],
                    "presented_order": list(lease.presented_order),
                    "position": position,
                    "strength": strength,
                    "value": None,
                    "created_at": now,
                    "seconds": max(0.0, (now - lease.started_at).total_seconds()),
                },
            )
            conn.execute(_COMPLETE_LEASE, {"lease_id": lease.id, "now": now})
            conn.execute(_COUNT_LABEL, {"item_id": lease.item_id})
        assert label_id is not None
        return label_id

    # -- reading and export ------------------------------------------------------------

    def labels(self, project_id: int) -> list[LabelRecord]:
        """Every label of the project, one per annotator answer, in submission order."""
        with self._transaction() as conn:
            self._project(conn, project_id)
            rows = conn.execute(
                select(
                    Label.id,
                    Label.item_id,
                    Annotator.name,
                    Label.chosen,
                    Label.presented_order,
                    Label.strength,
                    Label.created_at,
                    Label.seconds,
                )
                .join(Annotator, Annotator.id == Label.annotator_id)
                .where(Label.project_id == project_id)
                .order_by(Label.id)
            ).all()
        return [LabelRecord(*row) for row in rows]

    def items(self, project_id: int) -> list[ItemRecord]:
        """Every item of the project, by id."""
        with self._transaction() as conn:
            self._project(conn, project_id)
            rows = conn.execute(
                select(Item.id, Item.prompt, Item.responses, Item.overlap, Item.meta)
                .where(Item.project_id == project_id)
                .order_by(Item.id)
            ).all()
        return [
            ItemRecord(id_, prompt, list(responses), overlap, dict(meta or {}))
            for id_, prompt, responses, overlap, meta in rows
        ]

    def progress(self, project_id: int) -> dict[str, int]:
        """Counts of items, labels, complete items and annotators who labelled."""
        with self._transaction() as conn:
            self._project(conn, project_id)
            n_items, n_complete = conn.execute(
                select(func.count(Item.id), func.count(Item.id).filter(Item.is_complete)).where(
                    Item.project_id == project_id
                )
            ).one()
            n_labels, n_annotators = conn.execute(
                select(func.count(Label.id), func.count(Label.annotator_id.distinct())).where(
                    Label.project_id == project_id
                )
            ).one()
        return {
            "n_items": n_items,
            "n_labels": n_labels,
            "n_items_complete": n_complete,
            "n_annotators": n_annotators,
        }

    def export_preferences(
        self, project_id: int, path: str | os.PathLike[str], method: str = "majority"
    ) -> int:
        """Write aggregated TRL preference pairs as JSONL; return the number of pairs.

        Items whose aggregate is a tie, and items without labels, are skipped.
        """
        if method != "majority":
            raise ValueError(f"unknown aggregation method {method!r}; available: 'majority'")
        with self._transaction() as conn:
            name, _ = self._project(conn, project_id)
        items = {item.item_id: item for item in self.items(project_id)}
        aggregates = majority_vote(self.labels(project_id))

        def rows() -> Iterator[dict[str, Any]]:
            for item_id, agg in aggregates.items():
                if agg.winner is None:
                    continue
                item = items[item_id]
                yield {
                    "prompt": item.prompt,
                    "chosen": item.responses[agg.winner],
                    "rejected": item.responses[1 - agg.winner],
                    "source": f"feedback:{name}",
                    "n_votes": agg.n_votes,
                    "agreement": agg.agreement,
                }

        return _write_jsonl(path, rows())

    def export_raw(self, project_id: int, path: str | os.PathLike[str]) -> int:
        """Write one JSON line per label (per-annotator labels kept); return the count."""
        items = {item.item_id: item for item in self.items(project_id)}
        rows = (
            {
                "label_id": label.label_id,
                "item_id": label.item_id,
                "prompt": items[label.item_id].prompt,
                "responses": items[label.item_id].responses,
                "annotator": label.annotator,
                "chosen": label.chosen,
                "order": label.order,
                "strength": label.strength,
                "created_at": label.created_at.isoformat(),
                "seconds": label.seconds,
            }
            for label in self.labels(project_id)
        )
        return _write_jsonl(path, rows)


def _task(token: str, item_id: int, prompt: str, responses: list[str], order: list[int]) -> AnnotationTask:
    return AnnotationTask(
        token=token,
        item_id=item_id,
        prompt=prompt,
        responses=[responses[i] for i in order],
        order=list(order),
    )
