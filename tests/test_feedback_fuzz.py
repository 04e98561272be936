"""The feedback service's JSON API fuzzed with schemathesis from its own OpenAPI spec: no 500s.

Every operation gets generated requests (bounded, derandomised: the same examples on
every run), sent as a logged-in admin with a valid session cookie and CSRF header so
that they get past authentication and reach the real handlers. The store has a
project of every task type with items and a task leased to the admin; generated path
parameters, task tokens, answers and login names are swapped, part of the time, for
ones that exist, so that requests also get past the "not found" checks into the
answer validation and the label insert. Whatever the request, the answer must not be
a server error, and it must match the response schema the spec declares for its status.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, response_schema_conformance

from rlhfkit.feedback import api, auth
from rlhfkit.feedback.answers import ANSWER_FIELDS
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import LoginRateLimiter
from rlhfkit.feedback.session import COOKIE, CSRF_HEADER
from rlhfkit.feedback.store import RESPONSES_PER_TYPE, TASK_TYPES, FeedbackStore

ADMIN, ADMIN_PASSWORD = "root", "root-password"
# Generated requests per operation: bounded, so the whole file runs in well under a minute.
MAX_EXAMPLES = 20
# Every operation of the JSON API, one test each (schemathesis' lazy pytest loader does
# not work with pytest 9, so hypothesis drives each operation's strategy directly).
# path_format: the path as OpenAPI names it (no converters such as {name:path}).
OPERATIONS = sorted((route.path_format, method) for route in api.router.routes for method in route.methods)
ANSWER_KEYS = sorted({key for keys in ANSWER_FIELDS.values() for key in keys})
# Any JSON value, nested a little: what a buggy or hostile client may put in an answer.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

# Well-formed answers per task type (3 responses shown in a ranking), to reach the label insert.
_TEXTS = st.text(min_size=1, max_size=50)
VALID_ANSWERS = {
    "comparison": st.fixed_dictionaries(
        {"choice": st.sampled_from(["left", "right", "tie"]), "strength": st.integers(1, 3)}
    ),
    "ranking": st.permutations([0, 1, 2]).map(lambda order: {"ranking": order}),
    "likert": st.integers(1, 7).map(lambda rating: {"rating": rating}),
    "binary": st.booleans().map(lambda label: {"label": label}),
    "edit": _TEXTS.map(lambda text: {"text": text}),
    "demonstration": _TEXTS.map(lambda text: {"text": text}),
}


@dataclass(frozen=True)
class Fixture:
    """The store under test and the ids, names and task tokens that exist in it."""

    store: FeedbackStore
    admin_id: int
    project_ids: list[int]
    tokens: dict[str, str]  # task token -> its project's task type
    names: list[str]


@pytest.fixture
def fuzz_fixture(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fixture]:
    """A SQLite store: an admin, an annotator, a project of every task type with items, leased tasks."""
    # Cheap password hashes (the cost is stored in each hash, so generated logins are cheap too).
    monkeypatch.setattr(auth, "SCRYPT_N", 2**4)
    store = FeedbackStore(tmp_path / "fuzz.db", seed=0, durable=False)
    admin_id = store.add_user(ADMIN, "admin", ADMIN_PASSWORD)
    store.add_user("alice", "annotator", "alice-password")
    admin_annotator = next(u.annotator_id for u in store.users() if u.user_id == admin_id)
    project_ids: list[int] = []
    tokens: dict[str, str] = {}
    for task_type in TASK_TYPES:
        project = store.create_project(f"p-{task_type}", task_type, "Be *careful*.", overlap=2)
        k = max(RESPONSES_PER_TYPE[task_type][0], min(3, RESPONSES_PER_TYPE[task_type][1]))
        store.add_items(
            project, [{"prompt": f"q{i}", "responses": [f"r{i}-{j}" for j in range(k)]} for i in range(3)]
        )
        project_ids.append(project)
        task = store.next_task(project, admin_annotator)
        assert task is not None
        tokens[task.token] = task_type
    yield Fixture(store, admin_id, project_ids, tokens, ["alice", ADMIN])
    store.close()


@pytest.fixture
def fuzz_schema(fuzz_fixture: Fixture) -> Any:
    """The API's OpenAPI schema, bound to the app for in-process (ASGI) calls."""
    # Generous login and sign-up limits: generated wrong passwords and names must not turn into 429s.
    app = create_app(
        fuzz_fixture.store,
        login_limiter=LoginRateLimiter(attempts=10_000, window=1, signup_attempts=10_000),
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def aim(case: Any, data: st.DataObject, facts: Fixture) -> None:
    """Swap some generated values for existing ones, so the request reaches deeper code."""
    maybe = st.booleans()
    params = case.path_parameters or {}
    if "project_id" in params and data.draw(maybe):
        params["project_id"] = data.draw(st.sampled_from(facts.project_ids))
    if "name" in params and data.draw(maybe):
        params["name"] = data.draw(st.sampled_from(facts.names))
    body = case.body
    if not isinstance(body, dict):
        return
    if "token" in body and data.draw(maybe):
        body["token"] = data.draw(st.sampled_from(sorted(facts.tokens)))
        kind = data.draw(st.sampled_from(["valid", "known keys", "generated"]))
        if kind == "valid":
            body["answer"] = data.draw(VALID_ANSWERS[facts.tokens[body["token"]]])
        elif kind == "known keys":
            body["answer"] = data.draw(st.dictionaries(st.sampled_from(ANSWER_KEYS), JSON_VALUES, max_size=2))
    if "password" in body and "invite" not in body and data.draw(maybe):
        body.update(name=ADMIN, password=ADMIN_PASSWORD)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_api_never_answers_500(fuzz_schema: Any, fuzz_fixture: Fixture, path: str, method: str) -> None:
    operation = fuzz_schema[path][method]

    @given(case=operation.as_strategy(), data=st.data())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any, data: st.DataObject) -> None:
        aim(case, data, fuzz_fixture)
        # A fresh session per request: a generated logout must not log out the next request.
        token, csrf = fuzz_fixture.store.create_session(fuzz_fixture.admin_id)
        response = case.call(headers={CSRF_HEADER: csrf}, cookies={COOKIE: token})
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    call()
