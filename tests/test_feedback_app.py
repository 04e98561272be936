"""The feedback web service: JSON API, pages and security rules (TestClient), HTTP labelling (uvicorn)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from fastapi.testclient import TestClient
from feedback_server import running_server

from rlhfkit.crowd.simulate import AnnotatorProfile, simulate_annotation
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import LoginRateLimiter
from rlhfkit.feedback.client import FeedbackClient, FeedbackClientError, HttpAnnotators

PASSWORDS = {"root": "root-password", "alice": "alice-password", "bob": "bob-password"}


@pytest.fixture
def service(open_store):
    """A store with an admin, two annotators, a comparison project with a golden item; and the app."""
    store = open_store()
    store.add_user("root", "admin", PASSWORDS["root"])
    store.add_user("alice", "annotator", PASSWORDS["alice"])
    store.add_user("bob", "annotator", PASSWORDS["bob"])
    project = store.create_project(
        "prefs", guidelines="Pick the **better** list.", overlap=2, golden_rate=0.0
    )
    store.add_items(project, [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)])
    store.add_items(
        project, [{"prompt": "control", "responses": ["SECRET-GOOD", "bad"], "golden": {"chosen": 0}}]
    )
    app = create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60))
    return store, app, project


def login(app, name):
    """A TestClient logged in as `name`; returns (client, csrf token)."""
    client = TestClient(app)
    response = client.post("/api/login", json={"name": name, "password": PASSWORDS[name]})
    assert response.status_code == 200, response.text
    return client, response.json()["csrf_token"]


def test_annotator_labels_and_sees_only_their_own_work(service):
    store, app, project = service
    alice, alice_csrf = login(app, "alice")
    bob, bob_csrf = login(app, "bob")
    task = alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": alice_csrf}).json()["task"]
    assert set(task) == {
        "token",
        "task_type",
        "prompt",
        "messages",
        "responses",
    }  # no item id, no golden flag
    submitted = alice.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"choice": "left", "strength": 2}},
        headers={"X-CSRF-Token": alice_csrf},
    )
    assert submitted.status_code == 200
    # A double click: same token, same answer, same label.
    again = alice.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"choice": "left", "strength": 2}},
        headers={"X-CSRF-Token": alice_csrf},
    )
    assert again.json() == submitted.json()
    assert [label["annotator"] for label in alice.get(f"/api/projects/{project}/my-labels").json()] == [
        "alice"
    ]
    assert bob.get(f"/api/projects/{project}/my-labels").json() == []
    # Bob cannot submit on Alice's token, nor read all labels, stats, exports or invites.
    stolen = bob.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"choice": "right"}},
        headers={"X-CSRF-Token": bob_csrf},
    )
    assert stolen.status_code == 403
    for path in (
        f"/api/projects/{project}/labels",
        f"/api/projects/{project}/stats",
        f"/api/projects/{project}/export",
    ):
        assert bob.get(path).status_code == 403, path
    assert bob.post("/api/invites", json={}, headers={"X-CSRF-Token": bob_csrf}).status_code == 403
    assert bob.get("/admin").status_code == 403
    assert bob.get("/admin/projects/new").status_code == 403
    # Project settings: annotators never see the golden rate.
    assert bob.get(f"/api/projects/{project}").json()["golden_rate"] is None


def test_not_logged_in_is_401_or_a_redirect(service):
    _, app, project = service
    anonymous = TestClient(app)
    for path in (
        "/api/me",
        "/api/projects",
        f"/api/projects/{project}/my-labels",
        f"/api/projects/{project}/labels",
    ):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.post(f"/api/projects/{project}/next").status_code == 401
    assert anonymous.get("/admin", follow_redirects=False).status_code == 303
    assert (
        anonymous.get(f"/projects/{project}/annotate", follow_redirects=False).headers["location"] == "/login"
    )


def test_golden_answers_never_reach_annotators(service):
    store, app, project = service
    store.update_project(project, golden_rate=1.0)
    alice, csrf = login(app, "alice")
    task = alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": csrf}).json()["task"]
    assert task["prompt"] == "control"  # rate 1: the golden item comes first
    alice.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"choice": "tie"}},
        headers={"X-CSRF-Token": csrf},
    )
    for path in (f"/api/projects/{project}", f"/api/projects/{project}/my-labels", "/api/projects", "/"):
        body = alice.get(path).text
        assert '"chosen": 0' not in body and "golden" not in body.replace('"golden_rate":null', ""), path
    (label,) = alice.get(f"/api/projects/{project}/my-labels").json()
    assert label["chosen"] is None  # her own answer, not the key
    root, _ = login(app, "root")
    stats = root.get(f"/api/projects/{project}/stats").json()
    assert stats["annotators"][0]["golden_accuracy"] == 0.0


def test_state_changing_calls_need_the_csrf_token(service):
    _, app, project = service
    alice, csrf = login(app, "alice")
    assert alice.post(f"/api/projects/{project}/next").status_code == 403
    assert alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": "forged"}).status_code == 403
    root, _ = login(app, "root")
    assert root.post("/api/projects", json={"name": "x"}).status_code == 403
    assert root.post("/admin/projects", data={"name": "x", "task_type": "likert"}).status_code == 403
    assert root.post("/admin/invites", data={"role": "annotator"}).status_code == 403
    assert root.post("/logout").status_code == 403
    # The login form is protected by a double-submit token even before a session exists.
    fresh = TestClient(app)
    assert fresh.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]}).status_code == 403


def test_session_cookie_flags_and_security_headers(service):
    _, app, _ = service
    response = TestClient(app).post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


def test_every_response_has_the_security_headers_and_hsts_only_over_https(service):
    store, app, _ = service
    strict = {
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "same-origin",
    }
    paths = ["/login", "/api/me", "/static/annotate.js", "/openapi.json", "/no-such-page", "/docs"]

    def check(client, hsts):
        for path in paths:
            headers = client.get(path).headers
            assert {name: headers.get(name) for name in strict} == strict, path
            assert "default-src 'none'" in headers["content-security-policy"], path
            assert headers.get("strict-transport-security") == hsts, path

    # Plain http on localhost: no HSTS (a browser would pin http://localhost to HTTPS it does not have).
    check(TestClient(app), None)
    # Served over HTTPS, or behind an HTTPS proxy (secure cookies): a year, no includeSubDomains.
    check(TestClient(app, base_url="https://testserver"), "max-age=31536000")
    check(TestClient(create_app(store, secure_cookies=True)), "max-age=31536000")


def test_a_413_and_a_500_carry_the_security_headers_and_no_store(service):
    # Both were sent around the header middleware: the 413 by the body limit itself, the 500 by
    # Starlette's error handler, which sits outside every middleware.
    store, _, _ = service
    app = create_app(store, max_body_bytes=100, secure_cookies=True)

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    client = TestClient(app, raise_server_exceptions=False)
    oversized = client.post("/api/login", content=b"x" * 500, headers={"content-type": "application/json"})

    def chunks():
        yield b"x" * 80
        yield b"x" * 80

    chunked = client.post("/api/login", content=chunks(), headers={"content-type": "application/json"})
    failed = client.get("/boom")
    for response, status in [(oversized, 413), (chunked, 413), (failed, 500)]:
        assert response.status_code == status
        assert "default-src 'none'" in response.headers["content-security-policy"], status
        assert response.headers["x-content-type-options"] == "nosniff", status
        assert response.headers["strict-transport-security"] == "max-age=31536000", status
        assert response.headers["cache-control"] == "no-store", status
    assert failed.text == "Internal Server Error"
    with pytest.raises(RuntimeError, match="a bug"):  # the error itself still reaches the server's log
        TestClient(app).get("/boom")


def test_no_page_or_api_answer_is_cached(service):
    # Back after a logout on a shared computer, or a caching proxy, must not show them to the next person.
    _, app, project = service
    root, _ = login(app, "root")
    alice, _ = login(app, "alice")
    for client, path in [
        (root, "/admin"),
        (root, f"/api/projects/{project}/export?format=raw"),
        (root, f"/api/projects/{project}/labels"),
        (root, "/api/me"),
        (alice, f"/projects/{project}/annotate"),
        (alice, f"/api/projects/{project}/my-labels"),
        (TestClient(app), "/login"),
    ]:
        response = client.get(path)
        assert response.status_code == 200 and response.headers["cache-control"] == "no-store", path
    assert "no-store" not in alice.get("/static/annotate.js").headers.get("cache-control", "")


def test_every_cookie_is_secure_over_https_or_behind_an_https_proxy(service):
    store, app, _ = service
    client = TestClient(app, base_url="https://testserver")
    form = client.get("/login")
    assert "rlhfkit_form_csrf=" in form.headers["set-cookie"] and "Secure" in form.headers["set-cookie"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    done = client.post(
        "/login",
        data={"name": "alice", "password": PASSWORDS["alice"], "csrf_token": token},
        follow_redirects=False,
    )
    assert done.status_code == 303
    session = [c for c in done.headers.get_list("set-cookie") if c.startswith("rlhfkit_session=")]
    assert session and "Secure" in session[0]
    # Behind an HTTPS proxy (the app sees http): --secure-cookies.
    proxied = TestClient(create_app(store, secure_cookies=True))
    assert "Secure" in proxied.get("/login").headers["set-cookie"]
    logged_in = proxied.post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]})
    assert "Secure" in logged_in.headers["set-cookie"]
    # Plain http without the flag: no Secure, or the browser would never send them back.
    assert "Secure" not in TestClient(app).get("/login").headers["set-cookie"]


def test_login_rate_limit(service):
    _, app, _ = service
    client = TestClient(app)
    for _ in range(3):
        assert (
            client.post("/api/login", json={"name": "alice", "password": "wrong-password"}).status_code == 401
        )
    blocked = client.post("/api/login", json={"name": "alice", "password": PASSWORDS["alice"]})
    assert blocked.status_code == 429 and "Retry-After" in blocked.headers
    # The lock is on (name, address): the same address may still try another name (up to its own,
    # higher ceiling, see below).
    assert client.post("/api/login", json={"name": "bob", "password": "x" * 9}).status_code == 401


def test_login_finds_the_user_in_any_case_and_the_rate_limit_counts_every_case_as_one_name(service):
    _, app, _ = service
    client = TestClient(app)
    me = client.post("/api/login", json={"name": "ALICE", "password": PASSWORDS["alice"]})
    assert me.status_code == 200 and me.json()["name"] == "alice"
    # The fixture's limit: 3 failures per name and address. Changing the case of the name buys no
    # more guesses.
    guesser = TestClient(app, client=("10.0.0.1", 50000))
    for typed in ["bob", "Bob", "BOB"]:
        assert (
            guesser.post("/api/login", json={"name": typed, "password": "wrong-password"}).status_code == 401
        )
    assert guesser.post("/api/login", json={"name": "bOb", "password": PASSWORDS["bob"]}).status_code == 429


def _guess(app, address: str, name: str, password: str = "wrong-password") -> int:
    client = TestClient(app, client=(address, 50000))
    return client.post("/api/login", json={"name": name, "password": password}).status_code


def test_failures_from_one_address_do_not_lock_the_name_out_from_another(service):
    _, app, _ = service
    # Anyone who knows a name would otherwise keep its annotator locked out.
    assert [_guess(app, "10.0.0.66", "alice") for _ in range(4)] == [401, 401, 401, 429]
    assert _guess(app, "10.0.0.66", "alice", PASSWORDS["alice"]) == 429
    assert _guess(app, "10.0.0.7", "alice", PASSWORDS["alice"]) == 200
    assert _guess(app, "10.0.0.8", "ALICE") == 401


def test_an_ipv6_client_is_counted_by_its_64_network(service):
    # One subscriber can send from any of its /64's 2**64 addresses: counted one by one, a guesser
    # would never reach the per-address limits.
    from rlhfkit.feedback.session import limit_key

    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert limit_key("::ffff:10.0.0.9") == "10.0.0.9" and limit_key("10.0.0.9") == "10.0.0.9"
    assert limit_key("testclient") == "testclient"
    store, _, _ = service
    app = create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60, address_attempts=4))
    guesses = [
        _guess(app, f"2001:db8:1:2::{i:x}", name) for i, name in enumerate(["root", "alice", "bob", "carol"])
    ]
    assert guesses == [401] * 4
    assert _guess(app, "2001:db8:1:2:ffff::1", "dave") == 429  # another address of the same /64
    assert _guess(app, "2001:db8:1:3::1", "bob", PASSWORDS["bob"]) == 200  # the next /64 is not held


def test_the_per_name_ceiling_stops_guesses_from_many_addresses(service):
    store, _, _ = service
    default = LoginRateLimiter()
    assert (default.attempts, default.name_attempts) == (5, 100)
    app = create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60, name_attempts=6))
    # Two guesses from each address stay under the per-address lock; six in all reach the ceiling,
    # whatever the case each address types the name in.
    codes = [_guess(app, f"10.0.1.{i}", typed) for i in range(3) for typed in ("bob", "BOB")]
    assert codes == [401] * 6
    refused = TestClient(app, client=("10.0.2.1", 50000)).post(
        "/api/login", json={"name": "Bob", "password": PASSWORDS["bob"]}
    )
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert _guess(app, "10.0.2.1", "alice", PASSWORDS["alice"]) == 200  # other names are not affected


def test_one_address_guessing_many_names_reaches_its_ceiling(service):
    store, _, _ = service
    assert LoginRateLimiter().address_attempts == 20
    app = create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60, address_attempts=4))
    assert [_guess(app, "10.0.3.1", name) for name in ("root", "alice", "bob", "carol")] == [401] * 4
    assert _guess(app, "10.0.3.1", "dave") == 429
    assert _guess(app, "10.0.3.1", "bob", PASSWORDS["bob"]) == 429
    assert _guess(app, "10.0.3.2", "bob", PASSWORDS["bob"]) == 200


def test_login_rate_limit_holds_for_a_burst_of_concurrent_guesses(service, monkeypatch):
    store, app, _ = service
    # Checking a password takes a while (scrypt, on a busy server): guesses sent at once are all in
    # flight together, and still only the limit's 3 may reach the password check.
    checked = []
    authenticate = store.authenticate

    def slow_authenticate(name, password):
        checked.append(password)
        time.sleep(0.3)
        return authenticate(name, password)

    monkeypatch.setattr(store, "authenticate", slow_authenticate)
    client = TestClient(app)
    codes = []

    def guess(i):
        codes.append(
            client.post("/api/login", json={"name": "alice", "password": f"guess-{i:02d}"}).status_code
        )

    with client:
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(codes) == [401] * 3 + [429] * 7
    assert len(checked) == 3
    # People behind one address (an office) who log in at once, with right passwords, are not refused.
    fresh = TestClient(create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60)))
    codes.clear()
    with fresh:
        threads = [
            threading.Thread(
                target=lambda name: codes.append(
                    fresh.post("/api/login", json={"name": name, "password": PASSWORDS[name]}).status_code
                ),
                args=(name,),
            )
            for name in ["root", "alice", "bob"] * 3
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert codes == [200] * 9


def test_model_output_with_markup_is_data_and_sql_text_is_stored_verbatim(service):
    store, app, _ = service
    root, csrf = login(app, "root")
    created = root.post(
        "/api/projects",
        json={"name": "xss", "task_type": "binary", "guidelines": "<script>alert('g')</script> *ok*"},
        headers={"X-CSRF-Token": csrf},
    )
    assert created.status_code == 201
    pid = created.json()["id"]
    evil = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    sql = "'); DROP TABLE labels; --"
    added = root.post(
        f"/api/projects/{pid}/items",
        json={"items": [{"prompt": sql, "responses": [evil]}]},
        headers={"X-CSRF-Token": csrf},
    )
    assert added.status_code == 201
    page = root.get(f"/projects/{pid}/guidelines").text
    assert "<script>alert('g')" not in page and "&lt;script&gt;alert(" in page and "<em>ok</em>" in page
    task = root.post(f"/api/projects/{pid}/next", headers={"X-CSRF-Token": csrf}).json()["task"]
    assert task["prompt"] == sql and task["responses"] == [evil]
    root.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"label": True}},
        headers={"X-CSRF-Token": csrf},
    )
    exported = root.get(f"/api/projects/{pid}/export", params={"format": "trl-unpaired"})
    assert json.loads(exported.text)["completion"] == evil
    assert len(store.labels(pid)) == 1  # the labels table is still there
    # The annotate page has no inline script; its script writes outputs with textContent only.
    annotate = root.get(f"/projects/{pid}/annotate").text
    assert "<script>" not in annotate.replace('<script src="/static/annotate.js"></script>', "")
    script = root.get("/static/annotate.js").text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


def test_export_names_only_the_download_after_the_project_and_leaves_no_files(service, tmp_path, monkeypatch):
    store, app, _ = service
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    victim = tmp_path / "victim-raw.jsonl"
    victim.write_text("keep me\n")
    root, csrf = login(app, "root")
    headers = {"X-CSRF-Token": csrf}
    # A project name is free text: a path in it must neither write nor delete a file there.
    for name in ["../" * 12 + str(victim)[1:].removesuffix("-raw.jsonl"), "films/2024"]:
        pid = root.post("/api/projects", json={"name": name}, headers=headers).json()["id"]
        exported = root.get(f"/api/projects/{pid}/export", params={"format": "raw"})
        assert exported.status_code == 200
        disposition = exported.headers["content-disposition"]
        assert "/" not in disposition and disposition.endswith('-raw.jsonl"')
    assert victim.read_text() == "keep me\n"
    # A refused export (no SFT rows from a comparison project) leaves no folder behind either.
    refused = root.get(f"/api/projects/{pid}/export", params={"format": "sft"})
    assert refused.status_code == 400
    assert list((tmp_path / "temp").iterdir()) == []


@pytest.mark.parametrize(
    ("path", "body", "loc", "problem"),
    [
        ("/api/projects", b'{"name": "n", "golden_rate": NaN}', ["body", "golden_rate"], "finite number"),
        ("/api/projects", b'{"name": "n", "overlap": 1e400}', ["body", "overlap"], "finite"),
        ("/api/projects", b'{"name": "n\\ud800"}', ["body", "name"], "unicode string"),
        (
            "/api/projects/PID/items",
            b'{"items": [{"prompt": "q", "responses": ["a"], "meta": {"x": NaN}}]}',
            ["body", "items", 0, "meta"],
            "not a JSON number",
        ),
        (
            "/api/projects/PID/items",
            b'{"items": [{"prompt": "q", "responses": ["a\\udfff b"]}]}',
            ["body", "items", 0, "responses"],
            "lone surrogate",
        ),
        (
            "/api/submit",
            b'{"token": "t", "answer": {"rating": Infinity}}',
            ["body", "answer"],
            "not a JSON number",
        ),
    ],
)
def test_nan_infinity_and_lone_surrogates_are_refused_naming_the_field(service, path, body, loc, problem):
    store, app, project = service
    root, csrf = login(app, "root")
    n_items = len(store.items(project))
    response = root.post(
        path.replace("PID", str(project)),
        content=body,
        headers={"X-CSRF-Token": csrf, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and problem in error["msg"]
    assert len(store.items(project)) == n_items


def test_nul_characters_are_refused_naming_the_field_on_every_backend(service):
    # JSON allows "\u0000", PostgreSQL's text and jsonb do not: it answered 500 there, to anyone.
    store, app, project = service
    client = TestClient(app, raise_server_exceptions=False)

    def refused(response, loc):
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == loc and "NUL character" in error["msg"], error

    refused(client.post("/api/login", json={"name": "ali\u0000ce", "password": "x" * 9}), ["body", "name"])
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    refused(
        client.post("/login", data={"name": "ali\u0000ce", "password": "x" * 9, "csrf_token": token}),
        ["body", "name"],
    )
    edit = store.create_project("nul-edit", "edit")
    store.add_items(edit, [{"prompt": "q", "responses": ["draft"]}])
    alice, csrf = login(app, "alice")
    headers = {"X-CSRF-Token": csrf}
    refused(
        alice.post("/api/submit", json={"token": "t\u0000", "answer": {}}, headers=headers), ["body", "token"]
    )
    task = alice.post(f"/api/projects/{edit}/next", headers=headers).json()["task"]
    answer = {"token": task["token"], "answer": {"text": "better\u0000"}}
    refused(alice.post("/api/submit", json=answer, headers=headers), ["body", "answer"])
    assert store.labels(edit) == []  # the task is still open: the fixed answer goes through
    fixed = {"token": task["token"], "answer": {"text": "better"}}
    assert alice.post("/api/submit", json=fixed, headers=headers).status_code == 200
    root, root_csrf = login(app, "root")
    headers = {"X-CSRF-Token": root_csrf}
    refused(root.post("/api/projects", json={"name": "p\u0000"}, headers=headers), ["body", "name"])
    items = {"items": [{"prompt": "q", "responses": ["a", "b"], "meta": {"k\u0000": 1}}]}
    refused(
        root.post(f"/api/projects/{project}/items", json=items, headers=headers), ["body", "items", 0, "meta"]
    )
    refused(
        root.post("/api/annotators/a%00b/exclude", json={"excluded": True}, headers=headers), ["path", "name"]
    )
    refused(root.post("/admin/annotators/a%00b/exclude", data={"csrf_token": root_csrf}), ["path", "name"])
    new_project = {"name": "p", "task_type": "likert", "guidelines": "g\u0000", "csrf_token": root_csrf}
    refused(root.post("/admin/projects", data=new_project), ["body", "guidelines"])
    assert [p.name for p in store.projects()] == ["prefs", "nul-edit"] and len(store.items(project)) == 4


def test_deeply_nested_json_gets_a_422_not_a_500(service):
    store, app, project = service
    client = TestClient(app, raise_server_exceptions=False)
    nested = "[" * 700 + "]" * 700  # JSON that Python's parser reads, and that pydantic's error echoes
    for body in (
        f'{{"name": {nested}, "password": "x"}}',
        f'{{"name": "a", "password": "x", "more": {nested}}}',
    ):
        response = client.post("/api/login", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] in (["body", "name"], ["body", "more"])
        assert json.dumps(error["input"]).count("[") < 40  # cut off, not echoed all the way down
    root, csrf = login(app, "root")
    deep_meta = (
        f'{{"items": [{{"prompt": "q", "responses": ["a", "b"], "meta": {{"x": {nested}}}, "z": 1}}]}}'
    )
    response = root.post(
        f"/api/projects/{project}/items",
        content=deep_meta,
        headers={"X-CSRF-Token": csrf, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert len(store.items(project)) == 4  # nothing added


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"choice": "sideways"}, "choice"),
        ({"choice": "left", "strength": 9}, "strength"),
        ({"rank": [0]}, "rank"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(service, answer, field):
    _, app, project = service
    alice, csrf = login(app, "alice")
    task = alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": csrf}).json()["task"]
    response = alice.post(
        "/api/submit", json={"token": task["token"], "answer": answer}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 422 and response.json()["field"] == field


def test_other_bad_requests(service):
    _, app, project = service
    alice, csrf = login(app, "alice")
    headers = {"X-CSRF-Token": csrf}
    unknown = alice.post("/api/submit", json={"token": "nope", "answer": {"choice": "left"}}, headers=headers)
    assert unknown.status_code == 422 and unknown.json()["field"] == "token"
    assert "unknown task token 'nope'" in unknown.json()["detail"]
    missing = alice.post("/api/submit", json={"answer": {}}, headers=headers)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "token"]
    assert alice.post("/api/projects/999/next", headers=headers).status_code == 404
    root, root_csrf = login(app, "root")
    empty = root.post(
        f"/api/projects/{project}/items",
        json={"items": [{"prompt": "", "responses": ["a", "b"]}]},
        headers={"X-CSRF-Token": root_csrf},
    )
    assert empty.status_code == 422 and "prompt" in json.dumps(empty.json())
    wrong = root.post(
        f"/api/projects/{project}/items",
        json={"items": [{"prompt": "q", "responses": ["a", "b", "c"]}]},
        headers={"X-CSRF-Token": root_csrf},
    )
    assert wrong.status_code == 400 and "'responses'" in wrong.json()["detail"]
    small = create_app(app.state.store, max_body_bytes=1000)
    big = TestClient(small).post(
        "/api/login", content=b"x" * 5000, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["field"] == "body"
    # Without a Content-Length (chunked), the limit holds on the bytes actually received.
    chunks = TestClient(small).post(
        "/api/login", content=iter([b"x" * 600, b"x" * 600]), headers={"content-type": "application/json"}
    )
    assert chunks.status_code == 413 and "larger than 1000 bytes" in chunks.json()["detail"]


@pytest.mark.parametrize(
    ("task_type", "responses", "answer", "field", "problem"),
    [
        ("edit", ["draft"], {"text": "   "}, "text", "is empty"),
        ("demonstration", [], {"text": ""}, "text", "is empty"),
        ("edit", ["draft"], {"text": "x" * 20_001}, "text", "longer than"),
        ("ranking", ["a", "b", "c"], {"ranking": [0, 0, 1]}, "ranking", "exactly once"),
        ("ranking", ["a", "b", "c"], {"ranking": [0, 1]}, "ranking", "exactly once"),
        ("ranking", ["a", "b", "c"], {"ranking": [2, 1, 0, 3]}, "ranking", "exactly once"),
        ("ranking", ["a", "b", "c"], {"ranking": ["0", 1, 2]}, "ranking", "list of response positions"),
        ("likert", ["one"], {"rating": 8}, "rating", "from 1 to 7"),
        ("binary", ["one"], {"label": "yes"}, "label", ""),
    ],
)
def test_bad_answers_of_every_task_type_name_the_field(service, task_type, responses, answer, field, problem):
    store, app, _ = service
    project = store.create_project(f"bad-{task_type}", task_type)
    store.add_items(project, [{"prompt": "q", "responses": responses}])
    alice, csrf = login(app, "alice")
    task = alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": csrf}).json()["task"]
    response = alice.post(
        "/api/submit", json={"token": task["token"], "answer": answer}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and f"field {field!r}" in response.json()["detail"]
    assert problem in response.json()["detail"]
    assert store.labels(project) == []  # nothing stored; the task is still open
    fixed = {"edit": {"text": "better"}, "demonstration": {"text": "mine"}, "ranking": {"ranking": [2, 0, 1]}}
    if task_type in fixed:
        ok = alice.post(
            "/api/submit",
            json={"token": task["token"], "answer": fixed[task_type]},
            headers={"X-CSRF-Token": csrf},
        )
        assert ok.status_code == 200, ok.text


def test_dashboard_excludes_an_annotator_with_a_csrf_protected_form(service):
    store, app, project = service
    alice, alice_csrf = login(app, "alice")
    task = alice.post(f"/api/projects/{project}/next", headers={"X-CSRF-Token": alice_csrf}).json()["task"]
    alice.post(
        "/api/submit",
        json={"token": task["token"], "answer": {"choice": "left"}},
        headers={"X-CSRF-Token": alice_csrf},
    )
    root, csrf = login(app, "root")
    page = root.get("/admin").text
    assert 'action="/admin/annotators/alice/exclude"' in page and f'value="{csrf}"' in page
    form = {"excluded": "true", "project_id": str(project)}
    assert root.post("/admin/annotators/alice/exclude", data=form).status_code == 403  # no token
    assert store.excluded_annotators() == []
    # An annotator cannot exclude anyone, even with her own valid token.
    as_alice = alice.post("/admin/annotators/bob/exclude", data={**form, "csrf_token": alice_csrf})
    assert as_alice.status_code == 403 and store.excluded_annotators() == []
    done = root.post(
        "/admin/annotators/alice/exclude", data={**form, "csrf_token": csrf}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"] == f"/admin#project-{project}"
    assert store.excluded_annotators() == ["alice"]
    raw = root.get(f"/api/projects/{project}/export", params={"format": "raw"}).text
    assert raw == ""  # her label is left out of exports
    assert "Include again" in root.get("/admin").text
    back = root.post("/admin/annotators/alice/exclude", data={"excluded": "false", "csrf_token": csrf})
    assert back.status_code == 200 and store.excluded_annotators() == []  # followed to the dashboard
    unknown = root.post("/admin/annotators/nobody/exclude", data={"csrf_token": csrf})
    assert unknown.status_code == 404
    # Annotators not made by sign-up (imported workers, simulated pools) may have a "/" in the name.
    worker = store.add_annotator("team/7", "simulated")
    store.submit_comparison(store.next_task(project, worker).token, worker, "left")
    assert 'action="/admin/annotators/team/7/exclude"' in root.get("/admin").text
    assert root.post("/admin/annotators/team/7/exclude", data={"csrf_token": csrf}).status_code == 200
    assert store.excluded_annotators() == ["team/7"]
    again = root.post(
        "/api/annotators/team%2F7/exclude", json={"excluded": False}, headers={"X-CSRF-Token": csrf}
    )
    assert again.status_code == 204 and store.excluded_annotators() == []


def test_invite_link_signs_up_an_annotator(service):
    store, app, _ = service
    root, csrf = login(app, "root")
    url = root.post("/api/invites", json={"role": "annotator"}, headers={"X-CSRF-Token": csrf}).json()["url"]
    invite = url.split("invite=")[1]
    newcomer = TestClient(app)
    form = newcomer.get(f"/signup?invite={invite}")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    done = newcomer.post(
        "/signup",
        data={"invite": invite, "name": "carol", "password": "carol-password", "csrf_token": token},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert newcomer.get("/api/me").json()["role"] == "annotator"
    assert TestClient(app).get(f"/signup?invite={invite}").status_code == 403  # used up


def test_sign_up_refuses_the_name_of_an_annotator_without_an_account(service):
    store, app, project = service
    worker = store.add_annotator("carol")  # labels given without an account
    store.submit_comparison(store.next_task(project, worker).token, worker, "left")
    root, csrf = login(app, "root")
    url = root.post("/api/invites", json={"role": "admin"}, headers={"X-CSRF-Token": csrf}).json()["url"]
    invite = url.split("invite=")[1]
    newcomer = TestClient(app)
    taken = newcomer.post("/api/signup", json={"invite": invite, "name": "carol", "password": "mallory-pass"})
    assert taken.status_code == 400
    assert (
        taken.json()["detail"]
        == "the name 'carol' already exists (names that differ only in case count as one)"
    )
    assert newcomer.get("/api/me").status_code == 401
    done = newcomer.post("/api/signup", json={"invite": invite, "name": "carol2", "password": "mallory-pass"})
    assert done.status_code == 200 and done.json()["role"] == "admin"
    assert [label.annotator for label in store.labels(project)] == ["carol"]


def test_the_exclude_api_finds_the_annotator_in_any_case(service):
    store, app, _ = service
    root, csrf = login(app, "root")
    excluded = root.post(
        "/api/annotators/ALICE/exclude", json={"excluded": True}, headers={"X-CSRF-Token": csrf}
    )
    assert excluded.status_code == 204 and store.excluded_annotators() == ["alice"]


def test_a_session_ends_after_30_idle_minutes(service, clock):
    store, app, _ = service
    assert app.state.session_idle_seconds == 30 * 60
    alice, _ = login(app, "alice")
    clock.advance(29 * 60)
    assert alice.get("/api/me").status_code == 200  # activity: 30 more minutes from now
    clock.advance(29 * 60)
    assert alice.get("/api/me").status_code == 200
    clock.advance(30 * 60 + 1)
    assert alice.get("/api/me").status_code == 401
    short = create_app(store, session_idle_seconds=60)
    bob = TestClient(short)
    assert bob.post("/api/login", json={"name": "bob", "password": PASSWORDS["bob"]}).status_code == 200
    clock.advance(61)
    assert bob.get("/api/me").status_code == 401


def test_sign_ups_are_limited_per_client_address(service):
    store, _, _ = service
    assert LoginRateLimiter().signup_attempts == 10
    app = create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60, signup_attempts=3))
    invites = [store.create_invite("annotator", None) for _ in range(5)]
    holder = TestClient(app, client=("10.0.4.1", 50000))

    def sign_up(client, invite, name):
        return client.post("/api/signup", json={"invite": invite, "name": name, "password": "new-password"})

    # Every try counts, refused ones too: they tell which names are taken, and each hashes a password.
    assert sign_up(holder, invites[0], "bob").status_code == 400
    assert sign_up(holder, invites[0], "dora").status_code == 200
    assert sign_up(holder, "no-such-invite", "erin").status_code == 403
    refused = sign_up(holder, invites[1], "erin")
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert store.invite_role(invites[1]) == "annotator"  # nothing was done
    # The sign-up form counts under the same limit.
    form = holder.get(f"/signup?invite={invites[1]}")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    page = holder.post(
        "/signup",
        data={"invite": invites[1], "name": "erin", "password": "new-password", "csrf_token": token},
        follow_redirects=False,
    )
    assert page.status_code == 429 and "Too many sign-ups" in page.text
    # Another address is not affected, and sign-ups do not count against logins.
    assert sign_up(TestClient(app, client=("10.0.4.2", 50000)), invites[1], "erin").status_code == 200
    assert _guess(app, "10.0.4.1", "bob", PASSWORDS["bob"]) == 200


def test_a_look_alike_project_name_is_refused_naming_the_project(service):
    store, app, _ = service
    root, csrf = login(app, "root")
    headers = {"X-CSRF-Token": csrf}
    same = root.post("/api/projects", json={"name": "prefs"}, headers=headers)
    assert same.status_code == 409 and same.json()["detail"] == "field 'name': a project named 'prefs' exists"
    for look_alike in ["prefs ", "PREFS", "\uff50\uff52\uff45\uff46\uff53"]:
        refused = root.post("/api/projects", json={"name": look_alike}, headers=headers)
        assert refused.status_code == 409, look_alike
        assert "a project named 'prefs' exists" in refused.json()["detail"]
        assert "differs from it only in case, spacing or Unicode form" in refused.json()["detail"]
    # The new-project form strips the name; case and Unicode form are refused there too, naming the project.
    form = root.get("/admin/projects/new")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    page = root.post(
        "/admin/projects",
        data={"name": "Prefs", "task_type": "likert", "csrf_token": token},
        follow_redirects=False,
    )
    assert page.status_code == 400 and "A project named &#39;prefs&#39; exists" in page.text
    assert [p.name for p in store.projects()] == ["prefs"]


def test_no_interactive_docs_load_scripts_from_a_cdn_and_the_spec_stays(service):
    # FastAPI's /docs and /redoc load their JavaScript and CSS from a CDN: broken offline, and
    # third-party scripts in the service's origin. The spec stays at /openapi.json for tools.
    _, app, _ = service
    root, _ = login(app, "root")
    for client in (TestClient(app), root):
        for path in ["/docs", "/redoc", "/docs/oauth2-redirect"]:
            response = client.get(path)
            assert response.status_code == 404, path
            assert "cdn" not in response.text.lower()
        assert "/api/login" in client.get("/openapi.json").json()["paths"]
    for path in ["/login", "/admin", "/"]:
        page = root.get(path).text
        assert not re.search(r"""<(script|link)[^>]+(src|href)=["']?(https?:)?//""", page), path


