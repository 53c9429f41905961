"""The OpenAPI 3.1 document, generated from the route table and the same pydantic models
that validate requests (validation mode) and render answers (serialization mode).

What a :class:`~web.routing.Route` declares becomes the document as follows:

- ``body`` / ``query`` / ``response``: the request body, the query parameters and the success
  body; every operation also refuses unknown query parameters (422), and one with a body can
  answer 400 (not JSON), 413 (too large) and 415 (not sent as application/json).
- ``headers``: response headers the success answer always carries (name → description).
  A GET whose answer carries ``ETag`` honours ``If-None-Match`` (304); an operation that
  declares 412 honours ``If-Match``. Both headers follow RFC 9110's grammar
  (:data:`web.conditional.PRECONDITION_PATTERN`); a malformed one is 400.
- ``auth``: a bearer token (401 with ``WWW-Authenticate``), and 403 for ``admin``.
- ``rate_limited``: the ``RateLimit`` / ``RateLimit-Policy`` fields and 429 with
  ``Retry-After`` (an authenticated route outside it still answers 429 to an address that sent
  too many bad credentials; ``/metrics`` and this document have a per-address budget);
  ``idempotent``: the ``Idempotency-Key`` header, 409 and 422.
- Every answer carries ``X-Request-ID``; every error is ``application/problem+json``.
- ``links`` (:data:`_LINKS`): where an answer's ids, ETags and cursors may be sent next, so a
  client (or schemathesis' stateful tests) can chain calls without guessing ids.
- ``HEAD`` is answered wherever ``GET`` is (the same answer without its body); it is implied
  rather than listed as operations of its own.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from web.conditional import PRECONDITION_PATTERN
from web.outages import API_PREFIX, NEEDS_NO_STORE
from web.problem import PROBLEM_TYPE, Problem
from web.ratelimit import OPERATIONS_LIMITED
from web.routing import Route

_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    304: "Not modified: the resource still has the ETag sent in If-None-Match",
    400: "Malformed request: the body is not JSON, or a precondition header (If-Match, "
    "If-None-Match) is not * or a list of entity tags",
    401: "Missing, invalid, expired or revoked credentials",
    403: "Not allowed for this role",
    404: "Not found (or not yours)",
    409: "Conflict with current state",
    412: "If-Match did not match the current ETag",
    413: "Body too large",
    415: "The body is not sent as application/json",
    422: "Validation failed (body, query parameters or headers); see errors",
    429: "Rate limited; see Retry-After",
    501: "Not possible on this broker (e.g. reading ready or delayed messages on RabbitMQ)",
    503: "A store (MongoDB, or Redis where the operation cannot do without it) is "
    "unreachable, or the server is too busy to check a password; see Retry-After",
}
_TAGS = {
    "auth": "Registration, sign-in and tokens",
    "account": "The caller's profile",
    "tasks": "A user's to-do items, their history and search",
    "notifications": "The in-app feed",
    "webhooks": "Signed HTTP callbacks on task events, and their delivery log",
    "analytics": "Daily figures rolled up by the scheduler",
    "admin": "Operators: queues, dead letters, workers, the schedule (admin role)",
    "operations": "Health, metrics and this document (no auth; only metrics and this "
    "document are limited, per address and generously)",
}


def _header(description: str, schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """A response header object."""
    return {"description": description, "required": required, "schema": schema}


def _text(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


_REQUEST_ID = _header(
    "The request id: the client's X-Request-ID when it is sane ([A-Za-z0-9._:-], at most 128 "
    "characters), else a new one; quote it when reporting",
    _text("^[A-Za-z0-9._:-]{1,128}$"),
)
_RATELIMIT_POLICY = _header(
    "The quota policy (draft-ietf-httpapi-ratelimit-headers): q requests per w seconds",
    _text('^"[^"]*";q=[0-9]+;w=[0-9]+$'),
)
_RATELIMIT = _header(
    "The quota left: r requests, t seconds until it grows again (left out when the limiter "
    "cannot be asked)",
    _text('^"[^"]*";r=[0-9]+;t=[0-9]+$'),
    required=False,
)
_RETRY_AFTER = _header("Seconds to wait before retrying", {"type": "integer", "minimum": 1})
_WWW_AUTHENTICATE = _header(
    "The Bearer challenge (RFC 6750) with the error code", _text("^Bearer ")
)
_REPLAYED = _header(
    "Present (true) when this is the stored answer to an earlier request with the same "
    "Idempotency-Key",
    {"type": "string", "const": "true"},
    required=False,
)


#: At least one character that is not Unicode White_Space (what pydantic's strip removes).
_NOT_BLANK = r"[^\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class _Generator(GenerateJsonSchema):
    """Pydantic's JSON schemas, made exact for this API.

    Response schemas promise what is always sent: we never exclude defaults, so a field with a
    default is serialised every time and is required. ``None`` defaults stay optional, because
    problem details drop ``None`` fields. A request string that is stripped before its minimum
    length is checked must contain a non-blank character.
    """

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        out = super().default_schema(schema)
        if "default" in out and out["default"] is None and not _allows_null(out):
            # The field may be left out but not sent as null (SkipJsonSchema[None]).
            del out["default"]
        return out

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        out = super().str_schema(schema)
        if (
            self.mode == "validation"
            and schema.get("strip_whitespace")
            and schema.get("min_length", 0) > 0
            and "pattern" not in out
        ):
            out["pattern"] = _NOT_BLANK
        return out

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        inner = field["schema"]
        if (
            self.mode == "serialization"
            and field["type"] != "typed-dict-field"
            and inner["type"] == "default"
            and field.get("serialization_exclude_if") is None
        ):
            return "default_factory" in inner or inner.get("default") is not None
        return super().field_is_required(field, total)


def _allows_null(schema: JsonSchemaValue) -> bool:
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    return any(_allows_null(variant) for variant in schema.get("anyOf", []))


def build_openapi(routes: tuple[Route, ...], *, version: str) -> dict[str, Any]:
    """The whole document."""
    models: list[tuple[type[BaseModel], Any]] = [(Problem, "serialization")]
    for route in routes:
        if route.body is not None:
            models.append((route.body, "validation"))
        if route.response is not None:
            models.append((route.response, "serialization"))
    unique = list(dict.fromkeys(models))
    refs, schema = models_json_schema(unique, ref_template=_REF, schema_generator=_Generator)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    _add_links(paths, routes)
    used_tags = list(dict.fromkeys(route.tag for route in routes))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Task Manager API",
            "version": version,
            "description": "Tasks, accounts, notifications and operations. Errors are "
            "application/problem+json (RFC 9457). HEAD is answered wherever GET is. Links "
            "say where the ids, ETags and cursors of an answer may be sent next.",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": t, "description": _TAGS[t]} if t in _TAGS else {"name": t} for t in used_tags
        ],
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


_ID = "$response.body#/id"
_FIRST_ID = "$response.body#/items/0/id"
_ETAG = "$response.header.ETag"
_NEXT = "$response.body#/next_cursor"


def _to(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    # ``header_If_Match`` stands for the qualified name ``header.If-Match``.
    names = {
        (k.replace("header_", "header.", 1).replace("_", "-") if k.startswith("header_") else k): v
        for k, v in parameters.items()
    }
    return {"operationId": operation_id, "parameters": names, "description": description}


def _task_links() -> dict[str, Any]:
    return {
        "GetTask": _to("get_task", "Read the task", id=_ID),
        "GetTaskIfChanged": _to(
            "get_task", "Read it again, 304 while unchanged", id=_ID, header_If_None_Match=_ETAG
        ),
        "PatchTask": _to(
            "patch_task", "Change it unless changed meanwhile", id=_ID, header_If_Match=_ETAG
        ),
        "DeleteTask": _to(
            "delete_task", "Delete it unless changed meanwhile", id=_ID, header_If_Match=_ETAG
        ),
        "TaskActivity": _to("task_activity", "Its history", id=_ID),
    }


def _next_page(operation_id: str, **same: str) -> dict[str, Any]:
    return {"NextPage": _to(operation_id, "The next page (same filters)", cursor=_NEXT, **same)}


#: Links of each operation's success answer (by operationId): where its ids, ETags and cursors
#: may be sent next. A link to an operation the table does not have is left out.
_LINKS: dict[str, dict[str, Any]] = {
    "create_task": _task_links(),
    "get_task": _task_links(),
    "patch_task": _task_links(),
    "list_tasks": {
        "GetFirstTask": _to("get_task", "Read the first task listed", id=_FIRST_ID),
        **_next_page("list_tasks", sort="$request.query.sort"),
    },
    "task_activity": _next_page("task_activity", id="$request.path.id"),
    "create_webhook": {
        "GetWebhook": _to("get_webhook", "Read the webhook", id=_ID),
        "DeleteWebhook": _to("delete_webhook", "Delete it", id=_ID),
        "WebhookDeliveries": _to("list_webhook_deliveries", "Its delivery log", id=_ID),
        "ResumeWebhook": _to("resume_webhook", "Resume its deliveries", id=_ID),
    },
    "list_webhooks": {
        "GetFirstWebhook": _to("get_webhook", "Read the first webhook listed", id=_FIRST_ID),
        **_next_page("list_webhooks"),
    },
    "list_webhook_deliveries": {
        "Redeliver": _to(
            "redeliver_webhook_delivery",
            "Send the first delivery listed again",
            id="$request.path.id",
            delivery_id=_FIRST_ID,
        ),
        **_next_page("list_webhook_deliveries", id="$request.path.id"),
    },
    "list_notifications": {
        "ReadFirst": _to("read_notification", "Mark the first one read", id=_FIRST_ID),
        **_next_page("list_notifications", unread="$request.query.unread"),
    },
    "list_queues": {
        "FirstQueueDead": _to(
            "list_dead", "The first queue's dead letters", queue="$response.body#/items/0/queue"
        ),
        "RetryFirstQueue": _to(
            "retry_dead", "Replay its dead letters", queue="$response.body#/items/0/queue"
        ),
        "PurgeFirstQueue": _to(
            "purge_dead", "Purge its dead letters", queue="$response.body#/items/0/queue"
        ),
    },
    "list_dead": _next_page("list_dead", queue="$request.path.queue"),
    "list_schedules": {
        "RunFirstJob": _to(
            "run_schedule", "Fire the first job now", name="$response.body#/items/0/name"
        ),
    },
    "start_backup": {"GetBackup": _to("get_backup", "Follow the backup", id=_ID)},
    "list_backups": {
        "GetFirstBackup": _to("get_backup", "The first backup listed", id=_FIRST_ID),
        **_next_page("list_backups"),
    },
}


def _add_links(paths: dict[str, dict[str, Any]], routes: tuple[Route, ...]) -> None:
    known = {route.operation_id for route in routes}
    for route in routes:
        links = {
            name: link
            for name, link in _LINKS.get(route.operation_id, {}).items()
            if link["operationId"] in known
        }
        if links:
            paths[route.path][route.method.lower()]["responses"][str(route.status)]["links"] = links


def _conditional_get(route: Route) -> bool:
    return route.method == "GET" and "ETag" in route.headers


def _operation(route: Route, refs: dict[Any, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.handler.__doc__:
        op["description"] = route.handler.__doc__.strip()
    if route.auth != "none":
        op["security"] = [{"bearer": []}]
    op["parameters"] = _parameters(route)
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    op["responses"] = _responses(route, refs)
    return op


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in re.findall(r"{(\w+)}", route.path)
    ]
    if route.query is not None:
        qschema = route.query.model_json_schema(ref_template=_REF, schema_generator=_Generator)
        required = set(qschema.get("required", []))
        for name, prop in qschema.get("properties", {}).items():
            param_schema = _query_schema(prop)
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": param_schema,
            }
            description = prop.get("description") or param_schema.pop("description", None)
            if description:
                param["description"] = description
            params.append(param)
    if _conditional_get(route):
        params.append(
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "description": "ETags the client holds (or *): 304 when one is current "
                "(weak comparison); 400 when not * or a list of entity tags",
                "schema": {"type": "string", "pattern": PRECONDITION_PATTERN},
            }
        )
    if 412 in route.errors:
        params.append(
            {
                "name": "If-Match",
                "in": "header",
                "required": False,
                "description": "Change only if the resource still has one of these strong "
                "ETags (or *); otherwise 412. Weak tags (W/) never match. 400 when not * or a "
                "list of entity tags",
                "schema": {"type": "string", "pattern": PRECONDITION_PATTERN},
            }
        )
    if route.idempotent:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Repeat the request safely: the same key and body within 24 h "
                "get the first response again (marked Idempotent-Replayed: true); a different "
                "body with the key is 422, a repeat while the first still runs is 409.",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[\\x20-\\x7e]+$",
                },
            }
        )
    params.append(
        {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "A request id to log and echo back (replaced when not sane)",
            "schema": {"type": "string"},
        }
    )
    return params


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: drop the ``null`` branch pydantic adds for
    optional fields, and the ``null`` default that goes with it."""
    out = {k: v for k, v in prop.items() if k not in ("title", "description")}
    variants = out.pop("anyOf", None)
    if variants is not None:
        concrete = [v for v in variants if v != {"type": "null"}]
        if len(concrete) == 1:
            out = {**concrete[0], **out}
        else:
            out["anyOf"] = concrete
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def _responses(route: Route, refs: dict[Any, Any]) -> dict[str, Any]:
    common: dict[str, Any] = {"X-Request-ID": _REQUEST_ID}
    if route.rate_limited:
        common["RateLimit-Policy"] = _RATELIMIT_POLICY
        common["RateLimit"] = _RATELIMIT
    ok: dict[str, Any] = {"description": "Success"}
    ok_headers = dict(common)
    for name, description in route.headers.items():
        ok_headers[name] = {
            "description": description,
            "required": True,
            "schema": {"type": "string"},
        }
    if route.idempotent:
        ok_headers["Idempotent-Replayed"] = _REPLAYED
    ok["headers"] = ok_headers
    if route.response is not None:
        ok["content"] = {route.content_type: {"schema": refs[(route.response, "serialization")]}}
    elif route.status != 204:
        kind = "object" if route.content_type == "application/json" else "string"
        ok["content"] = {route.content_type: {"schema": {"type": kind}}}
    responses: dict[str, Any] = {str(route.status): ok}
    if _conditional_get(route):
        responses["304"] = {
            "description": _STATUS_TEXT[304],
            "headers": {**common, "ETag": ok_headers["ETag"]},
        }
    problem = {PROBLEM_TYPE: {"schema": refs[(Problem, "serialization")]}}
    for code in sorted(_error_codes(route)):
        headers = dict(common)
        if code == 413:
            # Refused while reading the body, before the rate limit's fields are added.
            headers = {"X-Request-ID": _REQUEST_ID}
        if code == 401:
            headers["WWW-Authenticate"] = _WWW_AUTHENTICATE
        if code in (429, 503):
            headers["Retry-After"] = _RETRY_AFTER
        if route.idempotent and (code == 409 or code in route.errors):
            # What the handler refused is the stored outcome of the key, replayed as such.
            headers["Idempotent-Replayed"] = _REPLAYED
        responses[str(code)] = {
            "description": _STATUS_TEXT[code],
            "headers": headers,
            "content": problem,
        }
    return responses


def _error_codes(route: Route) -> set[int]:
    # Every operation refuses query parameters it does not declare.
    codes = {*route.errors, 422}
    if route.auth != "none":
        codes.add(401)
    if route.auth == "admin":
        codes.add(403)
    if route.body is not None:
        codes.update({400, 413, 415})
    if _conditional_get(route) or 412 in route.errors:
        codes.add(400)  # a malformed If-None-Match / If-Match
    if route.rate_limited or route.auth != "none" or route.path in OPERATIONS_LIMITED:
        # Outside RATE_LIMIT, bad credentials still spend the address's budget, and the
        # public operations routes have a budget of their own (web/ratelimit.py).
        codes.add(429)
    if route.idempotent:
        codes.add(409)
    if route.path.startswith(API_PREFIX) and route.path not in NEEDS_NO_STORE:
        codes.add(503)  # a store is unreachable (web/outages.py)
    return codes
