"""Reliability of the feedback service under load and crashes, on SQLite and PostgreSQL.

50 simulated annotators label at once over HTTP on loopback against `rlhfkit feedback
serve` running in a subprocess (the real command, durable store), for a bounded time.
Then the server is killed with SIGKILL mid-load and restarted on the same database.
Everything is checked against the database itself, not against what the server says:
every label that got a 2xx answer is there exactly once, no item has more labels (or
leases) than its overlap, no annotator labelled an item twice, and a retry of a
submission whose answer was lost in the crash never makes a second label.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from feedback_server import free_port
from sqlalchemy import delete, select

from rlhfkit.feedback import auth
from rlhfkit.feedback.session import COOKIE
from rlhfkit.feedback.store import FeedbackStore, Item, Label, Lease

N_ANNOTATORS = 50
OVERLAP = 3
# Far more work than 50 annotators finish in the test, so the load never runs dry.
N_ITEMS = 1000
LOAD_SECONDS = 2.0
# Phase 2 kills the server once this many more labels were acknowledged (or after the time bound).
ACKS_BEFORE_KILL = 50
PASSWORD = "annotator-password"
CHOICES = ("left", "right", "tie")


class _StopAfter:
    """A stop flag that turns itself on after `n` checks (a few more labels, no timing)."""

    def __init__(self, n: int):
        self.left = n

    def is_set(self) -> bool:
        """True after `n` calls."""
        self.left -= 1
        return self.left < 0


@dataclass
class Annotator:
    """One simulated annotator: an HTTP session and a record of what the server acknowledged."""

    name: str
    client: httpx.Client
    csrf: str = ""
    seed: int = 0
    # label id -> (token, answer) of every submission that got a 2xx answer.
    acked: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    # A submission sent without an answer back (the server died): retried after the restart.
    pending: tuple[str, dict[str, Any]] | None = None
    errors: list[str] = field(default_factory=list)
    n_transport_errors: int = 0

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A POST with the session's CSRF token."""
        return self.client.post(path, json=body, headers={"X-CSRF-Token": self.csrf})

    def submit(self, token: str, answer: dict[str, Any]) -> None:
        """Submit; on a 2xx record the acknowledged label, otherwise record the error."""
        self.pending = (token, answer)
        response = self.post("/api/submit", {"token": token, "answer": answer})
        self.pending = None
        if response.status_code // 100 != 2:
            self.errors.append(f"submit {response.status_code}: {response.text}")
            return
        label_id = response.json()["label_id"]
        if label_id in self.acked and self.acked[label_id] != (token, answer):
            self.errors.append(f"label {label_id} acknowledged for two different submissions")
        self.acked[label_id] = (token, answer)

    def recover(self, project_id: int) -> None:
        """After a restart: retry the submission whose answer was lost, then label one more task."""
        if self.pending is not None:
            self.submit(*self.pending)
        self.label_until(project_id, _StopAfter(1))

    def label_until(self, project_id: int, stop: threading.Event | _StopAfter) -> None:
        """Lease and answer tasks until `stop` is set, the queue is empty or the server is gone."""
        n = 0
        try:
            while not stop.is_set():
                response = self.post(f"/api/projects/{project_id}/next", {})
                if response.status_code != 200:
                    self.errors.append(f"next {response.status_code}: {response.text}")
                    return
                task = response.json()["task"]
                if task is None:
                    return
                # A deterministic answer per annotator and task, so a retry sends the same one.
                n += 1
                answer = {"choice": CHOICES[(self.seed + n) % 3], "strength": 1 + n % 3}
                self.submit(task["token"], answer)
        except httpx.TransportError:
            # The server died under us (phase 2): stop; `pending` says what was in flight.
            self.n_transport_errors += 1
        except Exception as exc:  # recorded, so that the test fails on it rather than the thread alone
            self.errors.append(repr(exc))


