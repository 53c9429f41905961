"""The operator dashboard (``GET /admin``) in headless Chromium, against the real app: sign
in, queues, dead letters, schedules, backups, sessions, and the page's lockdown.

The app is served on a loopback port with the real MongoDB (SecantusDB) and Redis, an
in-process worker takes its messages, and the browser is Debian's Chromium driven by
Playwright (never a browser build downloaded by Playwright). The tests click what an operator
clicks and check what the API then holds. The cockpit (history, busy view, one message at a
time, pause, objectives, backlog) is tests/web/test_dashboard_cockpit.py; the fixtures are in
tests/web/dashboard_support.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import dramatiq
from playwright.async_api import Page, expect

from jobs.schedule import SCHEDULE
from jobs.scheduler import Scheduler
from tests.conftest import eventually
from tests.web.dashboard_support import (
    ADMIN,
    MARKUP,
    UI_TIMEOUT_MS,
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
from web.handlers.dashboard import CONTENT_SECURITY_POLICY
from web.keys import CONTEXT, PLATFORM

__all__ = ["browser", "served", "watched"]  # fixtures used by name


class Flaky:
    """A test actor's body: fails with ``RuntimeError('boom')`` while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.calls: list[str] = []
        self.done: list[str] = []

    def __call__(self, tag: str) -> None:
        self.calls.append(tag)
        if self.failing.is_set():
            raise RuntimeError("boom")
        self.done.append(tag)


