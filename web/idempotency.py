"""``Idempotency-Key`` for routes declared ``idempotent=True`` (the protocol: core/idempotency).

Called by the route wrapper after authentication and body validation, around the handler. A
request without the header runs as usual; with it, the first response to (caller, key) is stored
and a repeat of the same request gets that response again, marked ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.payload import BytesPayload

from core import idempotency
from core.errors import AppError, FieldError, Invalid
from web.keys import CONTEXT, REQ_CLAIMS, REQ_ID
from web.problem import from_app_error
from web.ratelimit import client_address

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
#: Headers that belong to the outcome (stored and replayed); per-request ones such as
#: X-Request-ID or the rate-limit headers are left to the request that is answered.
STORED_HEADERS = (
    "Content-Type",
    "Location",
    "ETag",
    "Last-Modified",
    "Content-Location",
    "Cache-Control",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def idempotent(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Call ``handler`` at most once per (caller, ``Idempotency-Key``); replay repeats."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return await handler(request)
    if len(values) > 1:
        raise Invalid(
            "Send one Idempotency-Key header",
            [FieldError(field=idempotency.FIELD, message="Sent more than once")],
        )
    key = idempotency.check_key(values[0])
    ctx = request.app[CONTEXT]
    fingerprint = idempotency.fingerprint(
        ctx, request.method, request.path_qs, await request.read()
    )
    answered: list[web.StreamResponse] = []

    async def call() -> idempotency.StoredResponse:
        try:
            response = await handler(request)
        except AppError as exc:
            # A 4xx answer is this request's outcome, so it is rendered here to be stored.
            response = from_app_error(exc, request_id=request.get(REQ_ID), instance=request.path)
        answered.append(response)
        return idempotency.StoredResponse(
            status=response.status,
            headers={h: response.headers[h] for h in STORED_HEADERS if h in response.headers},
            body=await _body_of(request, response),
        )

    outcome = await idempotency.run(ctx, _scope(request), key, fingerprint, call)
    if not outcome.replayed:
        return answered[0]
    stored = outcome.response
    return web.Response(
        status=stored.status, body=stored.body, headers={**stored.headers, REPLAYED: "true"}
    )


def _scope(request: web.Request) -> str:
    claims = request.get(REQ_CLAIMS)
    if claims is not None:
        return f"user:{claims.subject}"
    # Anonymous routes (register): the caller's address as the rate limit sees it.
    return f"anon:{client_address(request.remote)}"


async def _body_of(request: web.Request, response: web.StreamResponse) -> bytes:
    if isinstance(response, web.Response):
        body = response.body
        if body is None or isinstance(body, bytes):
            return body or b""
        if isinstance(body, BytesPayload):  # text= and problem responses
            return await body.as_bytes()
    raise TypeError(f"{request.path}: an idempotent route must answer with a buffered body")
