"""The OpenAPI 3.1 document, generated from the route table and the same pydantic models
that validate requests."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from web.problem import Problem
from web.routing import Route

_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    400: "Malformed request",
    401: "Missing, invalid, expired or revoked access token",
    403: "Not allowed for this role",
    404: "Not found (or not yours)",
    409: "Conflict with current state",
    412: "If-Match did not match",
    413: "Body too large",
    422: "Validation failed",
    429: "Rate limited; see Retry-After",
    503: "A dependency is unavailable",
}


def build_openapi(routes: tuple[Route, ...], *, version: str) -> dict[str, Any]:
    """The whole document."""
    models: list[tuple[type[BaseModel], Any]] = [(Problem, "serialization")]
    for route in routes:
        if route.body is not None:
            models.append((route.body, "validation"))
        if route.response is not None:
            models.append((route.response, "serialization"))
    unique = list(dict.fromkeys(models))
    refs, schema = models_json_schema(unique, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = route.path
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in re.findall(r"{(\w+)}", path)
        ]
        paths.setdefault(path, {})[route.method.lower()] = _operation(route, refs, params)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Task Manager API",
            "version": version,
            "description": "Tasks, accounts, notifications and operations. Errors are "
            "application/problem+json (RFC 9457).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(route: Route, refs: dict[Any, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "responses": {},
    }
    if route.handler.__doc__:
        op["description"] = route.handler.__doc__.strip()
    if route.auth != "none":
        op["security"] = [{"bearer": []}]
    if route.query is not None:
        qschema = route.query.model_json_schema(ref_template=_REF)
        required = set(qschema.get("required", []))
        for name, prop in qschema.get("properties", {}).items():
            params.append(
                {"name": name, "in": "query", "required": name in required, "schema": prop}
            )
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    ok: dict[str, Any] = {"description": "Success"}
    if route.response is not None:
        ok["content"] = {route.content_type: {"schema": refs[(route.response, "serialization")]}}
    elif route.status != 204:
        ok["content"] = {route.content_type: {"schema": {}}}
    op["responses"][str(route.status)] = ok
    problem = {"application/problem+json": {"schema": refs[(Problem, "serialization")]}}
    codes = set(route.errors)
    if route.auth != "none":
        codes.add(401)
    if route.auth == "admin":
        codes.add(403)
    if route.body is not None or route.query is not None:
        codes.update({400, 422})
    if route.rate_limited:
        codes.add(429)
    for code in sorted(codes):
        op["responses"][str(code)] = {"description": _STATUS_TEXT[code], "content": problem}
    return op
