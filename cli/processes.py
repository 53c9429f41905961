"""The process commands: ``web``, ``worker`` and the all-in-one ``run``."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import click
from pydantic import SecretStr

from cli.common import URLS_FILE, load_settings
from config.connections import Connections
from config.logging import setup_logging
from config.sentry import setup_sentry
from config.settings import MIN_SECRET_LENGTH, Settings, is_loopback_host, is_placeholder_secret


class DevSettings(Settings):
    """``taskmanager run`` defaults: development mode, console logs, listening on loopback
    only (``HOST`` to change it), and a random ``JWT_SECRET`` when none is set (see
    :func:`run`: kept in the data directory, or fresh per start with ``--memory``)."""

    generate_missing_jwt_secret: ClassVar[bool] = True
    app_env: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    log_format: Literal["json", "console"] = "console"


@click.command()
@click.option("--port", type=int, default=None, help="Port (default: PORT or 8000).")
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=None,
    help="Processes serving the port (default: WEB_PROCESSES, else one per usable core; "
    "1: this process alone).",
)
def web(port: int | None, processes: int | None) -> None:
    """Serve the HTTP API (SIGTERM drains open connections first: web.app.serve).

    By default one process per core this process may use (its CPU affinity, at most its
    cgroup's CPU limit rounded up). With more than one, this process supervises: it starts
    that many web processes (app and outbox relay each) on the same port (SO_REUSEPORT),
    restarts one that exits, passes SIGTERM/SIGINT on to all and waits for their drain;
    /metrics merges their metrics (cli/web_group.py).
    """
    settings = load_settings(from_data_dir=False)
    setup_logging(settings, process="web")
    setup_sentry(settings, process="web")
    port = port or settings.port
    from cli.web_group import leave_with_parent, supervise, usable_cores

    count = processes or settings.web_processes or usable_cores()
    if count > 1:
        sys.exit(supervise(settings, port, count))

    from web.app import create_app, serve
    from web.group import group_parent

    app = create_app(settings)
    parent = group_parent()  # a child of `web --processes N`
    if parent is not None:
        app.cleanup_ctx.append(leave_with_parent(parent))
    serve(app, host=settings.host, port=port, reuse_port=parent is not None)


@click.command(context_settings={"ignore_unknown_options": True})
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

    # Fail fast, with a readable message, before forking.
    settings = load_settings(from_data_dir=False)
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


@click.command()
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

    While it runs, DATA_DIR/urls.json (0600) names the services it uses (MONGODB_URL of the
    embedded server, REDIS_URL, BROKER_URL, MONGODB_DB, REDIS_PREFIX), so operator commands
    started in the same directory (``taskmanager stats``, ``queues``...) need no settings;
    removed on a clean stop. Without REDIS_URL its queues live in this process only.
    """
    from cli.embedded import EmbeddedMongo
    from cli.jobs import in_app as scheduler_in_app
    from web.app import create_app, serve
    from workers.broker import build_broker
    from workers.pools import WorkerPools

    settings = load_settings(DevSettings, need_services=False, from_data_dir=False)
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
    urls_file: Path | None = None
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
            # A TERM while the server is being spawned is held until it has started: raised
            # inside subprocess.Popen (after the fork, before Popen returns), it would leave a
            # server that `embedded.stop()` does not know of.
            held: list[int] = []
            signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
            try:
                embedded.start()
            finally:
                signal.signal(signal.SIGTERM, _exit_on_signal)
            if held:
                raise SystemExit(128 + held[0])
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
        urls_file = write_urls(Path(data_dir), settings)
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
        if urls_file is not None:
            remove_urls(urls_file)


def write_urls(data_dir: Path, settings: Settings) -> Path:
    """Write ``data_dir/urls.json`` (0600, in a 0700 directory): the services this ``run``
    uses, read by :func:`cli.common.load_settings` for variables the environment lacks.
    ``REDIS_URL``/``BROKER_URL`` are ``null`` with the in-process stand-in (unreachable from
    other processes: the commands say so)."""
    import json

    data_dir = data_dir.resolve()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / URLS_FILE
    body = {
        "MONGODB_URL": settings.mongodb_url,
        "MONGODB_DB": settings.mongodb_db,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "BROKER_URL": settings.effective_broker_url,
        "pid": os.getpid(),
    }
    tmp = data_dir / f".{URLS_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(body, out, indent=2)
    os.replace(tmp, path)
    return path


def remove_urls(path: Path) -> None:
    """Remove ``path`` if this process wrote it (another ``run`` may have replaced it)."""
    import json

    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


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
