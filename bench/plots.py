"""The PNG plots of ``BENCHMARKS.md``, drawn from one run's results (matplotlib, Agg backend:
no display needed). Each function returns the file name it wrote, or None without data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.growth import KINDS


def _save(fig: Any, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name


def api_plot(api: dict[str, Any], folder: Path) -> str | None:
    """Requests/s per endpoint: the web process beside the raw store, the ceiling as a line."""
    eps = api.get("endpoints")
    if not eps:
        return None
    labels = [e["label"] for e in eps.values()]
    web = [e["http"]["rps"] for e in eps.values()]
    raw = [e["raw"]["rps"] for e in eps.values()]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], web, 0.4, label="taskmanager web (1 process)")
    ax.bar([i + 0.2 for i in x], raw, 0.4, label="raw store (same round trips)")
    ax.axhline(api["ceiling"]["rps"], color="k", ls="--", label="bare aiohttp ceiling")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("API endpoints beside the ceiling and the raw store, one run")
    ax.legend(fontsize=8)
    return _save(fig, folder, "api.png")


def peers_plot(peers: dict[str, Any], folder: Path) -> str | None:
    """Messages/s of each framework doing one INCR per message."""
    s = peers.get("summary")
    if not s:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [f"{fw} {row['version']}" for fw, row in s.items()]
    ax.bar(names, [row["rate"] for row in s.values()], color=["C0", "C1", "C2"][: len(s)])
    ax.set_ylabel("messages/s (one worker process)")
    ax.set_title("One Redis INCR per message, same run")
    return _save(fig, folder, "peers.png")


def latency_plot(workers: dict[str, Any], folder: Path) -> str | None:
    """Write→searchable and write→webhook p50/p95 at each offered write rate."""
    steps = workers.get("ladder", {}).get("steps")
    if not steps:
        return None
    rates = [st["offered_rate"] for st in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("searchable_ms", "write → searchable"), ("webhook_ms", "write → webhook")):
        for q, style in (("p50", ":"), ("p95", "-")):
            ys = [st[key].get(q) for st in steps]
            pts = [(r, y) for r, y in zip(rates, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{label} {q}")
    ax.axhline(1000, color="C0", lw=0.8, alpha=0.5)
    ax.axhline(2000, color="C1", lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("writes/s offered")
    ax.set_ylabel("ms from the 201 (log)")
    ax.set_title("Write → effect latency (targets: 1 s searchable, 2 s webhook)")
    ax.legend(fontsize=7)
    return _save(fig, folder, "write-effect.png")


def growth_plot(growth: dict[str, Any], folder: Path) -> str | None:
    """p50 latency of each request kind against the tasks per user."""
    sizes = growth.get("sizes")
    if not sizes:
        return None
    xs = [int(s) for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, label in KINDS:
        ax.plot(xs, [sizes[s]["kinds"][kind]["p50"] for s in sizes], marker="o", label=label)
    ax.axhline(50, color="k", ls="--", lw=0.8, label="50 ms (p95 target)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks of the user")
    ax.set_ylabel("p50 ms, one request at a time (log)")
    ax.set_title("Growth: latency against tasks per user")
    ax.legend(fontsize=7)
    return _save(fig, folder, "growth.png")


def soak_plot(soak: dict[str, Any], folder: Path) -> str | None:
    """RSS of every process along the soak."""
    procs = soak.get("procs")
    if not procs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, p in procs.items():
        ts, mbs = zip(*p["series"], strict=True)
        ax.plot(ts, mbs, label=name)
    ax.axvline(soak["warmup_seconds"], color="grey", ls=":", lw=0.8, label="end of warm-up")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("RSS MB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Memory over a {soak['seconds']:g} s soak at {soak['rate']:g} requests/s")
    ax.legend(fontsize=7)
    return _save(fig, folder, "soak.png")


def draw_all(results: dict[str, dict[str, Any]], folder: Path) -> dict[str, str]:
    """Every plot that has data; section name -> file name."""
    folder.mkdir(parents=True, exist_ok=True)
    makers = {
        "api": api_plot,
        "peers": peers_plot,
        "workers": latency_plot,
        "growth": growth_plot,
        "soak": soak_plot,
    }
    out = {}
    for name, make in makers.items():
        data = results.get(name)
        if data and "failed" not in data:
            made = make(data, folder)
            if made:
                out[name] = made
    return out
