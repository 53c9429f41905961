"""Worker throughput beside other task queues: bare Dramatiq, Celery and RQ doing the same job
(one Redis ``INCR`` per message, ``bench/peer_jobs.py``), measured in one run, interleaved.

What runs (loopback only, bounded, stopped here): a private ``redis-server`` on a free port
(nothing is written to the machine's Redis; it is flushed between runs); for each framework
and round, this process fills the queue with ``--messages`` messages, then starts ONE worker
process and polls the counter until every message is counted (or ``--timeout``), then stops
the worker:

* Dramatiq 2: ``dramatiq bench.peer_jobs --processes 1 --threads 8`` (a plain RedisBroker);
* Celery 5: ``celery worker --pool threads --concurrency 8`` (no heartbeat, gossip or mingle);
* RQ 2: ``rq worker --burst --worker-class rq.worker.SimpleWorker``: RQ runs one job at a
  time per worker process (its default worker forks a child per job, slower still).

rate = messages/s between 10 % and 90 % counted (the worker's start-up is left out); the
median of the rounds is reported. CPU/msg is the worker process's (and its children's) CPU
over the drain. Nothing is asserted: the report states the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis

from bench.procs import (
    Child,
    children,
    clean_env,
    publish,
    python,
    rss_mb,
    tree_cpu,
    write_json,
)
from cli.embedded import PrivateRedis

RESULTS = Path(__file__).resolve().parent / "results"
FRAMEWORKS = ("dramatiq", "celery", "rq")
COUNTER = "peer:count"
QUEUE = "peer"


@dataclass
class Options:
    """Command-line options."""

    messages: int
    rounds: int
    threads: int
    timeout: float
    frameworks: tuple[str, ...]
    out: Path | None
    json_out: Path | None


def bin_of(name: str) -> str:
    """A console script beside the running interpreter."""
    return str(Path(python()).with_name(name))


def fill(framework: str, url: str, count: int) -> float:
    """Send ``count`` messages the framework's ordinary way; returns messages/s sent."""
    started = time.monotonic()
    if framework == "dramatiq":
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url)  # type: ignore[no-untyped-call]
        actor = dramatiq.actor(
            lambda: None, actor_name="incr", queue_name=QUEUE, broker=broker, max_retries=0
        )
        for _ in range(count):
            actor.send()
        broker.close()
    elif framework == "celery":
        from celery import Celery

        app = Celery("peer-sender", broker=url)
        app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task("incr", queue=QUEUE, producer=producer)
        app.close()
    else:
        from rq import Queue

        conn = redis.Redis.from_url(url)
        queue = Queue(QUEUE, connection=conn)
        batch = 1000
        for start in range(0, count, batch):
            jobs = [
                Queue.prepare_data("bench.peer_jobs.rq_incr", result_ttl=0)
                for _ in range(min(batch, count - start))
            ]
            queue.enqueue_many(jobs)
        conn.close()
    return count / max(time.monotonic() - started, 1e-9)


def worker_args(framework: str, url: str, threads: int) -> list[str]:
    """The worker command line."""
    if framework == "dramatiq":
        return [
            bin_of("dramatiq"),
            "bench.peer_jobs",
            "--processes",
            "1",
            "--threads",
            str(threads),
        ]
    if framework == "celery":
        return [
            *(bin_of("celery"), "-A", "bench.peer_jobs:celery_app", "worker", "--pool", "threads"),
            *("--concurrency", str(threads), "--without-heartbeat", "--without-gossip"),
            *("--without-mingle", "--loglevel", "WARNING", "-Q", QUEUE),
        ]
    return [
        *(bin_of("rq"), "worker", "--burst", "--worker-class", "rq.worker.SimpleWorker"),
        *("--url", url, "--quiet", QUEUE),
    ]


