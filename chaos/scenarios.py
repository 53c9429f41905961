"""The scenarios: each starts its rig, runs the load, injects one fault, and checks the ledger.

Figures per scenario: requests failed (not answered 2xx), side effects lost (an acknowledged
write's webhook, email or search entry that never arrived), duplicates visible to users (a
second webhook event, email or search hit for one write; a webhook *redelivery* with the same
``X-Webhook-Id``, or of an email with the same ``Message-ID``, is counted apart as a
redelivery: receivers and mail systems dedupe on those), and time to recover: from the
fault to the last moment the system visibly misbehaved (a failed request, or a write whose
first side effect took longer than :data:`SLOW_EFFECT_S`). ``inf`` when an effect never came.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chaos.load import Load, Outcome
from chaos.rig import ChaosReceiver, Nginx, PrivateRabbit, Rig, rig
from cli.embedded import PrivateRedis
from tests.e2e.helpers import wait_http
from tests.e2e.test_pipeline import API, api
from tests.e2e.test_scheduler_failover import Replicas

#: A write whose first side effect takes longer than this counts as "not recovered yet".
SLOW_EFFECT_S = 2.0
#: During a graceful restart no write's first side effect may take longer than this.
MAX_DELAY_S = 5.0
#: How long every acknowledged write's effects may take to arrive after the load stops.
DRAIN_S = 60.0


@dataclass
class Result:
    """One scenario's figures, targets and verdict."""

    name: str
    fault: str
    failed: int = 0
    failed_target: int = 0
    #: How the failed-requests target reads when it is not a plain number.
    failed_target_text: str = ""
    lost: int = 0
    duplicates: int = 0
    redeliveries: int = 0
    recover_s: float = 0.0
    recover_target_s: float = 0.0
    #: False when the fault lasts the whole run (nothing to recover from).
    recovers: bool = True
    writes: int = 0
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    extra_ok: bool = True
    details: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> bool:
        """Every figure within its target."""
        return (
            not self.error
            and self.failed <= self.failed_target
            and self.lost == 0
            and self.duplicates == 0
            and self.recover_s <= self.recover_target_s
            and self.extra_ok
        )


