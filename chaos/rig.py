"""What a scenario runs on: private servers and ``taskmanager`` processes, all on loopback.

The process helpers are the end-to-end suite's: :class:`tests.e2e.helpers.Proc` (start, stop,
descendants), :func:`tests.e2e.test_pipeline.service_env` (the deployment's environment),
:class:`tests.e2e.test_redis_loss.RestartableRedis` (a private Redis killed and started again
empty) and the suite's SMTP sink. Nothing here touches the machine's shared Redis (6379) or
RabbitMQ (5672).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cli.embedded import EmbeddedMongo, free_port
from config.settings import Settings
from tests.conftest import SmtpSink, serving
from tests.e2e.helpers import Proc, port_open, start, wait_http
from tests.e2e.test_pipeline import SECRET, Received, Receiver, service_env
from tests.e2e.test_redis_loss import RestartableRedis

ROOT = Path(__file__).resolve().parents[1]
#: How soon a relay resends an event whose messages never finished (the deployment default is
#: 60 s; the runner uses a shorter bound so a scenario is short; RELIABILITY.md says so).
OUTBOX_REDELIVER_AFTER_S = 5.0


class RestartableMongo:
    """A SecantusDB server keeping its data on disk, so it can be stopped and started again on
    the same port with its data (a restart, not a loss)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tm-chaos-mongo-")
        # No log_path: EmbeddedMongo leaves the log file it opens to the garbage collector.
        self.server = EmbeddedMongo(self.dir)
        self.server.start(timeout=60)

    @property
    def url(self) -> str:
        """Its connection string."""
        return self.server.url

    def restart(self, down_for: float = 2.0) -> float:
        """Stop it (TERM), stay down ``down_for`` seconds, start it again; returns the seconds
        it did not accept connections."""
        began = time.monotonic()
        self.server.stop()
        time.sleep(down_for)
        self.server = EmbeddedMongo(self.dir, port=self.server.port)
        self.server.start(timeout=60)
        return time.monotonic() - began

    def stop(self) -> None:
        """Stop it and remove its storage."""
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ChaosReceiver(Receiver):
    """The suite's webhook receiver, plus two misbehaving endpoints: ``/slow-*`` answers after
    :attr:`slow_s`, ``/fail-*`` answers 500. It counts requests being handled."""

    slow_s: float = 1.0
    #: A delay every endpoint adds (so that a worker is always mid-message).
    delay_s: float = 0.0
    in_flight: int = 0
    answered: dict[str, int] = field(default_factory=dict)

    async def start(self) -> ChaosReceiver:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            body = await request.read()
            name = request.match_info["name"]
            self.answered[name] = self.answered.get(name, 0) + 1
            await asyncio.sleep(self.delay_s)
            if name.startswith("slow"):
                await asyncio.sleep(self.slow_s)
            elif name.startswith("fail"):
                return web.Response(status=500, text="failing on purpose")
            self.requests.append(
                Received(request.path, dict(request.headers), body, time.monotonic())
            )
            return web.Response(text="thanks")
        finally:
            self.in_flight -= 1


@dataclass
class Rig:
    """One scenario's servers and processes."""

    work: Path
    redis: RestartableRedis
    mongo: RestartableMongo
    smtp: SmtpSink
    settings: Settings
    env: dict[str, str]
    webs: list[Proc] = field(default_factory=list)
    web_ports: list[int] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    others: list[Proc] = field(default_factory=list)
    base: str = ""

    def start_web(self, port: int | None = None) -> tuple[Proc, int]:
        """``taskmanager web`` on ``port`` (a free one when None)."""
        port = port or free_port()
        proc = start(["web", "--port", str(port)], self.env, cwd=str(self.work))
        self.webs.append(proc)
        return proc, port

    def start_worker(self, threads: int = 4) -> Proc:
        """``taskmanager worker --processes 1 --threads N``."""
        proc = start(
            ["worker", "--processes", "1", "--threads", str(threads)], self.env, cwd=str(self.work)
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: Proc) -> None:
        """SIGKILL a worker: its supervisor and every process under it, at once."""
        victims = [*proc.descendants(), proc.pid]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.popen.wait(10)

    def describe(self) -> str:
        """The tails of every process's output, for a failure message."""
        return "\n".join(p.describe()[-3000:] for p in [*self.webs, *self.workers, *self.others])

    def close(self) -> None:
        """Stop every process (TERM, then KILL) and server."""
        for proc in [*self.others, *self.webs, *self.workers]:
            proc.close(grace=15)