def test_the_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy(service):
    store, _, _ = service

    def guess(app, peer, forwarded=None, password="wrong-password"):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        client = TestClient(app, client=(peer, 50000))
        return client.post(
            "/api/login", json={"name": "alice", "password": password}, headers=headers
        ).status_code

    # Off by default, and from a peer that is not a trusted proxy: the header is ignored (anyone can
    # send one), so changing it buys no more guesses.
    for app in (
        create_app(store, login_limiter=LoginRateLimiter(attempts=3, window=60)),
        create_app(
            store, login_limiter=LoginRateLimiter(attempts=3, window=60), trusted_proxies=["10.9.0.1"]
        ),
    ):
        codes = [guess(app, "203.0.113.9", f"198.51.100.{i}") for i in range(4)]
        assert codes == [401, 401, 401, 429]
    # Behind a trusted proxy, two clients get separate ceilings: the proxy's address is not the limit's.
    app = create_app(
        store,
        login_limiter=LoginRateLimiter(attempts=3, window=60),
        trusted_proxies=["10.9.0.1", "10.8.0.0/16"],
    )
    assert [guess(app, "10.9.0.1", "198.51.100.1") for _ in range(4)] == [401, 401, 401, 429]
    assert guess(app, "10.9.0.1", "198.51.100.2", PASSWORDS["alice"]) == 200
    # The right-most address that is not a trusted proxy counts: what the client put to its left
    # (a made-up address) is ignored, and trusted proxies on the way (10.8.x.x) are skipped.
    assert guess(app, "10.9.0.1", "192.0.2.77, 198.51.100.1", PASSWORDS["alice"]) == 429
    assert guess(app, "10.9.0.1", "198.51.100.1, 10.8.3.4", PASSWORDS["alice"]) == 429
    # A malformed address there, or no header at all: the proxy's own address, never a free one.
    assert [guess(app, "10.9.0.1", "not-an-address") for _ in range(3)] == [401, 401, 401]
    assert guess(app, "10.9.0.1", None, PASSWORDS["alice"]) == 429
    # Sign-ups are counted per client address through the same proxy too.
    signups = create_app(
        store,
        login_limiter=LoginRateLimiter(attempts=3, window=60, signup_attempts=1),
        trusted_proxies=["10.9.0.1"],
    )
    proxy = TestClient(signups, client=("10.9.0.1", 50000))

    def sign_up(forwarded, name):
        body = {"invite": "no-such-invite", "name": name, "password": "new-password"}
        return proxy.post("/api/signup", json=body, headers={"X-Forwarded-For": forwarded}).status_code

    assert [sign_up("198.51.100.5", "erin"), sign_up("198.51.100.5", "erin")] == [403, 429]
    assert sign_up("198.51.100.6", "erin") == 403
    with pytest.raises(ValueError, match="'10.0.0.1/8' is not an IP address or network"):
        create_app(store, trusted_proxies=["10.0.0.1/8"])
    with pytest.raises(ValueError, match="a list of addresses"):
        create_app(store, trusted_proxies="10.0.0.1")


