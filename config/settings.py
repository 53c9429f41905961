"""Settings: one validated object built from the environment in each entry point.

Nothing else in the code base reads ``os.environ``; processes build a :class:`Settings` once
and pass it down.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The development secret earlier versions signed with by default. It is published in this
#: repository's history, so it is a placeholder like the others: refused, never signed with.
PUBLISHED_DEV_SECRET = "dev-only-secret-change-me-0123456789abcdef"
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "secret", "dev-secret-change-me", PUBLISHED_DEV_SECRET}
)
#: HS256 wants a key of at least 256 bits (RFC 7518 section 3.2).
MIN_SECRET_LENGTH = 32
#: The GCRA limiter (core/ratelimit.py) spends ``window / limit`` microseconds per request, in
#: whole microseconds: more than one request per microsecond would spend nothing.
MAX_RATE_PER_SECOND = 1_000_000

#: Accepted URL schemes per setting (a typo'd scheme fails at start, naming the variable).
_URL_SCHEMES = {
    "mongodb_url": ("mongodb", "mongodb+srv"),
    "redis_url": ("redis", "rediss", "unix"),
    "broker_url": ("redis", "rediss", "unix", "amqp", "amqps"),
}


def is_placeholder_secret(secret: str) -> bool:
    """Whether ``secret`` is a known placeholder (or says "change me"): never sign with it."""
    folded = secret.strip().lower()
    return folded in PLACEHOLDER_SECRETS or "change-me" in folded or "changeme" in folded


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another name, or "" / "0.0.0.0" / "::": every interface


def _check_url(variable: str, url: str, schemes: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``url`` has one of ``schemes`` and a sane host part."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{variable} is not a URL ({exc})") from exc
    if parts.scheme.lower() not in schemes:
        wanted = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{variable} must start with {wanted} (got {parts.scheme or 'none'}://)")
    if parts.scheme.lower() == "unix":
        if not parts.path:
            raise ValueError(f"{variable} names no socket path (unix:///path/to/redis.sock)")
        return
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if parts.scheme.lower().startswith("mongodb") else [hosts]:
        if host.startswith("["):  # [IPv6]:port
            name, _, rest = host[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        if not name:
            raise ValueError(f"{variable} names no host (e.g. {schemes[0]}://localhost)")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{variable} has a bad port {port!r}")


_RATE_RE = re.compile(r"^\s*([1-9]\d*)\s*/\s*(second|minute|hour|day)\s*$")
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of every process, from the environment (see README, Configuration)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    app_env: Literal["development", "test", "production"] = "production"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)

    mongodb_url: str | None = None
    mongodb_db: str = Field("taskmanager", pattern=r"^[A-Za-z0-9_-]{1,60}$")
    mongodb_max_pool_size: int = Field(50, ge=1)
    mongodb_min_pool_size: int = Field(0, ge=0)
    mongodb_timeout_ms: int = Field(5000, ge=100)

    redis_url: str | None = None
    #: Prefix of every Redis key we write (cache, limits, locks, broker), so several
    #: deployments or test runs can share one Redis without touching each other's data.
    redis_prefix: str = "tm:"
    broker_url: str | None = None
    #: A worker whose heartbeat is older than this is dead: its in-flight messages are
    #: redelivered (Redis broker; workers beat every second and sweep every second).
    worker_heartbeat_timeout_ms: int = Field(10_000, ge=3_000, le=600_000)
    #: How long a worker given SIGTERM waits for in-flight messages before exiting; keep it
    #: below the orchestrator's grace period (k8s terminationGracePeriodSeconds: 300).
    worker_shutdown_timeout_ms: int = Field(270_000, ge=1_000)
    #: Port of a ``taskmanager worker`` group's Prometheus endpoint (``HOST:PORT/metrics``,
    #: workers/metrics.py); 0 turns it off.
    worker_metrics_port: int = Field(9191, ge=0, le=65535)
    #: Port of ``taskmanager archiver``'s Prometheus endpoint (``HOST:PORT/metrics``,
    #: core/archive_metrics.py); 0 turns it off.
    archiver_metrics_port: int = Field(9192, ge=0, le=65535)
    #: A message of an outbox event not finished this long after it was sent (or after its
    #: last retry's eta) is sent again by the relay (core/events.py, receipts).
    outbox_redeliver_after_s: float = Field(60.0, ge=0.5, le=86_400)

    #: Unset by default: every process needs a random one, except ``taskmanager run``
    #: (:attr:`generate_missing_jwt_secret`), which makes one up on loopback.
    jwt_secret: SecretStr = SecretStr("")
    jwt_issuer: str = "taskmanager"
    jwt_audience: str = "taskmanager-api"
    access_token_ttl: int = Field(900, ge=10, le=86400)
    refresh_token_ttl: int = Field(14 * 86400, ge=60)

    smtp_url: str | None = None
    mail_from: str = "Task Manager <no-reply@taskmanager.local>"

    sentry_dsn: str | None = None
    sentry_traces_sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    rate_limit: str = "100/minute"
    login_max_failures: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_failure_window: int = Field(900, ge=1)

    backup_dir: str = "./backups"
    #: Complete backups kept in ``backup_dir``; older ones are pruned after each successful
    #: backup (28 = 7 days of the 6-hourly schedule).
    backup_keep: int = Field(28, ge=1)
    #: Seconds between two archive segments at most (``taskmanager archiver``): the RPO.
    archive_interval: float = Field(60, gt=0)
    admin_email: str | None = None
    admin_password: SecretStr | None = None
    webhook_allow_hosts: CommaList = []
    #: Webhook deliveries: whole-request timeout (s), and Dramatiq retries with exponential
    #: backoff between ``webhook_min_backoff_ms`` and ``webhook_max_backoff_ms``.
    webhook_timeout: float = Field(10.0, gt=0, le=30)
    webhook_max_retries: int = Field(8, ge=0, le=30)
    webhook_min_backoff_ms: int = Field(1000, ge=1)
    webhook_max_backoff_ms: int = Field(3_600_000, ge=1)
    #: Webhook isolation (core/webhooks.py): a user's deliveries being attempted at once, and
    #: the consecutive failed attempts after which a webhook is paused (circuit breaker).
    webhook_max_in_flight_per_user: int = Field(4, ge=1, le=1000)
    webhook_breaker_failures: int = Field(10, ge=1, le=10_000)
    cors_origins: CommaList = []
    #: Proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` is believed when working
    #: out the client address for rate limits and sign-in throttling.
    trusted_proxies: CommaList = []
    max_body_size: int = Field(1024 * 1024, ge=1024)

    #: Whether an unset (or placeholder) ``JWT_SECRET`` is replaced by a random one when the
    #: listener is loopback and ``APP_ENV=development``, instead of refused. Only the
    #: all-in-one ``taskmanager run`` does (``cli.processes.DevSettings``): it keeps that secret in
    #: its data directory. Separate processes must share one secret, so they are told to set it.
    generate_missing_jwt_secret: ClassVar[bool] = False
    _jwt_secret_generated: bool = PrivateAttr(False)

    @field_validator("webhook_allow_hosts", "cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        match = _RATE_RE.match(value)
        if not match:
            raise ValueError(
                "RATE_LIMIT must look like '100/minute': a count of at least 1 per "
                "second|minute|hour|day"
            )
        per_second = int(match.group(1)) / _PERIODS[match.group(2)]
        if per_second > MAX_RATE_PER_SECOND:
            raise ValueError(
                f"RATE_LIMIT allows at most {MAX_RATE_PER_SECOND:,} requests per second (one "
                f"per microsecond, the limiter's resolution); got {value.strip()!r}"
            )
        return value

    @field_validator("mongodb_url", "redis_url", "broker_url")
    @classmethod
    def _check_urls(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            name = str(info.field_name)
            _check_url(name.upper(), value, _URL_SCHEMES[name])
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # raises ValueError naming the bad entry
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
            raise ValueError("REDIS_PREFIX may hold letters, digits and _ . : - only")
        return value

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        """Never sign with a published or guessable secret.

        A placeholder (unset, a known example value, the old published development secret,
        anything saying "change me") or a short (< 32 characters) ``JWT_SECRET`` is refused
        when ``HOST`` is not loopback, whatever ``APP_ENV`` says, and outside development.
        Development on loopback accepts a short secret of one's own; a placeholder there is
        refused too, except under ``taskmanager run``, which replaces it by a random one.
        """
        secret = self.jwt_secret.get_secret_value()
        placeholder = is_placeholder_secret(secret)
        what = "unset" if not secret else "a placeholder" if placeholder else "too short"
        fix = f"set a random secret of {MIN_SECRET_LENGTH}+ characters (`openssl rand -hex 32`)"
        if placeholder or len(secret) < MIN_SECRET_LENGTH:
            if not is_loopback_host(self.host):
                raise ValueError(
                    f"JWT_SECRET is {what} and HOST={self.host!r} is reachable from other "
                    f"machines, which could then forge tokens: {fix}"
                )
            if self.app_env != "development":
                raise ValueError(f"JWT_SECRET is {what} (APP_ENV={self.app_env}): {fix}")
            if placeholder:
                if not self.generate_missing_jwt_secret:
                    raise ValueError(
                        f"JWT_SECRET is {what}: {fix}; processes that share a database must "
                        "share it (only `taskmanager run` makes one up)"
                    )
                object.__setattr__(self, "jwt_secret", SecretStr(secrets.token_urlsafe(48)))
                self._jwt_secret_generated = True
        if (self.admin_email is None) != (self.admin_password is None):
            raise ValueError("ADMIN_EMAIL and ADMIN_PASSWORD go together")
        return self

    @property
    def jwt_secret_generated(self) -> bool:
        """Whether ``jwt_secret`` was made up for this process (no usable ``JWT_SECRET``)."""
        return self._jwt_secret_generated

    @property
    def effective_broker_url(self) -> str | None:
        """The broker URL: ``BROKER_URL``, else ``REDIS_URL`` (``None``: in-process stand-in)."""
        return self.broker_url or self.redis_url

    @property
    def rate_limit_parsed(self) -> tuple[int, int]:
        """``RATE_LIMIT`` as (requests, window seconds)."""
        match = _RATE_RE.match(self.rate_limit)
        assert match is not None
        return int(match.group(1)), _PERIODS[match.group(2)]
