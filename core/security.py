"""Passwords (argon2id) and tokens (JWT per RFC 8725).

Hashing is CPU-bound (~20 ms of one core, 19 MiB) and runs off the event loop on a small pool
of its own (:class:`HashPool`): about one thread per usable core and a short queue. A burst of
sign-ins beyond that is refused at once with :class:`~core.errors.Overloaded` (503 +
``Retry-After``) instead of queueing, so it can neither occupy every core nor the shared
default executor, and the other routes keep their latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from config.settings import Settings
from core.errors import Overloaded, Unauthorized

# OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when an account does not exist, so a login for an unknown email costs the
# same time as one for a known email with a wrong password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

ALGORITHM = "HS256"
#: How many verified tokens each process remembers (about 0.5 KB each).
VERIFIED_CACHE_SIZE = 10_000
TokenType = Literal["access", "refresh"]
_JWT_TYP = {"access": "at+jwt", "refresh": "rt+jwt"}


T = TypeVar("T")


def derive_key(settings: Settings, purpose: str) -> bytes:
    """A key of its own for ``purpose`` (``"cursor"``, ``"webhooks/secret"``, ...), derived from
    ``JWT_SECRET`` (HMAC-SHA256), so no two uses share a key."""
    root = settings.jwt_secret.get_secret_value().encode()
    return hmac.new(root, b"taskmanager/" + purpose.encode(), hashlib.sha256).digest()


class Unsealable(ValueError):
    """A sealed value that does not open: another key (``JWT_SECRET`` changed), another owner
    or altered bytes."""


def seal(key: bytes, plain: bytes, bound_to: str) -> bytes:
    """``plain`` encrypted and authenticated (AES-256-GCM, a random 12-byte nonce first), bound to
    ``bound_to`` (the record's id): the bytes open only with the same key for the same record.

    cryptography is imported on the first seal or unseal, not with this module: its compiled
    binding is 8.5 MB of a process's RSS, and a web process that never stores an idempotent
    response nor registers a webhook never needs it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, bound_to.encode())


def unseal(key: bytes, sealed: bytes, bound_to: str) -> bytes:
    """The plain bytes of :func:`seal`'s output; :class:`Unsealable` if they do not open."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = bytes(sealed)
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], bound_to.encode())
    except (InvalidTag, ValueError) as exc:
        raise Unsealable(str(exc) or type(exc).__name__) from exc


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class HashPool:
    """At most ``workers`` password hashes/verifications run at once (argon2-cffi releases
    the GIL, so each takes a core) and at most ``queue`` more wait; a call beyond that raises
    :class:`Overloaded` without waiting. One pool per process: the cores are the process's."""

    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            raise ValueError("a hash pool needs at least one worker and a queue of 0 or more")
        self.workers = workers
        self.queue = queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._admitted

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pool, or raise :class:`Overloaded` if it is full."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise Overloaded("Too many sign-ins at once; retry in a moment", retry_after=1)
            self._admitted += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        # Released when the work ends, not when the caller stops waiting (a cancelled request
        # does not cancel a hash that is already running).
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _release(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._admitted -= 1


#: The process's password-hashing pool: one thread per usable core, a queue twice that.
hash_pool = HashPool(workers=usable_cores(), queue=2 * usable_cores())


async def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (on :data:`hash_pool`; may raise
    :class:`Overloaded`)."""
    return await hash_pool.run(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; with no hash, spends the same time and says no (on
    :data:`hash_pool`; may raise :class:`Overloaded`, whether or not the account exists)."""
    return await hash_pool.run(_verify, stored_hash, password)


def _verify(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """Whether a stored hash uses older parameters than today's."""
    return _hasher.check_needs_rehash(stored_hash)


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says."""

    subject: str
    login_id: str
    jti: str
    type: TokenType
    role: str
    expires_at: int


class Tokens:
    """Issues and verifies access and refresh tokens.

    Per RFC 8725: the algorithm is pinned (no ``alg`` negotiation, so ``none`` and key
    confusion are impossible), ``iss``/``aud``/``exp`` are required and checked, and the JOSE
    ``typ`` header plus a ``type`` claim make access and refresh tokens non-interchangeable.
    """

    def __init__(self, settings: Settings):
        self._key = settings.jwt_secret.get_secret_value()
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self.ttl = {"access": settings.access_token_ttl, "refresh": settings.refresh_token_ttl}
        self._verified: OrderedDict[str, TokenClaims] = OrderedDict()

    def issue(self, type_: TokenType, *, subject: str, login_id: str, role: str) -> TokenClaims:
        """A new token's claims (call :meth:`encode` to get the string)."""
        return TokenClaims(
            subject=subject,
            login_id=login_id,
            jti=secrets.token_urlsafe(16),
            type=type_,
            role=role,
            expires_at=int(time.time()) + self.ttl[type_],
        )

    def encode(self, claims: TokenClaims) -> str:
        """Sign ``claims``."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": claims.subject,
            "sid": claims.login_id,
            "jti": claims.jti,
            "type": claims.type,
            "role": claims.role,
            "iat": now,
            "nbf": now,
            "exp": claims.expires_at,
        }
        return jwt.encode(
            payload, self._key, algorithm=ALGORITHM, headers={"typ": _JWT_TYP[claims.type]}
        )

    def decode(self, token: str, expected: TokenType) -> TokenClaims:
        """Verify ``token`` as a token of type ``expected``; raise :class:`Unauthorized`.

        Verified tokens are remembered until they expire (a bounded LRU keyed by the exact
        token string, so a remembered token is one whose signature was checked): the HMAC
        and claim checks dominate the CPU of a cached read otherwise. Revocation is not
        cached: callers check the denylist on every request.
        """
        now = time.time()
        known = self._verified.get(token)
        if known is not None and known.type == expected and known.expires_at > now:
            self._verified.move_to_end(token)
            return known
        claims = self._verify(token, expected)
        self._verified[token] = claims
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    def _verify(self, token: str, expected: TokenType) -> TokenClaims:
        try:
            decoded = jwt.decode_complete(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "sid", "type"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("Token has expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Not a valid {expected} token") from exc
        header, payload = decoded["header"], decoded["payload"]
        if header.get("alg") != ALGORITHM or header.get("typ") != _JWT_TYP[expected]:
            raise Unauthorized(f"Not a valid {expected} token")
        if payload.get("type") != expected:
            raise Unauthorized(f"Not a valid {expected} token")
        fields = ("sub", "sid", "jti", "role")
        if not all(isinstance(payload.get(f), str) for f in fields):
            raise Unauthorized(f"Not a valid {expected} token")
        return TokenClaims(
            subject=payload["sub"],
            login_id=payload["sid"],
            jti=payload["jti"],
            type=expected,
            role=payload["role"],
            expires_at=int(payload["exp"]),
        )
