"""Shared by the dashboard's browser tests (tests/web/test_dashboard*.py): Debian's Chromium
driven by Playwright, the real app on a loopback port, a watched page, screenshots.

The app is served with the real MongoDB (SecantusDB) and Redis; the browser is never one
downloaded by Playwright. Screenshots go to ``<pytest tmp path>/screenshots`` and, when the
environment variable ``DASHBOARD_SCREENSHOTS`` names a directory, there too.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright, expect

from tests.conftest import bearer
from web.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
ADMIN = {"email": "ops@example.com", "password": "admin password 1"}
#: Where screenshots go besides the test's tmp path (e.g. ``DASHBOARD_SCREENSHOTS=shots``).
SCREENSHOTS_ENV = "DASHBOARD_SCREENSHOTS"
#: The search queue's latency objective (s): short, so a paused queue breaches it at once.
SEARCH_OBJECTIVE_S = 2
#: Data that would run if the page ever inserted it as markup.
MARKUP = '<img src="/x.png" onerror="window.pwned = 1">'
#: Long enough for a few of the page's 5 s polls.
UI_TIMEOUT_MS = 20_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; a missing one is a failure, never a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: `make browser` installs Debian's chromium package (as root), "
            "or run `apt-get install chromium`; this test never downloads a browser"
        )
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Served:
    """The real app on a loopback port."""

    app: web.Application
    base: str

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """One API call (status, JSON body or None)."""
        headers = bearer(token) if token else {}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.base + path, headers=headers, **kwargs) as resp,
        ):
            body = await resp.json() if "json" in resp.content_type else None
            return resp.status, body

    async def login(self, email: str, password: str) -> dict[str, Any]:
        """Sign in over the API; the token pair."""
        status, body = await self.call(
            "POST", "/api/v1/auth/login", json={"email": email, "password": password}
        )
        assert status == 200, body
        return body  # type: ignore[no-any-return]


@pytest.fixture
async def served(make_settings: Any, tmp_path: Path) -> AsyncIterator[Served]:
    """The app as ``taskmanager web`` builds it, on 127.0.0.1 with a free port."""
    settings = make_settings(
        admin_email=ADMIN["email"],
        admin_password=ADMIN["password"],
        backup_dir=str(tmp_path / "backups"),
        queue_latency_objectives=f"search={SEARCH_OBJECTIVE_S}",
    )
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Served(app, f"http://{host}:{port}")
    finally:
        await runner.cleanup()


@dataclass
class Watched:
    """A page plus everything it asked for and complained about."""

    page: Page
    base: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def assert_stayed_local(self) -> None:
        """Every request went to the app itself (nothing from a CDN or elsewhere)."""
        assert self.requests, "the page made no request at all"
        strays = [u for u in self.requests if not u.startswith(self.base + "/")]
        assert not strays, f"requests left the app: {strays}"

    def assert_clean(self, *expected_statuses: int) -> None:
        """No script error, no CSP violation; console errors only for failed requests with
        one of ``expected_statuses`` (Chromium logs every 4xx answer a fetch gets)."""
        assert not self.page_errors, self.page_errors
        allowed = re.compile(
            r"Failed to load resource: the server responded with a status of (\d+)"
        )
        unexpected = [
            m
            for m in self.console_errors
            if not ((hit := allowed.search(m)) and int(hit.group(1)) in expected_statuses)
        ]
        assert not unexpected, unexpected


@pytest.fixture
async def watched(browser: Browser, served: Served) -> AsyncIterator[Watched]:
    """A fresh browser context and page on the served app, watched."""
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    w = Watched(page, served.base)

    def on_request(request: Request) -> None:
        w.requests.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            w.console_errors.append(message.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: w.page_errors.append(str(exc)))
    try:
        yield w
    finally:
        await context.close()


async def sign_in(page: Page, base: str, email: str, password: str) -> None:
    """Open the dashboard and sign in through its form."""
    await page.goto(f"{base}/admin")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def save_screenshot(page: Page, tmp_path: Path, name: str) -> list[Path]:
    """A full-page screenshot, ``<name>.png`` under the tmp path and ``$DASHBOARD_SCREENSHOTS``."""
    dirs = [tmp_path / "screenshots"]
    if os.environ.get(SCREENSHOTS_ENV):
        dirs.append(Path(os.environ[SCREENSHOTS_ENV]))
    image = await page.screenshot(full_page=True)
    saved = []
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.png").write_bytes(image)
        saved.append(directory / f"{name}.png")
    assert len(image) > 10_000, "the screenshot is (nearly) blank"
    return saved


def dead_rows(page: Page, queue: str) -> Any:
    return page.locator(f'#dead-body section[data-queue="{queue}"] tbody tr')


async def row_ids(page: Page, queue: str) -> set[str]:
    ids = await dead_rows(page, queue).evaluate_all("rows => rows.map(r => r.dataset.id)")
    return set(ids)


async def has_count(read: Callable[[], Awaitable[dict[str, str]]], count: int) -> bool:
    """Whether ``read()`` holds ``count`` entries (for ``eventually``)."""
    return len(await read()) == count
