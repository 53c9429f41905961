"""Two web processes against one on cached reads, each process held to the same CPU quota.

A phase of ``python -m bench api`` (``--scaling-cores``, default 0.5; 0 skips it). On this
2-core machine two uncapped web processes cannot show what they would do on two cores: the
load generator needs about half a core for every core of web it drives, so it takes the
second core from them. Each web process is therefore held to ``cores`` of CPU by a cgroup
quota (``bench.procs.CpuCap``), one cgroup per process: ``taskmanager web --processes 1`` gets
one quota, each member of ``taskmanager web --processes 2`` (SO_REUSEPORT) its own. Two
processes at half a core each against one at half a core stands for two cores against one,
with the load generator's share left free; what the comparison tests is that nothing the
processes share (Redis, the store, the metrics directory, the relay) holds them back.

Both groups run at once on their own ports, behind the same seeded user; the cached endpoints
(``GET /tasks/stats``, the first page of ``GET /tasks``) are measured on each in turn, in
alternating order over ``--scaling-rounds`` rounds (ABBA), so a slow spell of the machine
hits both. Reported per endpoint: the median req/s of each, their ratio (target ≥ 1.7 times) and
the cores each used (its cap bounds it). Needs a writable cgroup cpu controller (root):
without one the phase says why and measures nothing.
"""

from __future__ import annotations

import statistics
import uuid
from typing import TYPE_CHECKING, Any

from bench.procs import CpuCap, await_children, taskmanager_exe, wait_http
from cli.embedded import free_port

if TYPE_CHECKING:
    from bench.api import ApiBench, RawStore

#: Two processes must do at least this many times what one does.
TARGET = 1.7
#: The cached endpoints compared (keys of ``ApiBench.endpoints``).
KEYS = ("stats", "list")
VARIANTS = ("one", "two")


async def measure(
    bench: ApiBench, raw: RawStore, token: str, task_ids: list[str], cores: float, rounds: int
) -> dict[str, Any]:
    """Start both groups, cap them, measure; the results (``skipped`` says why not)."""
    why = CpuCap.unavailable()
    if why is not None:
        return {"skipped": why}
    assert bench.services is not None
    cap = CpuCap(uuid.uuid4().hex[:8])
    env = bench.web_env(bench.services)
    ports = {v: free_port() for v in VARIANTS}
    procs = {
        v: bench.services.spawn(
            f"web-{v}",
            [taskmanager_exe(), "web", "--port", str(ports[v]), "--processes", str(n)],
            env,
        )
        for n, v in enumerate(VARIANTS, start=1)
    }
    try:
        for v, proc in procs.items():
            await wait_http(proc, f"http://127.0.0.1:{ports[v]}/readyz", timeout=60)
        cap.cap("one", [procs["one"].pid], cores)
        for k, pid in enumerate(await await_children(procs["two"].pid, 2)):
            cap.cap(f"two-{k}", [pid], cores)
        measured = await bench.alternate(
            raw,
            token,
            task_ids,
            {v: (procs[v], ports[v]) for v in VARIANTS},
            list(KEYS),
            rounds,
            "scaling",
        )
    finally:
        for proc in procs.values():
            proc.stop()
        cap.close()
    for m in (m for per in measured.values() for ms in per.values() for m in ms):
        if m.error_count:
            raise RuntimeError(f"{m.name}: {m.errors} {m.error_sample}")
    samples = {v: {k: [m.rps for m in measured[v][k]] for k in KEYS} for v in VARIANTS}
    # Warm-up included on both sides: the cap holds all along.
    used = {v: {k: [m.tree_cores or 0.0 for m in measured[v][k]] for k in KEYS} for v in VARIANTS}
    return {
        "cores_each": cores,
        "rounds": rounds,
        "seconds": bench.opts.trial_seconds,
        "endpoints": {
            key: {
                **{v: round(statistics.median(samples[v][key]), 1) for v in VARIANTS},
                "samples": {v: [round(x, 1) for x in samples[v][key]] for v in VARIANTS},
                "cores": {v: round(statistics.median(used[v][key]), 2) for v in VARIANTS},
                "ratio": round(
                    statistics.median(samples["two"][key]) / statistics.median(samples["one"][key]),
                    3,
                ),
            }
            for key in KEYS
        },
    }


def passed(res: dict[str, Any]) -> bool | None:
    """Whether every compared endpoint met the target (``None``: not measured)."""
    eps = res.get("endpoints")
    if not eps:
        return None
    return all(e["ratio"] >= TARGET for e in eps.values())


def lines(res: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The report's section."""
    if not res:
        return []
    head = "two web processes vs one on cached reads"
    if "skipped" in res:
        return ["", f"{head}: not measured ({res['skipped']})"]
    out = [
        "",
        f"{head}, each process held to {res['cores_each']:g} of a core by a cgroup CPU quota "
        f"(python -m bench api --scaling-cores; {res['rounds']} rounds ABBA, "
        f"{res['seconds']:g} s windows, median):",
        f"  {'endpoint':<18} {'one req/s':>10} {'two req/s':>10} {'ratio':>7}  cores one / two"
        "  target",
    ]
    for key, e in res["endpoints"].items():
        verdict = "PASS" if e["ratio"] >= TARGET else "MISS"
        out.append(
            f"  {labels.get(key, key):<18} {e['one']:>10,.0f} {e['two']:>10,.0f} "
            f"{e['ratio']:>6.2f}x  {e['cores']['one']:.2f} / {e['cores']['two']:.2f}"
            f"      >= {TARGET:g}x {verdict}"
        )
    return out
