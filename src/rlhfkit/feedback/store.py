"""The feedback store: projects, items, annotators, leases and labels in one SQL database.

The same code runs on an embedded SQLite file (the default) and on PostgreSQL by URL.
Humans (through the web app) and simulated annotators (`rlhfkit.crowd.simulate`) label
through the same two calls: `next_task` leases an item, `submit` commits the label
(`submit_comparison` is its A/B shorthand). Per-annotator labels are kept forever;
aggregation happens on export.

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
  hold rankings, Likert ratings, thumbs, edits and demonstrations.
- golden (control) items carry a known answer that never leaves the store towards an
  annotator; they are mixed into an annotator's queue at the project's golden rate.
- users (admin or annotator, scrypt password hash), server-side sessions, invites.

The tables are created and upgraded by the Alembic migrations shipped in
`rlhfkit/feedback/migrations`, run when a store is opened.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
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
    case,
    create_engine,
    event,
    exists,
    false,
    func,
    insert,
    or_,
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

from rlhfkit.crowd.agreement import krippendorff_alpha_nominal
from rlhfkit.data.io import write_jsonl
from rlhfkit.feedback import exports
from rlhfkit.feedback.answers import (
    CHOICES,
    GOLDEN_TYPES,
    MAX_STRENGTH,
    AnswerError,
    StoredAnswer,
    is_correct,
    nominal_value,
    store_answer,
    validate_golden,
)
from rlhfkit.feedback.auth import (
    hash_password,
    needs_rehash,
    new_token,
    rehash_password,
    token_digest,
    verify_password,
)
from rlhfkit.feedback.migrate import upgrade_database


def name_key(name: str) -> str:
    """What makes two names the same name: NFKC normalisation and case folding ("Root", "ＲＯＯＴ": "root").

    Users and annotators are unique by it, and a login finds its user by it.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def project_key(name: str) -> str:
    """What makes two project names the same name: `name_key`, with runs of whitespace as one space and
    none at either end ("Top5", "top5 " and "ＴＯＰ５": "top5"; "Top  5" and "top 5": "top 5").

    Projects are unique by it: such names read as one on the dashboard, where HTML collapses spaces.
    """
    return " ".join(name_key(name).split())


# A login name: it appears in URLs (the dashboard's exclude form) and beside other names, so no
# "/", no look-alikes of another name (spaces, invisible or non-ASCII characters), no "." or "..".
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}")

TASK_TYPES = ("comparison", "ranking", "likert", "binary", "edit", "demonstration")
# How many responses an item of each task type shows: (fewest, most).
RESPONSES_PER_TYPE: dict[str, tuple[int, int]] = {
    "comparison": (2, 2),
    "ranking": (2, 9),
    "likert": (1, 1),
    "binary": (1, 1),
    "edit": (1, 1),
    "demonstration": (0, 0),
}
ROLES = ("admin", "annotator")
ANNOTATOR_KINDS = ("human", "simulated")
_ITEM_FIELDS = {"prompt", "responses", "overlap", "meta", "golden"}
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
    __table_args__ = (Index("uq_projects_name_key", "name_key", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # project_key(name): no two projects have names that differ only in case, spacing or Unicode
    # form. NULL for the younger look-alikes of a database made before this key (migration 0005).
    name_key: Mapped[str | None] = mapped_column(Text)
    task_type: Mapped[str] = mapped_column(String(32))
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int]
    # Free-form options of the project (shown to admins only).
    settings: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Chance that an annotator's next task is a golden (control) item.
    golden_rate: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))


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
    # A chat prompt as messages; `prompt` then holds a plain-text rendering of it.
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JsonType)
    # Golden items: the known answer (original indices). They are never in the overlap
    # queue (is_complete is always true) and are served at the project's golden rate.
    is_golden: Mapped[bool] = mapped_column(default=False, server_default=false())
    golden: Mapped[Any | None] = mapped_column(JsonType)


