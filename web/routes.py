"""The route table: every URL of the API, in one place."""

from __future__ import annotations

from core import accounts
from web.handlers import accounts as acc
from web.handlers import ops
from web.routing import Route

API = "/api/v1"
AUTH_ERRORS = (401,)

ROUTES: tuple[Route, ...] = (
    # Auth and account
    Route(
        "POST",
        f"{API}/auth/register",
        acc.register,
        "Create an account",
        "auth",
        auth="none",
        body=accounts.RegisterIn,
        response=accounts.TokenPair,
        status=201,
        errors=(409, 422, 429),
    ),
    Route(
        "POST",
        f"{API}/auth/login",
        acc.login,
        "Sign in",
        "auth",
        auth="none",
        body=accounts.LoginIn,
        response=accounts.TokenPair,
        errors=(401, 422, 429),
    ),
    Route(
        "POST",
        f"{API}/auth/refresh",
        acc.refresh,
        "Rotate the refresh token",
        "auth",
        auth="none",
        body=accounts.RefreshIn,
        response=accounts.TokenPair,
        errors=(401, 422, 429),
    ),
    Route(
        "POST",
        f"{API}/auth/logout",
        acc.logout,
        "End this login",
        "auth",
        status=204,
        errors=AUTH_ERRORS,
    ),
    Route(
        "GET",
        f"{API}/me",
        acc.get_me,
        "The caller's profile",
        "account",
        response=accounts.UserPublic,
        errors=AUTH_ERRORS,
    ),
    Route(
        "PATCH",
        f"{API}/me",
        acc.patch_me,
        "Change name or notification preferences",
        "account",
        body=accounts.MePatch,
        response=accounts.UserPublic,
        errors=(401, 422),
    ),
    # Operations
    Route(
        "GET",
        "/healthz",
        ops.healthz,
        "Liveness",
        "operations",
        auth="none",
        response=ops.Health,
        rate_limited=False,
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "Readiness (MongoDB and Redis)",
        "operations",
        auth="none",
        response=ops.Health,
        errors=(503,),
        rate_limited=False,
    ),
    Route(
        "GET",
        "/metrics",
        ops.metrics,
        "Prometheus metrics",
        "operations",
        auth="none",
        content_type="text/plain",
        rate_limited=False,
    ),
    Route(
        "GET",
        f"{API}/openapi.json",
        ops.openapi,
        "This document",
        "operations",
        auth="none",
        rate_limited=False,
    ),
    Route(
        "GET",
        "/docs",
        ops.docs,
        "Interactive API documentation",
        "operations",
        auth="none",
        content_type="text/html",
        rate_limited=False,
    ),
)
