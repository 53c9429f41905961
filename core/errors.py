"""The one error hierarchy. The web layer maps these to problem+json (RFC 9457)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem with one input field (``field`` is a dotted path)."""

    field: str
    message: str


class AppError(Exception):
    """Base of every error we raise on purpose; ``status`` is the HTTP status it maps to."""

    status = 500
    title = "Internal Server Error"
    slug = "internal"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class Invalid(AppError):
    """Input that breaks a rule (422), with one entry per offending field."""

    status = 422
    title = "Unprocessable Content"
    slug = "validation"

    def __init__(self, detail: str, errors: list[FieldError] | None = None):
        super().__init__(detail)
        self.errors = errors or []


class BadRequest(AppError):
    """A request that cannot even be read (malformed JSON, bad encoding)."""

    status = 400
    title = "Bad Request"
    slug = "bad-request"


class Unauthorized(AppError):
    """Missing or invalid credentials (401)."""

    status = 401
    title = "Unauthorized"
    slug = "unauthorized"

    def __init__(
        self, detail: str = "Invalid or missing credentials", *, error: str = "invalid_token"
    ):
        super().__init__(
            detail,
            headers={"WWW-Authenticate": f'Bearer realm="taskmanager", error="{error}"'},
        )


class Forbidden(AppError):
    """Authenticated but not allowed (403)."""

    status = 403
    title = "Forbidden"
    slug = "forbidden"


class NotFound(AppError):
    """Absent, or not the caller's (404: existence is never revealed)."""

    status = 404
    title = "Not Found"
    slug = "not-found"


class Conflict(AppError):
    """The request clashes with current state (409)."""

    status = 409
    title = "Conflict"
    slug = "conflict"


class PreconditionFailed(AppError):
    """``If-Match`` did not match (412)."""

    status = 412
    title = "Precondition Failed"
    slug = "precondition-failed"


class PayloadTooLarge(AppError):
    """Body over the configured limit (413)."""

    status = 413
    title = "Content Too Large"
    slug = "too-large"


class RateLimited(AppError):
    """Too many requests (429) with ``Retry-After``."""

    status = 429
    title = "Too Many Requests"
    slug = "rate-limited"

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class Unavailable(AppError):
    """A dependency is down (503)."""

    status = 503
    title = "Service Unavailable"
    slug = "unavailable"


class Overloaded(AppError):
    """Too busy to take this request now (503) with ``Retry-After``: refused at once, so the
    work already admitted (and every other route) keeps its pace instead of queueing behind it."""

    status = 503
    title = "Service Unavailable"
    slug = "overloaded"

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class UnsupportedMediaType(AppError):
    """A body in a media type the operation does not take (415), e.g. no ``Content-Type``."""

    status = 415
    title = "Unsupported Media Type"
    slug = "unsupported-media-type"