class Annotator(Base):
    """A human or simulated annotator."""

    __tablename__ = "annotators"
    __table_args__ = (Index("uq_annotators_name_key", "name_key", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # name_key(name): no two annotators have names that differ only in case or Unicode form.
    name_key: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Excluded annotators (spammers) keep their labels, but no export uses them.
    excluded: Mapped[bool] = mapped_column(default=False, server_default=false())


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
    # On golden items: whether the answer matched the known one.
    correct: Mapped[bool | None]


class User(Base):
    """A person who logs in: an admin or an annotator, labelling as the annotator of the same name."""

    __tablename__ = "users"
    __table_args__ = (Index("uq_users_name_key", "name_key", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # name_key(name): a login finds the user whatever the case it is typed in.
    name_key: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Session(Base):
    """A login: the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The session ends at this time unless a request comes first (see `session_user`); None: not set yet.
    idle_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Invite(Base):
    """A one-time sign-up link for a role."""

    __tablename__ = "invites"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))


@dataclass(frozen=True)
class AnnotationTask:
    """An item leased to an annotator, with its responses in the presented order.

    Nothing in it tells a golden item from any other.
    """

    token: str
    item_id: int
    prompt: str
    responses: list[str]
    order: list[int]  # original index of each presented response
    task_type: str = "comparison"
    messages: list[dict[str, str]] | None = None  # the prompt as chat messages, if it is a chat


@dataclass(frozen=True)
class LabelRecord:
    """One stored label."""

    label_id: int
    item_id: int
    annotator: str
    chosen: int | None
    order: list[int]
    strength: int | None
    created_at: datetime
    seconds: float | None
    kind: str = "comparison"
    value: dict[str, Any] | None = None
    is_golden: bool = False
    correct: bool | None = None


@dataclass(frozen=True)
class ItemRecord:
    """One stored item."""

    item_id: int
    prompt: str
    responses: list[str]
    overlap: int
    meta: dict[str, Any]
    messages: list[dict[str, str]] | None = None
    is_golden: bool = False
    golden: dict[str, Any] | None = None

    @property
    def prompt_text(self) -> str | list[dict[str, str]]:
        """The prompt as exports write it: chat messages when it is a chat, else the string."""
        return self.messages if self.messages is not None else self.prompt


@dataclass(frozen=True)
class ProjectRecord:
    """One project's settings."""

    project_id: int
    name: str
    task_type: str
    guidelines: str
    overlap: int
    golden_rate: float
    created_at: datetime


@dataclass(frozen=True)
class UserRecord:
    """A user who can log in (never carries the password hash)."""

    user_id: int
    name: str
    role: str
    annotator_id: int


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _database_url(url: str | os.PathLike[str]) -> URL:
    """A SQLAlchemy URL; a plain filesystem path means an SQLite file."""
    if isinstance(url, os.PathLike) or "://" not in url:
        return URL.create("sqlite", database=str(Path(url).expanduser().resolve()))
    return make_url(url)


def _refuse_non_database(path: Path, empty_too: bool) -> None:
    """ValueError if `path` is a file that is not an SQLite database: SQLite takes a short file of any
    text for an empty database and writes its tables into it. `empty_too`: refuse an empty file as
    well (a store opened to read, where an empty file holds no feedback)."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head and empty_too:
        raise ValueError(f"{path} is an empty file, not a feedback database")
    if head and head != b"SQLite format 3\x00":
        raise ValueError(f"{path} is not an SQLite database (it does not start with the SQLite header)")


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


class ItemError(ValueError):
    """An invalid item: names its index in the batch and the field."""

    def __init__(self, index: int, field: str, problem: str):
        self.index, self.field, self.problem = index, field, problem
        super().__init__(f"item {index}: field {field!r} {problem}")


def validate_item(index: int, raw: Any, default_overlap: int, task_type: str) -> dict[str, Any]:
    """One item as table values; ItemError names the item index and the field."""

    def bad(field: str, problem: str) -> ItemError:
        return ItemError(index, field, problem)

    if not isinstance(raw, Mapping):
        raise ItemError(index, "item", f"must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ITEM_FIELDS
    if unknown:
        raise bad(
            sorted(unknown)[0],
            f"is not an item field (allowed: {sorted(_ITEM_FIELDS)}; put extra data under 'meta')",
        )
    if "prompt" not in raw:
        raise bad("prompt", "is missing")
    prompt, messages = _prompt_and_messages(raw["prompt"], bad)
    if (problem := unstorable(raw["prompt"])) is not None:
        raise bad("prompt", problem)
    lowest, highest = RESPONSES_PER_TYPE[task_type]
    responses = raw.get("responses", [] if highest == 0 else None)
    if responses is None:
        raise bad("responses", "is missing")
    if isinstance(responses, str | bytes) or not isinstance(responses, Iterable):
        raise bad("responses", "must be a list of strings")
    responses = list(responses)
    if len(responses) < max(lowest, 2) and task_type in ("comparison", "ranking"):
        raise bad("responses", f"needs at least 2 responses, got {len(responses)}")
    if not lowest <= len(responses) <= highest:
        wanted = f"exactly {lowest}" if lowest == highest else f"{lowest} to {highest}"
        raise bad("responses", f"needs {wanted} responses in a {task_type} project, got {len(responses)}")
    for j, response in enumerate(responses):
        if not isinstance(response, str):
            raise bad("responses", f"[{j}] must be a string, got {type(response).__name__}")
        if task_type == "ranking" and not response.strip():
            raise bad("responses", f"[{j}] is empty (a ranking cannot order an empty response)")
        if (problem := unstorable(response)) is not None:
            raise bad("responses", f"[{j}] {problem}")
    golden = raw.get("golden")
    if golden is not None:
        try:
            golden = validate_golden(task_type, golden, len(responses))
        except ValueError as exc:
            raise bad("golden", str(exc)) from None
    overlap = raw.get("overlap", default_overlap)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
        raise bad("overlap", f"must be an integer >= 1, got {overlap!r}")
    meta = raw.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise bad("meta", f"must be a mapping, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise bad("meta", f"must be JSON-serialisable: {exc}") from exc
    if (problem := unstorable(meta)) is not None:
        raise bad("meta", problem)
    return {
        "prompt": prompt,
        "messages": messages,
        "responses": responses,
        "overlap": overlap,
        "meta": meta,
        "is_golden": golden is not None,
        "golden": golden,
    }


def unstorable(value: Any) -> str | None:
    """What keeps `value` (nested mappings' keys and values and lists included) from being stored as
    JSON text, if anything: NaN or infinity, a NUL character, or a lone surrogate.

    Python's json reads and writes the first and last (`NaN`, `"\\ud800"`), but no JSON reader after
    us would take NaN, and a lone surrogate is not Unicode: SQLite's JSON keeps it escaped, and then
    no export of the project can be written as UTF-8. JSON allows `"\\u0000"`, but PostgreSQL's text
    and jsonb do not (SQLite does: it is refused on both, so that both agree). The feedback API's
    request checks and the importer use this one function.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"holds {value}, which is not a JSON number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds {value[exc.start]!r} at character {exc.start}, a lone surrogate (not Unicode text)"
        if "\x00" in value:
            where = value.index("\x00")
            return f"holds a NUL character at character {where}, which the database cannot store"
        return None
    # dict and list, not the abstract Mapping: a request nested hundreds deep must not run out of stack.
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:  # numbers, booleans, None and nested API request models have none
        if isinstance(key, str) and (problem := unstorable(key)) is not None:
            return problem
        if (problem := unstorable(inner)) is not None:
            return problem
    return None


def _prompt_and_messages(
    prompt: Any, bad: Callable[[str, str], ItemError]
) -> tuple[str, list[dict[str, str]] | None]:
    """(plain-text prompt, chat messages or None) of a prompt given as a string or a chat."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise bad("prompt", "must be a non-empty string or a list of chat messages")
        return prompt, None
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "must be a non-empty string or a list of chat messages")
    messages = []
    for j, message in enumerate(prompt):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise bad("prompt", f"[{j}] must be an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise bad("prompt", f"[{j}].role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise bad("prompt", f"[{j}].content must be a non-empty string")
        messages.append({"role": role, "content": content})
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages), messages


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
_PICK_QUERIES = (
    _NEEDS_LABELS.where(
        Item.n_labels > 0,
        ~exists().where(Label.item_id == Item.id, Label.annotator_id == bindparam("annotator_id")),
    ),
    _NEEDS_LABELS.where(Item.n_labels == 0),
)
_PICK_PHASES = tuple(
    query.order_by(Item.id).limit(1).with_for_update(skip_locked=True, of=Item) for query in _PICK_QUERIES
)
# PostgreSQL, when skipping found nothing: an item may only have been locked by a submit or
# lease in flight, so wait for those rows instead of telling the annotator the work is done.
_PICK_PHASES_WAITING = tuple(
    query.order_by(Item.id).limit(1).with_for_update(of=Item) for query in _PICK_QUERIES
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
_ITEM_CONTENT = select(Item.prompt, Item.responses, Item.messages).where(Item.id == bindparam("item_id"))
_GOLDEN_CANDIDATES = (
    select(Item.id)
    .where(
        Item.project_id == bindparam("project_id"),
        Item.is_golden,
        ~exists().where(Label.item_id == Item.id, Label.annotator_id == bindparam("annotator_id")),
    )
    .order_by(Item.id)
)
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
_LABEL_OF_LEASE = select(Label.id, Label.chosen, Label.position, Label.strength, Label.value).where(
    Label.lease_id == bindparam("lease_id")
)
_LOCK_ITEM = (
    select(Item.n_labels, Item.overlap, Item.is_golden, Item.golden)
    .where(Item.id == bindparam("item_id"))
    .with_for_update()
)
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
    .values(n_labels=Item.n_labels + 1, is_complete=or_(Item.is_golden, Item.n_labels + 1 >= Item.overlap))
)


def _project_row(
    name: str, task_type: str, guidelines: str, overlap: int, golden_rate: float, now: Any
) -> dict[str, Any]:
    """A new project's row, its settings checked (create_project and import_project)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("project name must be a non-empty string")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
        raise ValueError(f"overlap must be an integer >= 1, got {overlap!r}")
    if isinstance(golden_rate, bool) or not isinstance(golden_rate, int | float) or not 0 <= golden_rate <= 1:
        raise ValueError(f"golden_rate must be a number from 0 to 1, got {golden_rate!r}")
    if golden_rate > 0 and task_type not in GOLDEN_TYPES:
        raise ValueError(f"golden_rate: {task_type} projects cannot have golden items")
    return {
        "name": name,
        "name_key": project_key(name),
        "task_type": task_type,
        "guidelines": guidelines,
        "overlap": overlap,
        "golden_rate": float(golden_rate),
        "settings": {},
        "created_at": now,
    }


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
        create: bool = True,
    ):
        """Open a store, creating its tables if needed.

        `url`: "sqlite:///path.db", "postgresql+psycopg://user@host/db", or a plain
        path (an SQLite file). `schema`: a PostgreSQL schema to keep the tables in
        (created if missing). `seed`: seeds the presentation order of responses
        (None: unpredictable). `clock`: returns the current timezone-aware time.
        `durable`: labels and items are on disk when a call returns, even if the
        machine loses power next (leases never wait for the disk: losing one is
        harmless); False trades that for speed, for simulations, keeping them safe
        against a crash of the process only. `create=False`: an SQLite file that is not
        there is a FileNotFoundError, not a new empty database (for commands that only read).
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
                if not create and not Path(database).is_file():
                    raise FileNotFoundError(f"no SQLite database file at {database}")
                _refuse_non_database(Path(database), empty_too=not create)
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
            upgrade_database(self._engines["write"])
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
        self,
        name: str,
        task_type: str = "comparison",
        guidelines: str = "",
        overlap: int = 1,
        golden_rate: float = 0.0,
    ) -> int:
        """Create a project, or return the id of the existing project of that name.

        An existing project keeps its guidelines, overlap and golden rate; a different
        task type is an error, and so is a name that differs from an existing project's only in
        case, spacing or Unicode form (see `project_key`); the error names that project.
        `golden_rate`: the chance (0 to 1) that an annotator's next task is a golden item.
        """
        values = _project_row(name, task_type, guidelines, overlap, golden_rate, self._now())
        return self._get_or_create(Project, values, "task_type")

    def update_project(
        self, project_id: int, *, guidelines: str | None = None, golden_rate: float | None = None
    ) -> None:
        """Change a project's guidelines or golden rate (its name and task type never change)."""
        changes: dict[str, Any] = {}
        if guidelines is not None:
            changes["guidelines"] = guidelines
        if golden_rate is not None:
            if not 0 <= golden_rate <= 1:
                raise ValueError(f"golden_rate must be a number from 0 to 1, got {golden_rate!r}")
            changes["golden_rate"] = float(golden_rate)
        if not changes:
            return
        with self._transaction("write") as conn:
            self._project(conn, project_id)
            conn.execute(update(Project).where(Project.id == project_id).values(**changes))

    def project_id(self, name: str) -> int:
        """The id of the project called `name`, else of the one whose name reads the same (`project_key`:
        `--project top5` finds "Top5"; no two projects share a key); KeyError if there is none."""
        with self._transaction() as conn:
            found = conn.scalar(select(Project.id).where(Project.name == name))
            if found is None and isinstance(name, str) and name.strip():
                found = conn.scalar(select(Project.id).where(Project.name_key == project_key(name)))
            if found is None:
                names = conn.scalars(select(Project.name).order_by(Project.id)).all()
        if found is None:
            have = (
                f"the projects here: {', '.join(map(repr, names))}" if names else "there are no projects here"
            )
            raise KeyError(f"no feedback project named {name!r} ({have})")
        return found

    def project_named_like(self, name: str) -> str | None:
        """The name of the project called `name`, else of one whose name reads the same (`project_key`),
        else None. `create_project` refuses a look-alike; this tells a form or the API which it is."""
        with self._transaction() as conn:
            return conn.scalar(
                select(Project.name)
                .where(or_(Project.name == name, Project.name_key == project_key(name)))
                .order_by(case((Project.name == name, 0), else_=1))
                .limit(1)
            )

    def project(self, project_id: int) -> ProjectRecord:
        """One project's settings; KeyError if there is none."""
        found = [p for p in self.projects() if p.project_id == project_id]
        if not found:
            raise KeyError(f"no feedback project with id {project_id}")
        return found[0]

    def projects(self) -> list[ProjectRecord]:
        """Every project, by id."""
        with self._transaction() as conn:
            rows = conn.execute(
                select(
                    Project.id,
                    Project.name,
                    Project.task_type,
                    Project.guidelines,
                    Project.overlap,
                    Project.golden_rate,
                    Project.created_at,
                ).order_by(Project.id)
            ).all()
        return [ProjectRecord(*row) for row in rows]

    def add_annotator(self, name: str, kind: str = "human") -> int:
        """Get or create the annotator called `name`; return its id."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("annotator name must be a non-empty string")
        if kind not in ANNOTATOR_KINDS:
            raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {kind!r}")
        values = {"name": name, "name_key": name_key(name), "kind": kind, "created_at": self._now()}
        return self._get_or_create(Annotator, values, "kind")

    def exclude_annotator(self, name: str, excluded: bool = True) -> None:
        """Leave an annotator's labels out of every export (or take them back in); KeyError if unknown.

        The annotator is found by `name_key`, as names are unique: "SPAM" or "Ｓｐａｍ" finds "Spam".
        """
        with self._transaction("write") as conn:
            changed = conn.execute(
                update(Annotator).where(Annotator.name_key == name_key(name)).values(excluded=bool(excluded))
            ).rowcount
        if not changed:
            raise KeyError(f"no annotator named {name!r}")

    def excluded_annotators(self) -> list[str]:
        """Names of the excluded annotators, sorted."""
        with self._transaction() as conn:
            return sorted(conn.scalars(select(Annotator.name).where(Annotator.excluded)).all())

    def _get_or_create(
        self, model: type[Project] | type[Annotator], values: dict[str, Any], must_match: str
    ) -> int:
        """Id of the row named values["name"], inserting it if missing (race-safe).

        Both are found by their name_key: a name that differs from an existing one only in case or
        Unicode form (and, for a project, spacing) is refused (ValueError), not made a second one. A
        project is found by its exact name first: a look-alike from before project keys has none.
        """
        name = values["name"]
        what = model.__tablename__[:-1]
        differs = "case, spacing or Unicode form" if model is Project else "case or Unicode form"
        same_name = or_(model.name == name, model.name_key == values["name_key"])
        for attempt in range(2):
            try:
                with self._transaction("write") as conn:
                    row = conn.execute(
                        select(model.id, getattr(model, must_match), model.name)
                        .where(same_name)
                        .order_by(case((model.name == name, 0), else_=1))
                        .limit(1)
                    ).one_or_none()
                    if row is None:
                        return conn.scalar(insert(model).returning(model.id), values)
                if row[2] != name:
                    raise ValueError(
                        f"{what} {row[2]!r} exists, and {name!r} differs from it only in {differs}, "
                        "and such names count as one"
                    )
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

        Each item: {"prompt": str or chat messages, "responses": [str, ...] (as many as
        the task type shows; none for demonstrations), "overlap": int (optional, default
        the project's), "meta": dict (optional), "golden": the known answer (optional,
        makes it a golden item; see answers.validate_golden)}.
        """
        with self._transaction() as conn:
            _, task_type = self._project(conn, project_id)
            default_overlap = conn.scalar(select(Project.overlap).where(Project.id == project_id))
        assert default_overlap is not None
        now = self._now()
        rows = []
        for index, raw in enumerate(items):
            row = validate_item(index, raw, default_overlap, task_type)
            # Golden items stay out of the overlap queue: next_task mixes them in itself.
            row.update(project_id=project_id, n_labels=0, is_complete=row["is_golden"], created_at=now)
            rows.append(row)
        if not rows:
            return []
        with self._transaction("write") as conn:
            ids = conn.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), rows).all()
        return list(ids)

    def import_project(
        self,
        name: str,
        task_type: str,
        items: Iterable[Mapping[str, Any]],
        labels: Iterable[Mapping[str, Any]] = (),
        *,
        guidelines: str = "",
        overlap: int = 1,
    ) -> tuple[int, list[int]]:
        """Create the project `name` with its items (and labels) in one transaction; return the
        project id and the item ids in input order.

        All or nothing: a failure at any point (a lost connection included) leaves no project, item,
        annotator or label behind. A project of that name (or one that reads the same, see
        `project_key`) is a ValueError. `items` are as `add_items` takes them; `labels` are stored
        answers, as `rlhfkit.feedback.importing.read_raw_file` makes them from a raw export:
        {"item": index into `items`, "annotator", "chosen", "order", "position", "strength", "value",
        "created_at", "seconds", "correct"}. A label's annotator is the one of that name, or a new
        human annotator without an account: nobody logs in as it until an admin gives it one
        (`add_user`).
        """
        now = self._now()
        project = _project_row(name, task_type, guidelines, overlap, 0.0, now)
        rows = [validate_item(index, raw, overlap, task_type) for index, raw in enumerate(items)]
        labels = list(labels)
        n_labels: dict[int, int] = {}
        for label in labels:
            n_labels[label["item"]] = n_labels.get(label["item"], 0) + 1
        for index, row in enumerate(rows):
            n = n_labels.get(index, 0)
            row.update(n_labels=n, is_complete=row["is_golden"] or n >= row["overlap"], created_at=now)
        try:
            return self._import_project(project, rows, labels, now)
        except IntegrityError:
            # Another process made the project (or a look-alike) between our check and our insert
            # (PostgreSQL; SQLite's write lock orders the two): the unique index stopped this one,
            # which left nothing behind. Say which project is in the way, as the check does.
            there = self.project_named_like(name)
            if there is None:
                raise
            raise ValueError(f"project {there!r} exists already") from None

    def _import_project(
        self,
        project: dict[str, Any],
        rows: list[dict[str, Any]],
        labels: list[Mapping[str, Any]],
        now: datetime,
    ) -> tuple[int, list[int]]:
        """import_project's transaction."""
        task_type = project["task_type"]
        with self._transaction("write") as conn:
            same = or_(Project.name == project["name"], Project.name_key == project["name_key"])
            there = conn.scalar(select(Project.name).where(same).limit(1))
            if there is not None:
                raise ValueError(f"project {there!r} exists already")
            project_id = conn.scalar(insert(Project).returning(Project.id), project)
            for row in rows:
                row["project_id"] = project_id
            ids: list[int] = []
            if rows:
                ids = list(conn.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), rows))
            annotators = self._annotators_by_name(conn, {label["annotator"] for label in labels}, now)
            if labels:
                conn.execute(
                    insert(Label),
                    [
                        {
                            "project_id": project_id,
                            "item_id": ids[label["item"]],
                            "annotator_id": annotators[label["annotator"]],
                            "lease_id": None,
                            "kind": task_type,
                            "chosen": label["chosen"],
                            "presented_order": list(label["order"]),
                            "position": label["position"],
                            "strength": label["strength"],
                            "value": label["value"],
                            # A hand-made raw row may have no time: the import's, as documented.
                            "created_at": label.get("created_at") or now,
                            "seconds": label["seconds"],
                            "correct": label["correct"],
                        }
                        for label in labels
                    ],
                )
        return project_id, ids

    def _annotators_by_name(self, conn: Connection, names: Iterable[str], now: datetime) -> dict[str, int]:
        """Ids of the annotators called `names` in this transaction, each made (human, no account)
        if missing; a name that differs from an existing one only in case or Unicode form is refused."""
        ids: dict[str, int] = {}
        for name in sorted(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError("annotator name must be a non-empty string")
            key = name_key(name)
            row = conn.execute(select(Annotator.id, Annotator.name).where(Annotator.name_key == key)).first()
            if row is None:
                values = {"name": name, "name_key": key, "kind": "human", "created_at": now}
                ids[name] = conn.scalar(insert(Annotator).returning(Annotator.id), values)
            elif row.name != name:
                raise ValueError(
                    f"annotator {row.name!r} exists, and {name!r} differs from it only in case or Unicode "
                    "form, and such names count as one"
                )
            else:
                ids[name] = row.id
        return ids

    # -- users, sessions, invites ------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> int:
        """Create a user (and the annotator of the same name); return the user id.

        An admin's call: a human annotator of exactly this name that has no account yet (labels
        imported or given through `add_annotator`) becomes this user's, labels and all.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        with self._new_user(name, role, password, adopt_annotator=True) as (conn, user_id):
            return user_id

    @contextmanager
    def _new_user(
        self, name: str, role: str, password: str, adopt_annotator: bool
    ) -> Iterator[tuple[Connection, int]]:
        """Insert a user in a write transaction that the block may still roll back by raising.

        `adopt_annotator`: an existing human annotator of the same name without an account becomes
        the user's; otherwise any annotator of that name makes the name taken.
        """
        if not isinstance(name, str) or not USER_NAME.fullmatch(name):
            raise ValueError(
                f"user name {name!r} is not allowed: 1 to 200 characters, ASCII letters, digits and "
                "_ . @ -, starting with a letter or a digit"
            )
        key = name_key(name)
        # The same words whether the name is a user's or only an annotator's, and never the spelling
        # it clashes with: whoever signs up learns no more than that the name is taken.
        taken = ValueError(f"the name {name!r} already exists (names that differ only in case count as one)")
        password_hash = hash_password(password)  # slow by design: before the transaction opens
        try:
            with self._transaction("write") as conn:
                if conn.scalar(select(User.id).where(User.name_key == key)) is not None:
                    raise taken
                annotator = conn.execute(
                    select(Annotator.id, Annotator.name, Annotator.kind).where(Annotator.name_key == key)
                ).one_or_none()
                if annotator is None:
                    annotator_id = conn.scalar(
                        insert(Annotator).returning(Annotator.id),
                        {"name": name, "name_key": key, "kind": "human", "created_at": self._now()},
                    )
                elif not adopt_annotator or annotator.name != name or annotator.kind != "human":
                    raise taken
                else:
                    annotator_id = annotator.id
                user_id = conn.scalar(
                    insert(User).returning(User.id),
                    {
                        "name": name,
                        "name_key": key,
                        "role": role,
                        "password_hash": password_hash,
                        "annotator_id": annotator_id,
                        "created_at": self._now(),
                    },
                )
                yield conn, user_id
        except IntegrityError:
            raise taken from None

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password and end all their sessions; KeyError if there is no such user."""
        password_hash = hash_password(password)
        with self._transaction("write") as conn:
            user_id = conn.scalar(
                update(User)
                .where(User.name_key == name_key(name))
                .values(password_hash=password_hash)
                .returning(User.id)
            )
            if user_id is None:
                raise KeyError(f"no user named {name!r}")
            # A new password is often set because the old one leaked: whoever logged in with it is out.
            conn.execute(Session.__table__.delete().where(Session.user_id == user_id))

    def users(self) -> list[UserRecord]:
        """Every user, by id."""
        with self._transaction() as conn:
            rows = conn.execute(
                select(User.id, User.name, User.role, User.annotator_id).order_by(User.id)
            ).all()
        return [UserRecord(*row) for row in rows]

    def authenticate(self, name: str, password: str) -> UserRecord | None:
        """The user if the password is right, else None (same cost either way).

        The name may be typed in any case ("ROOT" logs in as "root"): see `name_key`.
        """
        with self._transaction() as conn:
            row = conn.execute(
                select(User.id, User.name, User.role, User.annotator_id, User.password_hash).where(
                    User.name_key == name_key(name)
                )
            ).one_or_none()
        # An unknown name still pays for one hash, so timing does not tell which names exist.
        ok = verify_password(password, row.password_hash if row else None)
        if row is None or not ok:
            return None
        if needs_rehash(row.password_hash):
            # Made with older (weaker) parameters: the password is at hand now, so hash it anew.
            # Only if it is still the same hash: a new password set meanwhile stays.
            new_hash = rehash_password(password)  # slow by design: before the transaction opens
            with self._transaction("write") as conn:
                conn.execute(
                    update(User)
                    .where(User.id == row.id, User.password_hash == row.password_hash)
                    .values(password_hash=new_hash)
                )
        return UserRecord(row.id, row.name, row.role, row.annotator_id)

    def create_session(
        self, user_id: int, seconds: float = 12 * 3600, idle_seconds: float | None = 30 * 60
    ) -> tuple[str, str]:
        """Start a login; return (session token for the cookie, CSRF token for forms).

        It lasts `seconds` at most, and ends sooner after `idle_seconds` without a request (see
        `session_user`; None: no idle limit). Expired and idle sessions are deleted on the way, so
        the table holds live logins only.
        """
        token, csrf = new_token(), new_token()
        now = self._now()
        with self._transaction("write") as conn:
            conn.execute(
                Session.__table__.delete().where(or_(Session.expires_at <= now, Session.idle_until <= now))
            )
            conn.execute(
                insert(Session),
                {
                    "token_hash": token_digest(token),
                    "user_id": user_id,
                    "csrf_token": csrf,
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=seconds),
                    "idle_until": None if idle_seconds is None else now + timedelta(seconds=idle_seconds),
                },
            )
        return token, csrf

    def session_user(self, token: str, idle_seconds: float | None = 30 * 60) -> tuple[UserRecord, str] | None:
        """(user, CSRF token) of a session token that is neither expired nor idle, else None.

        Each call is activity: the session's idle deadline moves to `idle_seconds` from now. It is
        written only when the stored one is more than a minute (a tenth of `idle_seconds` when that
        is shorter) behind, so most requests write nothing and a session may end up to that much
        early. None: no idle limit.
        """
        now = self._now()
        alive = [Session.token_hash == token_digest(token), Session.expires_at > now]
        if idle_seconds is not None:
            alive.append(or_(Session.idle_until.is_(None), Session.idle_until > now))
        with self._transaction() as conn:
            row = conn.execute(
                select(
                    User.id, User.name, User.role, User.annotator_id, Session.csrf_token, Session.idle_until
                )
                .join(User, User.id == Session.user_id)
                .where(*alive)
            ).one_or_none()
        if row is None:
            return None
        if idle_seconds is not None:
            deadline = now + timedelta(seconds=idle_seconds)
            step = timedelta(seconds=min(60.0, idle_seconds / 10))
            if row.idle_until is None or row.idle_until < deadline - step:
                with self._transaction("write") as conn:
                    conn.execute(
                        update(Session)
                        .where(Session.token_hash == token_digest(token))
                        .values(idle_until=deadline)
                    )
        return UserRecord(row.id, row.name, row.role, row.annotator_id), row.csrf_token

    def n_sessions(self) -> int:
        """How many sessions are stored (expired ones not yet purged included)."""
        with self._transaction() as conn:
            return conn.scalar(select(func.count(Session.id))) or 0

    def end_session(self, token: str) -> None:
        """Log out: forget the session."""
        with self._transaction("write") as conn:
            conn.execute(Session.__table__.delete().where(Session.token_hash == token_digest(token)))

    def create_invite(self, role: str, created_by: int | None, seconds: float = 7 * 86400) -> str:
        """A one-time sign-up token for `role`, valid for `seconds`."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        token, now = new_token(), self._now()
        with self._transaction("write") as conn:
            conn.execute(
                insert(Invite),
                {
                    "token_hash": token_digest(token),
                    "role": role,
                    "created_by": created_by,
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=seconds),
                    "used_by": None,
                },
            )
        return token

    def invite_role(self, token: str) -> str | None:
        """The role an unused, unexpired invite grants, else None."""
        with self._transaction() as conn:
            return conn.scalar(
                select(Invite.role).where(
                    Invite.token_hash == token_digest(token),
                    Invite.used_by.is_(None),
                    Invite.expires_at > self._now(),
                )
            )

    def accept_invite(self, token: str, name: str, password: str) -> int:
        """Create the user an invite allows and use the invite up; return the user id.

        ValueError when the name is not allowed or taken (by a user or an annotator, ignoring case).
        """
        role = self.invite_role(token)
        if role is None:
            raise PermissionError("this invite link is unknown, used or expired")
        # The user and the claim on the invite commit together or not at all: of two sign-ups on
        # one link at the same time, the one whose claim finds the invite used leaves no account.
        # A name that an annotator already has is taken, even one without an account: its labels
        # would become the work of whoever signs up under it. (An invite carries only a role, so no
        # annotator is ever made for one.)
        with self._new_user(name, role, password, adopt_annotator=False) as (conn, user_id):
            claimed = conn.execute(
                update(Invite)
                .where(
                    Invite.token_hash == token_digest(token),
                    Invite.used_by.is_(None),
                    Invite.expires_at > self._now(),
                )
                .values(used_by=user_id)
            ).rowcount
            if not claimed:
                raise PermissionError("this invite link was used at the same time by someone else")
        return user_id

    # -- the annotation loop -----------------------------------------------------------

    def next_task(
        self, project_id: int, annotator_id: int, lease_seconds: float = 600
    ) -> AnnotationTask | None:
        """Lease the next item this annotator should label; None when there is none.

        An annotator who already holds an unexpired lease in the project gets that
        same task back (same token, same order). With the project's golden rate, the
        task is a golden item the annotator has not answered yet, as long as real work
        is left.
        """
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        with self._transaction("lease") as conn:
            _, task_type = self._project(conn, project_id)
            now = self._now()
            # Serialises one annotator's requests, so two browser tabs never hold two leases.
            if conn.scalar(_LOCK_ANNOTATOR, {"annotator_id": annotator_id}) is None:
                raise KeyError(f"no annotator with id {annotator_id}")
            params = {"annotator_id": annotator_id, "project_id": project_id, "now": now}
            held = conn.execute(_HELD_LEASE, params).one_or_none()
            if held is not None:
                item = conn.execute(_ITEM_CONTENT, {"item_id": held.item_id}).one()
                return _task(held.token, held.item_id, item, held.presented_order, task_type)
            item_id = self._pick_item(conn, params)
            if item_id is None:
                return None
            golden_rate = conn.scalar(select(Project.golden_rate).where(Project.id == project_id)) or 0.0
            if golden_rate > 0:
                with self._rng_lock:
                    draw = self._rng.random()
                if draw < golden_rate:
                    candidates = conn.scalars(_GOLDEN_CANDIDATES, params).all()
                    if candidates:
                        with self._rng_lock:
                            item_id = self._rng.choice(candidates)
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
        return _task(token, item_id, item, order, task_type)

    def _pick_item(self, conn: Connection, params: dict[str, Any]) -> int | None:
        """Lock and return the next item that still needs this annotator's label."""
        phases = _PICK_PHASES if self._is_sqlite else _PICK_PHASES + _PICK_PHASES_WAITING
        for phase in phases:
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
        is 1 (slight) to 3 (strong). See `submit`.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {sorted(CHOICES)}, got {choice!r}")
        if isinstance(strength, bool) or not isinstance(strength, int) or not 1 <= strength <= MAX_STRENGTH:
            raise ValueError(f"strength must be an integer from 1 to {MAX_STRENGTH}, got {strength!r}")
        return self.submit(
            token, annotator_id, {"choice": choice, "strength": strength}, task_type="comparison"
        )

    def submit(
        self, token: str, annotator_id: int, answer: Mapping[str, Any], task_type: str | None = None
    ) -> int:
        """Commit the answer to a leased task; return the label id.

        `answer` is in presented positions (see rlhfkit.feedback.answers); `task_type`,
        when given, must be the project's. A retry with the same token and answer
        returns the same label id; a different answer is an error. An expired lease is
        still accepted (the answer is real work) unless the annotator has labelled the
        item since. Raises ValueError (AnswerError naming the field) for bad answers,
        PermissionError for another annotator's token.
        """
        with self._transaction("write") as conn:
            conn.execute(_LOCK_ANNOTATOR, {"annotator_id": annotator_id})
            lease = conn.execute(_LEASE_BY_TOKEN, {"token": token}).one_or_none()
            if lease is None:
                raise AnswerError("token", f"unknown task token {token!r} (not issued by this service)")
            if lease.annotator_id != annotator_id:
                raise PermissionError(
                    f"task token {token!r} was issued to another annotator, not to annotator {annotator_id}"
                )
            name, project_type = self._project(conn, lease.project_id)
            if task_type is not None and task_type != project_type:
                raise ValueError(f"project {name!r} is a {project_type!r} project, not a {task_type}")
            stored = store_answer(project_type, answer, lease.presented_order)
            if lease.completed_at is not None:
                done = conn.execute(_LABEL_OF_LEASE, {"lease_id": lease.id}).one()
                if StoredAnswer(done.chosen, done.position, done.strength, done.value) != stored:
                    raise ValueError(
                        f"task {token!r} was already submitted with a different answer (label {done.id})"
                    )
                return done.id
            # Locks the item row (PostgreSQL) for the n_labels update below.
            item = conn.execute(_LOCK_ITEM, {"item_id": lease.item_id}).one()
            twice = conn.scalar(_LABEL_BY_ANNOTATOR, {"item_id": lease.item_id, "annotator_id": annotator_id})
            if twice is not None:
                # No item id: annotators never see one (it would single out golden items).
                raise ValueError(f"this annotator already labelled this task's item (label {twice})")
            now = self._now()
            label_id = conn.scalar(
                _INSERT_LABEL,
                {
                    "project_id": lease.project_id,
                    "item_id": lease.item_id,
                    "annotator_id": annotator_id,
                    "lease_id": lease.id,
                    "kind": project_type,
                    "chosen": stored.chosen,
                    "presented_order": list(lease.presented_order),
                    "position": stored.position,
                    "strength": stored.strength,
                    "value": stored.value,
                    "created_at": now,
                    "seconds": max(0.0, (now - lease.started_at).total_seconds()),
                    "correct": is_correct(project_type, item.golden, stored) if item.is_golden else None,
                },
            )
            conn.execute(_COMPLETE_LEASE, {"lease_id": lease.id, "now": now})
            conn.execute(_COUNT_LABEL, {"item_id": lease.item_id})
        assert label_id is not None
        return label_id

    # -- reading and export ------------------------------------------------------------

    def labels(
        self,
        project_id: int,
        *,
        annotator_id: int | None = None,
        include_golden: bool = True,
        include_excluded: bool = True,
    ) -> list[LabelRecord]:
        """The project's labels in submission order: all of them, or one annotator's.

        Exports pass include_golden=False and include_excluded=False.
        """
        query = (
            select(
                Label.id,
                Label.item_id,
                Annotator.name,
                Label.chosen,
                Label.presented_order,
                Label.strength,
                Label.created_at,
                Label.seconds,
                Label.kind,
                Label.value,
                Item.is_golden,
                Label.correct,
            )
            .join(Annotator, Annotator.id == Label.annotator_id)
            .join(Item, Item.id == Label.item_id)
            .where(Label.project_id == project_id)
            .order_by(Label.id)
        )
        if annotator_id is not None:
            query = query.where(Label.annotator_id == annotator_id)
        if not include_golden:
            query = query.where(Item.is_golden == false())
        if not include_excluded:
            query = query.where(Annotator.excluded == false())
        with self._transaction() as conn:
            self._project(conn, project_id)
            rows = conn.execute(query).all()
        return [LabelRecord(*row) for row in rows]

    def items(self, project_id: int) -> list[ItemRecord]:
        """Every item of the project, by id (golden ones with their known answer)."""
        with self._transaction() as conn:
            self._project(conn, project_id)
            rows = conn.execute(
                select(
                    Item.id,
                    Item.prompt,
                    Item.responses,
                    Item.overlap,
                    Item.meta,
                    Item.messages,
                    Item.is_golden,
                    Item.golden,
                )
                .where(Item.project_id == project_id)
                .order_by(Item.id)
            ).all()
        return [
            ItemRecord(
                id_, prompt, list(responses), overlap, dict(meta or {}), messages, bool(is_golden), golden
            )
            for id_, prompt, responses, overlap, meta, messages, is_golden, golden in rows
        ]

    def progress(self, project_id: int) -> dict[str, int]:
        """Counts of (non-golden) items, labels, complete items and annotators who labelled."""
        with self._transaction() as conn:
            self._project(conn, project_id)
            n_items, n_complete = conn.execute(
                select(func.count(Item.id), func.count(Item.id).filter(Item.is_complete)).where(
                    Item.project_id == project_id, Item.is_golden == false()
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

    def annotator_stats(self, project_id: int) -> list[dict[str, Any]]:
        """Per annotator: labels, mean and median seconds per label, golden answers and accuracy."""
        by_name: dict[str, list[LabelRecord]] = {}
        for label in self.labels(project_id):
            by_name.setdefault(label.annotator, []).append(label)
        excluded = set(self.excluded_annotators())
        stats = []
        for name, labels in sorted(by_name.items()):
            seconds = sorted(label.seconds for label in labels if label.seconds is not None)
            golden = [label.correct for label in labels if label.is_golden and label.correct is not None]
            stats.append(
                {
                    "annotator": name,
                    "n_labels": len(labels),
                    "mean_seconds": round(sum(seconds) / len(seconds), 2) if seconds else None,
                    "median_seconds": round(seconds[len(seconds) // 2], 2) if seconds else None,
                    "n_golden": len(golden),
                    "golden_accuracy": round(sum(golden) / len(golden), 4) if golden else None,
                    "excluded": name in excluded,
                }
            )
        return stats

    def agreement(self, project_id: int) -> float | None:
        """Krippendorff's alpha (nominal) over the non-golden items labelled more than once."""
        units: dict[int, list[Any]] = {}
        for label in self.labels(project_id, include_golden=False):
            value = nominal_value(label.kind, label.chosen, label.value)
            if value is not None:
                units.setdefault(label.item_id, []).append(value)
        return krippendorff_alpha_nominal(units)

    def export(
        self, project_id: int, path: str | os.PathLike[str], format: str, skipped: dict | None = None
    ) -> int:
        """Write one of the EXPORT_FORMATS as JSONL; return the number of rows.

        `skipped`, when given, receives `identical_responses`: the comparison items a majority
        decided that made no row because their two responses are the same text (trl-preference)."""
        if format not in exports.EXPORT_FORMATS:
            raise ValueError(
                f"unknown export format {format!r}; choose one of {list(exports.EXPORT_FORMATS)}"
            )
        if format == "raw":
            return self.export_raw(project_id, path)
        project = self.project(project_id)
        # Labels first: items are only ever added, so every label read has its item in the read after.
        labels = self.labels(project_id, include_golden=False, include_excluded=False)
        items = {item.item_id: item for item in self.items(project_id)}
        build = exports.EXPORT_FORMATS[format]
        n = write_jsonl(path, build(project.task_type, project.name, items, labels))
        if skipped is not None:
            identical = format == "trl-preference"
            skipped["identical_responses"] = (
                exports.identical_comparisons(project.task_type, items, labels) if identical else 0
            )
        return n

    def export_preferences(
        self, project_id: int, path: str | os.PathLike[str], method: str = "majority"
    ) -> int:
        """Write aggregated TRL preference pairs as JSONL; return the number of pairs.

        Comparisons: one pair per item by majority vote (ties and unlabelled items
        skipped); rankings: every C(K,2) pair that a majority of annotators ordered the
        same way; edits: (edit > original), one per label. Golden items and excluded
        annotators are left out.
        """
        if method != "majority":
            raise ValueError(f"unknown aggregation method {method!r}; available: 'majority'")
        return self.export(project_id, path, "trl-preference")

    def export_raw(self, project_id: int, path: str | os.PathLike[str]) -> int:
        """Write one JSON line per label (per-annotator labels kept, golden ones flagged); return the count.

        Excluded annotators' labels are left out, as in every export.
        """
        labels = self.labels(project_id, include_excluded=False)
        items = {item.item_id: item for item in self.items(project_id)}  # after the labels, as in export
        return write_jsonl(path, exports.raw_rows(items, labels))


def _task(token: str, item_id: int, item: Any, order: list[int], task_type: str) -> AnnotationTask:
    return AnnotationTask(
        token=token,
        item_id=item_id,
        prompt=item.prompt,
        responses=[item.responses[i] for i in order],
        order=list(order),
        task_type=task_type,
        messages=item.messages,
    )