def _p95(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


async def drain(load: Load, rcv: ChaosReceiver, rig_: Rig, only: set[str] | None) -> None:
    """Wait until every expected webhook and email arrived, at most :data:`DRAIN_S`."""
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline and load.missing(rcv.requests, rig_.smtp, only):  # noqa: ASYNC110 - polls a count
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # a late duplicate shows up here


def score(
    result: Result,
    load: Load,
    outcome: Outcome,
    fault_at: float | None,
    *,
    outage_until: float = 0.0,
    from_back: bool = False,
) -> None:
    """Fill ``result`` from the load's requests and the ledger's outcome. ``from_back``: the
    recovery is counted from ``outage_until`` (the server back), not from the fault."""
    result.requests = len(load.requests)
    result.writes = outcome.writes_acked
    result.lost = len(outcome.lost)
    result.duplicates = len(outcome.duplicates)
    result.redeliveries = outcome.redeliveries
    result.details += outcome.lost[:5] + outcome.duplicates[:5]
    failed = load.failed()
    result.failed = len(failed)
    result.details += [
        f"{r.kind} at +{r.sent - (fault_at or 0):.1f}s: {r.error}" for r in failed[:5]
    ]
    took = [r.done - r.sent for r in load.requests]
    result.extra["request p95/max s"] = f"{_p95(took):.2f}/{max(took, default=0.0):.2f}"
    lags = [lag for _, lag, _ in outcome.effect_lag]
    result.extra["effect p50/p95 s"] = (
        f"{sorted(lags)[len(lags) // 2]:.2f}/{_p95(lags):.2f}" if lags else "-"
    )
    if fault_at is None:
        return
    if outcome.lost:
        result.recover_s = math.inf
        return
    bad = [r.done for r in failed if r.sent >= fault_at - 1]
    slow = [e for e in outcome.effect_lag if e[0] >= fault_at - 5 and e[1] > SLOW_EFFECT_S]
    bad += [ack + lag for ack, lag, _ in slow]
    result.extra["effects > 2 s after the fault"] = len(slow)
    result.details += [
        f"{what} of a write acknowledged at +{ack - fault_at:.1f}s arrived {lag:.1f}s later"
        for ack, lag, what in sorted(slow, key=lambda e: -e[1])[:3]
    ]
    origin = outage_until if from_back else fault_at
    result.recover_s = max([0.0, *(t - origin for t in bad)])
    if outage_until:
        result.extra["failed outside the outage"] = len(
            [r for r in failed if r.sent < fault_at - 1 or r.done > outage_until + 1]
        )


async def with_load(
    result: Result,
    rig_: Rig,
    fault: Callable[[Rig, ChaosReceiver, Load], Awaitable[float | None]],
    *,
    base: str | None = None,
    warm_s: float,
    after_s: float,
    hooks: list[str] | None = None,
    only: set[str] | None = None,
    delay_s: float = 0.0,
) -> tuple[Load, ChaosReceiver, Outcome, float]:
    """Run the load on ``base`` (the rig's first web by default): ``warm_s`` seconds, then
    ``fault`` (which returns when the fault is over, and may return the time the outage
    ended), then ``after_s`` seconds; drain and check the ledger."""
    rcv = await ChaosReceiver(delay_s=delay_s).start()
    load = Load(base or rig_.base, rcv.url)
    try:
        await load.setup(hooks)
        running = asyncio.create_task(load.run(3600))
        await asyncio.sleep(warm_s)
        fault_at = time.monotonic()
        ended = await fault(rig_, rcv, load)
        result.extra["outage s"] = f"{(ended or time.monotonic()) - fault_at:.1f}"
        await asyncio.sleep(after_s)
        load.stop()
        await running
        await drain(load, rcv, rig_, only)
        outcome = await load.check(rcv.requests, rig_.smtp, only)
        return load, rcv, outcome, fault_at
    finally:
        await load.close()
        await rcv.close()


# --- the scenarios ----------------------------------------------------------------------


async def worker_sigkill(load_s: float) -> Result:
    """SIGKILL the only worker (supervisor and children) while it is delivering a webhook; a
    supervisor starts a new one a second later. Target: nothing lost, redelivered within 15 s."""
    result = Result(
        "worker SIGKILL mid-message",
        "SIGKILL worker (all its processes) while a webhook is in flight; restarted after 1 s",
        recover_target_s=15.0,
    )
    async with rig(workers=1) as r:

        async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
            deadline = time.monotonic() + 20
            while rcv.in_flight == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a count
                await asyncio.sleep(0.01)
            result.extra["in flight at kill"] = rcv.in_flight
            await asyncio.to_thread(r.kill_worker, r.workers[0])
            await asyncio.sleep(1.0)
            r.start_worker()
            return None

        load, _, outcome, at = await with_load(
            result, r, fault, warm_s=load_s / 3, after_s=2 * load_s / 3, delay_s=0.05
        )
        score(result, load, outcome, at)
    return result


async def scheduler_sigkill(load_s: float) -> Result:
    """Two scheduler replicas running a one-second job (the failover test's hook); SIGKILL the
    leader between two slots. Target: the follower leads and fires within 10 s; every slot
    from the first to the last claimed once (none lost, none doubled)."""
    result = Result(
        "scheduler leader SIGKILL",
        "SIGKILL the leading scheduler of two (1 s job)",
        recover_target_s=10.0,
    )
    async with rig(workers=1) as r:
        replicas = Replicas(r.settings)
        try:
            first = replicas.start()
            r.others.append(first)
            await asyncio.to_thread(
                replicas.wait,
                lambda: replicas.leader_pid() == first.pid,
                timeout=60,
                what="a leader",
                alive=(first,),
            )
            second = replicas.start()
            r.others.append(second)
            await asyncio.to_thread(
                replicas.wait,
                lambda: "scheduler.started" in second.output(),
                timeout=60,
                what="the second replica",
                alive=(first, second),
            )
            killed: dict[str, Any] = {}

            async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
                await asyncio.sleep((0.5 - time.time() % 1) % 1)
                killed["wall"] = datetime.now(UTC)
                killed["mono"] = time.monotonic()
                first.popen.send_signal(signal.SIGKILL)
                await asyncio.to_thread(
                    replicas.wait,
                    lambda: replicas.leader_pid() == second.pid,
                    timeout=30,
                    what="the follower to lead",
                    alive=(second,),
                )
                killed["took"] = time.monotonic() - killed["mono"]
                return None

            load, _, outcome, at = await with_load(
                result, r, fault, warm_s=load_s / 3, after_s=2 * load_s / 3
            )
            score(result, load, outcome, at)
            runs = await asyncio.to_thread(replicas.fired)
            slots = [run["scheduled_for"] for run in runs]
            gaps = sum(
                max(0, round((b - a).total_seconds()) - 1) for a, b in itertools.pairwise(slots)
            )
            doubled = len(slots) - len(set(slots))
            by_second = [run for run in runs if run["fired_by"].split(":")[-2] == str(second.pid)]
            sent = [run["sent_at"] for run in by_second if run.get("sent_at")]
            next_fire = (
                (min(sent).replace(tzinfo=UTC) - killed["wall"]).total_seconds()
                if sent
                else math.inf
            )
            resent = sum(1 for run in runs if run.get("resent_by"))
            result.lost += gaps
            result.duplicates += doubled
            # Recovery here is the scheduler's: the takeover and the new leader's first fire
            # (the load's own figure, which the scheduler does not touch, is shown apart).
            result.extra["load: last effect > 2 s, s after the kill"] = f"{result.recover_s:.1f}"
            result.recover_s = max(killed["took"], next_fire)
            result.extra.update(
                {
                    "takeover s": f"{killed['took']:.1f}",
                    "next fire s": f"{next_fire:.1f}",
                    "slots fired": len(slots),
                    "slots lost": gaps,
                    "slots doubled": doubled,
                    "resent (actor skips, allowed once)": resent,
                }
            )
            result.extra_ok = resent <= 1
        finally:
            await asyncio.to_thread(replicas.close)
    return result


def restart_redis(r: Rig, down_for: float) -> None:
    """SIGKILL the rig's Redis, stay down ``down_for`` seconds, start it again empty on the
    same port (:meth:`RestartableRedis.kill_and_restart` with a pause)."""
    server = r.redis.server
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.stop()
    time.sleep(down_for)
    r.redis.server = PrivateRedis(port=server.port).start()


async def redis_restart(load_s: float) -> Result:
    """SIGKILL the private Redis and start it again, empty, on the same port."""
    result = Result(
        "Redis restart",
        "SIGKILL redis-server (no persistence), 2 s down, start it again empty on the same port",
        recover_target_s=20.0,
    )
    async with rig(workers=1) as r:

        async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
            await asyncio.to_thread(restart_redis, r, 2.0)
            return time.monotonic()

        load, _, outcome, at = await with_load(
            result, r, fault, warm_s=load_s / 3, after_s=2 * load_s / 3
        )
        back = at + float(result.extra["outage s"])
        score(result, load, outcome, at, outage_until=back, from_back=True)
    return result


async def mongo_restart(load_s: float) -> Result:
    """Stop the MongoDB test server (SecantusDB, data on disk), 2 s down, start it again."""
    result = Result(
        "MongoDB restart",
        "SIGTERM the SecantusDB server, 2 s down, start it again with its data on the same port",
        recover_target_s=20.0,
    )
    async with rig(workers=1) as r:

        async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
            await asyncio.to_thread(r.mongo.restart, 2.0)
            return time.monotonic()

        load, _, outcome, at = await with_load(
            result, r, fault, warm_s=load_s / 3, after_s=2 * load_s / 3
        )
        ended = at + float(result.extra["outage s"])
        score(result, load, outcome, at, outage_until=ended, from_back=True)
        # The database is down: requests then are answered 503 with Retry-After (a clean
        # failure, not a loss); the target is no failure outside the outage.
        inside = result.failed - int(result.extra["failed outside the outage"])
        result.failed_target = inside
        statuses = Counter(str(req.status or "no answer") for req in load.failed())
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        result.failed_target_text = (
            f"0 outside the outage ({inside} inside{': ' if answers else ''}{answers})"
        )
    return result


async def webhook_slow_failing(load_s: float) -> Result:
    """Two users' receivers misbehave for the whole run: one answers after 1 s, one answers
    500. Target: the other users' webhooks unaffected (none lost, p95 within 2 s), the slow
    receiver gets every event, the failing webhook is paused with every event in its log."""
    result = Result(
        "slow and failing webhook receivers",
        "one receiver answers after 1 s, one answers 500, for the whole run",
        recover_target_s=0.0,
        recovers=False,
    )
    hooks = ["u0", "u1", "slow0", "fail0"]
    async with rig(workers=1) as r:

        async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
            return None

        load, rcv, outcome, _ = await with_load(
            result, r, fault, warm_s=1.0, after_s=load_s, hooks=hooks, only={"u0", "u1", "slow0"}
        )
        score(result, load, outcome, None)
        keyed = load.first_arrivals(rcv.requests)
        acked = {e.key: e.acked for e in load.expects if e.kind == "webhook"}
        healthy_lags = [keyed[k] - acked[k] for k in acked if k[0] in ("u0", "u1") and k in keyed]
        p95 = _p95(healthy_lags)
        fail_user = next(u for u in load.users if u.hook == "fail0")
        async with api(r.base) as client:
            hooks_answer = await client.call("GET", f"{API}/webhooks", token=fail_user.token)
            [hook] = hooks_answer.json()["items"]
            logged = await client.deliveries(fail_user.token, hook["id"])
        expected_fail = sum(1 for e in load.expects if e.kind == "webhook" and e.key[0] == "fail0")
        result.extra.update(
            {
                "healthy users' webhook p95 s": f"{p95:.2f} (target ≤ {SLOW_EFFECT_S:.0f})",
                "failing webhook state": hook.get("state"),
                "failing webhook: events / deliveries logged": f"{expected_fail}/{len(logged)}",
                "attempts the failing receiver answered 500": rcv.answered.get("fail0", 0),
            }
        )
        result.extra_ok = (
            p95 <= SLOW_EFFECT_S
            and hook.get("state") == "paused"
            and len(logged) >= min(expected_fail, 200)
        )
    return result


async def rolling_restart(load_s: float) -> Result:
    """Two web processes behind nginx (``least_conn``); each in turn gets SIGTERM, exits, and
    is started again on its port before the other goes. Target: 0 failed requests."""
    result = Result(
        "rolling restart behind nginx",
        "SIGTERM web 1, restart it, then web 2, behind nginx least_conn",
        recover_target_s=30.0,
    )
    async with rig(webs=2, workers=1) as r:
        nginx = Nginx(r.web_ports)
        result.extra["nginx"] = nginx.version()
        try:

            async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
                for i in range(2):
                    old, port = r.webs[i], r.web_ports[i]
                    code, in_time = await asyncio.to_thread(old.stop, signal.SIGTERM, 30.0)
                    result.extra[f"web {i + 1} exit"] = (
                        f"{code} ({'in time' if in_time else 'killed'})"
                    )
                    new, _ = r.start_web(port)
                    r.webs[i] = new
                    r.webs.append(old)  # closed with the rest
                    await wait_http(new, f"http://127.0.0.1:{port}/readyz", timeout=90)
                return time.monotonic()

            load, _, outcome, at = await with_load(
                result, r, fault, base=nginx.base, warm_s=load_s / 3, after_s=load_s / 3
            )
            score(result, load, outcome, at)
            worst = max((lag for _, lag, _ in outcome.effect_lag), default=0.0)
            result.extra["worst effect delay s"] = f"{worst:.1f} (target ≤ {MAX_DELAY_S:.0f})"
            result.extra_ok = worst <= MAX_DELAY_S
        finally:
            await asyncio.to_thread(nginx.stop)
    return result


async def rabbitmq_restart(load_s: float) -> Result:
    """The broker is a private RabbitMQ node (``BROKER_URL=amqp://…``); it is stopped, stays
    down 2 s and starts again with its data. Target: nothing lost or doubled."""
    result = Result(
        "RabbitMQ restart",
        "rabbitmqctl stop of a private node (BROKER_URL=amqp://…), 2 s down, start again",
        recover_target_s=20.0,
    )
    rabbit = await asyncio.to_thread(PrivateRabbit().start)
    try:
        async with rig(workers=1, BROKER_URL=rabbit.url) as r:

            async def fault(r: Rig, rcv: ChaosReceiver, load: Load) -> float | None:
                await asyncio.to_thread(rabbit.restart, 2.0)
                return time.monotonic()

            load, _, outcome, at = await with_load(
                result, r, fault, warm_s=load_s / 3, after_s=2 * load_s / 3
            )
            back = at + float(result.extra["outage s"])
            score(result, load, outcome, at, outage_until=back, from_back=True)
    finally:
        await asyncio.to_thread(rabbit.close)
    return result


SCENARIOS: dict[str, Callable[[float], Awaitable[Result]]] = {
    "worker": worker_sigkill,
    "scheduler": scheduler_sigkill,
    "redis": redis_restart,
    "mongo": mongo_restart,
    "webhooks": webhook_slow_failing,
    "rabbitmq": rabbitmq_restart,
    "rolling": rolling_restart,
}