def test_openapi_lists_the_api(service):
    _, app, _ = service
    spec = TestClient(app).get("/openapi.json").json()
    assert {
        "/api/login",
        "/api/submit",
        "/api/projects/{project_id}/next",
        "/api/projects/{project_id}/export",
    } <= set(spec["paths"])


def test_simulated_annotators_label_over_http(open_store):
    store = open_store(clock=None)
    pool = [AnnotatorProfile(f"sim-{i}", "careful", flip_prob=0.1) for i in range(4)]
    for profile in pool:
        store.add_user(profile.name, "annotator", f"{profile.name}-password")
    project = store.create_project("http", overlap=2)
    store.add_items(project, [{"prompt": f"q{i}", "responses": ["short", "a longer one"]} for i in range(10)])
    with running_server(store) as url:
        annotators = HttpAnnotators(url, {p.name: f"{p.name}-password" for p in pool})
        stats = simulate_annotation(annotators, project, pool, lambda prompt, response: len(response), seed=0)
        client = FeedbackClient(url)
        with pytest.raises(FeedbackClientError) as err:
            client.login("sim-0", "wrong-password")
        assert err.value.status == 401
    labels = store.labels(project)
    assert stats["n_labels"] == len(labels) == 20
    assert len({(label.item_id, label.annotator) for label in labels}) == 20
    assert all(label.seconds is not None for label in labels)


