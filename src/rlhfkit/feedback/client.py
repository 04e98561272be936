"""A small HTTP client of the feedback service's JSON API (standard library only).

`FeedbackClient` is one logged-in user. `HttpAnnotators` gives simulated annotators
the store-like calls that `rlhfkit.crowd.simulate.simulate_annotation` makes
(add_annotator, next_task, submit), each annotator through its own HTTP
session: simulated labels then travel the same path as a human's clicks.
"""

from __future__ import annotations

import http.cookiejar
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from rlhfkit.feedback.store import AnnotationTask


class FeedbackClientError(RuntimeError):
    """An error answer of the service: HTTP status and its message."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {detail}")


class FeedbackClient:
    """One user's session with the service at `base_url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.csrf_token: str | None = None
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        raw = self._request(method, path, body)
        return json.loads(raw) if raw else None

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> bytes:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if method != "GET" and self.csrf_token:
            headers["X-CSRF-Token"] = self.csrf_token
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", exc.reason)
            except ValueError:
                detail = exc.reason
            raise FeedbackClientError(
                exc.code, detail if isinstance(detail, str) else json.dumps(detail)
            ) from None
        return raw

    def login(self, name: str, password: str) -> dict[str, Any]:
        """Log in; keeps the session cookie and CSRF token for later calls."""
        me = self._call("POST", "/api/login", {"name": name, "password": password})
        self.csrf_token = me["csrf_token"]
        return me

    def projects(self) -> list[dict[str, Any]]:
        """The projects visible to this user."""
        return self._call("GET", "/api/projects")

    def next_task(self, project_id: int) -> AnnotationTask | None:
        """Lease the next task (responses in the presented order); None when there is none."""
        task = self._call("POST", f"/api/projects/{project_id}/next", {})["task"]
        if task is None:
            return None
        # The API keeps the item id and original order to itself; -1 / [] stand in.
        return AnnotationTask(
            token=task["token"],
            item_id=-1,
            prompt=task["prompt"],
            responses=task["responses"],
            order=[],
            task_type=task["task_type"],
            messages=task["messages"],
        )

    def submit(self, token: str, answer: Mapping[str, Any]) -> int:
        """Answer a task (see rlhfkit.feedback.answers); returns the label id."""
        return self._call("POST", "/api/submit", {"token": token, "answer": dict(answer)})["label_id"]

    def my_labels(self, project_id: int) -> list[dict[str, Any]]:
        """This user's own labels in a project."""
        return self._call("GET", f"/api/projects/{project_id}/my-labels")

    def signup(self, invite: str, name: str, password: str) -> dict[str, Any]:
        """Create an account from an invite token and log in as it."""
        me = self._call("POST", "/api/signup", {"invite": invite, "name": name, "password": password})
        self.csrf_token = me["csrf_token"]
        return me

    # Admin calls.

    def create_project(self, name: str, task_type: str = "comparison", overlap: int = 1) -> dict[str, Any]:
        """Create a project (admin); returns it as the API shows it."""
        return self._call("POST", "/api/projects", {"name": name, "task_type": task_type, "overlap": overlap})

    def add_items(self, project_id: int, items: list[Mapping[str, Any]]) -> list[int]:
        """Add items to a project (admin); returns their ids."""
        return self._call("POST", f"/api/projects/{project_id}/items", {"items": [dict(i) for i in items]})[
            "item_ids"
        ]

    def stats(self, project_id: int) -> dict[str, Any]:
        """A project's progress, agreement and per-annotator figures (admin)."""
        return self._call("GET", f"/api/projects/{project_id}/stats")

    def export(self, project_id: int, format: str = "raw") -> list[dict[str, Any]]:
        """A project's export (admin) as a list of rows; `format` as in `rlhfkit feedback export`."""
        raw = self._request("GET", f"/api/projects/{project_id}/export?format={urllib.parse.quote(format)}")
        return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]

    def create_invite(self, role: str = "annotator") -> str:
        """A one-time sign-up token for a new user of `role` (admin)."""
        url = self._call("POST", "/api/invites", {"role": role})["url"]
        return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["invite"][0]


class HttpAnnotators:
    """Store-like access for simulated annotators, each logged in as the user of the same name.

    Pass it where `simulate_annotation` takes the store; `passwords` maps each
    annotator name to its password (the users must exist).
    """

    def __init__(self, base_url: str, passwords: Mapping[str, str]):
        self.base_url = base_url
        self.passwords = dict(passwords)
        self._clients: list[FeedbackClient] = []

    def add_annotator(self, name: str, kind: str = "simulated") -> int:
        """Log in as `name`; return a handle for the calls below."""
        if name not in self.passwords:
            raise KeyError(f"no password for annotator {name!r}")
        client = FeedbackClient(self.base_url)
        client.login(name, self.passwords[name])
        self._clients.append(client)
        return len(self._clients) - 1

    def next_task(self, project_id: int, annotator: int) -> AnnotationTask | None:
        """The annotator's next task, over HTTP."""
        return self._clients[annotator].next_task(project_id)

    def submit(
        self, token: str, annotator: int, answer: Mapping[str, Any], task_type: str | None = None
    ) -> int:
        """Submit an answer (in presented positions, as the store's `submit`), over HTTP.

        `task_type` is accepted for the store's signature; the service checks the answer
        against the project's type itself.
        """
        return self._clients[annotator].submit(token, answer)

    def submit_comparison(self, token: str, annotator: int, choice: str, strength: int = 1) -> int:
        """Submit a comparison answer, over HTTP."""
        return self.submit(token, annotator, {"choice": choice, "strength": strength})