@contextmanager
def serve(db_url: str, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`rlhfkit feedback serve` on `db_url` in a subprocess; yields (base URL, process)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlhfkit", "feedback", "serve", "--db", db_url, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    # verify=False: plain HTTP on loopback, and it spares building a TLS context per client.
    try:
        with httpx.Client(timeout=2, verify=False) as probe:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                    )
                try:
                    if probe.get(url + "/api/me").status_code == 401:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def connect(annotators: list[Annotator], url: str) -> None:
    """Point every annotator at a (re)started server, keeping its session cookie."""
    for a in annotators:
        a.client.base_url = httpx.URL(url)


def run_load(annotators: list[Annotator], project_id: int, stop: threading.Event) -> list[threading.Thread]:
    """Start every annotator's labelling loop in its own thread."""
    threads = [threading.Thread(target=a.label_until, args=(project_id, stop)) for a in annotators]
    for thread in threads:
        thread.start()
    return threads


def n_acked(annotators: list[Annotator]) -> int:
    """Labels acknowledged so far, over all annotators."""
    return sum(len(a.acked) for a in annotators)


def check_database(store: FeedbackStore, project_id: int, annotators: list[Annotator]) -> dict[str, int]:
    """Assert the invariants against the tables themselves; return counts for the report."""
    with store._transaction() as conn:  # the raw tables, not the store's reading of them
        labels = conn.execute(
            select(
                Label.id, Label.item_id, Label.annotator_id, Label.lease_id, Label.chosen, Label.position
            ).where(Label.project_id == project_id)
        ).all()
        items = {row.id: row for row in conn.execute(select(Item.id, Item.overlap, Item.n_labels)).all()}
        leases = conn.execute(
            select(Lease.id, Lease.token, Lease.item_id, Lease.annotator_id, Lease.completed_at)
        ).all()
    by_id = {label.id: label for label in labels}
    lease_by_id = {lease.id: lease for lease in leases}
    names = {user.annotator_id: user.name for user in store.users()}
    # Every acknowledged label is there, by the annotator and the lease token it was acknowledged to.
    for a in annotators:
        assert not a.errors, (a.name, a.errors[:3])
        for label_id, (token, answer) in a.acked.items():
            assert label_id in by_id, f"acknowledged label {label_id} of {a.name} is not in the database"
            label = by_id[label_id]
            assert names[label.annotator_id] == a.name
            assert lease_by_id[label.lease_id].token == token
            assert label.position == {"left": 0, "right": 1, "tie": None}[answer["choice"]]
    # Distinct acknowledgements of different submissions never share a label.
    acked_ids = [label_id for a in annotators for label_id in a.acked]
    assert len(acked_ids) == len(set(acked_ids))
    # No duplicate: one label per lease and per (item, annotator); no item over its overlap.
    assert len({label.lease_id for label in labels}) == len(labels)
    pairs = Counter((label.item_id, label.annotator_id) for label in labels)
    assert max(pairs.values(), default=1) == 1, [pair for pair, n in pairs.items() if n > 1][:5]
    per_item = Counter(label.item_id for label in labels)
    for item_id, n in per_item.items():
        assert n <= items[item_id].overlap, f"item {item_id} has {n} labels, overlap {items[item_id].overlap}"
        # The denormalised counter that drives assignment agrees with the labels.
        assert items[item_id].n_labels == n, (item_id, items[item_id].n_labels, n)
    # No double assignment: leases last longer than the test, so an item never had more
    # leases than its overlap, and an annotator never two leases on one item.
    leases_per_item = Counter(lease.item_id for lease in leases)
    assert max(leases_per_item.values(), default=0) <= OVERLAP
    assert len({(lease.item_id, lease.annotator_id) for lease in leases}) == len(leases)
    open_per_annotator = Counter(lease.annotator_id for lease in leases if lease.completed_at is None)
    assert max(open_per_annotator.values(), default=0) <= 1
    return {"labels": len(labels), "leases": len(leases), "items_touched": len(per_item)}


