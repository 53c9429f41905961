"""The one error hierarchy. The web layer maps these to problem+json (RFC 9457)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FieldError:
    """One problem with one input field (``field`` is a dotted path)."""

    field: str
    message: str


class AppError(Exception):
    """Base of every error we raise on purpose; ``status`` is the HTTP status it maps to, and
    ``title`` and ``slug`` name it in problem details. A subclass sets them as class keywords:
    ``class Gone(AppError, status=410, title="Gone", slug="gone")``."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"
    slug: ClassVar[str] = "internal"

    def __init_subclass__(
        cls, *, status: int | None = None, title: str | None = None, slug: str | None = None
    ) -> None:
        super().__init_subclass__()
        if status is not None:
            cls.status = status
        if title is not None:
            cls.title = title
        if slug is not None:
            cls.slug = slug

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class _RetryLater(AppError):
    """An error whose answer says when to try again (``Retry-After``, at least a second)."""

    def __init__(self, detail: str, retry_after: int = 1):
        self.retry_after = max(1, retry_after)
        super().__init__(detail, headers={"Retry-After": str(self.retry_after)})


class Invalid(AppError, status=422, title="Unprocessable Content", slug="validation"):
    """Input that breaks a rule (422), with one entry per offending field."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None):
        super().__init__(detail)
        self.errors = errors or []


class BadRequest(AppError, status=400, title="Bad Request", slug="bad-request"):
    """A request that cannot even be read (malformed JSON, bad encoding)."""


class Unauthorized(AppError, status=401, title="Unauthorized", slug="unauthorized"):
    """Missing or invalid credentials (401)."""

    def __init__(
        self, detail: str = "Invalid or missing credentials", *, error: str = "invalid_token"
    ):
        super().__init__(
            detail,
            headers={"WWW-Authenticate": f'Bearer realm="taskmanager", error="{error}"'},
        )


class Forbidden(AppError, status=403, title="Forbidden", slug="forbidden"):
    """Authenticated but not allowed (403)."""


class NotFound(AppError, status=404, title="Not Found", slug="not-found"):
    """Absent, or not the caller's (404: existence is never revealed)."""


class Conflict(AppError, status=409, title="Conflict", slug="conflict"):
    """The request clashes with current state (409)."""


class PreconditionFailed(
    AppError, status=412, title="Precondition Failed", slug="precondition-failed"
):
    """``If-Match`` did not match (412)."""


class PayloadTooLarge(AppError, status=413, title="Content Too Large", slug="too-large"):
    """Body over the configured limit (413)."""


class RateLimited(_RetryLater, status=429, title="Too Many Requests", slug="rate-limited"):
    """Too many requests (429) with ``Retry-After``."""


class Unavailable(AppError, status=503, title="Service Unavailable", slug="unavailable"):
    """A dependency is down (503)."""


class Overloaded(_RetryLater, status=503, title="Service Unavailable", slug="overloaded"):
    """Too busy to take this request now (503) with ``Retry-After``: refused at once, so the
    work already admitted (and every other route) keeps its pace instead of queueing behind it."""


class UnsupportedMediaType(
    AppError, status=415, title="Unsupported Media Type", slug="unsupported-media-type"
):
    """A body in a media type the operation does not take (415), e.g. no ``Content-Type``."""
