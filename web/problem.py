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
    """Turn pydantic's errors into ours, one ``{field, message}`` per problem, in the API's
    words (:func:`field_message`), never pydantic's or Python's."""
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        field = ".".join(loc) or where
        errors.append(FieldError(field=field, message=field_message(err)))
    return Invalid(f"The {where} is not valid", errors)


_TYPE_NAMES = {
    "string": "a string",
    "int": "an integer",
    "float": "a number",
    "decimal": "a number",
    "bool": "true or false",
    "list": "an array",
    "tuple": "an array",
    "set": "an array",
    "dict": "an object",
    "model": "an object",
    "model_attributes": "an object",
    "dataclass": "an object",
    "datetime": "a date-time such as 2025-01-31T09:00:00Z (RFC 3339)",
    "date": "a date such as 2025-01-31",
}
#: pydantic error type -> message; ``{name}`` takes the error's context.
_MESSAGES = {
    "missing": "Field required",
    "extra_forbidden": "Unknown field",
    "int_from_float": "Must be an integer",
    "int_parsing_size": "Number too large",
    "finite_number": "Must be a finite number",
    "greater_than": "Must be greater than {gt}",
    "greater_than_equal": "Must be at least {ge}",
    "less_than": "Must be less than {lt}",
    "less_than_equal": "Must be at most {le}",
    "multiple_of": "Must be a multiple of {multiple_of}",
    "string_too_short": "Must have at least {min_length} character(s)",
    "string_too_long": "Must have at most {max_length} characters",
    "string_pattern_mismatch": "Must match the pattern {pattern}",
    "too_short": "Must have at least {min_length} item(s)",
    "too_long": "Must have at most {max_length} items",
    "literal_error": "Must be one of {expected}",
    "enum": "Must be one of {expected}",
    "timezone_aware": "Must have a time zone offset (Z or +hh:mm)",
    "timezone_naive": "Must not have a time zone offset",
    "datetime_from_date_parsing": "Must be " + _TYPE_NAMES["datetime"],
    "date_from_datetime_inexact": "Must be a date without a time",
    "date_from_datetime_parsing": "Must be " + _TYPE_NAMES["date"],
    "json_invalid": "Not valid JSON",
    "json_type": "Not valid JSON",
    "union_tag_invalid": "Unknown kind",
    "frozen_field": "Cannot be changed",
    "is_instance_of": "Has the wrong type",
}
#: Prefixes pydantic puts before the message of a validator's own error.
_PREFIXES = ("Value error, ", "Assertion failed, ")


def field_message(err: Any) -> str:
    """One pydantic error (a dict of ``ValidationError.errors()``) as the API says it."""
    kind = str(err.get("type", ""))
    context = err.get("ctx") or {}
    template = _MESSAGES.get(kind)
    if template is not None:
        try:
            return template.format(**context)
        except (KeyError, IndexError):
            return template.split(" {", 1)[0]
    base, _, suffix = kind.rpartition("_")
    if suffix in ("type", "parsing") and base in _TYPE_NAMES:
        return f"Must be {_TYPE_NAMES[base]}"
    message = str(err.get("msg") or "Invalid value")
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            message = message.removeprefix(prefix)
            return message[:1].upper() + message[1:]
    return message
