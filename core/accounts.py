"""Accounts: registration, login sessions with rotating refresh tokens, logout, profile, roles.

A *login* is one sign-in: it owns the current refresh token's ``jti``. Refreshing rotates it;
presenting a refresh token that was already rotated away is treated as theft and revokes the
whole login (its refresh token in MongoDB, its access tokens through a Redis denylist).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from bson import ObjectId
from bson.errors import InvalidId
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
)
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError
from redis.exceptions import RedisError

from config.logging import get_logger
from core import account_rules, events
from core.context import Context
from core.errors import Conflict, NotFound, Overloaded, RateLimited, Unauthorized
from core.security import TokenClaims, hash_password, needs_rehash, verify_password
from core.store import Doc, update_then_read, utcnow

log = get_logger(__name__)

Role = Literal["user", "admin"]
#: A new password (registration, admin creation); sign-in accepts whatever was once allowed.
Password = Annotated[
    str,
    StringConstraints(min_length=8, max_length=128),
    AfterValidator(account_rules.check_password),
    account_rules.SchemaPattern(account_rules.password_pattern),
]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(account_rules.check_name),
    account_rules.SchemaPattern(account_rules.name_pattern),
]
#: A new account's address: valid, normalised, and no lookalike (see core.account_rules).
NewEmail = Annotated[EmailStr, AfterValidator(account_rules.check_email)]

#: Account-wide slow-down of sign-in (see :func:`login`): the first delay and its cap, seconds.
SLOWDOWN_FIRST = 0.25
SLOWDOWN_MAX = 3.0


class Strict(BaseModel):
    """Request bodies: unknown fields and wrong JSON types are refused (never coerced)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NotificationPrefs(Strict):
    """What a user wants to be told, and how."""

    email_welcome: bool = True
    email_due_soon: bool = True
    in_app: bool = True
    due_soon_window_hours: int = Field(24, ge=1, le=168)


