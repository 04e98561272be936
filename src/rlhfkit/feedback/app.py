"""The feedback web service: the FastAPI app behind `rlhfkit feedback serve`.

One FeedbackStore (SQLite file or PostgreSQL) holds everything, sessions included,
so several server processes can share a database. Pages are server-rendered Jinja2
with autoescaping; model outputs reach the browser's DOM through textContent only,
and a strict Content-Security-Policy (scripts from /static only) keeps any markup in
them inert.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.feedback import api, pages
from rlhfkit.feedback.answers import AnswerError
from rlhfkit.feedback.auth import LoginRateLimiter
from rlhfkit.feedback.session import SESSION_IDLE_SECONDS
from rlhfkit.feedback.store import FeedbackStore, unstorable

MAX_BODY_BYTES = 16 * 1024 * 1024
# Every security header of the service is set here, on every response (pages, API, static files,
# errors). There are no exceptions: the service serves no page that needs a looser policy (FastAPI's
# /docs and /redoc, which load their scripts from a CDN, are turned off; see `create_app`).
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
# Over HTTPS (served over TLS, or behind an HTTPS proxy: secure_cookies), browsers are told to use
# HTTPS only for a year, so a network attacker cannot downgrade a later visit to plain http and read
# the session cookie. No includeSubDomains: other services on sibling names are not ours to decide.
# Never sent over plain http without secure_cookies (localhost), where it would be meaningless.
HSTS = ("strict-transport-security", "max-age=31536000")
# Pages and API answers hold labels, exports, names and CSRF tokens: no browser or proxy may keep
# them (the Back button after a logout on a shared computer, a caching proxy serving an admin's
# export to the next caller). Only the static files are cached.
NO_STORE = (b"cache-control", b"no-store")


def security_headers(https: bool) -> list[tuple[bytes, bytes]]:
    """The security headers of every response; `https`: served over HTTPS (HSTS too)."""
    headers = dict(SECURITY_HEADERS, **(dict([HSTS]) if https else {}))
    return [(name.encode(), value.encode()) for name, value in headers.items()]


class BodyLimitAndHeaders:
    """ASGI middleware: 413 for bodies over `max_bytes`; security headers on every response, and
    `Cache-Control: no-store` on all but the static files.

    `secure_cookies`: the app is served over HTTPS whatever the request's scheme says (behind an
    HTTPS proxy), so HSTS is sent on every response; otherwise only on those served over HTTPS.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, secure_cookies: bool = False):
        self.app = app
        self.max_bytes = max_bytes
        self.secure_cookies = secure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        https = self.secure_cookies or scope.get("scheme") == "https"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes, send, https)
            return
        received = 0
        started = False  # the app began its answer
        refused = False  # we answered 413 ourselves; the app's answer is dropped

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # A chunked body without Content-Length: answer 413 here, because an
                    # exception raised into the app would be turned into a generic 400 by
                    # FastAPI's body parsing. The app then sees a client that went away.
                    refused = True
                    if not started:
                        await _too_large(self.max_bytes, send, https)
                    return {"type": "http.disconnect"}
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", [])) + security_headers(https)
                if not static and all(name.lower() != NO_STORE[0] for name, _ in headers):
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception:
            if refused:
                # The app failed on the body we cut off (a form parser, say); the 413 is out already.
                return
            if not started:
                # Starlette's error handler, outside every middleware, would answer this 500 without
                # the security headers and no-store: answer it here; the error goes on to be logged.
                await send_with_headers(_INTERNAL_ERROR_START)
                await send_with_headers({"type": "http.response.body", "body": _INTERNAL_ERROR})
            raise


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(proxies: Iterable[str]) -> list[Network]:
    """The networks of `create_app`'s `trusted_proxies` (addresses or CIDRs); ValueError naming a bad one."""
    if isinstance(proxies, str):
        raise ValueError(
            f"trusted_proxies: expected a list of addresses or networks, got the string {proxies!r}"
        )
    networks = []
    for entry in proxies:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip()))
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an IP address or network (e.g. 10.0.0.5, 10.0.0.0/8 or "
                "fd00::/8; a network has no host bits set)"
            ) from None
    return networks