def drain(framework: str, url: str, opts: Options) -> dict[str, Any]:
    """One run: fill, start the worker, time the counter, stop the worker."""
    r = redis.Redis.from_url(url)
    r.flushdb()
    sent_rate = fill(framework, url, opts.messages)
    env = clean_env(PEER_FRAMEWORK=framework, PEER_REDIS_URL=url)
    child = Child(f"peer-{framework}", worker_args(framework, url, opts.threads), env)
    marks: dict[float, float] = {}
    rss_peak = 0.0
    cpu_at_10 = cpu_end = 0.0
    started = time.monotonic()
    deadline = started + opts.timeout
    first = None
    n = 0
    # The worker's forked processes, looked up again every half second only: a lookup scans
    # /proc (about a millisecond), too much for this 10 ms loop beside the measured worker.
    kids: list[int] = []
    kids_at = -math.inf

    def worker_cpu() -> float:
        return tree_cpu(child.pid)

    try:
        while time.monotonic() < deadline:
            n = int(r.get(COUNTER) or 0)
            now = time.monotonic()
            if n and first is None:
                first = now
            for q in (0.1, 0.9):
                if q not in marks and n >= q * opts.messages:
                    marks[q] = now
                    if q == 0.1:
                        cpu_at_10 = worker_cpu()
            if now - kids_at >= 0.5:
                kids, kids_at = children(child.pid), now
            for pid in (child.pid, *kids):
                with contextlib.suppress(OSError):
                    rss_peak = max(rss_peak, rss_mb(pid)[0])
            if n >= opts.messages:
                cpu_end = worker_cpu()
                break
            time.sleep(0.01)
        done = time.monotonic()
        errors = [] if n >= opts.messages else [f"{n}/{opts.messages} counted by the timeout"]
        if not child.alive() and child.popen.returncode not in (0, None) and errors:
            errors.append(child.output()[-500:])
    finally:
        child.close()
        r.flushdb()
        r.close()
    window = marks.get(0.9, done) - marks.get(0.1, started)
    rate = 0.8 * opts.messages / window if 0.9 in marks and window > 0 else 0.0
    return {
        "framework": framework,
        "rate": round(rate, 1),
        "whole": round(n / max(done - (first or started), 1e-9), 1),
        "cpu_us_per_msg": round((cpu_end - cpu_at_10) / (0.9 * opts.messages) * 1e6, 1)
        if cpu_end
        else None,
        "sent_rate": round(sent_rate, 1),
        "rss_mb": round(rss_peak, 1),
        "counted": n,
        "errors": errors,
    }


def run(opts: Options) -> dict[str, Any]:
    """Every round, frameworks interleaved; results with the medians."""
    private = PrivateRedis().start()
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for rnd in range(opts.rounds):
            for fw in opts.frameworks:
                print(f"[bench peers] round {rnd + 1}: {fw}", file=sys.stderr, flush=True)
                runs.append(drain(fw, private.url, opts))
        server = str(redis.Redis.from_url(private.url).info("server")["redis_version"])
    finally:
        private.stop()
    summary = {}
    for fw in opts.frameworks:
        mine = [x for x in runs if x["framework"] == fw]
        summary[fw] = {
            "rate": statistics.median(x["rate"] for x in mine),
            "rounds": [x["rate"] for x in mine],
            "cpu_us_per_msg": statistics.median(x["cpu_us_per_msg"] or 0.0 for x in mine),
            "rss_mb": max(x["rss_mb"] for x in mine),
            "errors": [e for x in mine for e in x["errors"]],
            "version": version(fw),
        }
    return {
        "messages": opts.messages,
        "rounds": opts.rounds,
        "threads": opts.threads,
        "redis": f"a private redis-server {server}",
        "seconds": round(time.monotonic() - started, 1),
        "runs": runs,
        "summary": summary,
    }


def report(res: dict[str, Any]) -> str:
    """The text report."""
    s = res["summary"]
    base = s.get("dramatiq", {}).get("rate") or 0.0
    lines = [
        "Worker throughput beside other task queues (python -m bench peers): one run, interleaved",
        f"  job       one Redis INCR per message; {res['messages']} messages per run, "
        f"{res['rounds']} round(s); {res['redis']}, {res['seconds']} s in all",
        f"  workers   ONE process each; Dramatiq and Celery with {res['threads']} threads, "
        "RQ SimpleWorker (one job at a time)",
        "",
        f"{'framework':<12}{'version':>9}{'msgs/s':>9}{'vs Dramatiq':>13}{'CPU/msg':>10}"
        f"{'RSS MB':>8}  rounds",
    ]
    for fw, row in s.items():
        ratio = f"{row['rate'] / base:.0%}" if base else "-"
        lines.append(
            f"{fw:<12}{row['version']:>9}{row['rate']:>9,.0f}{ratio:>13}"
            f"{row['cpu_us_per_msg']:>8.0f}us{row['rss_mb']:>8.1f}  "
            + " ".join(f"{r:,.0f}" for r in row["rounds"])
        )
    errors = [f"{fw}: {e}" for fw, row in s.items() for e in row["errors"]]
    lines.append("errors: " + ("; ".join(errors) if errors else "0"))
    lines.append("rate = messages/s between 10 % and 90 % counted; median of the rounds")
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> Options:
    """Command-line options of ``python -m bench peers``."""
    ap = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (frameworks interleaved)")
    ap.add_argument("--threads", type=int, default=8, help="Dramatiq and Celery worker threads")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--out", type=Path, default=RESULTS / "peers-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    frameworks = tuple(f for f in ns.frameworks.split(",") if f)
    if not frameworks or set(frameworks) - set(FRAMEWORKS) or ns.messages < 10:
        ap.error(f"--frameworks from {','.join(FRAMEWORKS)}; --messages >= 10")
    return Options(
        ns.messages,
        ns.rounds,
        ns.threads,
        ns.timeout,
        frameworks,
        None if str(ns.out) == "-" else ns.out,
        ns.json,
    )


def main(argv: list[str]) -> int:
    """Run, print the report, write the results file (and JSON)."""
    opts = parse(argv)
    res = run(opts)
    text = report(res)
    publish(text, opts.out)
    if opts.json_out is not None:
        write_json(opts.json_out, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
