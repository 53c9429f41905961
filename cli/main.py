"""The ``taskmanager`` console script: process entry points and operator commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import click
from pydantic import SecretStr, ValidationError

from config.connections import Connections
from config.logging import get_logger, setup_logging
from config.sentry import setup_sentry
from config.settings import MIN_SECRET_LENGTH, Settings, is_loopback_host, is_placeholder_secret

T = TypeVar("T")
log = get_logger("cli")


class DevSettings(Settings):
    """``taskmanager run`` defaults: development mode, console logs, listening on loopback
    only (``HOST`` to change it), and a random ``JWT_SECRET`` when none is set (see
    :func:`run`: kept in the data directory, or fresh per start with ``--memory``)."""

    generate_missing_jwt_secret: ClassVar[bool] = True
    app_env: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    log_format: Literal["json", "console"] = "console"


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


@click.group()
@click.version_option(package_name="taskmanager")
def main() -> None:
    """Task manager platform: web API, workers, scheduler and operator tools."""


@main.command()
@click.option("--port", type=int, default=None, help="Port (default: PORT or 8000).")
def web(port: int | None) -> None:
    """Serve the HTTP API (SIGTERM drains open connections first: web.app.serve)."""
    from web.app import create_app, serve

    settings = load_settings()
    setup_logging(settings, process="web")
    setup_sentry(settings, process="web")
    serve(create_app(settings), host=settings.host, port=port or settings.port)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--processes", "-p", type=int, default=2, show_default=True)
@click.option("--threads", "-t", type=int, default=8, show_default=True)
@click.option("--queues", "-Q", multiple=True, help="Only these queues (repeatable).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(processes: int, threads: int, queues: tuple[str, ...], extra: tuple[str, ...]) -> None:
    """Run actors (wraps the Dramatiq CLI; extra arguments are passed through).

    On SIGTERM each process stops taking messages, finishes those in flight for up to
    WORKER_SHUTDOWN_TIMEOUT_MS and puts the prefetched ones back on their queues.
    """
    import dramatiq.cli

    settings = load_settings()  # fail fast, with a readable message, before forking
    if queues:
        known = known_queues(settings)
        unknown = [q for q in queues if q not in known]
        if unknown:
            raise click.BadParameter(
                f"no actor uses {', '.join(map(repr, unknown))}; the queues are: "
                f"{', '.join(sorted(known))}",
                param_hint="--queues",
            )
    argv = [
        # The broker must be named: given a bare module, Dramatiq would serve its global
        # default broker (localhost, namespace "dramatiq") on which no actor is declared.
        "workers.entry:broker",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--skip-logging",
        "--worker-shutdown-timeout",
        str(settings.worker_shutdown_timeout_ms),
    ]
    if queues:
        argv += ["--queues", *queues]
    args = dramatiq.cli.make_argument_parser().parse_args([*argv, *extra])
    sys.exit(dramatiq.cli.main(args))


def known_queues(settings: Settings) -> set[str]:
    """The queues the declared actors use (delay and dead-letter queues aside).

    Read from a broker built over the in-process stand-in, so nothing is contacted."""
    from workers.broker import build_broker

    offline = settings.model_copy(update={"redis_url": None, "broker_url": None})
    platform = build_broker(Connections(offline))
    try:
        declared = platform.broker.get_declared_queues()
        return {q for q in declared if not q.endswith((".DQ", ".XQ"))}
    finally:
        platform.close()


#: File of ``taskmanager run``'s generated JWT secret, in its data directory.
SECRET_FILE = "jwt-secret"


def stored_secret(data_dir: Path) -> tuple[str, bool]:
    """The secret kept in ``data_dir/jwt-secret``, made on first use; returns it and whether
    it was just made. The directory is 0700, the file 0600 (tightened, with a note, when
    found looser); a file holding a placeholder or a short value is refused."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:
        os.chmod(data_dir, 0o700)
    path = data_dir / SECRET_FILE
    created = False
    if not path.exists():
        # Written aside, then linked into place: two starts racing agree on one secret, and
        # no reader ever sees a half-written file.
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                created = True
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        click.echo(f"note: {path} was readable by others; made it 0600", err=True)
        os.chmod(path, 0o600)
    secret = path.read_text().strip()
    if is_placeholder_secret(secret) or len(secret) < MIN_SECRET_LENGTH:
        raise click.ClickException(
            f"{path} holds a placeholder or short secret: delete it (a new one is made) or set "
            "JWT_SECRET"
        )
    return secret, created


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

    It listens on 127.0.0.1 unless HOST says otherwise. With no JWT_SECRET (or a placeholder)
    it signs with a random secret made on first start and kept in DATA_DIR/jwt-secret (0600),
    so tokens and webhook secrets survive restarts; with --memory, where nothing persists, a
    fresh one per start. A HOST other than loopback needs a JWT_SECRET of one's own.
    """
    from cli.embedded import EmbeddedMongo
    from cli.jobs import in_app as scheduler_in_app
    from web.app import create_app, serve
    from workers.broker import build_broker
    from workers.pools import WorkerPools

    settings = load_settings(DevSettings, need_services=False)
    secret_source = "JWT_SECRET"
    if settings.jwt_secret_generated:
        if memory:
            secret_source = "random for this run (--memory: nothing persists)"
        else:
            secret, created = stored_secret(Path(data_dir).resolve())
            settings = settings.model_copy(update={"jwt_secret": SecretStr(secret)})
            where = Path(data_dir, SECRET_FILE).resolve()
            secret_source = f"{'made and kept' if created else 'kept'} in {where}"
    setup_logging(settings, process="run")
    setup_sentry(settings, process="run")
    embedded: EmbeddedMongo | None = None
    worker_: WorkerPools | None = None
    # Python's default SIGTERM action kills the process without unwinding, which would leave
    # the embedded server running: until `serve` installs its own handler (it drains and
    # returns), a TERM must raise so that `finally` stops the children.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if settings.mongodb_url is None:
            storage = ":memory:" if memory else str(Path(data_dir, "mongo").resolve())
            embedded = EmbeddedMongo(
                storage, log_path=None if memory else str(Path(data_dir, "mongo.log"))
            )
            embedded.start()
            settings = settings.model_copy(update={"mongodb_url": embedded.url})
        connections = Connections(settings)
        platform = build_broker(connections)
        # Webhook deliveries get threads of their own (more than one user's in-flight cap),
        # so slow receivers never hold back search, cache, notifications or analytics.
        worker_ = WorkerPools.split(
            platform.broker,
            threads=worker_threads,
            webhook_threads=max(worker_threads, 2 * settings.webhook_max_in_flight_per_user),
        )
        port = port or settings.port
        _banner(settings, embedded, memory, port, secret_source)
        worker_.start()
        app = create_app(settings, connections=connections, platform=platform)
        app.cleanup_ctx.append(scheduler_in_app(platform))
        serve(app, host=settings.host, port=port)
    finally:
        # Stopping is bounded (worker join, then TERM/KILL of the server); a repeated TERM
        # must not cut it short and orphan the server.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker_ is not None:
            worker_.stop()
        if embedded is not None:
            embedded.stop()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _banner(settings: Settings, embedded: Any, memory: bool, port: int, secret_source: str) -> None:
    mongo = (
        f"embedded SecantusDB ({'in memory, nothing persists' if memory else embedded.storage})"
        if embedded is not None
        else settings.mongodb_url
    )
    redis = settings.redis_url or "in-process fakeredis (nothing persists)"
    broker = settings.effective_broker_url or "in-process fakeredis"
    smtp = settings.smtp_url or "none: emails are written to the log"
    exposure = "" if is_loopback_host(settings.host) else "  (reachable from other machines)"
    click.echo(
        "taskmanager run — all-in-one (development)\n"
        f"  http     http://{_url_host(settings.host)}:{port}  (docs: /docs){exposure}\n"
        f"  mongodb  {mongo}\n"
        f"  redis    {redis}\n"
        f"  broker   {broker}\n"
        f"  smtp     {smtp}\n"
        f"  secret   {secret_source}",
        err=True,
    )


@main.group()
def admin() -> None:
    """Administrator accounts."""


@admin.command("create")
@click.option("--email", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option(
    "--promote-existing",
    is_flag=True,
    help="If an account already has this email, make it admin: its password becomes the one "
    "given here and every one of its sessions is ended.",
)
def admin_create(email: str, password: str, promote_existing: bool) -> None:
    """Create an admin account.

    An existing account with that email is refused unless --promote-existing is given:
    whoever registered the address may not be the operator, so promotion sets the password
    given here and revokes every login of the account (its tokens stop working at once).
    """
    from core import accounts

    _check_new_account(email, password)
    settings = load_settings()
    setup_logging(settings, process="cli")

    async def go() -> tuple[dict[str, Any], str, int]:
        from core.context import open_context

        async with open_context(settings, Connections(settings)) as ctx:
            await ctx.store.ensure_indexes()
            user, outcome = await accounts.ensure_admin(
                ctx, email, password, promote_existing=promote_existing
            )
            hooks = await ctx.store["webhooks"].count_documents({"owner": str(user["_id"])})
            return user, outcome, hooks

    user, outcome, hooks = _domain_call(run_async, go)
    if outcome == "exists":
        raise click.ClickException(
            f"an account with email {user['email']} already exists (role {user.get('role')}, id "
            f"{user['_id']}) and was not changed. To make it an admin, run again with "
            "--promote-existing: its password becomes the one given and all its sessions end"
        )
    click.echo(f"{outcome} admin {user['email']} (id {user['_id']})")
    if outcome == "promoted":
        click.echo("its password was replaced and every session of the account was ended")
        if hooks:
            click.echo(
                f"note: the account has {hooks} webhook(s) registered before the promotion; "
                "review them (GET /api/v1/webhooks as this admin)",
                err=True,
            )


@admin.command("revoke-sessions")
@click.option("--email", default=None, help="The account's email.")
@click.option("--user-id", default=None, help="The account's id.")
def admin_revoke_sessions(email: str | None, user_id: str | None) -> None:
    """End every login of one account now (its access and refresh tokens stop working)."""
    from core import accounts
    from core.errors import NotFound

    if (email is None) == (user_id is None):
        raise click.UsageError("give either --email or --user-id")
    settings = load_settings()
    setup_logging(settings, process="cli")

    async def go() -> tuple[str, int]:
        from core.context import open_context

        async with open_context(settings, Connections(settings)) as ctx:
            if user_id is not None:
                user = await accounts.get_user(ctx, user_id)
            else:
                found = await ctx.store["users"].find_one(
                    {"email": accounts.normalize_email(email or "")}
                )
                if found is None:
                    raise NotFound(f"No account with email {email}")
                user = found
            return user["email"], await accounts.revoke_user_logins(ctx, str(user["_id"]))

    who, count = _domain_call(run_async, go)
    click.echo(f"revoked {count} login(s) of {who}")


def _check_new_account(email: str, password: str) -> None:
    """Registration's rules for the email and password (core.accounts.RegisterIn), as
    parameter errors (exit 2) before anything is contacted."""
    from core.accounts import RegisterIn

    try:
        RegisterIn.model_validate({"email": email, "password": password, "name": "Administrator"})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "email"
        message = error["msg"].removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint=f"--{field}") from exc


def _domain_call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a domain error (core.errors.AppError) becoming a readable exit 1."""
    from core.errors import AppError, Invalid

    try:
        return fn(*args)
    except Invalid as exc:
        details = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        raise click.ClickException(f"{exc.detail}: {details}" if details else exc.detail) from exc
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc


@main.command()
@click.option("--user", "user_id", default=None, help="Only this user's tasks (a user id).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
def reindex(user_id: str | None, batch_size: int) -> None:
    """Rebuild the search index from MongoDB (safe while the platform serves)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from core import search
    from core.store import Store

    settings = load_settings(need_services=False)
    if not settings.mongodb_url:
        raise click.ClickException("MONGODB_URL must be set")
    setup_logging(settings, process="cli")

    async def go() -> search.ReindexResult:
        store = Store(Connections(settings).mongo(), settings.mongodb_db)
        try:
            await store.ensure_indexes()
            total = await search.count_tasks(store, user_id)
            with tqdm(total=total, unit="task", desc="reindex", file=sys.stderr) as bar:
                return await search.reindex(
                    store, user_id, batch_size=batch_size, progress=bar.update
                )
        finally:
            await store.client.close()

    result = run_async(go)
    click.echo(
        f"indexed {result.tasks} tasks ({result.written} entries written, "
        f"{result.removed} of deleted tasks removed) in {result.seconds:.1f} s"
    )


def _register_commands() -> None:
    from cli import backup, jobs, outbox

    for command in (jobs.scheduler, jobs.schedules, jobs.run_job, backup.backup, outbox.outbox):
        main.add_command(command)


_register_commands()

# -- Queue operations (workers/ops.py) -------------------------------------------------------


def _inspector() -> Any:
    from workers.broker import build_broker

    settings = load_settings(need_services=False)
    if settings.effective_broker_url is None:
        raise click.ClickException("BROKER_URL or REDIS_URL must be set")
    return build_broker(Connections(settings)).inspector


def _backend_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    from core.errors import AppError
    from workers.ops import BACKEND_ERRORS

    try:
        return fn(*args, **kwargs)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    except BACKEND_ERRORS as exc:
        raise click.ClickException(f"the broker is unreachable: {exc}") from exc


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queues(as_json: bool) -> None:
    """Per queue: ready, delayed, in progress, dead-lettered, latency of the next message."""
    import dataclasses
    import json

    inspector = _inspector()
    stats = _backend_call(inspector.stats)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(s) for s in stats], indent=2))
        return
    _table(
        ["QUEUE", "READY", "DELAYED", "IN PROGRESS", "DEAD", "LATENCY"],
        [
            [
                s.queue,
                str(s.ready),
                str(s.delayed),
                _opt(s.in_progress),
                str(s.dead),
                "-" if s.oldest_age_seconds is None else f"{s.oldest_age_seconds:.1f}s",
            ]
            for s in stats
        ],
    )


@main.group()
def dead() -> None:
    """Dead-lettered messages: list, replay, purge."""


@dead.command("list")
@click.option("--queue", "-q", "queue", default=None, help="One queue (default: all).")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--cursor", default=None, help="Continue after a previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def dead_list(queue: str | None, limit: int, cursor: str | None, as_json: bool) -> None:
    """List dead letters, oldest first."""
    import dataclasses
    import json

    inspector = _inspector()
    names = [queue] if queue else list(inspector.queues)
    items = []
    next_cursor = None
    for name in names:
        page = _backend_call(inspector.dead, name, limit=limit, cursor=cursor if queue else None)
        items += page.items
        next_cursor = page.next_cursor if queue else None
    if as_json:
        payload = {"items": [dataclasses.asdict(m) for m in items], "next_cursor": next_cursor}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    if not items:
        click.echo("no dead letters")
        return
    _table(
        ["ID", "QUEUE", "ACTOR", "FAILED AT", "RETRIES", "ERROR"],
        [
            [
                m.id,
                m.queue,
                m.actor,
                _opt(m.failed_at and m.failed_at.isoformat(timespec="seconds")),
                str(m.retries),
                (m.error or "-")[:80],
            ]
            for m in items
        ],
    )
    if next_cursor:
        click.echo(f"more: --cursor {next_cursor}")


@dead.command("retry")
@click.option("--queue", "-q", "queue", required=True)
@click.option("--ids", multiple=True, help="Ids from `dead list` (repeatable, or comma-separated).")
@click.option("--all", "retry_all", is_flag=True, help="Every dead letter of the queue.")
def dead_retry(queue: str, ids: tuple[str, ...], retry_all: bool) -> None:
    """Put dead letters back on their queue as fresh messages (safe to repeat)."""
    wanted = [i.strip() for chunk in ids for i in chunk.split(",") if i.strip()]
    if bool(wanted) == retry_all:
        raise click.UsageError("give either --ids or --all")
    result = _backend_call(_inspector().retry, queue, None if retry_all else wanted)
    click.echo(f"retried {result.retried} message(s) on {queue}")
    if result.not_found:
        click.echo(f"not in the dead-letter queue: {', '.join(result.not_found)}", err=True)


@dead.command("purge")
@click.option("--queue", "-q", "queue", default=None)
@click.option("--all", "purge_all", is_flag=True, help="Every queue.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(queue: str | None, purge_all: bool, yes: bool) -> None:
    """Drop dead letters for good."""
    if (queue is None) != purge_all:
        raise click.UsageError("give either --queue or --all")
    inspector = _inspector()
    names: list[str] = [queue] if queue is not None else list(inspector.queues)
    counts = {s.queue: s.dead for s in _backend_call(inspector.stats)}
    for name in names:
        if name not in counts:
            raise click.ClickException(f"No queue named {name!r}")
    total = sum(counts[n] for n in names)
    if not yes:
        click.confirm(
            f"Purge {total} dead letter(s) of {', '.join(names)}? This cannot be undone",
            abort=True,
        )
    purged = sum(_backend_call(inspector.purge, name) for name in names)
    click.echo(f"purged {purged} dead letter(s)")


@main.group()
def healthcheck() -> None:
    """Probes for container health checks (exit 0 healthy, 1 not)."""


@healthcheck.command("worker")
@click.option("--max-age", type=float, default=30.0, show_default=True, help="Seconds.")
def healthcheck_worker(max_age: float) -> None:
    """Whether a worker on this host has beaten within --max-age seconds."""
    import socket

    import redis

    from workers.registry import host_has_live_worker, redis_client

    settings = load_settings(need_services=False)
    if settings.redis_url is None:
        raise click.ClickException("REDIS_URL must be set")
    client = redis_client(Connections(settings))
    host = socket.gethostname()
    try:
        alive = host_has_live_worker(client, settings.redis_prefix, host=host, max_age=max_age)
    except redis.RedisError as exc:
        click.echo(f"unhealthy: redis unreachable ({exc})", err=True)
        sys.exit(1)
    finally:
        client.close()
    if not alive:
        click.echo(f"unhealthy: no worker on {host} beat within {max_age:g} s", err=True)
        sys.exit(1)
    click.echo(f"healthy: a worker on {host} is beating")


if __name__ == "__main__":
    main()
