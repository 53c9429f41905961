"""Settings: one validated object built from the environment in each entry point.

Nothing else in the code base reads ``os.environ``; processes build a :class:`Settings` once
and pass it down.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Secrets that only ever make sense on a developer's machine.
#: Only for ``APP_ENV=development``: long enough for HS256 (RFC 7518 asks for >= 256 bits).
DEV_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "secret", "dev-secret-change-me", DEV_JWT_SECRET}
)

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

    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
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
    admin_email: str | None = None
    admin_password: SecretStr | None = None
    webhook_allow_hosts: CommaList = []
    #: Webhook deliveries: whole-request timeout (s), and Dramatiq retries with exponential
    #: backoff between ``webhook_min_backoff_ms`` and ``webhook_max_backoff_ms``.
    webhook_timeout: float = Field(10.0, gt=0, le=30)
    webhook_max_retries: int = Field(8, ge=0, le=30)
    webhook_min_backoff_ms: int = Field(1000, ge=1)
    webhook_max_backoff_ms: int = Field(3_600_000, ge=1)
    cors_origins: CommaList = []
    #: Proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` is believed when working
    #: out the client address for rate limits and sign-in throttling.
    trusted_proxies: CommaList = []
    max_body_size: int = Field(1024 * 1024, ge=1024)

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
        if not _RATE_RE.match(value):
            raise ValueError(
                "RATE_LIMIT must look like '100/minute': a count of at least 1 per "
                "second|minute|hour|day"
            )
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
        if self.app_env != "development":
            if self.jwt_secret.get_secret_value() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    "JWT_SECRET is a placeholder; set a random secret (e.g. `openssl rand -hex 32`)"
                    " or APP_ENV=development"
                )
            if len(self.jwt_secret.get_secret_value()) < 32:
                raise ValueError("JWT_SECRET must be at least 32 characters outside development")
        if (self.admin_email is None) != (self.admin_password is None):
            raise ValueError("ADMIN_EMAIL and ADMIN_PASSWORD go together")
        return self

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
