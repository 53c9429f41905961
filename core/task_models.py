"""Tasks' request and response models: the bodies and queries the API accepts for tasks, the
shapes it answers with, and the constrained types and validators they share.

The operations on tasks live in :mod:`core.tasks`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from core.pagination import Page, PageQuery

Status = Literal["todo", "in_progress", "done"]
Priority = Literal["low", "medium", "high", "urgent"]
Sort = Literal[
    "created_at",
    "-created_at",
    "due_at",
    "-due_at",
    "priority",
    "-priority",
    "updated_at",
    "-updated_at",
]
MAX_BULK = 500

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(max_length=10_000)]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]
Tags = Annotated[list[Tag], Field(max_length=20)]


#: RFC 3339 ``date-time`` (what the document's ``format: date-time`` means): seconds and an
#: offset required. Pydantic alone would also take ``0.5`` (a Unix time) or a space for ``T``.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _rfc3339(value: object) -> object:
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.fullmatch(value)):
        return value
    raise ValueError("Must be a date-time such as 2025-01-31T09:00:00Z (RFC 3339)")


#: A moment with its offset, written as RFC 3339 says. Lax inside strict models: the check
#: above hands pydantic a Python string, which strict mode would refuse as a datetime.
Moment = Annotated[AwareDatetime, Strict(False), BeforeValidator(_rfc3339)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _unique_tags(tags: list[str] | None) -> list[str] | None:
    return list(dict.fromkeys(tags)) if tags is not None else None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00+01:00: a 422, not a 500
        raise ValueError("Date is out of range once converted to UTC") from exc


def _utc_ms(value: datetime | None) -> datetime | None:
    value = _utc(value)
    if value is None:
        return None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class TaskCreate(_Strict):
    """``POST /tasks`` body."""

    title: Title
    description: Description = ""
    status: Status = "todo"
    priority: Priority = "medium"
    due_at: Moment | None = None
    tags: Tags = []

    _tags = field_validator("tags")(_unique_tags)
    _due = field_validator("due_at")(_utc_ms)


class TaskUpdate(_Strict):
    """``PATCH /tasks/{id}`` body: any subset; ``null`` clears ``description`` and ``due_at``."""

    # SkipJsonSchema: the document must not offer null where the validator below refuses it.
    title: Title | SkipJsonSchema[None] = None
    description: Description | None = None
    status: Status | SkipJsonSchema[None] = None
    priority: Priority | SkipJsonSchema[None] = None
    due_at: Moment | None = None
    tags: Tags | SkipJsonSchema[None] = None

    _tags = field_validator("tags")(_unique_tags)
    _due = field_validator("due_at")(_utc_ms)

    @model_validator(mode="after")
    def _no_null_required(self) -> TaskUpdate:
        for name in ("title", "status", "priority", "tags"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, ``description: null`` meaning empty."""
        out = {name: getattr(self, name) for name in self.model_fields_set}
        if "description" in out and out["description"] is None:
            out["description"] = ""
        return out


class BulkSet(_Strict):
    """Fields a bulk change may set (none may be null)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    status: Status | SkipJsonSchema[None] = None
    priority: Priority | SkipJsonSchema[None] = None
    tags: Tags | SkipJsonSchema[None] = None

    _tags = field_validator("tags")(_unique_tags)

    @model_validator(mode="after")
    def _no_null(self) -> BulkSet:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class BulkRequest(_Strict):
    """``POST /tasks/bulk`` body: ``set`` some fields, or ``delete``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["set"],
                    "properties": {"set": {"type": "object"}, "delete": {"const": False}},
                },
                {
                    "required": ["delete"],
                    "properties": {"set": {"type": "null"}, "delete": {"const": True}},
                },
            ]
        }
    )

    ids: Annotated[
        list[Annotated[str, StringConstraints(max_length=64)]],
        Field(min_length=1, max_length=MAX_BULK),
    ]
    set: BulkSet | None = None
    delete: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> BulkRequest:
        if self.delete == (self.set is not None):
            raise ValueError("give exactly one of 'set' or 'delete: true'")
        if self.set is not None and not self.set.model_fields_set:
            raise ValueError("'set' needs at least one field")
        return self


class TaskFilters(BaseModel):
    """Which tasks a list shows, and in which order."""

    status: Status | None = None
    priority: Priority | None = None
    tag: Tag | None = None
    due_before: Moment | None = None
    due_after: Moment | None = None
    overdue: bool | None = None
    sort: Sort = "-created_at"

    _due = field_validator("due_before", "due_after")(_utc)


# PageQuery first: its config (unknown names refused) and fields apply, listed after the
# filters' (pydantic orders fields from the last base to the first).
class TaskQuery(PageQuery, TaskFilters):
    """``GET /tasks`` query (strings from the URL, so lax types; unknown names refused)."""


class TaskPublic(BaseModel):
    """A task as the API shows it."""

    id: str
    title: str
    description: str
    status: Status
    priority: Priority
    due_at: datetime | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(Page[TaskPublic]):
    """One page of tasks."""


class BulkResult(BaseModel):
    """What happened to one id of a bulk request."""

    id: str
    result: Literal["updated", "unchanged", "deleted", "not_found"]


class BulkResponse(BaseModel):
    """Per-id results, in request order."""

    results: list[BulkResult]


class ActivityItem(BaseModel):
    """One event in a task's history."""

    id: str
    type: str
    actor_id: str | None
    data: dict[str, Any]
    created_at: datetime


class ActivityPage(Page[ActivityItem]):
    """A page of a task's history, newest first."""


class Stats(BaseModel):
    """Counts over the caller's tasks."""

    total: int
    by_status: dict[str, int]
    by_priority: dict[str, int]
    overdue: int
    due_today: int