def _whole_number(value: object) -> object:
    """JSON Schema's ``integer`` includes ``2.0``: take it as 2 (strict mode refuses floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class NotificationPrefsPatch(Strict):
    """A partial change of :class:`NotificationPrefs`."""

    email_welcome: bool | None = None
    email_due_soon: bool | None = None
    in_app: bool | None = None
    due_soon_window_hours: (
        Annotated[int, Field(ge=1, le=168), BeforeValidator(_whole_number)] | None
    ) = None


class RegisterIn(Strict):
    """``POST /auth/register`` body."""

    email: NewEmail
    password: Password
    name: Name


class LoginIn(Strict):
    """``POST /auth/login`` body."""

    email: Annotated[str, StringConstraints(min_length=1, max_length=320)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class RefreshIn(Strict):
    """``POST /auth/refresh`` body."""

    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class MePatch(Strict):
    """``PATCH /me`` body."""

    name: Name | None = None
    notification_prefs: NotificationPrefsPatch | None = None


class UserPublic(BaseModel):
    """A user as the API shows it (never the stored document)."""

    id: str
    email: str
    name: str
    role: Role
    notification_prefs: NotificationPrefs
    created_at: datetime
    updated_at: datetime


class TokenPair(BaseModel):
    """Response of register, login and refresh."""

    user: UserPublic
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int


def public_user(doc: Doc) -> UserPublic:
    """The public view of a stored user."""
    return UserPublic(
        id=str(doc["_id"]),
        email=doc["email"],
        name=doc["name"],
        role=doc.get("role", "user"),
        notification_prefs=NotificationPrefs(**doc.get("notification_prefs", {})),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
    )


def _oid(user_id: str) -> ObjectId:
    try:
        return ObjectId(user_id)
    except (InvalidId, TypeError) as exc:
        raise NotFound("No such user") from exc


def normalize_email(email: str) -> str:
    """The one form an email is stored and looked up in, on every path (register, login,
    admin bootstrap): see :func:`core.account_rules.canonical_email`."""
    return account_rules.canonical_email(email)


async def get_user(ctx: Context, user_id: str) -> Doc:
    """A stored user or :class:`NotFound`."""
    doc = await ctx.store["users"].find_one({"_id": _oid(user_id)})
    if doc is None:
        raise NotFound("No such user")
    return doc


async def create_user(
    ctx: Context, email: str, password: str, name: str, role: Role = "user"
) -> Doc:
    """Store a new user and its ``user.registered`` event in one transaction."""
    now = utcnow()
    doc: Doc = {
        "_id": ObjectId(),
        "email": normalize_email(email),
        "password_hash": await hash_password(password),
        "name": name,
        "role": role,
        "notification_prefs": NotificationPrefs().model_dump(),
        "created_at": now,
        "updated_at": now,
    }
    user_id = str(doc["_id"])
    event = events.new_event(events.EventType.USER_REGISTERED, user_id=user_id, subject_id=user_id)

    async def work(session: AsyncClientSession) -> None:
        await ctx.store["users"].insert_one(doc, session=session)
        await events.record(ctx, [event], session)

    try:
        await ctx.store.transaction(work)
    except DuplicateKeyError as exc:
        raise Conflict("An account with this email already exists") from exc
    log.info("user.registered", user_id=user_id)
    return doc


async def register(ctx: Context, body: RegisterIn, *, client: str) -> TokenPair:
    """Create an account and sign it in."""
    user = await create_user(ctx, str(body.email), body.password, body.name)
    return await _start_login(ctx, user, client=client)


async def login(ctx: Context, body: LoginIn, *, address: str, client: str) -> TokenPair:
    """Sign in; the same answer and similar timing whether or not the account exists.

    Failed attempts are counted over ``LOGIN_FAILURE_WINDOW`` seconds in three ways (OWASP
    Authentication Cheat Sheet), unknown accounts exactly like known ones:

    - per account *and* address: after ``LOGIN_MAX_FAILURES``, that address gets 429 (with
      ``Retry-After``) for that account; a successful sign-in clears this count;
    - per address, over every account: after ``LOGIN_MAX_FAILURES_PER_ADDRESS``, 429;
    - per account, over every address: never a refusal, so nobody can lock an owner out by
      failing on purpose. After ``LOGIN_MAX_FAILURES`` such failures every attempt on the
      account waits before its password is checked, 0.25 s doubling per further failure up to
      3 s (:data:`SLOWDOWN_FIRST`, :data:`SLOWDOWN_MAX`); the right password still signs in.

    With Redis away nothing is throttled (fail open: an outage must not lock users out).
    """
    email = normalize_email(body.email)
    account = _digest(email)
    pair_key = ctx.key("login-fail", "pair", account, address)
    addr_key = ctx.key("login-fail", "addr", address)
    acct_key = ctx.key("login-fail", "acct", account)
    counts = await _failure_counts(ctx, [pair_key, addr_key, acct_key])
    if counts is not None:
        (pair, pair_ttl), (per_addr, addr_ttl), (per_acct, _) = counts
        limits = (
            (pair, pair_ttl, ctx.settings.login_max_failures),
            (per_addr, addr_ttl, ctx.settings.login_max_failures_per_address),
        )
        for count, ttl, limit in limits:
            if count >= limit:
                raise RateLimited("Too many failed sign-in attempts; try again later", ttl)
        await asyncio.sleep(_slowdown(per_acct, ctx.settings.login_max_failures))
    user = await ctx.store["users"].find_one({"email": email})
    ok = await verify_password(user["password_hash"] if user else None, body.password)
    if not ok or user is None:
        await _count_failure(ctx, [pair_key, addr_key, acct_key])
        raise Unauthorized("Incorrect email or password", error="invalid_grant")
    await _forget_failures(ctx, pair_key)
    user_id = str(user["_id"])
    # Feeds cache warm-up: the worker precomputes what this user reads next.
    await events.record(
        ctx,
        [events.new_event(events.EventType.USER_LOGGED_IN, user_id=user_id, subject_id=user_id)],
        None,
    )
    if needs_rehash(user["password_hash"]):
        try:
            new_hash = await hash_password(body.password)
        except Overloaded:  # upgrading the hash can wait for the next sign-in
            log.info("auth.rehash_deferred", user_id=user_id)
        else:
            await ctx.store["users"].update_one(
                {"_id": user["_id"]}, {"$set": {"password_hash": new_hash}}
            )
    return await _start_login(ctx, user, client=client)


async def refresh(ctx: Context, body: RefreshIn) -> TokenPair:
    """Rotate a refresh token; reuse of a rotated one revokes the whole login."""
    claims = ctx.tokens.decode(body.refresh_token, "refresh")
    new_jti = secrets.token_urlsafe(16)
    login_doc = await update_then_read(
        ctx.store["logins"],
        {"_id": claims.login_id, "refresh_jti": claims.jti, "revoked": False},
        {"$set": {"refresh_jti": new_jti, "refreshed_at": utcnow()}},
        still={"refresh_jti": new_jti},
    )
    if login_doc is None:
        existing = await ctx.store["logins"].find_one({"_id": claims.login_id})
        if existing is not None and not existing.get("revoked"):
            log.warning("auth.refresh_reuse", login_id=claims.login_id, user_id=claims.subject)
            await revoke_login(ctx, claims.login_id)
            raise Unauthorized("Refresh token was already used; this login is now revoked")
        raise Unauthorized("Refresh token is no longer valid")
    user = await get_user(ctx, claims.subject)
    return await _issue_pair(ctx, user, claims.login_id, new_jti, login_doc["expires_at"])


async def logout(ctx: Context, access: TokenClaims) -> None:
    """End a login: its access token stops working now and its refresh tokens die."""
    await ctx.store["logins"].update_one({"_id": access.login_id}, {"$set": {"revoked": True}})
    ttl = max(1, access.expires_at - int(datetime.now(UTC).timestamp()))
    jti_key, login_key = (
        ctx.key("deny", "jti", access.jti),
        ctx.key("deny", "login", access.login_id),
    )
    try:
        await ctx.redis.set(jti_key, b"1", ex=ttl)
        await ctx.redis.set(login_key, b"1", ex=ctx.settings.access_token_ttl)
    finally:
        _forget_locally(ctx, [jti_key, login_key])


def _forget_locally(ctx: Context, keys: list[str]) -> None:
    """Drop revoked tokens from this process's cache at once (other processes hear of the
    denylist keys from Redis: core/local_cache.py)."""
    if ctx.local is not None:
        ctx.local.invalidate(keys)


async def revoke_login(ctx: Context, login_id: str) -> None:
    """Revoke every token of one login."""
    await ctx.store["logins"].update_one({"_id": login_id}, {"$set": {"revoked": True}})
    key = ctx.key("deny", "login", login_id)
    try:
        await ctx.redis.set(key, b"1", ex=ctx.settings.access_token_ttl)
    except RedisError:
        # MongoDB holds the truth; authenticate() falls back to it while Redis is away.
        log.warning("auth.denylist_unavailable", login_id=login_id)
    finally:
        _forget_locally(ctx, [key])


async def authenticate(ctx: Context, token: str) -> TokenClaims:
    """Verify an access token, including logout and login revocation."""
    claims = ctx.tokens.decode(token, "access")
    try:
        denied = await ctx.redis.exists(
            ctx.key("deny", "jti", claims.jti), ctx.key("deny", "login", claims.login_id)
        )
    except RedisError:
        log.warning("auth.denylist_unavailable_fallback_to_store")
        doc = await ctx.store["logins"].find_one({"_id": claims.login_id}, {"revoked": 1})
        denied = doc is None or bool(doc.get("revoked"))
    if denied:
        raise Unauthorized("Token has been revoked")
    return claims


async def update_me(ctx: Context, user_id: str, patch: MePatch) -> Doc:
    """Apply a partial profile change."""
    changes: dict[str, Any] = {}
    if patch.name is not None:
        changes["name"] = patch.name
    if patch.notification_prefs is not None:
        for key, value in patch.notification_prefs.model_dump(exclude_none=True).items():
            changes[f"notification_prefs.{key}"] = value
    if not changes:
        return await get_user(ctx, user_id)
    changes["updated_at"] = utcnow()
    doc = await update_then_read(ctx.store["users"], {"_id": _oid(user_id)}, {"$set": changes})
    if doc is None:
        raise NotFound("No such user")
    return doc


#: What :func:`ensure_admin` did.
AdminOutcome = Literal["created", "promoted", "exists"]


async def ensure_admin(
    ctx: Context, email: str, password: str, *, promote_existing: bool = False
) -> tuple[Doc, AdminOutcome]:
    """Make sure an admin with this email exists; returns the user and what was done.

    - No account has the email: an admin is created with ``password`` (``"created"``).
    - An account has it and ``promote_existing``: it becomes admin, its password becomes
      ``password`` and every one of its logins is revoked (:func:`revoke_user_logins`), so
      whoever registered the address before the operator is locked out (``"promoted"``).
    - An account has it otherwise: nothing is changed (``"exists"``); the caller decides
      (``admin create`` refuses, the start-up bootstrap warns unless it is an admin already).
      Promoting an account while keeping its password would make admin whoever registered
      the address first.

    The email and password must pass registration's rules (:class:`RegisterIn`), else
    :class:`~core.errors.Invalid`.
    """
    from pydantic import ValidationError

    from core.errors import FieldError, Invalid

    existing = await ctx.store["users"].find_one({"email": normalize_email(email)})
    if existing is not None and not promote_existing:
        return existing, "exists"
    try:
        body = RegisterIn.model_validate(
            {"email": email, "password": password, "name": "Administrator"}
        )
    except ValidationError as exc:
        errors = [
            FieldError(field=".".join(map(str, e["loc"])) or "body", message=e["msg"])
            for e in exc.errors()
        ]
        raise Invalid("Not a valid admin account", errors) from exc
    if existing is None:
        try:
            user = await create_user(ctx, str(body.email), body.password, body.name, role="admin")
            return user, "created"
        except Conflict:  # created concurrently (another replica's bootstrap, a sign-up)
            existing = await ctx.store["users"].find_one({"email": normalize_email(email)})
            if existing is None:
                raise
            if not promote_existing:
                return existing, "exists"
    promoted = await update_then_read(
        ctx.store["users"],
        {"_id": existing["_id"]},
        {
            "$set": {
                "role": "admin",
                "password_hash": await hash_password(body.password),
                "updated_at": utcnow(),
            }
        },
    )
    if promoted is None:
        raise NotFound("No such user")
    revoked = await revoke_user_logins(ctx, str(promoted["_id"]))
    log.warning("admin.promoted_existing", user_id=str(promoted["_id"]), logins_revoked=revoked)
    return promoted, "promoted"


async def revoke_user_logins(ctx: Context, user_id: str) -> int:
    """End every login of ``user_id`` at once; returns how many were ended.

    Each login's access tokens are refused from their next request on (the per-login
    denylist in Redis that :func:`authenticate` reads), then the logins are marked revoked in
    MongoDB, so their refresh tokens are refused too (and :func:`authenticate` refuses them
    from MongoDB while Redis is away). Redis is written first: if it cannot be reached,
    nothing is marked and :class:`~core.errors.Unavailable` is raised, so repeating the call
    revokes everything. A login started after the call is not affected.
    """
    from core.errors import Unavailable

    logins = [
        doc["_id"]
        async for doc in ctx.store["logins"].find(
            {"user_id": user_id, "revoked": False}, {"_id": 1}
        )
    ]
    if not logins:
        return 0
    try:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for login_id in logins:
                pipe.set(ctx.key("deny", "login", login_id), b"1", ex=ctx.settings.access_token_ttl)
            await pipe.execute()
    except RedisError as exc:
        _forget_locally(ctx, [ctx.key("deny", "login", login_id) for login_id in logins])
        log.warning("auth.denylist_unavailable", user_id=user_id, error=str(exc))
        raise Unavailable(
            "The token denylist (Redis) is unreachable: no login was revoked; try again"
        ) from exc
    _forget_locally(ctx, [ctx.key("deny", "login", login_id) for login_id in logins])
    await ctx.store["logins"].update_many(
        {"_id": {"$in": logins}}, {"$set": {"revoked": True, "revoked_at": utcnow()}}
    )
    log.info("auth.user_logins_revoked", user_id=user_id, logins=len(logins))
    return len(logins)


async def _start_login(ctx: Context, user: Doc, *, client: str) -> TokenPair:
    login_id = secrets.token_urlsafe(16)
    jti = secrets.token_urlsafe(16)
    expires_at = utcnow() + timedelta(seconds=ctx.settings.refresh_token_ttl)
    await ctx.store["logins"].insert_one(
        {
            "_id": login_id,
            "user_id": str(user["_id"]),
            "refresh_jti": jti,
            "revoked": False,
            "client": client[:200],
            "created_at": utcnow(),
            "expires_at": expires_at,
        }
    )
    return await _issue_pair(ctx, user, login_id, jti, expires_at)


async def _issue_pair(
    ctx: Context, user: Doc, login_id: str, refresh_jti: str, login_expires: datetime
) -> TokenPair:
    subject = str(user["_id"])
    role = user.get("role", "user")
    access = ctx.tokens.issue("access", subject=subject, login_id=login_id, role=role)
    refresh_claims = TokenClaims(
        subject=subject,
        login_id=login_id,
        jti=refresh_jti,
        type="refresh",
        role=role,
        expires_at=int(login_expires.timestamp()),
    )
    return TokenPair(
        user=public_user(user),
        access_token=ctx.tokens.encode(access),
        refresh_token=ctx.tokens.encode(refresh_claims),
        expires_in=ctx.settings.access_token_ttl,
    )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _slowdown(failures: int, threshold: int) -> float:
    """Seconds an attempt on an account with ``failures`` recent failures waits."""
    if failures < threshold:
        return 0.0
    return float(min(SLOWDOWN_MAX, SLOWDOWN_FIRST * 2 ** min(failures - threshold, 16)))


async def _failure_counts(ctx: Context, keys: list[str]) -> list[tuple[int, int]] | None:
    """``(failures, seconds left in the window)`` per counter; ``None`` if Redis is away."""
    try:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.ttl(key)
            values = await pipe.execute()
    except RedisError:
        # Fail open: a Redis outage must not lock users out.
        log.warning("auth.throttle_unavailable")
        return None
    return [(int(values[2 * i] or 0), max(1, int(values[2 * i + 1]))) for i in range(len(keys))]


async def _count_failure(ctx: Context, keys: list[str]) -> None:
    window = ctx.settings.login_failure_window
    try:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.incr(key)
                pipe.expire(key, window, nx=True)
            await pipe.execute()
    except RedisError:
        log.warning("auth.throttle_unavailable")


async def _forget_failures(ctx: Context, key: str) -> None:
    try:
        await ctx.redis.delete(key)
    except RedisError:
        log.warning("auth.throttle_unavailable")
