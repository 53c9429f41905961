"""The operator dashboard (``GET /admin``): a static page whose script reads and drives the
admin API with the operator's own token.

The page carries no data, so it is public; every call it makes needs an admin access token.
Its script and style are files under ``/admin/static/`` (never inline), which lets the
Content-Security-Policy forbid inline code: a string from a queue or an error message that
slipped into the page as markup still could not run.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aiohttp import web

#: Where ``admin.html``, ``admin.js``, ``admin.css`` live (served under ``/admin/static/``).
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/admin/static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _page() -> str:
    return (STATIC_DIR / "admin.html").read_text(encoding="utf-8")


async def dashboard(request: web.Request) -> web.Response:
    """The operator dashboard page (sign-in form; the panels load through the admin API)."""
    return web.Response(text=_page(), content_type="text/html", headers=HEADERS)
