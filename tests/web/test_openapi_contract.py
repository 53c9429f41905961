"""The OpenAPI document's contract with the route table, operation by operation.

tests/web/test_openapi.py validates the served document against OpenAPI 3.1 and checks every
route is there; these tests check what each operation promises: its success and problem
responses, parameters, headers, and response schemas exact enough for a client to rely on
(they are what tests/web/test_fuzz.py holds the running app to).
"""

from __future__ import annotations

import re
import types
import typing
from datetime import datetime
from importlib.metadata import version
from typing import Any

import pytest
from pydantic import BaseModel

from core.pagination import CURSOR_PATTERN
from core.webhook_url import URL_PATTERN
from web.conditional import PRECONDITION_PATTERN
from web.openapi import build_openapi
from web.ratelimit import OPERATIONS_LIMITED
from web.routes import ROUTES
from web.routing import Route

DOC = build_openapi(ROUTES, version=version("taskmanager"))
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _op(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = DOC["paths"][route.path][route.method.lower()]
    return op


def _params(route: Route, where: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in _op(route)["parameters"] if p["in"] == where}


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _ids(routes: tuple[Route, ...]) -> list[str]:
    return [f"{r.method} {r.path}" for r in routes]


each_route = pytest.mark.parametrize("route", ROUTES, ids=_ids(ROUTES))


def test_every_route_is_one_operation_with_a_unique_id() -> None:
    documented = [(method.upper(), path) for path, ops in DOC["paths"].items() for method in ops]
    assert sorted(documented) == sorted((r.method, r.path) for r in ROUTES)
    ids = [op["operationId"] for ops in DOC["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@each_route
def test_success_and_problem_responses(route: Route) -> None:
    responses = _op(route)["responses"]
    assert [code for code in responses if code.startswith("2")] == [str(route.status)]
    problems = {code: r for code, r in responses.items() if code.startswith(("4", "5"))}
    assert any(code.startswith("4") for code in problems)
    for code, response in problems.items():
        assert response["content"] == PROBLEM, code
    ok = responses[str(route.status)]
    if route.status == 204:
        assert "content" not in ok
    else:
        assert list(ok["content"]) == [route.content_type]
    if route.response is not None:
        assert ok["content"][route.content_type]["schema"] == {
            "$ref": f"#/components/schemas/{route.response.__name__}"
        }


@each_route
def test_path_parameters_are_declared(route: Route) -> None:
    declared = _params(route, "path")
    assert set(declared) == set(re.findall(r"{(\w+)}", route.path))
    for param in declared.values():
        assert param["required"] is True
        assert param["schema"] == {"type": "string"}


@each_route
def test_query_parameters_match_the_model(route: Route) -> None:
    declared = _params(route, "query")
    if route.query is None:
        assert declared == {}
        return
    fields = route.query.model_fields
    assert set(declared) == {f.alias or name for name, f in fields.items()}
    for name, param in declared.items():
        # A query parameter is absent or a string on the wire, never null.
        assert "null" not in str(param["schema"]), name
        field = next(f for n, f in fields.items() if (f.alias or n) == name)
        assert param["required"] is field.is_required(), name


@each_route
def test_every_answer_carries_the_request_id(route: Route) -> None:
    for code, response in _op(route)["responses"].items():
        assert response["headers"]["X-Request-ID"]["required"] is True, code


@each_route
def test_auth_and_rate_limit_refusals(route: Route) -> None:
    responses = _op(route)["responses"]
    if route.auth == "none":
        assert "security" not in _op(route)
    else:
        assert _op(route)["security"] == [{"bearer": []}]
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert ("403" in responses) is (route.auth == "admin" or 403 in route.errors)
    if route.rate_limited:
        assert responses["429"]["headers"]["Retry-After"]["schema"] == {
            "type": "integer",
            "minimum": 1,
        }
        for code, response in responses.items():
            if code != "413":  # refused while reading the body, before the limiter's fields
                assert "RateLimit-Policy" in response["headers"], code
                assert "RateLimit" in response["headers"], code
    else:
        # Bad credentials spend the address's budget on any route; the public /metrics and
        # document have a per-address budget of their own (the 429 carries the fields).
        limited = route.auth != "none" or route.path in OPERATIONS_LIMITED
        assert ("429" in responses) is limited
        assert all("RateLimit" not in r["headers"] for r in responses.values())


@each_route
def test_body_refusals(route: Route) -> None:
    responses = _op(route)["responses"]
    assert "422" in responses  # unknown query parameters, at least
    # 400: a body that is not JSON, or a malformed If-Match / If-None-Match.
    preconditions = {"If-Match", "If-None-Match"} & set(_params(route, "header"))
    assert ("400" in responses) is (route.body is not None or bool(preconditions))
    if route.body is None:
        assert "requestBody" not in _op(route)
        assert "413" not in responses and "415" not in responses
        return
    body = _op(route)["requestBody"]
    assert body["required"] is True
    assert list(body["content"]) == ["application/json"]
    assert {"400", "413", "415"} <= set(responses)
    # Unknown fields in a body are refused (422), and the document says so.
    assert _resolve(body["content"]["application/json"]["schema"])["additionalProperties"] is False


@each_route
def test_conditional_and_idempotent_requests(route: Route) -> None:
    headers = _params(route, "header")
    responses = _op(route)["responses"]
    ok = responses[str(route.status)]
    for name in route.headers:
        assert ok["headers"][name]["required"] is True, name
    assert ("If-Match" in headers) is (412 in route.errors)
    conditional_get = route.method == "GET" and "ETag" in route.headers
    assert ("If-None-Match" in headers) is conditional_get
    assert ("304" in responses) is conditional_get
    if conditional_get:
        assert "content" not in responses["304"]
        assert responses["304"]["headers"]["ETag"]["required"] is True
    assert ("Idempotency-Key" in headers) is route.idempotent
    if route.idempotent:
        assert route.method == "POST"
        assert "409" in responses
        assert ok["headers"]["Idempotent-Replayed"]["required"] is False
    for param in headers.values():
        assert param["required"] is False, param["name"]
    for name in ("If-Match", "If-None-Match"):
        if name in headers:
            assert headers[name]["schema"] == {"type": "string", "pattern": PRECONDITION_PATTERN}


def _mentions_datetime(annotation: Any) -> bool:
    if annotation is datetime:
        return True
    return any(_mentions_datetime(arg) for arg in typing.get_args(annotation))


def _response_models() -> dict[str, type[BaseModel]]:
    """Every model a response shows, nested ones included, by schema name."""
    found: dict[str, type[BaseModel]] = {}
    todo = [r.response for r in ROUTES if r.response is not None]
    while todo:
        model = todo.pop()
        if model.__name__ in found:
            continue
        found[model.__name__] = model
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, types.GenericAlias | types.UnionType) or typing.get_args(annotation):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


RESPONSE_MODELS = _response_models()


@pytest.mark.parametrize("name", sorted(RESPONSE_MODELS))
def test_response_schemas_say_what_is_sent(name: str) -> None:
    """Serialization schemas: datetimes are RFC 3339 strings, a field always sent is
    required, and null is offered exactly where the model allows it."""
    model = RESPONSE_MODELS[name]
    schema = SCHEMAS[name]
    for field_name, field in model.model_fields.items():
        key = field.serialization_alias or field.alias or field_name
        prop = schema["properties"][key]
        variants = prop.get("anyOf", [prop])
        if _mentions_datetime(field.annotation):
            assert {"type": "string", "format": "date-time"} in [
                {k: v for k, v in variant.items() if k in ("type", "format")}
                for variant in variants
            ], key
        nullable = {"type": "null"} in variants
        if name != "Problem":  # problem details leave None fields out instead of sending null
            assert nullable is (type(None) in typing.get_args(field.annotation)), key
        if not field.is_required() and field.default is not None:
            assert key in schema.get("required", []), f"{key} is always sent"


def test_problem_schema() -> None:
    problem = SCHEMAS["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert "null" not in str(problem["properties"])


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("*", True),
        ('"a"', True),
        ('W/"a"', True),
        ('"a", W/"b" ,"c"', True),
        ('"a",,"b",', True),
        ('""', True),
        ("", False),
        ("garbage", False),
        ('"a" "b"', False),
        ('*, "a"', False),
        ('"a"b', False),
        ('w/"a"', False),
    ],
)
def test_precondition_grammar(value: str, valid: bool) -> None:
    """RFC 9110's ``If-Match``/``If-None-Match``: ``*`` or a list of entity tags."""
    assert (re.fullmatch(PRECONDITION_PATTERN, value) is not None) is valid


def test_links_name_operations_and_parameters_that_exist() -> None:
    """Every link leads to an operation of the document, fills only parameters it declares
    (qualified ``header.X`` names included), from a 2xx answer; creations link onwards."""
    by_id = {op["operationId"]: op for ops in DOC["paths"].values() for op in ops.values()}
    linked = set()
    for ops in DOC["paths"].values():
        for op in ops.values():
            for code, response in op["responses"].items():
                for name, link in response.get("links", {}).items():
                    assert code.startswith("2"), (op["operationId"], name)
                    target = by_id[link["operationId"]]
                    declared = {(p["in"], p["name"]) for p in target["parameters"]}
                    for key, expression in link["parameters"].items():
                        where, _, pname = key.rpartition(".")
                        if where:
                            assert (where, pname) in declared, (name, key)
                        else:
                            assert any(n == pname for _, n in declared), (name, key)
                        assert expression.startswith(("$response.", "$request.")), expression
                    linked.add((op["operationId"], link["operationId"]))
    for source, target in [
        ("create_task", "get_task"),
        ("create_task", "patch_task"),
        ("create_task", "delete_task"),
        ("create_task", "task_activity"),
        ("create_webhook", "get_webhook"),
        ("create_webhook", "delete_webhook"),
        ("create_webhook", "list_webhook_deliveries"),
        ("list_webhook_deliveries", "redeliver_webhook_delivery"),
        ("list_notifications", "read_notification"),
        ("start_backup", "get_backup"),
        ("list_tasks", "list_tasks"),
    ]:
        assert (source, target) in linked, (source, target)


def test_what_the_server_enforces_is_in_the_document() -> None:
    """The rules a schema-driven client would otherwise break (tests/web/test_fuzz.py holds
    the running server to them): cursors, webhook URLs, date-times, the analytics range."""
    for route in ROUTES:
        cursor = _params(route, "query").get("cursor")
        if cursor is not None:
            assert cursor["schema"]["pattern"] == CURSOR_PATTERN, route.path
            assert "next_cursor" in cursor["description"]
    url = _resolve({"$ref": "#/components/schemas/WebhookCreate"})["properties"]["url"]
    assert url["pattern"] == URL_PATTERN
    tasks = _params(next(r for r in ROUTES if r.operation_id == "list_tasks"), "query")
    assert tasks["due_before"]["schema"] == {"type": "string", "format": "date-time"}
    summary = _params(next(r for r in ROUTES if r.operation_id == "analytics_summary"), "query")
    assert "366" in summary["from"]["description"]
    assert summary["from"]["schema"]["format"] == "date"