async def test_admin_operates_queues_dead_letters_schedules_and_backups(
    served: Served, watched: Watched, worker_for: Any, tmp_path: Path
) -> None:
    app, page = served.app, watched.page
    platform = app[PLATFORM]
    queue = "notifications"
    # A test-only actor on a real queue of this app's broker: its messages die at once.
    body = Flaky()

    def dashboard_boom(tag: str) -> None:
        body(tag)

    boom = dramatiq.actor(dashboard_boom, broker=platform.broker, queue_name=queue, max_retries=0)
    worker_for(app)
    for tag in ("a", "b", MARKUP):
        await asyncio.to_thread(boom.send, tag)

    async def dead() -> dict[str, str]:
        """Dead letters of the queue: id -> tag."""
        page_ = await asyncio.to_thread(platform.inspector.dead, queue)
        return {m.id: m.args[0] for m in page_.items}

    await eventually(lambda: has_count(dead, 3), timeout=15)
    by_tag = {tag: id_ for id_, tag in (await dead()).items()}
    scheduler = Scheduler(app[CONTEXT], platform)
    # One acquisition stands for a running scheduler (which renews every 2 s): held long
    # enough to outlast the page's steps below.
    scheduler.lock.ttl_ms = 120_000
    await scheduler.lock.tick()
    await scheduler.publish()

    await sign_in(page, served.base, ADMIN["email"], ADMIN["password"])
    await expect(page.get_by_text(f"Signed in as {ADMIN['email']}")).to_be_visible()

    # Queues: every queue of the broker, with this one's three dead letters.
    queues = [s.queue for s in await asyncio.to_thread(platform.inspector.stats)]
    assert {"notifications", "search", "maintenance"} <= set(queues)
    for name in queues:
        await expect(page.locator(f'#queues-body tr[data-queue="{name}"] th')).to_have_text(name)
    await expect(page.locator(f'#queues-body tr[data-queue="{queue}"] td.dead')).to_have_text("3")

    # Workers: the in-process worker, heartbeating.
    await expect(page.locator("#workers-body tbody tr")).to_have_count(1)
    await expect(page.locator("#workers-body td.heartbeat")).to_have_text(re.compile(r"\d"))

    # Dead letters: all listed with why they died.
    await expect(dead_rows(page, queue)).to_have_count(3)
    assert await row_ids(page, queue) == set(by_tag.values())
    await expect(page.locator("#dead-body td.error-text").first).to_contain_text(
        "RuntimeError: boom"
    )

    # Data is shown as text, never parsed as markup.
    args = page.locator(f'#dead-body tr[data-id="{by_tag[MARKUP]}"] td.args')
    await expect(args).to_have_text(json.dumps([MARKUP]))
    assert await page.locator("#dead-body img").count() == 0
    assert await page.evaluate("window.pwned") is None

    # Retry selected, once the actor is fixed: the message runs and is gone for good.
    body.failing.clear()
    retry_selected = page.get_by_role("button", name=f"Retry selected dead letters of {queue}")
    await expect(retry_selected).to_be_disabled()
    await page.get_by_label(f"Select dead letter {by_tag['a']}", exact=False).check()
    await retry_selected.click()
    await expect(page.locator(f'#dead-body tr[data-id="{by_tag["a"]}"]')).to_have_count(0)
    await expect(dead_rows(page, queue)).to_have_count(2)
    await eventually(lambda: body.done == ["a"], timeout=15)
    assert set((await dead()).values()) == {"b", MARKUP}

    # Retry all while it is broken again: both run once more and die again under new ids.
    body.failing.set()
    calls = len(body.calls)
    await page.get_by_role("button", name=f"Retry all dead letters of {queue}").click()
    old = {by_tag["b"], by_tag[MARKUP]}
    await eventually(lambda: _disjoint(row_ids, page, queue, old), timeout=UI_TIMEOUT_MS / 1000)
    await expect(dead_rows(page, queue)).to_have_count(2)
    assert len(body.calls) == calls + 2
    assert set((await dead()).values()) == {"b", MARKUP}

    # Purge asks first: dismissed, nothing happens; accepted, the queue is empty.
    dialogs: list[str] = []

    async def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.once("dialog", dismiss)
    await page.get_by_role("button", name=f"Purge dead letters of {queue}").click()
    await eventually(lambda: dialogs, timeout=15)
    assert "cannot be recovered" in dialogs[0] and queue in dialogs[0]
    assert len(await dead()) == 2

    async def accept(dialog: Any) -> None:
        await dialog.accept()

    page.once("dialog", accept)
    await page.get_by_role("button", name=f"Purge dead letters of {queue}").click()
    await expect(page.get_by_text("No dead letters in any queue.")).to_be_visible()
    assert await dead() == {}
    await expect(page.locator(f'#queues-body tr[data-queue="{queue}"] td.dead')).to_have_text("0")

    # Schedules: every job, the leader; "Run now" is followed to success by the page's polling.
    for job in SCHEDULE:
        await expect(page.locator(f'#schedules-body tr[data-job="{job.name}"]')).to_have_count(1)
    await expect(page.locator("#schedules-meta")).to_contain_text(scheduler.lock.instance)
    status = page.locator('#schedules-body tr[data-job="analytics-rollup"] .last-status')
    await expect(status).to_have_text("never")
    await page.get_by_role("button", name="History of analytics-rollup").click()
    history = page.locator('#schedules-body tr[data-history="analytics-rollup"]')
    await expect(history).to_contain_text("No runs recorded yet.")
    await page.get_by_role("button", name="Run analytics-rollup now").click()
    await expect(status).to_have_text("succeeded")
    # Its history (kept open, refreshed by the polls) lists the manual run with its duration.
    run = history.locator("tbody tr")
    await expect(run).to_have_count(1)
    await expect(run.locator(".run-status")).to_have_text("succeeded")
    await expect(run.locator(".tag")).to_have_text("manual")
    await expect(run.locator("td.duration")).to_have_text(re.compile(r"\d+(\.\d)? m?s"))

    # Backups: start one; the worker takes it and the panel follows it to success.
    await expect(page.get_by_text("No backups yet.")).to_be_visible()
    await page.get_by_role("button", name="Start backup").click()
    backup_status = page.locator("#backups-body .backup-status")
    await expect(backup_status).to_have_count(1)
    await expect(backup_status).to_have_text("succeeded")
    admin = await served.login(ADMIN["email"], ADMIN["password"])
    _, listed = await served.call("GET", "/api/v1/admin/backups", admin["access_token"])
    [backup] = listed["items"]
    assert backup["status"] == "succeeded" and backup["manual"] is True
    await expect(page.locator(f'#backups-body tr[data-backup="{backup["id"]}"]')).to_have_count(1)

    await save_screenshot(page, tmp_path, "dashboard-operations")
    watched.assert_stayed_local()
    watched.assert_clean()

    # Signing out ends the login on the server too.
    token = await page.evaluate(
        "JSON.parse(sessionStorage.getItem('taskmanager.admin.session')).access"
    )
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0

    async def revoked() -> bool:
        status, _ = await served.call("GET", "/api/v1/admin/queues", token)
        return status == 401

    await eventually(revoked, timeout=15)


