"""What every command module shares: settings from the environment, running a coroutine,
readable errors for unreachable services and domain refusals, and table output."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from config.settings import Settings

T = TypeVar("T")


def load_settings(cls: type[Settings] = Settings, *, need_services: bool = True) -> Settings:
    """Settings from the environment, or a readable error and exit 2."""
    try:
        settings = cls()
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(map(str, e["loc"])).upper() or "settings"
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
        raise click.ClickException("invalid configuration:\n" + "\n".join(lines)) from exc
    if need_services:
        missing = [
            n
            for n, v in (("MONGODB_URL", settings.mongodb_url), ("REDIS_URL", settings.redis_url))
            if not v
        ]
        if missing:
            raise click.ClickException(
                f"{' and '.join(missing)} must be set (or use `taskmanager run` for the all-in-one)"
            )
    return settings


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine to completion; an unreachable MongoDB or Redis is a message naming
    its variable (exit 1), not a traceback."""
    with service_errors():
        return asyncio.run(factory())  # type: ignore[arg-type]


@contextlib.contextmanager
def service_errors() -> Iterator[None]:
    """Turn connection failures of MongoDB and Redis into readable command errors."""
    import redis.exceptions
    from pymongo import errors as mongo_errors

    try:
        yield
    except mongo_errors.ConnectionFailure as exc:
        raise click.ClickException(
            f"MongoDB (MONGODB_URL) is unreachable: {_first_line(exc)}"
        ) from exc
    except mongo_errors.ConfigurationError as exc:
        raise click.ClickException(f"MONGODB_URL is not usable: {_first_line(exc)}") from exc
    except mongo_errors.OperationFailure as exc:
        if exc.code not in (13, 18):  # Unauthorized, AuthenticationFailed
            raise
        raise click.ClickException(f"MongoDB (MONGODB_URL) refused us: {exc}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise click.ClickException(f"Redis (REDIS_URL) is unreachable: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def domain_call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a domain error (core.errors.AppError) becoming a readable exit 1."""
    from core.errors import AppError, Invalid

    try:
        return fn(*args)
    except Invalid as exc:
        details = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        raise click.ClickException(f"{exc.detail}: {details}" if details else exc.detail) from exc
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc


def echo_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def or_dash(value: object) -> str:
    return "-" if value is None else str(value)
