"""Route declarations: one :class:`Route` per operation, carrying what the wrapper validates
and what the OpenAPI document describes, so the two can never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from core import accounts, cache
from core.context import Context
from core.errors import (
    AppError,
    FieldError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
)
from core.security import TokenClaims
from web.idempotency import idempotent
from web.jsonbody import read_json
from web.keys import CONTEXT, RELAY_WAKE, REQ_BODY, REQ_CLAIMS, REQ_QUERY
from web.problem import invalid_from_pydantic
from web.ratelimit import Budget

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)
Auth = Literal["none", "user", "admin"]


@dataclass(frozen=True)
class Route:
    """One operation of the API."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    auth: Auth = "user"
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    rate_limited: bool = True
    #: Honour ``Idempotency-Key`` (web/idempotency.py): for POST operations that create.
    idempotent: bool = False
    #: The cached value (core/cache.py) the handler reads when the request has no query
    #: string: read in the admission's round trip (core/gate.py), so a hit costs one.
    cached: str | None = None

    @property
    def operation_id(self) -> str:
        """The handler's name: unique across the table."""
        return self.handler.__name__


def wrap(route: Route) -> Handler:
    """The aiohttp handler: authenticate, validate query and body, then call the handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        budget = Budget(request) if route.rate_limited else None
        # Requests of one keep-alive connection share a task: what this one prefetched must
        # not reach the next.
        reset = cache.PREFETCHED.set(None)
        try:
            response = await checked(request, budget)
        except AppError as exc:
            if budget is not None:
                await budget.on_error(exc)
            elif isinstance(exc, Unauthorized):
                # Routes outside RATE_LIMIT (admin) still count bad credentials per address.
                await Budget(request).on_error(exc)
            raise
        finally:
            cache.PREFETCHED.reset(reset)
        if budget is not None:
            budget.on_response(response)
        return response

    async def checked(request: web.Request, budget: Budget | None) -> web.StreamResponse:
        if route.auth != "none":
            if budget is not None:
                # Revocation, rate limit and (first page, stats) the cache: one round trip.
                cached = route.cached if not request.query_string else None
                claims = await budget.admit(bearer_token(request), cached)
            else:
                claims = await _authenticate(request)
            if route.auth == "admin":
                await _require_admin(request, claims)
            request[REQ_CLAIMS] = claims
        elif budget is not None:
            await budget.spend(None)
        if route.query is not None:
            request[REQ_QUERY] = _parse_query(request, route.query)
        elif request.query:
            raise Invalid(
                "This operation takes no query parameters",
                [FieldError(field=k, message="Unknown parameter") for k in request.query],
            )
        if route.body is not None:
            request[REQ_BODY] = await _parse_body(request, route.body)
        if route.idempotent:
            response = await idempotent(request, route.handler)
        else:
            response = await route.handler(request)
        if request.method not in ("GET", "HEAD"):
            # A write may have recorded events: let the outbox relay move them now.
            request.app[RELAY_WAKE].set()
        return response

    handle.__name__ = route.operation_id
    return handle


async def _require_admin(request: web.Request, claims: TokenClaims) -> None:
    """Admin routes believe the stored role, not only the token's: an admin demoted (or
    deleted) since the token was issued loses admin at once, not when it expires. They are
    rare enough for the extra read."""
    if claims.role == "admin":
        try:
            user = await accounts.get_user(request.app[CONTEXT], claims.subject)
        except NotFound:
            user = {}
        if user.get("role") == "admin":
            return
    raise Forbidden("This operation needs the admin role")


def bearer_token(request: web.Request) -> str:
    """The access token of ``Authorization: Bearer <token>`` (401 when missing)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send 'Authorization: Bearer <access token>'", error="invalid_request")
    return token.strip()


async def _authenticate(request: web.Request) -> TokenClaims:
    return await accounts.authenticate(request.app[CONTEXT], bearer_token(request))


def _parse_query(request: web.Request, model: type[M]) -> M:
    raw: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        raw[key] = values if len(values) > 1 else values[0]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, where="query") from exc


async def _parse_body(request: web.Request, model: type[M]) -> M:
    """The body, read and checked once (415 without a JSON content type; 400 for what is not
    JSON, too deep, ``NaN`` or a repeated key: see web/jsonbody.py), then the model (422)."""
    raw = await read_json(request)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, where="body") from exc


def claims(request: web.Request) -> TokenClaims:
    """The caller's verified access-token claims."""
    value = request[REQ_CLAIMS]
    assert isinstance(value, TokenClaims)
    return value


def caller(request: web.Request) -> tuple[Context, str]:
    """The app's :class:`~core.context.Context` and the caller's user id (routes that need a
    token): what every handler of the caller's own data passes to :mod:`core`."""
    return request.app[CONTEXT], claims(request).subject


def body(request: web.Request, model: type[M]) -> M:
    """The validated body (the route declared ``model``)."""
    value = request[REQ_BODY]
    assert isinstance(value, model)
    return value


def query(request: web.Request, model: type[M]) -> M:
    """The validated query (the route declared ``model``)."""
    value = request[REQ_QUERY]
    assert isinstance(value, model)
    return value


def json_response(
    payload: BaseModel | dict[str, Any] | list[Any],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Serialise a model (or plain JSON) as the response body."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"), default=str)
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def add_routes(router: web.UrlDispatcher, routes: Iterable[Route]) -> None:
    """Register the table: one resource per path, in the table's order, and ``HEAD`` wherever
    there is ``GET`` (the GET handler answers it; aiohttp leaves the body out, RFC 9110 9.3.2).
    ``HEAD`` is implied, not documented as an operation of its own."""
    resources: dict[str, web.Resource] = {}
    for route in routes:
        resource = resources.get(route.path)
        if resource is None:
            resource = resources[route.path] = router.add_resource(route.path)
        handler = wrap(route)
        resource.add_route(route.method, handler)
        if route.method == "GET":
            resource.add_route("HEAD", handler)


def refuse_other_methods(router: web.UrlDispatcher) -> None:
    """Make every resource answer the methods it lacks with 405 and its own ``Allow``.

    Otherwise the router goes on to the next path that matches too: ``PATCH /tasks/stats``
    would reach ``PATCH /tasks/{id}`` with the id ``stats``, and a 405 would advertise the
    methods of every matching path (``/tasks/{id}``'s on ``/tasks/bulk``). Call it last, once
    CORS has added its ``OPTIONS`` routes: nothing can be added to a resource after this."""
    for resource in router.resources():
        if isinstance(resource, web.Resource) and all(r.method != "*" for r in resource):
            resource.add_route("*", _method_not_allowed({r.method for r in resource}))


def _method_not_allowed(allowed: set[str]) -> Handler:
    async def method_not_allowed(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return method_not_allowed