@pytest.mark.slow
def test_cli_user_add_and_import_errors(tmp_path):
    db = tmp_path / "fb.db"
    cli = [sys.executable, "-m", "rlhfkit", "feedback"]
    added = subprocess.run(
        [*cli, "user", "add", "root", "--role", "admin", "--db", str(db), "--password-stdin"],
        input="root-password\n",
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0, added.stderr
    # The test suite's cheap password hashes (conftest) are never silent: the CLI says so.
    assert "RLHFKIT_FEEDBACK_SCRYPT_COST is set" in added.stderr
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"prompt": "q", "completions": ["a", "b"]}\n{"prompt": "q", "completions": ["a", 3]}\n')
    failed = subprocess.run(
        [*cli, "import", "--db", str(db), "--project", "p", "--file", str(bad)],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert f"{bad}:2: field 'completions'" in failed.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "q", "completions": ["a", "b", "c"]}\n')
    ok = subprocess.run(
        [*cli, "import", "--db", str(db), "--project", "r", "--task-type", "likert", "--file", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "imported 3 items" in ok.stdout  # one item per completion in a Likert project


def test_serve_takes_the_session_idle_timeout_in_minutes(tmp_path, monkeypatch):
    """`feedback serve --session-idle-minutes N` sets the app's idle limit; 0 leaves only the 12 hours."""
    import uvicorn
    from typer.testing import CliRunner

    from rlhfkit.cli import app as cli
    from rlhfkit.feedback.session import SESSION_IDLE_SECONDS

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app.state.session_idle_seconds))
    db = str(tmp_path / "serve.db")
    for args, expected in (
        ([], SESSION_IDLE_SECONDS),
        (["--session-idle-minutes", "5"], 300),
        (["--session-idle-minutes", "0"], None),
    ):
        result = CliRunner().invoke(cli, ["feedback", "serve", "--db", db, *args])
        assert result.exit_code == 0, result.output
        assert served.pop() == expected
    result = CliRunner().invoke(cli, ["feedback", "serve", "--db", db, "--session-idle-minutes", "-1"])
    assert result.exit_code == 2 and "--session-idle-minutes" in result.output and not served
