"""Passwords, tokens and the login rate limit of the feedback service.

Passwords are hashed with scrypt from the standard library (memory-hard, no extra
dependency); tokens are random and only their SHA-256 digest is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

# scrypt cost: n=2**14, r=8 uses 16 MiB and about 50 ms per hash on one core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
_DUMMY_HASH: str | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32
    )


def check_password_rules(password: str) -> None:
    """ValueError if a new password is too short or too long."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password must have at most {MAX_PASSWORD_CHARS} characters")


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` of a new password (checked against the rules first)."""
    check_password_rules(password)
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` matches the stored hash; None (no such user) costs the same and fails."""
    global _DUMMY_HASH
    if encoded is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hash_password("not-a-real-password")
        verify_password(password, _DUMMY_HASH)
        return False
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password[:MAX_PASSWORD_CHARS], base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def new_token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database keeps of a token: a leaked table gives no working session."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LoginRateLimiter:
    """At most `attempts` failed logins per key (user name, client address) in `window` seconds.

    Kept in memory: one server process; a restart forgets it.
    """

    # How long a login waits for the checks in flight before it (see `attempt`) at most.
    QUEUE_SECONDS = 10.0

    def __init__(self, attempts: int = 5, window: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.attempts = attempts
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._checking: Counter[str] = Counter()  # logins whose password is being checked, per key
        self._changed = threading.Condition()

    def n_keys(self) -> int:
        """The number of keys with failures kept (what the limiter holds in memory)."""
        return len(self._failures)

    def _recent(self, key: str) -> deque[float] | None:
        """The key's failures within the window; a key with none left is forgotten."""
        failures = self._failures.get(key)
        if failures is None:
            return None
        cutoff = self._clock() - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures

    def _wait(self, keys: tuple[str, ...]) -> float:
        """Seconds until these keys may try again (0: now); the caller holds the lock."""
        waits = [
            failures[0] + self.window - self._clock()
            for key in keys
            if (failures := self._recent(key)) is not None and len(failures) >= self.attempts
        ]
        return max(waits, default=0.0)

    def _could_exceed(self, keys: tuple[str, ...]) -> bool:
        """Whether the limit would be reached if every check in flight failed; the caller holds the lock."""
        return any(
            self._checking[key] and len(self._recent(key) or ()) + self._checking[key] >= self.attempts
            for key in keys
        )

    def _record(self, keys: tuple[str, ...]) -> None:
        """Count a failure under each key; the caller holds the lock."""
        # Forget keys whose failures all left the window, so memory holds only the failures of
        # the last `window` seconds (a refused attempt records none).
        for key in list(self._failures):
            self._recent(key)
        for key in keys:
            self._failures.setdefault(key, deque()).append(self._clock())

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login under these keys is allowed again (0: allowed now)."""
        with self._changed:
            # Asking adds no key: refused attempts under ever new names must not grow the memory.
            return self._wait(keys)

    def attempt(self, *keys: str) -> float:
        """Begin a login under these keys: 0 when it may check its password (then call `finished`),
        else the seconds to wait (it is refused, and counts nothing).

        Checks in flight count against the limit as if they were to fail: a burst of concurrent
        guesses would otherwise all pass here before the first of them had failed. So near the
        limit an attempt waits for the checks before it, and goes ahead if they were right
        (concurrent logins of people behind one address are delayed, not refused).
        """
        deadline = time.monotonic() + self.QUEUE_SECONDS
        with self._changed:
            while (wait := self._wait(keys)) <= 0 and self._could_exceed(keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return 1.0  # the checks in flight are stuck (a locked database): try again soon
                self._changed.wait(left)
            if wait <= 0:
                self._checking.update(keys)
            return wait

    def finished(self, *keys: str, failed: bool) -> None:
        """End a login that `attempt` let go ahead; `failed`: its password was wrong."""
        with self._changed:
            self._checking.subtract(keys)
            self._checking = +self._checking  # drop the keys with none in flight
            if failed:
                self._record(keys)
            self._changed.notify_all()

    def failed(self, *keys: str) -> None:
        """Record a failed login under each key."""
        with self._changed:
            self._record(keys)

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of these keys."""
        with self._changed:
            for key in keys:
                self._failures.pop(key, None)
