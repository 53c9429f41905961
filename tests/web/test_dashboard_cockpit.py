"""The operator's cockpit in headless Chromium, against the real app with real messages:
throughput history, the busy view, health, dead-letter filter/detail/retry/delete, find by id,
browsing delayed messages with retry-now and delete, pausing a queue (its messages held, its
latency objective breached, its users waiting listed) and resuming it; screenshots at desktop
width and at 375 px, where the page must not scroll sideways.

Fixtures and helpers: tests/web/dashboard_support.py (screenshots also go to
``$DASHBOARD_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
from playwright.async_api import expect

from core.pagination import CursorCodec
from tests.conftest import eventually
from tests.web.dashboard_support import (
    ADMIN,
    Served,
    Watched,
    browser,
    dead_rows,
    has_count,
    row_ids,
    save_screenshot,
    served,
    sign_in,
    watched,
)
from web.keys import PLATFORM

__all__ = ["browser", "served", "watched"]  # fixtures used by name


@dataclass
class CockpitActors:
    """Test-only actors on real queues of the app's broker, and what they ran."""

    slow: Any
    ok: Any
    boom: Any
    kaput: Any
    gate: threading.Event = field(default_factory=threading.Event)
    failing: threading.Event = field(default_factory=threading.Event)
    done: list[str] = field(default_factory=list)


def cockpit_actors(broker: Any) -> CockpitActors:
    """``slow`` holds a maintenance thread until ``gate`` opens; ``ok`` records its tag;
    ``boom`` (notifications) fails inside our own code (core/) while ``failing`` is set;
    ``kaput`` always fails in the test itself."""
    made: dict[str, Any] = {}
    state = CockpitActors(None, None, None, None)
    state.failing.set()

    def cockpit_slow(tag: str) -> None:
        state.gate.wait(30)
        state.done.append(tag)

    def cockpit_ok(tag: str, user_id: str | None = None) -> None:
        state.done.append(tag)

    def cockpit_boom(tag: str) -> None:
        if state.failing.is_set():
            CursorCodec(b"not the key").decode("tasks", "forged-cursor", 1)
        state.done.append(tag)

    def cockpit_kaput(tag: str) -> None:
        raise RuntimeError(f"kaput {tag}")

    for fn, queue in (
        (cockpit_slow, "maintenance"),
        (cockpit_ok, "maintenance"),
        (cockpit_boom, "notifications"),
        (cockpit_kaput, "notifications"),
    ):
        made[fn.__name__] = dramatiq.actor(fn, broker=broker, queue_name=queue, max_retries=0)
    state.slow, state.ok = made["cockpit_slow"], made["cockpit_ok"]
    state.boom, state.kaput = made["cockpit_boom"], made["cockpit_kaput"]
    return state


async def _int_attr(locator: Any, name: str) -> int:
    if not await locator.count():
        return -1
    value = await locator.get_attribute(name)
    return int(value) if value is not None else -1


async def test_the_cockpit_shows_and_steers_the_workers(
    served: Served, watched: Watched, worker_for: Any, tmp_path: Path
) -> None:
    actors = cockpit_actors(served.app[PLATFORM].broker)
    admin = (await served.login(ADMIN["email"], ADMIN["password"]))["access_token"]
    worker_for(served.app)
    try:
        await _cockpit(served, watched, actors, admin, tmp_path)
    except BaseException:
        # What the page showed when it went wrong, beside the other screenshots.
        await save_screenshot(watched.page, tmp_path, "cockpit-failed")
        raise
    finally:
        actors.gate.set()
    watched.assert_stayed_local()
    watched.assert_clean(404)


