"""What the benchmarks run on: the store servers, child processes, CPU and memory readings.

Everything here is loopback-only and bounded: every wait has a deadline, every process started
is stopped by the ``Services`` that started it, and Redis keys are written under one unique
prefix that is deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import redis

from cli.embedded import EmbeddedMongo, PrivateRedis, redis_answers
from config.settings import Settings
from core.events import unfinished

#: Product settings are stripped from inherited environments so a developer's shell cannot
#: point a benchmarked process somewhere else.
PRODUCT_VARS = frozenset(name.upper() for name in Settings.model_fields)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def clean_env(**values: str) -> dict[str, str]:
    """The inherited environment minus product variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in PRODUCT_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    # One process per `taskmanager web` (measured and signalled as one) unless asked.
    env["WEB_PROCESSES"] = "1"
    env.update(values)
    return env


class Child:
    """A child process whose output goes to a temporary file (shown when it fails)."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str]):
        self.name = name
        self.args = args
        self._out: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.popen = subprocess.Popen(
            args, env=dict(env), stdout=self._out, stderr=subprocess.STDOUT, cwd=_root()
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def output(self) -> str:
        """What it printed so far (the tail)."""
        self._out.flush()
        return Path(self._out.name).read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> int:
        """TERM, wait, KILL; returns the exit code. Idempotent."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def close(self) -> None:
        """Stop it and delete its output file."""
        self.stop()
        self._out.close()
        Path(self._out.name).unlink(missing_ok=True)


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