def _in(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def forwarded_client(peer: str, forwarded_for: list[str], trusted: list[Network]) -> str:
    """The client's address of a request from `peer` with these X-Forwarded-For values (in order).

    The header is only believed when `peer` is a trusted proxy: anyone can send one. Each proxy
    appends the address it saw, so the header is read from the right, past the trusted proxies, to
    the first address that is not one; what is to the left of it was sent by the client and could be
    anything. A missing or malformed address there leaves the peer (the proxy) as the client: a
    shared ceiling, never one an attacker chooses.
    """
    if not _in(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    # Every address on the way is a trusted proxy: the left-most is where the request came from.
    return hops[0] if hops else peer


class TrustedProxies:
    """ASGI middleware: the client address (`request.client`) from X-Forwarded-For, for requests whose
    direct peer is one of the `trusted` proxies (see `forwarded_client`)."""

    def __init__(self, app: ASGIApp, trusted: list[Network]):
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and self.trusted and client:
            forwarded = [
                value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"
            ]
            address = forwarded_client(client[0], forwarded, self.trusted)
            if address != client[0]:
                scope = {**scope, "client": (address, 0)}
        await self.app(scope, receive, send)


_INTERNAL_ERROR = b"Internal Server Error"
_INTERNAL_ERROR_START: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_INTERNAL_ERROR)).encode()),
    ],
}


async def _too_large(max_bytes: int, send: Send, https: bool) -> None:
    body = f'{{"detail": "request body is larger than {max_bytes} bytes", "field": "body"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": headers + security_headers(https) + [NO_STORE],
        }
    )
    await send({"type": "http.response.body", "body": body})


# How deep a 422 echoes the input: JSON may nest as deep as the parser goes (about 1,000 levels),
# and echoing that through the recursive encoders ran out of stack, a 500 for anyone.
ECHO_DEPTH = 32


def _json_safe(value: Any, depth: int = 0) -> Any:
    """`value` with every part that JSON cannot hold (see `store.unstorable`) as its repr, and what is
    nested more than ECHO_DEPTH levels deep as "..."."""
    if isinstance(value, dict | list) and depth >= ECHO_DEPTH:
        return "..."
    if isinstance(value, dict):
        return {_json_safe(k, depth + 1): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, float | str) and unstorable(value) is not None:
        return repr(value)
    return value


def create_app(
    store: FeedbackStore,
    *,
    secure_cookies: bool = False,
    lease_seconds: float = 600.0,
    login_limiter: LoginRateLimiter | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    session_idle_seconds: float | None = SESSION_IDLE_SECONDS,
    trusted_proxies: Iterable[str] = (),
) -> FastAPI:
    """The service on an open store. `secure_cookies`: mark cookies Secure and send HSTS (behind an
    HTTPS proxy).

    `session_idle_seconds`: a session ends after this long without a request (None: only its
    absolute limit of 12 hours ends it).

    `trusted_proxies`: addresses or networks ("10.0.0.5", "10.0.0.0/8") of the reverse proxies in
    front of the app. A request from one of them has its client address (which the login and sign-up
    limits count per) taken from X-Forwarded-For: the right-most address there that is not itself
    a trusted proxy. From any other peer the header is ignored. None by default.

    There is no /docs or /redoc: FastAPI's pages load their scripts and styles from a CDN (broken
    offline, and third-party code in the service's origin). The spec is at /openapi.json, for any
    OpenAPI tool.
    """
    trusted = parse_trusted_proxies(trusted_proxies)
    app = FastAPI(
        title="rlhfkit feedback service",
        description="Collect human feedback (comparisons, rankings, ratings, thumbs, edits, demonstrations).",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store
    app.state.secure_cookies = secure_cookies
    app.state.lease_seconds = lease_seconds
    app.state.session_idle_seconds = session_idle_seconds
    app.state.login_limiter = login_limiter or LoginRateLimiter()
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's errors echo the input, which may be what was wrong with it (NaN, a lone
        # surrogate, nesting a thousand levels deep) and cannot be written as JSON: such an input
        # is sent back as its repr, cut off ECHO_DEPTH levels down, before the recursive encoder sees it.
        return JSONResponse({"detail": jsonable_encoder(_json_safe(exc.errors()))}, status_code=422)

    @app.exception_handler(AnswerError)
    async def _answer_error(request: Request, exc: AnswerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(PermissionError)
    async def _permission_error(request: Request, exc: PermissionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(KeyError)
    async def _key_error(request: Request, exc: KeyError) -> JSONResponse:
        message: Any = exc.args[0] if exc.args else "not found"
        return JSONResponse({"detail": str(message)}, status_code=404)

    app.add_middleware(BodyLimitAndHeaders, max_bytes=max_body_bytes, secure_cookies=secure_cookies)
    # Added last, so it runs first: everything below sees the client's address.
    app.add_middleware(TrustedProxies, trusted=trusted)
    return app
