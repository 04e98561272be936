"""Create or upgrade the feedback store's tables with the Alembic migrations shipped here."""

from __future__ import annotations

import zlib
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions (a test checks it against Alembic's head).
HEAD_REVISION = "0005"
# The revision whose schema databases made before migrations existed have.
BASELINE_REVISION = "0001"
_PG_LOCK_KEY = zlib.crc32(b"rlhfkit.feedback.migrate")


def current_revision(conn: Connection) -> str | None:
    """The schema revision of the database, None when it has no version table."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.scalar(text("SELECT version_num FROM alembic_version"))


def upgrade_database(engine: Engine) -> None:
    """Bring the database to HEAD_REVISION; safe when several processes open it at once.

    `engine` must start write transactions that hold the database's write lock (the
    store's write engine: BEGIN IMMEDIATE on SQLite); PostgreSQL takes an advisory lock.
    """
    with engine.connect() as conn:
        if current_revision(conn) == HEAD_REVISION:
            return
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        revision = current_revision(conn)
        if revision == HEAD_REVISION:
            return  # another process upgraded it while we waited for the lock
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        # env.py runs the migrations on this connection, inside this transaction.
        config.attributes["connection"] = conn
        if revision is None and inspect(conn).has_table("projects"):
            command.stamp(config, BASELINE_REVISION)
        command.upgrade(config, "head")
