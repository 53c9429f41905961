"""RFC 9457 problem details: the one error shape of the API."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import SkipJsonSchema

from core.errors import AppError, FieldError, Invalid

PROBLEM_TYPE = "application/problem+json"
_TYPE_BASE = "https://taskmanager.dev/problems/"


class ProblemField(BaseModel):
    """One field-level validation problem."""

    field: str
    message: str


class Problem(BaseModel):
    """An error response (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    # Never sent as null (rendered with exclude_none), so the document does not offer null.
    instance: str | SkipJsonSchema[None] = None
    request_id: str | SkipJsonSchema[None] = None
    errors: list[ProblemField] | SkipJsonSchema[None] = None


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    request_id: str | None = None,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Render one problem."""
    body = Problem(
        type=_TYPE_BASE + slug,
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        errors=[ProblemField(field=e.field, message=e.message) for e in errors] if errors else None,
    )
    return web.Response(
        status=status,
        body=body.model_dump_json(exclude_none=True),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


def from_app_error(exc: AppError, *, request_id: str | None, instance: str) -> web.Response:
    """Render one of our errors."""
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        slug=exc.slug,
        request_id=request_id,
        instance=instance,
        errors=exc.errors if isinstance(exc, Invalid) else None,
        headers=exc.headers,
    )


def invalid_from_pydantic(exc: ValidationError, *, where: str) -> Invalid:
    """Turn pydantic's errors into ours, one ``{field, message}`` per problem."""
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        field = ".".join(loc) or where
        errors.append(FieldError(field=field, message=_message(err)))
    return Invalid(f"The {where} is not valid", errors)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "Unknown field"
    if kind == "missing":
        return "Field required"
    return str(err.get("msg", "Invalid value"))
