"""Sentry set-up shared by web, worker and scheduler processes."""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.aiohttp import AioHttpIntegration
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

from config.settings import Settings

#: structlog's bookkeeping keys, not worth sending.
_NOISE = frozenset({"event", "exc_info", "exception", "timestamp", "level", "logger"})


def setup_sentry(settings: Settings, *, process: str) -> bool:
    """Initialise Sentry when ``SENTRY_DSN`` is set; returns whether it was initialised.

    Call it before the broker is built: the Dramatiq integration patches the broker class.
    """
    if not settings.sentry_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.app_env,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        # No PII is the default; `send_default_pii` itself is deprecated (a DeprecationWarning)
        # and its successor `data_collection` would switch off the default event scrubber.
        integrations=[AioHttpIntegration(), DramatiqIntegration(), LoggingIntegration()],
        before_send=_from_structlog,
        before_breadcrumb=_breadcrumb_from_structlog,
    )
    sentry_sdk.set_tag("process", process)
    return True


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
