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


#: ``QUEUE_LATENCY_OBJECTIVES`` by default (seconds), and the objective of a queue it does not
#: name (unless it names ``default``).
DEFAULT_LATENCY_OBJECTIVES = (
    "notifications=60,cache=60,search=120,webhooks=300,analytics=600,maintenance=900"
)
DEFAULT_LATENCY_OBJECTIVE = 300.0
_OBJECTIVE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def parse_latency_objectives(value: str) -> dict[str, float]:
    """``QUEUE_LATENCY_OBJECTIVES`` (``queue=seconds,...``) as a dict; ``ValueError`` naming
    the bad item. The key ``default`` is the objective of queues not listed."""
    out: dict[str, float] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, seconds = (x.strip() for x in item.partition("="))
        where = f"QUEUE_LATENCY_OBJECTIVES item {item!r}"
        if not sep or not _OBJECTIVE_NAME.fullmatch(name):
            raise ValueError(f"{where}: expected queue=seconds (e.g. webhooks=300)")
        if name in out:
            raise ValueError(f"{where}: queue {name!r} is given twice")
        try:
            number = float(seconds)
        except ValueError:
            number = float("nan")
        if not 0 < number <= 7 * 86400:  # NaN fails too
            raise ValueError(f"{where}: seconds must be a number above 0 and at most 604800")
        out[name] = number
    return out


#: A ``FAIR_SHARE_WEIGHTS`` key: a user id, ``role:<role>`` (a class of users) or ``default``.
WEIGHT_KEY = re.compile(r"^(role:[a-z_]{1,32}|default|[A-Za-z0-9_-]{1,64})$")


def parse_share_weights(value: str) -> dict[str, int]:
    """``FAIR_SHARE_WEIGHTS`` (``key=weight,...``) as a dict; ``ValueError`` naming the bad
    item. A key is a user id, ``role:<role>`` (every user of that role) or ``default`` (every
    user not otherwise named; 1 unless given); a weight multiplies ``FAIR_SHARE_WINDOW``."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, weight = (x.strip() for x in item.partition("="))
        where = f"FAIR_SHARE_WEIGHTS item {item!r}"
        if not sep or not WEIGHT_KEY.fullmatch(name):
            raise ValueError(f"{where}: expected user_id=weight, role:<role>=weight or default=N")
        if name in out:
            raise ValueError(f"{where}: {name!r} is given twice")
        if not weight.isdigit() or not 1 <= int(weight) <= 1000:
            raise ValueError(f"{where}: the weight must be a whole number from 1 to 1000")
        out[name] = int(weight)
    return out


_RATE_RE = re.compile(r"^\s*([1-9]\d*)\s*/\s*(second|minute|hour|day)\s*$")
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of every process, from the environment (see README, Configuration)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    app_env: Literal["development", "test", "production"] = "production"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    #: Processes of ``taskmanager web`` (``--processes`` wins): 0 = one per usable core.
    web_processes: int = Field(0, ge=0, le=256)

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
    #: Latency objective per queue: the longest its next message may wait, in seconds
    #: (``queue=seconds,...``; ``default=`` sets it for queues not listed, else
    #: :data:`DEFAULT_LATENCY_OBJECTIVE`). Read through :meth:`latency_objective`.
    queue_latency_objectives: str = DEFAULT_LATENCY_OBJECTIVES
    #: Fair dispatch (core/fairness.py): the relay keeps at most ``fair_share_window``
    #: events of each user in flight (sent, side effects not all finished), times the user's
    #: weight (``FAIR_SHARE_WEIGHTS``: ``user_id=4,role:admin=2,default=1``), and fills the
    #: windows round-robin; ``FAIR_SHARE=false`` sends the outbox in order, as it was written.
    #: 32 since 2026-12-02 (16 before): see the README, Fair share, for what each costs.
    fair_share: bool = True
    fair_share_window: int = Field(32, ge=1, le=10_000)
    fair_share_weights: str = ""
    #: Events in flight across all users at most (core/fairness.py; 0: no budget, only the
    #: windows): the broker holds a short line filled round-robin.
    fair_share_budget: int = Field(0, ge=0, le=100_000)

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
    #: The web process's in-process cache of tokens, cached bodies and rate-limit leases,
    #: kept true by Redis's invalidation pushes (core/local_cache.py); only with a real
    #: ``REDIS_URL``.
    local_cache: bool = True
    login_max_failures: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_failure_window: int = Field(900, ge=1)

    backup_dir: str = "./backups"
    #: Complete backups kept in ``backup_dir``; older ones are pruned after each successful
    #: backup (28 = 7 days of the 6-hourly schedule).
    backup_keep: int = Field(28, ge=1)
    #: Seconds between two archive segments at most (``taskmanager archiver``): the RPO is this
    #: plus the ~1 s a segment takes to close and its 1 s margin, so 50 keeps it under 60 s.
    archive_interval: float = Field(50, gt=0)
    #: Concurrent ``insert_many`` batches per collection while a backup is restored
    #: (core/restore.py); bench/dr.py measured the default against SecantusDB.
    restore_concurrency: int = Field(2, ge=1, le=32)
    #: Remote copy of ``backup_dir`` (core/backup_targets.py): ``s3://bucket/prefix`` (options
    #: ``?endpoint_url=http://host:9000&region=...&keep=N``) or ``file:///path``; credentials
    #: from the AWS_* variables, never in the URL. Unset: the local folder only.
    backup_target: str | None = None
    #: A second remote copy, the off-site one (another region or provider); same forms.
    backup_offsite_target: str | None = None
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

    @field_validator("backup_target", "backup_offsite_target")
    @classmethod
    def _check_targets(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None:
            parts = urlsplit(value.strip())
            if parts.scheme not in ("s3", "file") or "@" in parts.netloc:
                raise ValueError(
                    f"{str(info.field_name).upper()} must be s3://bucket/prefix or "
                    "file:///path, without credentials (those come from AWS_* variables)"
                )
        return value

    @field_validator("queue_latency_objectives")
    @classmethod
    def _check_objectives(cls, value: str) -> str:
        parse_latency_objectives(value)
        return value

    @field_validator("fair_share_weights")
    @classmethod
    def _check_weights(cls, value: str) -> str:
        parse_share_weights(value)
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

    def latency_objective(self, queue: str) -> float:
        """The latency objective of ``queue`` (seconds): ``QUEUE_LATENCY_OBJECTIVES``'s entry,
        else its ``default``, else :data:`DEFAULT_LATENCY_OBJECTIVE`."""
        objectives = parse_latency_objectives(self.queue_latency_objectives)
        return objectives.get(queue, objectives.get("default", DEFAULT_LATENCY_OBJECTIVE))

    @property
    def rate_limit_parsed(self) -> tuple[int, int]:
        """``RATE_LIMIT`` as (requests, window seconds)."""
        match = _RATE_RE.match(self.rate_limit)
        assert match is not None
        return int(match.group(1)), _PERIODS[match.group(2)]