@contextlib.contextmanager
def servers() -> Iterator[tuple[RestartableRedis, RestartableMongo, SmtpSink]]:
    """A private Redis, a SecantusDB with storage on disk and an SMTP sink, stopped after."""
    redis = RestartableRedis()
    try:
        mongo = RestartableMongo()
        try:
            with serving(SmtpSink(free_port())) as smtp:
                yield redis, mongo, smtp
        finally:
            mongo.stop()
    finally:
        redis.stop()


@contextlib.asynccontextmanager
async def rig(*, webs: int = 1, workers: int = 1, **env: str) -> Any:
    """Servers and processes for one scenario: ``webs`` web processes (the first one's URL is
    :attr:`Rig.base`) and ``workers`` worker processes; ``env`` added to every process."""
    work = Path(tempfile.mkdtemp(prefix="tm-chaos-"))
    with servers() as (redis, mongo, smtp):
        settings = Settings(
            app_env="test",
            mongodb_url=mongo.url,
            mongodb_db=f"chaos_{uuid.uuid4().hex[:8]}",
            redis_url=redis.url,
            redis_prefix=f"chaos{uuid.uuid4().hex[:6]}:",
            jwt_secret=SECRET,
            smtp_url=smtp.url,
        )
        penv = service_env(settings, redis.url, smtp)
        penv["OUTBOX_REDELIVER_AFTER_S"] = str(OUTBOX_REDELIVER_AFTER_S)
        penv.update(env)
        r = Rig(work, redis, mongo, smtp, settings, penv)
        try:
            for _ in range(webs):
                proc, port = r.start_web()
                r.web_ports.append(port)
            for _ in range(workers):
                r.start_worker()
            for proc, port in zip(r.webs, r.web_ports, strict=True):
                await wait_http(proc, f"http://127.0.0.1:{port}/readyz", timeout=90)
            r.base = f"http://127.0.0.1:{r.web_ports[0]}"
            yield r
        finally:
            await asyncio.to_thread(r.close)
            shutil.rmtree(work, ignore_errors=True)


class Nginx:
    """Debian's nginx in front of the web processes (``least_conn``), as a private master
    process with its own configuration, pid file and logs, on a free port."""

    def __init__(self, upstreams: list[int]):
        self.exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir = Path(tempfile.mkdtemp(prefix="tm-chaos-nginx-"))
        self.port = free_port()
        servers_conf = "\n".join(f"    server 127.0.0.1:{p} max_fails=0;" for p in upstreams)
        (self.dir / "nginx.conf").write_text(
            f"""daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  upstream taskmanager {{
    least_conn;
{servers_conf}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://taskmanager;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 2;
      proxy_connect_timeout 2s;
    }}
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [self.exe, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = (self.dir / "error.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"nginx did not start: {err}")
            time.sleep(0.05)

    @property
    def base(self) -> str:
        """Its URL."""
        return f"http://127.0.0.1:{self.port}"

    def version(self) -> str:
        """``nginx -v``."""
        out = subprocess.run([self.exe, "-v"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).strip().split("/", 1)[-1]

    def stop(self) -> None:
        """Stop it (QUIT, then KILL) and remove its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of our own (node name, AMQP and distribution ports, data directory,
    no plugins), started with Debian's ``rabbitmq-server`` and stopped with ``rabbitmqctl -n``
    (never the machine's shared node on 5672). Its data survives a restart."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tm-chaos-rabbit-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"tmchaos{uuid.uuid4().hex[:6]}@localhost"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "env.conf").write_text("")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        if os.geteuid() == 0:  # the server script runs the node as the rabbitmq user
            subprocess.run(["chown", "-R", "rabbitmq:", str(self.dir)], check=True, timeout=30)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its AMQP URL (default virtual host)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90.0) -> PrivateRabbit:
        """Start the node and wait until it accepts AMQP connections."""
        d = self.dir
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        out = open(d / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (d / "server.out").read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError(f"private rabbitmq-server did not start: {tail}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl -n <node> stop``), then its server process."""
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"], capture_output=True, timeout=60, check=False
        )
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, down_for: float = 2.0) -> float:
        """Stop, stay down ``down_for`` seconds, start again; returns the seconds it did not
        accept connections."""
        began = time.monotonic()
        self.stop()
        time.sleep(down_for)
        self.start()
        return time.monotonic() - began

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
