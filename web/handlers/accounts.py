"""Auth and account handlers."""

from __future__ import annotations

from aiohttp import web

from core import accounts
from web.keys import CONTEXT
from web.ratelimit import client_address
from web.routing import body, caller, claims, json_response

#: Token responses must not be cached (RFC 6749 section 5.1).
NO_STORE = {"Cache-Control": "no-store"}


async def register(request: web.Request) -> web.Response:
    """Create an account and sign it in."""
    ctx = request.app[CONTEXT]
    pair = await accounts.register(
        ctx, body(request, accounts.RegisterIn), client=request.headers.get("User-Agent", "")
    )
    return json_response(pair, status=201, headers={"Location": "/api/v1/me", **NO_STORE})


async def login(request: web.Request) -> web.Response:
    """Sign in with email and password."""
    pair = await accounts.login(
        request.app[CONTEXT],
        body(request, accounts.LoginIn),
        address=client_address(request.remote),
        client=request.headers.get("User-Agent", ""),
    )
    return json_response(pair, headers=NO_STORE)


async def refresh(request: web.Request) -> web.Response:
    """Exchange a refresh token for a new pair (rotation)."""
    pair = await accounts.refresh(request.app[CONTEXT], body(request, accounts.RefreshIn))
    return json_response(pair, headers=NO_STORE)


async def logout(request: web.Request) -> web.Response:
    """End the caller's login."""
    await accounts.logout(request.app[CONTEXT], claims(request))
    return web.Response(status=204)


async def get_me(request: web.Request) -> web.Response:
    """The caller's profile."""
    user = await accounts.get_user(*caller(request))
    return json_response(accounts.public_user(user))


async def patch_me(request: web.Request) -> web.Response:
    """Change the caller's name or notification preferences."""
    user = await accounts.update_me(*caller(request), body(request, accounts.MePatch))
    return json_response(accounts.public_user(user))