async def test_a_non_admin_is_told_the_admin_role_is_needed(
    served: Served, watched: Watched
) -> None:
    page = watched.page
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    status, _ = await served.call(
        "POST",
        "/api/v1/auth/register",
        json={"email": email, "password": "user password 1", "name": "U"},
    )
    assert status == 201

    # A wrong password shows the API's problem detail, in the form.
    await sign_in(page, served.base, email, "not the password")
    error = page.locator("#signin-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("401")
    await expect(page.locator("#dashboard-view")).to_be_hidden()

    await page.get_by_label("Password").fill("user password 1")
    await page.get_by_role("button", name="Sign in").click()
    forbidden = page.get_by_role("alert").filter(has_text="needs the admin role")
    await expect(forbidden).to_be_visible()
    await expect(forbidden).to_contain_text(email)
    await expect(forbidden).to_contain_text("403")
    await expect(page.locator("#dashboard-view")).to_be_hidden()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    watched.assert_stayed_local()
    watched.assert_clean(401, 403)
    # One probe, not one 403 per panel, and no polling after it: proving an absence takes
    # waiting out more than one poll interval (5 s).
    await page.wait_for_timeout(6000)
    admin_calls = [u for u in watched.requests if "/api/v1/admin/" in u]
    assert admin_calls == [f"{served.base}/api/v1/admin/overview"], admin_calls


async def test_an_expired_access_token_is_refreshed_once_then_the_session_ends(
    served: Served, watched: Watched
) -> None:
    page = watched.page
    await sign_in(page, served.base, ADMIN["email"], ADMIN["password"])
    await expect(page.locator('#queues-body tr[data-queue="notifications"]')).to_have_count(1)
    key = "taskmanager.admin.session"
    before = await page.evaluate(f"JSON.parse(sessionStorage.getItem('{key}'))")

    # A reload keeps the session (sessionStorage); a dead access token is refreshed once.
    await page.evaluate(
        f"""() => {{
        const s = JSON.parse(sessionStorage.getItem('{key}'));
        s.access = 'not-a-token';
        sessionStorage.setItem('{key}', JSON.stringify(s));
    }}"""
    )
    await page.reload()
    await expect(page.locator('#queues-body tr[data-queue="notifications"]')).to_have_count(1)
    after = await page.evaluate(f"JSON.parse(sessionStorage.getItem('{key}'))")
    assert after["access"] not in ("not-a-token", before["access"])
    assert after["refresh"] != before["refresh"]
    refreshes = [u for u in watched.requests if u.endswith("/api/v1/auth/refresh")]
    assert len(refreshes) == 1, refreshes
    status, _ = await served.call("GET", "/api/v1/admin/queues", after["access"])
    assert status == 200

    # With a spent refresh token too, the session ends and the form says so.
    await page.evaluate(
        f"""(spent) => {{
        const s = JSON.parse(sessionStorage.getItem('{key}'));
        s.access = 'not-a-token';
        s.refresh = spent;
        sessionStorage.setItem('{key}', JSON.stringify(s));
    }}""",
        before["refresh"],
    )
    await page.reload()
    await expect(page.get_by_text("Your session has ended: sign in again.")).to_be_visible()
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    watched.assert_stayed_local()
    watched.assert_clean(401)


async def test_the_page_is_public_static_and_locked_down(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base}/admin") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert "default-src 'self'" in CONTENT_SECURITY_POLICY
            assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert "RateLimit-Policy" not in resp.headers  # not rate limited
            page = await resp.text()
        # No inline script: every script is a file of this server.
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
        assert scripts
        for attrs, inline in scripts:
            assert inline.strip() == ""
            assert re.search(r'src="/admin/static/[\w.]+\.js"', attrs), attrs
        assert "style=" not in page
        for asset, kind in (
            ("admin.js", "javascript"),
            ("admin.css", "text/css"),
            ("admin.svg", "image/svg+xml"),
        ):
            async with http.get(f"{served.base}/admin/static/{asset}") as resp:
                assert resp.status == 200, asset
                assert kind in resp.content_type, (asset, resp.content_type)
        js = (Path(__file__).parents[2] / "web" / "static" / "admin.js").read_text()
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js
        assert "eval(" not in js


async def _disjoint(
    read: Callable[[Page, str], Awaitable[set[str]]], page: Page, queue: str, old: set[str]
) -> bool:
    now = await read(page, queue)
    return len(now) == len(old) and not now & old
