"""Who is calling: logins, session cookies, roles and CSRF checks of the feedback service.

Sessions live in the database (the cookie holds a random token, HttpOnly and
SameSite=Lax); each session has its own CSRF token, which every state-changing
request must echo in the X-CSRF-Token header or a `csrf_token` form field.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import HTTPException, Request, Response

from rlhfkit.feedback.store import UserRecord, name_key

COOKIE = "rlhfkit_session"
CSRF_HEADER = "X-CSRF-Token"
# A session lasts 12 hours at most, and ends after 30 minutes without a request (the app's
# `session_idle_seconds`).
SESSION_SECONDS = 12 * 3600
SESSION_IDLE_SECONDS = 30 * 60


@dataclass(frozen=True)
class Caller:
    """The logged-in user and their session's CSRF token."""

    user: UserRecord
    csrf: str


def current_caller(request: Request) -> Caller | None:
    """The caller of a request, None when not logged in (cached on the request)."""
    if not hasattr(request.state, "caller"):
        token = request.cookies.get(COOKIE)
        store, idle = request.app.state.store, request.app.state.session_idle_seconds
        found = store.session_user(token, idle_seconds=idle) if token else None
        request.state.caller = Caller(*found) if found else None
    return request.state.caller


def require_user(request: Request) -> Caller:
    """Any logged-in user; 401 otherwise."""
    caller = current_caller(request)
    if caller is None:
        raise HTTPException(401, "log in first", {"WWW-Authenticate": "Cookie"})
    return caller


def require_admin(request: Request) -> Caller:
    """A logged-in admin; 401 when not logged in, 403 for annotators."""
    caller = require_user(request)
    if caller.user.role != "admin":
        raise HTTPException(403, "admins only")
    return caller


def csrf_matches(caller: Caller, sent: object) -> bool:
    """Whether `sent` is the caller's session CSRF token (compared in constant time)."""
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), caller.csrf.encode())


async def check_csrf(request: Request) -> None:
    """403 unless the request carries the session's CSRF token (header or form field)."""
    caller = require_user(request)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get("csrf_token")
    if not csrf_matches(caller, sent):
        raise HTTPException(403, "missing or wrong CSRF token")


def cookies_secure(request: Request) -> bool:
    """Whether cookies get the Secure flag: served over HTTPS, or behind an HTTPS proxy (--secure-cookies)."""
    return request.app.state.secure_cookies or request.url.scheme == "https"


def start_session(request: Request, user_id: int) -> tuple[str, str]:
    """A new session of the user (session token, CSRF token), with the app's session lengths."""
    return request.app.state.store.create_session(
        user_id, SESSION_SECONDS, idle_seconds=request.app.state.session_idle_seconds
    )


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    """The session cookie: HttpOnly, SameSite=Lax, Secure when served over HTTPS."""
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="lax",
        secure=cookies_secure(request),
    )


def client_address(request: Request) -> str:
    """The client's address, for the login and sign-up limits: the connection's peer, or, behind one of
    the app's `trusted_proxies`, the address X-Forwarded-For gives (`app.TrustedProxies` puts it here);
    an IPv6 client counted by its /64 (`limit_key`)."""
    return limit_key(request.client.host if request.client else "unknown")


def limit_key(address: str) -> str:
    """What the per-address limits count: an IPv4 address as it is, an IPv6 one by its /64 network.

    One IPv6 subscriber is routed a whole /64 (RFC 6177) and can send from any of its 2**64
    addresses, so counting single IPv6 addresses would give one guesser that many counts. An
    IPv4-mapped IPv6 address counts as its IPv4 address; anything that is not an address (a test
    client's name) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class TooManyLogins(Exception):
    """A login (or sign-up) refused by the rate limit; `retry_after`: whole seconds until one is allowed
    again."""

    def __init__(self, wait: float, what: str = "failed logins"):
        self.retry_after = int(wait) + 1
        super().__init__(f"too many {what}; try again in {self.retry_after} s")


def log_in(request: Request, name: str, password: str) -> UserRecord | None:
    """The user when the name and password are right, else None; TooManyLogins over the rate limit.

    The JSON API and the login form both log in through here (the session is theirs to start).
    """
    limiter = request.app.state.login_limiter
    # Keyed like the login itself: "Root", "ROOT" and "root" are one account, so they share one count.
    keys = limiter.login_keys(name_key(name), client_address(request))
    wait = limiter.attempt(*keys)
    if wait > 0:
        raise TooManyLogins(wait)
    try:
        user = request.app.state.store.authenticate(name, password)
    except BaseException:
        limiter.finished(*keys, failed=False)  # no answer, so no failure
        raise
    limiter.finished(*keys, failed=user is None)
    if user is not None:
        # Only the name-and-address count is forgotten: the ceilings of the name and of the address
        # keep theirs, or logging in to one's own account would clear a guesser's count.
        limiter.succeeded(keys[0])
    return user


def sign_up(request: Request, invite: str, name: str, password: str) -> int:
    """The new user's id (`FeedbackStore.accept_invite`); TooManyLogins over the sign-up rate limit.

    Every try counts against the client address, whatever its outcome: a refused name tells which
    names are taken, and every try hashes a password. The JSON API and the sign-up form both sign up
    through here.
    """
    limiter = request.app.state.login_limiter
    key = limiter.signup_key(client_address(request))
    wait = limiter.attempt(key)
    if wait > 0:
        raise TooManyLogins(wait, "sign-ups from this address")
    try:
        return request.app.state.store.accept_invite(invite, name, password)
    finally:
        limiter.finished(key, failed=True)  # counted whatever the outcome
