"""Passwords, tokens and the login rate limit of the feedback service.

Passwords are hashed with scrypt from the standard library (memory-hard, no extra
dependency); tokens are random and only their SHA-256 digest is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

# scrypt cost of new hashes: N=2^15, r=8, p=3, one of OWASP's equivalent minimums (N=2^17 r=8 p=1,
# 2^16/8/2, 2^15/8/3, 2^14/8/5). Every login pays for one hash while it holds the memory, and an
# unknown name pays too, so on a 2-core server memory is what concurrent logins exhaust: 32 MiB per
# hash instead of 2^17's 128 MiB, and about 200 ms of one core (OpenSSL runs the p lanes one
# after another) instead of 320 ms. A stored hash carries its own parameters: older ones still
# verify, and a login with one rehashes the password with these (see `needs_rehash`).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 3
# The explicit knob for test suites (which create many users): "N,r,p", e.g. "1024,8,1". Never set
# it in production: `rlhfkit feedback serve` and `user add` warn when it is set.
SCRYPT_COST_ENV = "RLHFKIT_FEEDBACK_SCRYPT_COST"
# scrypt refuses to use more memory than this (a stored hash names its own N and r).
_SCRYPT_MAXMEM = 256 * 1024 * 1024
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
# One hash per cost, verified against when a name is unknown (same cost as a wrong password).
_DUMMY_HASHES: dict[tuple[int, int, int], str] = {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def scrypt_cost() -> tuple[int, int, int]:
    """(N, r, p) of new password hashes: SCRYPT_N/R/P, or what RLHFKIT_FEEDBACK_SCRYPT_COST says.

    A malformed value is a ValueError, never a quiet fall-back to either setting.
    """
    raw = os.environ.get(SCRYPT_COST_ENV)
    if raw is None:
        return SCRYPT_N, SCRYPT_R, SCRYPT_P
    try:
        n, r, p = (int(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"{SCRYPT_COST_ENV}={raw!r}: expected N,r,p, e.g. 1024,8,1") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * n > _SCRYPT_MAXMEM // 2:
        raise ValueError(
            f"{SCRYPT_COST_ENV}={raw!r}: N must be a power of 2 above 1, r and p at least 1, "
            f"and 128*N*r at most {_SCRYPT_MAXMEM // 2 // 2**20} MiB"
        )
    return n, r, p


def check_password_rules(password: str) -> None:
    """ValueError if a new password is too short or too long."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password must have at most {MAX_PASSWORD_CHARS} characters")


def hash_password(password: str, cost: tuple[int, int, int] | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` of a new password (checked against the rules first).

    `cost`: (N, r, p); default `scrypt_cost()`.
    """
    check_password_rules(password)
    return _encode(password, cost or scrypt_cost())


def rehash_password(password: str) -> str:
    """A new hash, with `scrypt_cost()`, of a password that has just verified.

    No rules check: the password may predate them, and refusing it would lock its user out.
    """
    return _encode(password[:MAX_PASSWORD_CHARS], scrypt_cost())


def _encode(password: str, cost: tuple[int, int, int]) -> str:
    n, r, p = cost
    salt = secrets.token_bytes(16)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` matches the stored hash; None (no such user) costs the same and fails."""
    if encoded is None:
        cost = scrypt_cost()
        if cost not in _DUMMY_HASHES:
            _DUMMY_HASHES[cost] = hash_password("not-a-real-password", cost)
        verify_password(password, _DUMMY_HASHES[cost])
        return False
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password[:MAX_PASSWORD_CHARS], base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def needs_rehash(encoded: str) -> bool:
    """Whether a stored hash was made with other parameters than new hashes get (`scrypt_cost()`)."""
    parts = encoded.split("$")
    return parts[0] != "scrypt" or parts[1:4] != [str(value) for value in scrypt_cost()]


def new_token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database keeps of a token: a leaked table gives no working session."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LoginRateLimiter:
    """At most `attempts` failed logins per key in `window` seconds.

    A login counts under three keys (`login_keys`), as OWASP's authentication guidance has it: the
    lock is per user name and client address (`attempts`), so guessing one annotator's password
    from one address never locks that annotator out from theirs; a user name across all addresses
    has a much higher ceiling (`name_attempts`), which throttles guesses spread over many addresses,
    and so has one address across all names (`address_attempts`), which throttles one address
    trying a password on many names. Sign-ups count under `signup_key`, every try whatever its
    outcome, at most `signup_attempts` per client address. Any other key (a plain string) has the
    limit `attempts`. Kept in memory: one server process; a restart forgets it.
    """

    # How long a login waits for the checks in flight before it (see `attempt`) at most.
    QUEUE_SECONDS = 10.0
    # Key prefixes of `login_keys` with their own ceilings.
    _NAME, _ADDRESS, _SIGNUP = "name-from-anywhere:", "address-any-name:", "signup-address:"

    def __init__(
        self,
        attempts: int = 5,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        name_attempts: int | None = None,
        address_attempts: int | None = None,
        signup_attempts: int = 10,
    ):
        self.attempts = attempts
        self.window = window
        self.name_attempts = 20 * attempts if name_attempts is None else name_attempts
        self.address_attempts = 4 * attempts if address_attempts is None else address_attempts
        self.signup_attempts = signup_attempts
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._checking: Counter[str] = Counter()  # logins whose password is being checked, per key
        self._changed = threading.Condition()

    @classmethod
    def login_keys(cls, name_key: str, address: str) -> tuple[str, str, str]:
        """The keys a login counts under: (name and address, name, address).

        `name_key`: the name as logins find it (all spellings of a name are one key).
        """
        return f"name:{name_key}|addr:{address}", cls._NAME + name_key, cls._ADDRESS + address

    @classmethod
    def signup_key(cls, address: str) -> str:
        """The key sign-ups from `address` count under."""
        return cls._SIGNUP + address

    def _limit(self, key: str) -> int:
        if key.startswith(self._NAME):
            return self.name_attempts
        if key.startswith(self._ADDRESS):
            return self.address_attempts
        if key.startswith(self._SIGNUP):
            return self.signup_attempts
        return self.attempts

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
            if (failures := self._recent(key)) is not None and len(failures) >= self._limit(key)
        ]
        return max(waits, default=0.0)

    def _could_exceed(self, keys: tuple[str, ...]) -> bool:
        """Whether the limit would be reached if every check in flight failed; the caller holds the lock."""
        return any(
            self._checking[key] and len(self._recent(key) or ()) + self._checking[key] >= self._limit(key)
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
