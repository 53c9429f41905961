"""Per-request steps of the web process, timed one by one in this process (CPU time).

``python -m bench steps`` calls the product's own functions on realistic inputs (a real access
token, a first page of 50 tasks, the cached stats, the configured loggers and metrics) and
prints what each costs per call, beside what the API benchmark's hot paths pay per request.
It is the evidence behind the optimisation notes of ``bench/results/api-latest.txt``: the
profile there says which steps dominate, this says how much each would save if removed.

Times are the thread's CPU time (``time.thread_time``), the median of several rounds, so other
processes on the machine disturb them little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import structlog
from bson import ObjectId

from config.logging import get_logger, setup_logging
from config.settings import Settings
from core import tasks
from core.security import Tokens
from core.task_models import Stats, TaskPage

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Timed:
    """One step: ``calls`` calls of ``fn`` per round, the CPU time of each round kept."""

    fn: Callable[[], object]
    calls: int
    samples: list[float] = field(default_factory=list)

    def run_round(self) -> None:
        """Time one round (the thread's CPU time)."""
        start = time.thread_time()
        for _ in range(self.calls):
            self.fn()
        self.samples.append((time.thread_time() - start) / self.calls * 1e6)

    @property
    def us(self) -> float:
        """Median microseconds per call."""
        return statistics.median(self.samples)


def cost_us(fn: Callable[[], object], calls: int) -> Timed:
    """A step to time (see :func:`run_rounds`)."""
    fn()  # warm caches (pydantic validators, imports)
    return Timed(fn, calls)


def run_rounds(steps: list[Timed], rounds: int) -> None:
    """Time every step once per round, round-robin, so that a busy spell of the machine
    slows all of them alike and the medians stay comparable."""
    for _ in range(rounds):
        for step in steps:
            step.run_round()


def first_page(n: int = 50) -> list[dict[str, Any]]:
    """Stored task documents like the API benchmark's seed."""
    now = datetime.now(UTC).replace(microsecond=0)
    return [
        {
            "_id": ObjectId(),
            "owner": str(ObjectId()),
            "title": f"Task {i}: review the report",
            "description": "plan write review ship fix call email design test deploy budget",
            "status": "todo",
            "priority": "high",
            "due_at": now + timedelta(days=3) if i % 3 else None,
            "due_key": now + timedelta(days=3),
            "priority_rank": 2,
            "tags": ["work", "home"],
            "created_at": now,
            "updated_at": now,
            "completed_at": None,
            "version": 1,
        }
        for i in range(n)
    ]


def measure(calls: int, rounds: int = 7) -> list[tuple[str, float, str]]:
    """``(step, µs per call, what it is)`` for each step."""
    settings = Settings(app_env="production", jwt_secret="s" * 48, log_level="WARNING")
    setup_logging(settings, process="web")
    tokens = Tokens(settings)
    claims = tokens.issue("access", subject=str(ObjectId()), login_id="l" * 22, role="user")
    token = tokens.encode(claims)
    key = settings.jwt_secret.get_secret_value()
    options = {"require": ["exp", "iat", "iss", "aud", "sub", "jti", "sid", "type"]}

    docs = first_page()
    page = TaskPage(items=[tasks.public(d) for d in docs], next_cursor="c" * 64)
    page_blob = json.dumps(
        {"gen": 3, "until": time.time() + 3600, "value": page.model_dump(mode="json")}
    )
    page_value = json.loads(page_blob)["value"]
    stats = Stats(
        total=500,
        by_status={"todo": 250, "in_progress": 125, "done": 125},
        by_priority={"low": 100, "medium": 200, "high": 100, "urgent": 100},
        overdue=80,
        due_today=3,
    )
    stats_blob = json.dumps(
        {"gen": 3, "until": time.time() + 3600, "value": stats.model_dump(mode="json")}
    )
    log = get_logger("web")

    def page_hit() -> bytes:
        entry = json.loads(page_blob)
        return TaskPage.model_validate(entry["value"]).model_dump_json().encode()

    def stats_hit() -> bytes:
        entry = json.loads(stats_blob)
        return Stats.model_validate(entry["value"]).model_dump_json().encode()

    def request_id() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex)

    from web.metrics import HTTP_LATENCY, HTTP_REQUESTS

    def metrics() -> None:
        HTTP_REQUESTS.labels("GET", "/api/v1/tasks", "200").inc()
        HTTP_LATENCY.labels("/api/v1/tasks").observe(0.002)

    small = calls
    big = max(1, calls // 10)
    steps: list[tuple[str, Timed, str]] = [
        (
            "Tokens.decode",
            cost_us(lambda: tokens.decode(token, "access"), small),
            f"verify one access token ({len(token)} chars), every authenticated request",
        ),
        (
            "  jwt.get_unverified_header",
            cost_us(lambda: jwt.get_unverified_header(token), small),
            "its first pass over the token (header checks)",
        ),
        (
            "  jwt.decode_complete",
            cost_us(
                lambda: jwt.api_jwt.decode_complete(
                    token,
                    key,
                    algorithms=["HS256"],
                    audience=settings.jwt_audience,
                    issuer=settings.jwt_issuer,
                    options=options,  # type: ignore[arg-type]
                    leeway=5,
                ),
                small,
            ),
            "one pass that returns header and claims together",
        ),
        (
            "first page from the cache",
            cost_us(page_hit, big),
            f"json.loads + TaskPage.model_validate + model_dump_json ({len(page_blob):,} B)",
        ),
        ("  json.loads", cost_us(lambda: json.loads(page_blob), big), "of the cached entry"),
        (
            "  TaskPage.model_validate",
            cost_us(lambda: TaskPage.model_validate(page_value), big),
            "50 TaskPublic, datetimes parsed again",
        ),
        ("  TaskPage.model_dump_json", cost_us(page.model_dump_json, big), "the response body"),
        (
            "first page from MongoDB docs",
            cost_us(
                lambda: TaskPage(
                    items=[tasks.public(d) for d in docs], next_cursor=None
                ).model_dump_json(),
                big,
            ),
            "50 x tasks.public + model_dump_json (the uncached path, without the query)",
        ),
        (
            "stats from the cache",
            cost_us(stats_hit, small),
            "json.loads + Stats.model_validate + model_dump_json",
        ),
        (
            "log.info below the level",
            cost_us(
                lambda: log.info(
                    "http.request", method="GET", path="/api/v1/tasks", status=200, ms=1.5
                ),
                small,
            ),
            "the access line at LOG_LEVEL=WARNING: processors run, then the line is dropped",
        ),
        ("request id + contextvars", cost_us(request_id, small), "uuid4 + structlog bind"),
        ("metrics", cost_us(metrics, small), "counter + histogram per request"),
    ]
    run_rounds([t for _, t, _ in steps], rounds)
    return [(name, t.us, what) for name, t, what in steps]


def report(rows: list[tuple[str, float, str]]) -> str:
    """The text report."""
    lines = [
        "Per-request steps of the web process (python -m bench steps): CPU microseconds per call,"
        " median of 7 rounds taken round-robin, in one process",
        f"  machine   Python {sys.version.split()[0]}; compare with the API benchmark's web"
        " CPU per answer",
        "",
    ]
    lines += [f"{name:<32}{us:>9.1f} us  {what}" for name, us, what in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Measure and print; write ``bench/results/steps-latest.txt``."""
    ap = argparse.ArgumentParser(prog="python -m bench steps", description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per round (cheap steps)")
    ap.add_argument("--out", type=Path, default=RESULTS / "steps-latest.txt")
    ns = ap.parse_args(argv)
    text = report(measure(ns.calls))
    sys.stdout.write(text)
    if str(ns.out) != "-":
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text)
    return 0