async def _cockpit(
    served: Served, watched: Watched, actors: CockpitActors, admin: str, tmp_path: Path
) -> None:
    app, page = served.app, watched.page
    platform = app[PLATFORM]

    async def api(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await served.call(method, f"/api/v1{path}", admin, **kwargs)

    async def dead_ids() -> dict[str, str]:
        """The notifications queue's dead letters: id -> tag."""
        listed = await asyncio.to_thread(platform.inspector.dead, "notifications")
        return {m.id: m.args[0] for m in listed.items}

    async def queue_row(queue: str) -> dict[str, Any]:
        status, body = await api("GET", "/admin/queues")
        assert status == 200, body
        [row] = [q for q in body["items"] if q["queue"] == queue]
        return row  # type: ignore[no-any-return]

    # Real traffic before the page opens: two dead letters failing in core/, one in the test,
    # a slow message holding a thread, two delayed messages, a few that succeed.
    for tag in ("x1", "x2"):
        await asyncio.to_thread(actors.boom.send, tag)
    await asyncio.to_thread(actors.kaput.send, "k1")
    slow = await asyncio.to_thread(actors.slow.send, "long-running")
    later = [
        await asyncio.to_thread(actors.ok.send_with_options, args=(tag,), delay=600_000)
        for tag in ("later-1", "later-2")
    ]
    for i in range(3):
        await asyncio.to_thread(actors.ok.send, f"t{i}")
    await eventually(lambda: has_count(dead_ids, 3), "three dead letters", timeout=15)
    by_tag = {tag: id_ for id_, tag in (await dead_ids()).items()}
    # Two users whose tasks will wait in the search queue (paused below).
    users = {}
    for name in ("alice", "bob"):
        email = f"{name}-{uuid.uuid4().hex[:6]}@example.com"
        status, body = await served.call(
            "POST",
            "/api/v1/auth/register",
            json={"email": email, "password": "user password 1", "name": name},
        )
        assert status == 201, body
        users[name] = body

    await sign_in(page, served.base, ADMIN["email"], ADMIN["password"])
    await expect(page.get_by_text(f"Signed in as {ADMIN['email']}")).to_be_visible()

    # Health: the summary in the top bar and each check.
    await expect(page.locator("#health-badge")).to_have_text(
        re.compile(r"Health: (ok|degraded|failing)")
    )
    await expect(page.locator('#health-body tr[data-check="workers"]')).to_have_count(1)
    await expect(
        page.locator('#health-body tr[data-check="dead_letters"] .check-status')
    ).to_have_text("degraded")

    # Pause the search queue (workers read the paused set once a second).
    search = page.locator('#queues-body tr[data-queue="search"]')
    await page.get_by_role("button", name="Pause queue search").click()
    await expect(search.locator(".queue-status")).to_have_text("paused")
    assert (await queue_row("search"))["paused"] is True
    paused_at = time.monotonic()

    # Throughput: processed and failed over the last hour, from the platform's own history;
    # new traffic moves the chart.
    processed = page.locator("#charts-body svg.chart.processed")
    failed = page.locator("#charts-body svg.chart.failed")
    await eventually(lambda: _at_least(processed, 6), "6 processed in the chart", timeout=15)
    await eventually(lambda: _at_least(failed, 3), "3 failed in the chart", timeout=15)
    assert await _int_attr(processed, "data-points") == 60
    before = await _int_attr(processed, "data-total")
    for i in range(5):
        await asyncio.to_thread(actors.ok.send, f"more{i}")
    await eventually(lambda: _at_least(processed, before + 5), "the chart to move", timeout=15)
    await expect(
        page.locator('#charts-body tr[data-actor="cockpit_kaput"] td.failed')
    ).to_have_text("1")
    await page.get_by_role("button", name="Last day").click()
    await expect(page.locator('#charts-body .charts[data-window="24h"]')).to_have_count(1)
    assert await _int_attr(processed, "data-points") == 144
    assert await _int_attr(processed, "data-total") >= before + 5
    await page.get_by_role("button", name="Last hour").click()

    # Busy view: the slow message on its thread, for how long; per worker processed, memory.
    busy = page.locator(f'#busy-body tr[data-message-id="{slow.message_id}"]')
    await expect(busy).to_have_count(1)
    await expect(busy.locator("td.actor")).to_contain_text("cockpit_slow")
    await expect(busy.locator("td.args")).to_contain_text("long-running")
    await expect(busy.locator("td.running-for")).to_have_text(re.compile(r"^\d+(\.\d)? s$"))
    worker = page.locator("#workers-body tbody tr").first
    await expect(worker.locator("td.memory")).to_have_text(re.compile(r"MiB|GiB"))
    await expect(worker.locator("td.processed")).to_have_text(re.compile(r"^\d+$"))
    await expect(worker.locator("td.uptime")).to_have_text(re.compile(r"\d"))

    # Two users create tasks in the paused search queue: their messages wait there (checked
    # further down, once the page has polled and the oldest is past its objective).
    await asyncio.sleep(max(0.0, paused_at + 1.2 - time.monotonic()))
    counts = {"alice": 3, "bob": 1}
    for name, n in counts.items():
        for i in range(n):
            status, body = await served.call(
                "POST",
                "/api/v1/tasks",
                users[name]["access_token"],
                json={"title": f"{name} task {i}"},
            )
            assert status == 201, body

    # Dead letters: filter by actor, then by error; clear.
    rows = dead_rows(page, "notifications")
    await expect(rows).to_have_count(3)
    await page.locator("#dead-actor").fill("cockpit_kaput")
    await page.get_by_role("button", name="Filter", exact=True).click()
    await expect(rows).to_have_count(1)
    assert await row_ids(page, "notifications") == {by_tag["k1"]}
    await page.locator("#dead-actor").fill("")
    await page.locator("#dead-error").fill("CURSOR IS NOT")
    await page.get_by_role("button", name="Filter", exact=True).click()
    await expect(rows).to_have_count(2)
    assert await row_ids(page, "notifications") == {by_tag["x1"], by_tag["x2"]}
    await page.get_by_role("button", name="Clear").click()
    await expect(rows).to_have_count(3)

    # Detail of one: ids, times, error, and the traceback opening on our frames.
    await page.get_by_role("button", name=f"Details of dead letter {by_tag['x1']}").click()
    detail = page.locator("#message-panel")
    await expect(detail).to_be_visible()
    await expect(detail.locator("#message-title")).to_have_text(f"Message {by_tag['x1']}")
    await expect(detail.locator(".message-state")).to_have_text("dead")
    await expect(detail.locator(".fields")).to_contain_text("Enqueued")
    await expect(detail.locator(".fields")).to_contain_text("Failed")
    await expect(detail.locator(".message-error")).to_contain_text("cursor")
    frames = detail.locator("pre.traceback .frame")
    await expect(frames.first).to_contain_text("core/pagination.py")
    await expect(frames.first).to_have_class(re.compile(r"\bours\b"))
    assert "dramatiq" in (await detail.locator("pre.traceback").inner_text())

    # Retry that one once the actor is fixed: it runs, and is no dead letter any more.
    actors.failing.clear()
    await detail.get_by_role("button", name=f"Retry message {by_tag['x1']} now").click()
    await eventually(lambda: "x1" in actors.done, "x1 to run", timeout=15)
    assert by_tag["x1"] not in await dead_ids()
    await expect(page.locator(f'#dead-body tr[data-id="{by_tag["x1"]}"]')).to_have_count(0)

    # Delete another, from its row, after confirming.
    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await page.get_by_role("button", name=f"Delete dead letter {by_tag['x2']}").click()
    await expect(page.locator(f'#dead-body tr[data-id="{by_tag["x2"]}"]')).to_have_count(0)
    assert by_tag["x2"] in dialogs[0] and "cannot be recovered" in dialogs[0]
    assert set(await dead_ids()) == {by_tag["k1"]}

    # Find a message by id: a delayed one; an unknown id says so.
    status, listed = await api("GET", "/admin/queues/maintenance/messages?state=delayed")
    assert status == 200, listed
    delayed = {m["message_id"]: m["id"] for m in listed["items"]}
    later_ids = [delayed[m.message_id] for m in later]
    await page.locator("#find-id").fill(later_ids[0])
    await page.get_by_role("button", name="Find", exact=True).click()
    await expect(detail.locator("#message-title")).to_have_text(f"Message {later_ids[0]}")
    await expect(detail.locator(".message-state")).to_have_text("delayed")
    await expect(detail.locator(".fields")).to_contain_text("cockpit_ok")
    await page.locator("#find-id").fill("no-such-message")
    await page.get_by_role("button", name="Find", exact=True).click()
    await expect(detail.locator(".not-found")).to_have_text(
        "No message no-such-message in any queue."
    )
    await page.get_by_role("button", name="Close").click()
    await expect(detail).to_be_hidden()

    # Browse the delayed messages of a queue: retry one now (it runs), delete the other.
    await page.get_by_role("button", name="Browse messages of maintenance").click()
    await page.locator("#browse-state").select_option("delayed")
    browsed = page.locator("#messages-body tbody tr")
    await expect(browsed).to_have_count(2)
    await page.get_by_role("button", name=f"Retry message {later_ids[0]} now").click()
    await eventually(lambda: "later-1" in actors.done, "later-1 to run", timeout=15)
    await expect(browsed).to_have_count(1)
    page.once("dialog", accept)
    await page.get_by_role("button", name=f"Delete message {later_ids[1]}").click()
    await expect(page.get_by_text("No delayed messages in maintenance.")).to_be_visible()
    status, listed = await api("GET", "/admin/queues/maintenance/messages?state=delayed")
    assert listed["items"] == [], listed
    assert "later-2" not in actors.done

    # The paused search queue holds them, in the queue, breaching its objective; the users
    # with most messages waiting show.
    await expect(search.locator("td.ready")).to_have_text("4")
    await expect(search.locator("td.objective")).to_have_attribute("data-objective", "breached")
    backlog = page.locator('#backlog-body section[data-queue="search"]')
    for name, n in counts.items():
        user_id = users[name]["user"]["id"]
        await expect(backlog.locator(f'tr[data-user="{user_id}"] td.waiting')).to_have_text(str(n))
    first_user = backlog.locator("tbody tr").first
    await expect(first_user).to_have_attribute("data-user", users["alice"]["user"]["id"])
    await page.get_by_role("button", name="Browse messages of search").click()
    await expect(page.locator("#messages-body tbody tr")).to_have_count(4)
    await expect(page.locator("#messages-body td.user").first).to_have_text(
        re.compile("|".join(u["user"]["id"] for u in users.values()))
    )
    row = await queue_row("search")
    assert row["ready"] == 4 and row["objective_met"] is False

    await save_screenshot(page, tmp_path, "cockpit-desktop")
    await page.set_viewport_size({"width": 375, "height": 800})
    await expect(page.locator("#queues-body")).to_be_visible()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page scrolls sideways at 375 px ({width} px wide)"
    await save_screenshot(page, tmp_path, "cockpit-375px")
    await page.set_viewport_size({"width": 1360, "height": 900})

    # Resume: the workers take them all.
    await page.get_by_role("button", name="Resume queue search").click()
    await expect(search.locator(".queue-status")).to_have_text("running")
    await expect(search.locator("td.ready")).to_have_text("0")
    await expect(search.locator("td.objective")).not_to_have_attribute("data-objective", "breached")
    row = await queue_row("search")
    assert row["paused"] is False and row["ready"] == 0


async def _at_least(locator: Any, total: int) -> bool:
    return await _int_attr(locator, "data-total") >= total