@pytest.fixture
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash the 50 test passwords with a tiny scrypt cost (stored in each hash, so logins are cheap too)."""
    monkeypatch.setattr(auth, "SCRYPT_N", 2**4)


@pytest.mark.slow  # about 20 s per database on a loaded 2-core machine: two server starts
def test_50_annotators_then_sigkill_loses_no_acknowledged_label(db_url, tmp_path, cheap_hashes):
    store = FeedbackStore(db_url, seed=0, durable=False)
    try:
        project_id = store.create_project("load", overlap=OVERLAP)
        store.add_items(
            project_id, [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(N_ITEMS)]
        )
        log = tmp_path / "server.log"
        annotators = []
        for i in range(N_ANNOTATORS):
            name = f"ann-{i:02d}"
            user_id = store.add_user(name, "annotator", PASSWORD)
            # Sessions straight from the store: logging in is tested elsewhere, and 50
            # sequential logins would be most of this test's time on a loaded machine.
            token, csrf = store.create_session(user_id)
            client = httpx.Client(timeout=60, cookies={COOKIE: token}, verify=False)
            annotators.append(Annotator(name, client, csrf, seed=i))

        # Phase 1: 50 annotators label concurrently for a bounded time.
        with serve(db_url, log) as (url, process):
            connect(annotators, url)
            stop = threading.Event()
            started = time.monotonic()
            threads = run_load(annotators, project_id, stop)
            time.sleep(LOAD_SECONDS)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            phase1_seconds = time.monotonic() - started
            phase1 = check_database(store, project_id, annotators)
            assert phase1["labels"] == n_acked(annotators) > 0
            assert all(a.n_transport_errors == 0 and a.pending is None for a in annotators)

            # Phase 2: the same load, and SIGKILL while requests are in flight.
            before = n_acked(annotators)
            threads = run_load(annotators, project_id, threading.Event())
            deadline = time.monotonic() + LOAD_SECONDS
            # Kill once the load is going and at least one submission is on its way.
            while time.monotonic() < deadline and (
                n_acked(annotators) < before + ACKS_BEFORE_KILL or all(a.pending is None for a in annotators)
            ):
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            for thread in threads:
                thread.join(timeout=120)
            assert not any(thread.is_alive() for thread in threads)
        interrupted = [a for a in annotators if a.n_transport_errors]
        assert interrupted, "no request was in flight when the server was killed"

        # Phase 3: restart on the same database; every acknowledged label is there.
        check_database(store, project_id, annotators)
        with serve(db_url, log) as (url, _):
            connect(annotators, url)
            # Sessions live in the database, so they survive the restart; a submission whose
            # answer was lost is retried with the same token and answer: one label, not two.
            retried = [a for a in annotators if a.pending is not None]
            threads = [threading.Thread(target=a.recover, args=(project_id,)) for a in annotators]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            final = check_database(store, project_id, annotators)
        assert final["labels"] == n_acked(annotators)
        print(
            f"\n{store.url.split(':')[0]}: phase 1 {phase1['labels']} labels by {N_ANNOTATORS} annotators "
            f"in {phase1_seconds:.1f} s ({phase1['labels'] / phase1_seconds:.0f}/s); killed with "
            f"{len(interrupted)} annotators mid-request, {len(retried)} submissions retried; "
            f"{final['labels']} labels at the end, all acknowledged ones present"
        )
        # The check is not vacuous: one acknowledged label gone from the database is caught.
        victim = next(label_id for a in annotators for label_id in a.acked)
        with store._transaction("write") as conn:
            conn.execute(delete(Label).where(Label.id == victim))
        with pytest.raises(AssertionError, match=f"acknowledged label {victim} of .* not in the database"):
            check_database(store, project_id, annotators)
        for a in annotators:
            a.client.close()
    finally:
        store.close()
