"""What every command module shares: settings from the environment, running a coroutine,
readable errors for unreachable services and domain refusals, and table output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from config.settings import Settings

T = TypeVar("T")

#: ``taskmanager run``'s default data directory, and the file in it naming the services it
#: uses (written by :func:`cli.processes.run`, read by :func:`load_settings`).
DEFAULT_DATA_DIR = ".taskmanager-data"
URLS_FILE = "urls.json"
#: The variables ``urls.json`` may hold; each is used only when the environment lacks it.
#: ``MONGODB_DB`` follows ``MONGODB_URL``; ``REDIS_PREFIX`` and ``BROKER_URL`` follow
#: ``REDIS_URL`` (taken from the file only when ``REDIS_URL`` is).
URL_VARIABLES = ("MONGODB_URL", "MONGODB_DB", "REDIS_URL", "REDIS_PREFIX", "BROKER_URL")
_COMPANION = {"MONGODB_DB": "MONGODB_URL", "REDIS_PREFIX": "REDIS_URL", "BROKER_URL": "REDIS_URL"}
#: Where the root group keeps ``--redis-url``/``--mongodb-url``/``--data-dir`` (click meta).
_META_KEY = "taskmanager.services"


class ReadOnlySettings(Settings):
    """Settings of commands that only read (``queues``, ``stats``, ``workers``, ``dead list``,
    ``schedules``, ``outbox status``...): they sign nothing, so an unset or placeholder
    ``JWT_SECRET`` is not refused (it only keys ``dead list`` cursors, which the same
    command reads back)."""

    def _refuse_placeholders(self) -> ReadOnlySettings:  # type: ignore[override]
        # Replaces (and so switches off) Settings' model validator of the same name.
        return self


def set_service_options(
    ctx: click.Context, redis_url: str | None, mongodb_url: str | None, data_dir: str | None
) -> None:
    """Remember the root group's ``--redis-url``, ``--mongodb-url`` and ``--data-dir`` for
    :func:`load_settings` (they win over the environment)."""
    ctx.meta[_META_KEY] = {
        "REDIS_URL": redis_url,
        "MONGODB_URL": mongodb_url,
        "data_dir": data_dir,
    }


def _service_options() -> dict[str, str | None]:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    meta: dict[str, str | None] = ctx.find_root().meta.get(_META_KEY, {})
    return meta


def data_dir_urls(data_dir: str | None = None) -> tuple[Path, dict[str, str] | None]:
    """The file ``taskmanager run`` wrote in ``data_dir`` (default: the root group's
    ``--data-dir``, else ``./.taskmanager-data``) and what it holds (``None``: no such file)."""
    where = data_dir or _service_options().get("data_dir") or DEFAULT_DATA_DIR
    path = Path(where, URLS_FILE)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return path, None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path} is not readable: {exc}") from exc
    if not isinstance(raw, dict):
        raise click.ClickException(f"{path} is not readable: not a JSON object")
    return path, {k: str(v) for k, v in raw.items() if k in URL_VARIABLES and v}


def _overrides(from_data_dir: bool) -> tuple[dict[str, Any], Path | None, dict[str, str] | None]:
    """Init values for Settings: the command-line URLs, then (for variables the environment
    lacks) those ``taskmanager run`` wrote in its data directory, and its kept JWT secret."""
    options = _service_options()
    values: dict[str, Any] = {
        k.lower(): v for k, v in options.items() if k != "data_dir" and v is not None
    }
    if not from_data_dir:
        return values, None, None
    path, stored = data_dir_urls()
    if stored is None:
        return values, path, None
    given = {name for name in URL_VARIABLES if name.lower() in values or os.environ.get(name)}
    for name in URL_VARIABLES:
        owner = _COMPANION.get(name, name)
        if name in stored and owner not in given and name not in given:
            values[name.lower()] = stored[name]
    # Its kept secret too, for the commands that sign (only with its database).
    secret = path.parent / "jwt-secret"
    from_run = "MONGODB_URL" not in given and "MONGODB_URL" in stored
    if from_run and not os.environ.get("JWT_SECRET") and secret.is_file():
        with contextlib.suppress(OSError):
            values["jwt_secret"] = secret.read_text().strip()
    return values, path, stored


def fakeredis_hint(path: Path | None, stored: dict[str, str] | None) -> str:
    """Why no Redis is known, when a ``taskmanager run`` beside us runs without one."""
    if path is None or stored is None or stored.get("REDIS_URL"):
        return ""
    return (
        f"; the `taskmanager run` that wrote {path} uses an in-process Redis stand-in "
        "(fakeredis), which other processes cannot reach: start it with REDIS_URL set"
    )


def load_settings(
    cls: type[Settings] = Settings,
    *,
    need_services: bool = True,
    read_only: bool = False,
    from_data_dir: bool = True,
) -> Settings:
    """Settings from the command line (``--redis-url``, ``--mongodb-url``), the environment,
    and, for the variables still unset, the ``urls.json`` (and ``jwt-secret``) a
    ``taskmanager run`` keeps in its data directory (``from_data_dir``); or a readable error
    and exit 1. ``read_only`` commands need no ``JWT_SECRET`` (:class:`ReadOnlySettings`)."""
    if read_only and cls is Settings:
        cls = ReadOnlySettings
    values, path, stored = _overrides(from_data_dir)
    try:
        settings = cls(**values)
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
                f"{' and '.join(missing)} must be set (or --redis-url/--mongodb-url, or run "
                f"beside `taskmanager run`, which writes them in its data directory)"
                f"{fakeredis_hint(path, stored) if 'REDIS_URL' in missing else ''}"
            )
    return settings


def broker_settings(*, read_only: bool = True) -> Settings:
    """Settings of a command that talks to the broker (``BROKER_URL`` or ``REDIS_URL``
    needed: an in-process stand-in would show an empty, unrelated queue set)."""
    settings = load_settings(need_services=False, read_only=read_only)
    if settings.effective_broker_url is None:
        path, stored = data_dir_urls()
        raise click.ClickException(
            "BROKER_URL or REDIS_URL must be set (or --redis-url)" + fakeredis_hint(path, stored)
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


def iso(value: datetime | None, *, timespec: str = "seconds") -> str:
    """``value`` in ISO 8601 UTC with a ``Z`` (naive values are UTC, as MongoDB returns them);
    ``-`` for ``None``. Every time a command prints goes through here."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso(value, timespec="milliseconds")
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="python")
    return str(value)


def echo_json(value: object, *, indent: int | None = 2) -> None:
    """``value`` as JSON, times in ISO 8601 UTC with ``Z`` (milliseconds)."""
    click.echo(json.dumps(value, indent=indent, default=_json_default))
