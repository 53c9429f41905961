"""The ``taskmanager`` console script: process entry points and operator commands."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import ValidationError

from config.connections import Connections
from config.logging import get_logger, setup_logging
from config.sentry import setup_sentry
from config.settings import Settings

T = TypeVar("T")
log = get_logger("cli")


class DevSettings(Settings):
    """``taskmanager run`` defaults: development mode, console logs."""

    app_env: Literal["development", "test", "production"] = "development"
    log_format: Literal["json", "console"] = "console"


def load_settings(cls: type[Settings] = Settings, *, need_services: bool = True) -> Settings:
    """Settings from the environment, or a readable error and exit 2."""
    try:
        settings = cls()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
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
    """Run one coroutine to completion."""
    return asyncio.run(factory())  # type: ignore[arg-type]


@click.group()
@click.version_option(package_name="taskmanager")
def main() -> None:
    """Task manager platform: web API, workers, scheduler and operator tools."""


@main.command()
@click.option("--port", type=int, default=None, help="Port (default: PORT or 8000).")
def web(port: int | None) -> None:
    """Serve the HTTP API."""
    from aiohttp import web as aioweb

    from web.app import create_app

    settings = load_settings()
    setup_logging(settings, process="web")
    setup_sentry(settings, process="web")
    aioweb.run_app(
        create_app(settings),
        host=settings.host,
        port=port or settings.port,
        access_log=None,
        print=None,
    )


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--processes", "-p", type=int, default=2, show_default=True)
@click.option("--threads", "-t", type=int, default=8, show_default=True)
@click.option("--queues", "-Q", multiple=True, help="Only these queues (repeatable).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(processes: int, threads: int, queues: tuple[str, ...], extra: tuple[str, ...]) -> None:
    """Run actors (wraps the Dramatiq CLI; extra arguments are passed through)."""
    import dramatiq.cli

    load_settings()  # fail fast, with a readable message, before forking
    argv = [
        "workers.entry",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--skip-logging",
    ]
    if queues:
        argv += ["--queues", *queues]
    args = dramatiq.cli.make_argument_parser().parse_args([*argv, *extra])
    sys.exit(dramatiq.cli.main(args))


@main.command()
@click.option("--port", type=int, default=None, help="Port (default: PORT or 8000).")
@click.option("--memory", is_flag=True, help="Keep the embedded database in memory (throw-away).")
@click.option(
    "--data-dir",
    default=".taskmanager-data",
    show_default=True,
    help="Where the embedded database keeps its files.",
)
@click.option("--worker-threads", type=int, default=4, show_default=True)
def run(port: int | None, memory: bool, data_dir: str, worker_threads: int) -> None:
    """All-in-one: web, worker threads and scheduler in one process.

    With no MONGODB_URL it starts an embedded MongoDB-compatible server (SecantusDB) as a
    child process; with no REDIS_URL it uses an in-process Redis stand-in (fakeredis) for
    cache, limits and the broker (nothing in it persists).
    """
    from aiohttp import web as aioweb
    from dramatiq import Worker

    from cli.embedded import EmbeddedMongo
    from web.app import create_app
    from workers.broker import build_broker

    settings = load_settings(DevSettings, need_services=False)
    setup_logging(settings, process="run")
    setup_sentry(settings, process="run")
    embedded: EmbeddedMongo | None = None
    if settings.mongodb_url is None:
        storage = ":memory:" if memory else str(Path(data_dir, "mongo").resolve())
        embedded = EmbeddedMongo(
            storage, log_path=None if memory else str(Path(data_dir, "mongo.log"))
        )
        embedded.start()
        settings = settings.model_copy(update={"mongodb_url": embedded.url})
    connections = Connections(settings)
    platform = build_broker(connections)
    worker_ = Worker(platform.broker, worker_threads=worker_threads)
    port = port or settings.port
    _banner(settings, embedded, memory, port)
    worker_.start()
    try:
        app = create_app(settings, connections=connections, platform=platform)
        aioweb.run_app(app, host=settings.host, port=port, access_log=None, print=None)
    finally:
        worker_.stop()
        if embedded is not None:
            embedded.stop()


def _banner(settings: Settings, embedded: Any, memory: bool, port: int) -> None:
    mongo = (
        f"embedded SecantusDB ({'in memory, nothing persists' if memory else embedded.storage})"
        if embedded is not None
        else settings.mongodb_url
    )
    redis = settings.redis_url or "in-process fakeredis (nothing persists)"
    broker = settings.effective_broker_url or "in-process fakeredis"
    smtp = settings.smtp_url or "none: emails are written to the log"
    click.echo(
        "taskmanager run — all-in-one (development)\n"
        f"  http     http://127.0.0.1:{port}  (docs: /docs)\n"
        f"  mongodb  {mongo}\n"
        f"  redis    {redis}\n"
        f"  broker   {broker}\n"
        f"  smtp     {smtp}",
        err=True,
    )


@main.group()
def admin() -> None:
    """Administrator accounts."""


@admin.command("create")
@click.option("--email", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
def admin_create(email: str, password: str) -> None:
    """Create an admin, or promote an existing account to admin."""
    from core import accounts

    settings = load_settings()
    setup_logging(settings, process="cli")
    if len(password) < 8:
        raise click.BadParameter("must be at least 8 characters", param_hint="--password")

    async def go() -> tuple[dict[str, Any], bool]:
        from core.context import Context
        from core.store import Store

        connections = Connections(settings)
        store = Store(connections.mongo(), settings.mongodb_db)
        redis = connections.redis()
        try:
            await store.ensure_indexes()
            return await accounts.ensure_admin(Context(settings, store, redis), email, password)
        finally:
            await store.client.close()
            await redis.aclose()

    user, created = run_async(go)
    click.echo(f"{'created' if created else 'promoted'} admin {user['email']} (id {user['_id']})")


if __name__ == "__main__":
    main()