async def wait_http(child: Child, url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the output) if the child exits."""
    import aiohttp

    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited before {url} answered:\n{child.output()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s ({last}):\n{child.output()}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(parent: int) -> list[int]:
    """The processes ``parent`` forked (a ``taskmanager worker``'s or the Dramatiq CLI's worker
    processes, a web group's members), without multiprocessing's resource tracker. Read by
    scanning ``/proc`` for the parent id: ``/proc/<pid>/task/<tid>/children`` lists only what
    one thread forked."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if b"resource_tracker" not in fh.read():
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


async def await_children(parent: int, count: int, timeout: float = 30.0) -> list[int]:
    """The first ``count`` processes ``parent`` forks (a web group's members, a worker's
    worker processes), once they exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(parent)
        if len(found) >= count:
            return sorted(found)[:count]
        await asyncio.sleep(0.2)
    raise RuntimeError(f"process {parent} forked {children(parent)}, not {count} processes")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of the processes it forked (their sum)."""
    return proc_cpu(pid) + sum(proc_cpu(child) for child in children(pid))


async def until_quiet(cpu: Callable[[], float], limit: float = 60.0) -> float:
    """Wait (at most ``limit`` s) until ``cpu`` (CPU seconds of whatever is watched) grows by
    under a tenth of a core over a second; returns the wait."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        before = cpu()
        await asyncio.sleep(1.0)
        if cpu() - before < 0.1:
            break
    return round(time.monotonic() - t0, 1)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user time.
    return (sum(values[:8]) - idle) / CLK_TCK


def rss_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of a process in MB (MiB)."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


def cpu_model() -> str:
    """The CPU model name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


class CpuCap:
    """CPU quotas for benchmarked processes (Linux cgroups, v1 ``cpu`` or v2 ``cpu.max``;
    needs write access to the cgroup tree, as root): one cgroup per capped process, each
    allowed ``cores`` of CPU time per 100 ms period. N processes each held to the same share
    of a core stand for N processes on N cores, where the machine's cores are too few to give
    each process its own beside the load generator. Processes forked by a capped one stay in
    its cgroup. :meth:`close` moves what is left back and removes the cgroups."""

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PERIOD_US = 100_000

    def __init__(self, tag: str):
        self.tag = tag
        self.made: list[Path] = []
        self.root = self.V1 if (self.V1 / "cpu.cfs_quota_us").exists() else self.V2

    @classmethod
    def unavailable(cls) -> str | None:
        """Why processes cannot be capped here (``None`` when they can)."""
        probe = cls(f"probe{os.getpid()}")
        try:
            probe.cap("probe", [os.getpid()], 1.0, move=False)
        except OSError as exc:
            return f"no writable cgroup cpu controller ({type(exc).__name__}: {exc})"
        finally:
            probe.close()
        return None

    def cap(self, name: str, pids: list[int], cores: float, *, move: bool = True) -> None:
        """Hold processes ``pids`` (and what they fork later) to ``cores`` of CPU together."""
        group = self.root / f"tm-bench-{self.tag}-{name}"
        group.mkdir()
        self.made.append(group)
        quota = int(cores * self.PERIOD_US)
        if self.root == self.V1:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        for pid in pids if move else ():
            (group / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Move any process still in our cgroups back to the root and remove them."""
        for group in reversed(self.made):
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.made.clear()


@dataclass
class CpuSnapshot:
    """CPU seconds used so far by each watched process, Redis and the whole machine."""

    at: float
    procs: dict[str, float]
    redis: float
    machine: float


@dataclass
class Services:
    """MongoDB (SecantusDB), Redis and the key prefix one benchmark run uses."""

    mongo: EmbeddedMongo
    redis_url: str
    redis_source: str
    prefix: str
    db: str
    private_redis: PrivateRedis | None = None
    children: list[Child] = field(default_factory=list)
    _redis: redis.Redis | None = None

    @classmethod
    def start(cls) -> Services:
        """Start SecantusDB in memory; use the machine's Redis, else a private one."""
        tag = uuid.uuid4().hex[:10]
        private: PrivateRedis | None = None
        url = "redis://127.0.0.1:6379/0"
        source = "the machine's, 127.0.0.1:6379"
        if not redis_answers(url):
            private = PrivateRedis().start()
            url, source = private.url, f"a private redis-server on port {private.port}"
        mongo = EmbeddedMongo(":memory:").start()
        return cls(mongo, url, source, f"bench{tag}:", f"bench_{tag}", private)

    def fresh_store(self) -> None:
        """Replace SecantusDB by a new, empty one: runs compared side by side each start from
        the same store (one carrying an earlier run's data and its retryable-write registry,
        which it prunes in O(n) on every write, is measurably slower)."""
        self.mongo.stop()
        self.mongo = EmbeddedMongo(":memory:").start()

    @property
    def redis(self) -> redis.Redis:
        """A synchronous client (for readings and clean-up)."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url)
        return self._redis

    def redis_cpu(self) -> float:
        """CPU seconds the Redis server has used (it may serve others too)."""
        info: dict[str, Any] = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_version(self) -> str:
        """The Redis server version."""
        return str(self.redis.info("server")["redis_version"])

    def snapshot(self, pids: Mapping[str, int]) -> CpuSnapshot:
        """Read CPU counters now."""
        return CpuSnapshot(
            time.monotonic(),
            {name: proc_cpu(pid) for name, pid in pids.items()},
            self.redis_cpu(),
            machine_busy(),
        )

    def spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Child:
        """Start a child process that :meth:`stop` will stop."""
        child = Child(name, args, env)
        self.children.append(child)
        return child

    def stop(self) -> None:
        """Stop every child, the servers, and delete every key under our prefix."""
        for child in reversed(self.children):
            child.close()
        self.children.clear()
        with contextlib.suppress(redis.RedisError):
            keys = list(self.redis.scan_iter(match=self.prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                self.redis.delete(*keys[start : start + 1000])
        if self._redis is not None:
            self._redis.close()
        self.mongo.stop()
        if self.private_redis is not None:
            self.private_redis.stop()


def python() -> str:
    """The interpreter running the benchmark (the project's virtualenv)."""
    return sys.executable


def taskmanager_exe() -> str:
    """The ``taskmanager`` console script beside the running interpreter."""
    return str(Path(sys.executable).with_name("taskmanager"))


def publish(report: str, out: Path | None) -> None:
    """Print ``report`` and, unless ``out`` is ``None``, write it there (making its directory)."""
    sys.stdout.write(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        note_written(out)


#: Beside results files: when each was written (``{"name": "YYYY-MM-DD HH:MM UTC"}``). A file's
#: modification time cannot say it: a clone's files all carry the time of its checkout.
WRITTEN = "written.json"


#: How :data:`WRITTEN` and the reports give a moment.
STAMP = "%Y-%m-%d %H:%M UTC"


def _book(path: Path) -> dict[str, str]:
    """The :data:`WRITTEN` record beside ``path`` (empty when there is none)."""
    book = path.parent / WRITTEN
    return dict(json.loads(book.read_text())) if book.exists() else {}


def write_json(path: Path, text: str) -> None:
    """Write a benchmark's JSON results and record when (:func:`note_written`): the report
    dates each section by it, also when the benchmark ran alone."""
    path.write_text(text)
    note_written(path)


def note_written(path: Path) -> None:
    """Record that ``path`` was written now (in :data:`WRITTEN` beside it)."""
    known = _book(path)
    known[path.name] = datetime.now(UTC).strftime(STAMP)
    (path.parent / WRITTEN).write_text(json.dumps(dict(sorted(known.items())), indent=2) + "\n")


def written_at(path: Path) -> str:
    """When ``path`` was written (``YYYY-MM-DD HH:MM UTC``): as :func:`note_written` recorded
    it, else its modification time."""
    known = _book(path)
    if path.name in known:
        return known[path.name]
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime(STAMP)


def event_settled(event: Mapping[str, Any]) -> bool:
    """An outbox event sent, and every actor it fed (follow-ups such as webhook deliveries
    included) finished: its receipts (core/events.py) await nothing more. (Once all finished,
    the relay's sweep removes ``awaiting``: a sent event without it is settled.) Read with
    ``pending``, ``dispatched_at``, ``awaiting`` and ``finished``."""
    if event.get("pending") or "dispatched_at" not in event:
        return False
    return not unfinished(dict(event))


def product_env(svc: Services, secret: str, **extra: str) -> dict[str, str]:
    """The environment of a product process (production settings, loopback, no rate limit to
    speak of) on ``svc``'s store and Redis prefix; ``extra`` adds or overrides variables."""
    values = dict(
        APP_ENV="production",
        HOST="127.0.0.1",
        MONGODB_URL=svc.mongo.url,
        MONGODB_DB=svc.db,
        REDIS_URL=svc.redis_url,
        REDIS_PREFIX=svc.prefix,
        JWT_SECRET=secret,
        ACCESS_TOKEN_TTL="3600",
        LOG_LEVEL="WARNING",
        RATE_LIMIT="1000000/minute",
    )
    return clean_env(**(values | extra))


def product_settings(svc: Services, secret: str) -> Settings:
    """The settings a benchmark's own context uses beside :func:`product_env`'s processes."""
    return Settings(
        app_env="production",
        mongodb_url=svc.mongo.url,
        mongodb_db=svc.db,
        redis_url=svc.redis_url,
        redis_prefix=svc.prefix,
        jwt_secret=secret,
        rate_limit="1000000/minute",
    )
