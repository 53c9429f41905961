"""Sentry set-up shared by web, worker and scheduler processes.

Nothing a user typed as a secret may reach Sentry: events carry no local variables and no
request bodies, and every event, transaction and breadcrumb goes through :func:`scrub`, which
blanks the values of secret-looking keys (password, token, secret, authorization, cookie,
jwt, api key...) wherever they sit, and bearer tokens, JWTs and ``password=...`` pairs inside
any text (exception messages, log fields, URLs).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any

from config.settings import Settings

if TYPE_CHECKING:
    from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

#: structlog's bookkeeping keys, not worth sending.
_NOISE = frozenset({"event", "exc_info", "exception", "timestamp", "level", "logger"})


def setup_sentry(settings: Settings, *, process: str) -> bool:
    """Initialise Sentry when ``SENTRY_DSN`` is set; returns whether it was initialised.

    Call it before the broker is built: the Dramatiq integration patches the broker class.
    A process without a DSN never imports the SDK (with urllib3, 3.2 MB of a web process):
    code that reports goes through :func:`capture_exception` and :func:`tag_scope`.
    """
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.aiohttp import AioHttpIntegration
    from sentry_sdk.integrations.dramatiq import DramatiqIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.app_env,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        # No PII is the default; `send_default_pii` itself is deprecated (a DeprecationWarning)
        # and its successor `data_collection` would switch off the default event scrubber.
        # Frames' local variables hold request bodies and parsed models (passwords included);
        # request bodies are never attached either.
        include_local_variables=False,
        max_request_body_size="never",
        integrations=[AioHttpIntegration(), DramatiqIntegration(), LoggingIntegration()],
        before_send=_before_send,
        before_send_transaction=_before_send_transaction,
        before_breadcrumb=_before_breadcrumb,
    )
    sentry_sdk.set_tag("process", process)
    return True


def _active_sdk() -> Any:
    """``sentry_sdk`` when it is initialised in this process, else ``None``."""
    sdk = sys.modules.get("sentry_sdk")
    return sdk if sdk is not None and sdk.is_initialized() else None


def capture_exception(exc: BaseException) -> None:
    """Report ``exc`` to Sentry when it is set up here; nothing otherwise."""
    sdk = _active_sdk()
    if sdk is not None:
        sdk.capture_exception(exc)


def tag_scope(fields: dict[str, Any]) -> None:
    """When Sentry is set up here, tag the current scope's events with the non-empty
    ``fields``, ``user_id`` as the user; nothing otherwise."""
    sdk = _active_sdk()
    if sdk is None:
        return
    scope = sdk.get_current_scope()
    for key, value in fields.items():
        if value and key != "user_id":
            scope.set_tag(key, value)
    if fields.get("user_id"):
        scope.set_user({"id": fields["user_id"]})


FILTERED = "[Filtered]"

#: Keys whose values are secrets, wherever they appear (matched anywhere in the key).
_SECRET_KEY = re.compile(
    r"passw|pwd|secret|token|authoriz|cookie|jwt|api[-_]?key|credential|signature|private",
    re.IGNORECASE,
)
#: Secrets inside text: ``password=...`` / ``"token": "..."`` pairs, bearer and basic
#: credentials, JWTs, and the input values pydantic quotes in its error messages.
_TEXT_SECRETS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {FILTERED}"),
    (
        re.compile(
            r"""(?i)((?:passw\w*|pwd|secret\w*|\w*token|authorization|cookie|jwt\w*|api[-_]?key)"""
            r"""['"]?\s*[:=]\s*)(?:b?"[^"]*"|b?'[^']*'|[^\s,;&}'"]+)"""
        ),
        rf"\1'{FILTERED}'",
    ),
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), FILTERED),
    (re.compile(r"(input_value=)(?:'[^']*'|\"[^\"]*\"|\S+)"), rf"\1{FILTERED}"),
)


def scrub(value: Any) -> Any:
    """A copy of ``value`` (JSON-like data) with secrets blanked (see the module docstring)."""
    if isinstance(value, dict):
        return {
            key: FILTERED
            if isinstance(key, str) and _SECRET_KEY.search(key) and value[key] is not None
            else scrub(value[key])
            for key in value
        }
    if isinstance(value, (list, tuple)):
        return [scrub(item) for item in value]
    if isinstance(value, bytes):
        return scrub(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        for pattern, replacement in _TEXT_SECRETS:
            value = pattern.sub(replacement, value)
        return value
    return value


def _strip_request_and_frames(event: Any) -> Any:
    """Drop what must never be sent even scrubbed: request bodies, cookies, frame locals."""
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("data", "cookies"):
            request.pop(key, None)
    for exc in (event.get("exception") or {}).get("values") or []:
        for frame in (exc.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    for thread in (event.get("threads") or {}).get("values") or []:
        for frame in (thread.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    return event


def _before_send(event: Event, hint: Hint) -> Event | None:
    out: Event = scrub(_strip_request_and_frames(_from_structlog(event, hint)))
    return out


def _before_send_transaction(event: Event, hint: Hint) -> Event | None:
    out: Event = scrub(_strip_request_and_frames(event))
    return out


def _before_breadcrumb(crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb | None:
    out: Breadcrumb = scrub(_breadcrumb_from_structlog(crumb, hint))
    return out


def _structlog_fields(hint: Hint | BreadcrumbHint) -> dict[str, Any] | None:
    record = hint.get("log_record")
    if isinstance(record, logging.LogRecord) and isinstance(record.msg, dict):
        return record.msg
    return None


def _from_structlog(event: Event, hint: Hint) -> Event:
    """Events from structlog lines: the event name as message (the whole dict, timestamp
    included, would make every event unique and defeat grouping), fields as extra data and
    the request id as a searchable tag.

    Also drops the message body Sentry's Dramatiq integration attaches (task titles and
    descriptions of users): the actor, message id, request id and user id identify it.
    """
    dramatiq_context = event.get("contexts", {}).get("dramatiq")
    if isinstance(dramatiq_context, dict):
        dramatiq_context.pop("data", None)
    fields = _structlog_fields(hint)
    if fields is None:
        return event
    message = str(fields.get("event", ""))
    event["logentry"] = {"message": message, "formatted": message, "params": []}
    extra = event.setdefault("extra", {})
    extra.update({k: v for k, v in fields.items() if k not in _NOISE and not k.startswith("_")})
    if fields.get("request_id"):
        event.setdefault("tags", {})["request_id"] = str(fields["request_id"])
    return event


def _breadcrumb_from_structlog(crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb:
    """Breadcrumbs from structlog lines: the event name as message, fields as data."""
    fields = _structlog_fields(hint)
    if fields is not None:
        crumb["message"] = str(fields.get("event", ""))
        crumb["data"] = {
            k: v for k, v in fields.items() if k not in _NOISE and not k.startswith("_")
        }
    return crumb
