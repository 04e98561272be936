"""Shared fixtures: feedback-store databases on SQLite and PostgreSQL, and a test clock."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

PG_URL = os.environ.get("RLHFKIT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# The suite creates many users: their password hashes get a cheap scrypt cost (1 MiB, about 2 ms)
# through the service's documented knob, which subprocesses (the CLI, served apps) inherit.
# test_feedback_answers.py checks the production cost with the knob unset.
os.environ.setdefault("RLHFKIT_FEEDBACK_SCRYPT_COST", "1024,8,1")


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    """A controllable clock for lease expiry."""
    return FakeClock()


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Every test starts from accelerate's defaults: an Accelerator's shared state outlives it, so
    an earlier test's bf16 run would otherwise put later float32 runs under autocast."""
    import sys

    if "accelerate" in sys.modules:  # nothing to reset before accelerate is first imported
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    yield


def _require_postgres() -> None:
    """Skip when the test server is unreachable; under CI (CI=true) fail instead."""
    engine = create_engine(PG_URL, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        shown = make_url(PG_URL).render_as_string(hide_password=True)
        reason = f"PostgreSQL not reachable at {shown}: {str(exc.orig or exc).strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The PostgreSQL test server's URL (public schema); the test cleans up after itself."""
    _require_postgres()
    yield PG_URL


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[tuple[Engine, str]]:
    """This test session's own schema on the PostgreSQL server, with the feedback tables.

    Yields an engine whose search_path is that schema, and its URL; dropped at the end.
    """
    from rlhfkit.feedback.migrate import upgrade_database

    _require_postgres()
    schema = f"rlhfkit_test_{uuid.uuid4().hex[:12]}"
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    admin = create_engine(PG_URL, poolclass=NullPool)
    engine = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        # The store's own migrations, as a FeedbackStore opening the schema would run them.
        upgrade_database(engine)
        yield engine, url.render_as_string(hide_password=False)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A database URL for the feedback store, empty for each test.

    PostgreSQL: the session's schema, selected through the URL's search_path, emptied
    after each test (much cheaper than creating a schema and its tables per test).
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    from rlhfkit.feedback.store import Base

    engine, url = request.getfixturevalue("pg_schema")
    try:
        yield url
    finally:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())


@pytest.fixture
def open_store(db_url: str, clock: FakeClock) -> Iterator[Callable[..., Any]]:
    """Open FeedbackStores on the test database; all closed after.

    Defaults: seeded, on the test clock, and not durable (skipping fsync keeps the tests
    fast; durability has its own test).
    """
    from rlhfkit.feedback.store import FeedbackStore

    stores: list[FeedbackStore] = []

    def _open(**kwargs: Any) -> FeedbackStore:
        kwargs.setdefault("seed", 0)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("durable", False)
        store = FeedbackStore(db_url, **kwargs)
        stores.append(store)
        return store

    yield _open
    for store in stores:
        store.close()


CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
# Screenshots the browser tests save, for a person to look at after the run.
SCREENSHOTS = Path(os.environ.get("RLHFKIT_SCREENSHOTS", "test-artifacts/screenshots"))


def _skip_or_fail(reason: str) -> None:
    """Skip on a user's machine; under CI (CI=true) a missing prerequisite is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (its own browser download cannot run here)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        _skip_or_fail(f"{CHROMIUM} not found: run scripts/ensure-browser.sh (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser page (own cookies) that records console errors in `page.console_errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    new_page = context.new_page()
    new_page.console_errors = []
    new_page.on("console", lambda msg: msg.type == "error" and new_page.console_errors.append(msg.text))
    new_page.on("pageerror", lambda exc: new_page.console_errors.append(str(exc)))
    yield new_page
    context.close()


@pytest.fixture
def screenshot_dir() -> Path:
    """Where browser tests save their screenshots (test-artifacts/screenshots)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
