"""Structured logging: JSON lines (or console) for our code and every library.

Request and message ids live in ``structlog.contextvars`` so every line logged while handling
a request or a message carries them, including lines from libraries using stdlib logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from config.settings import Settings


def setup_logging(settings: Settings, *, process: str) -> None:
    """Configure structlog and stdlib logging once for a process (idempotent)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process,
    ]
    _PROCESS["name"] = process
    # Exceptions are rendered by the formatter, not before: the stdlib record must still carry
    # exc_info when it reaches other handlers (Sentry's logging integration reads it there).
    render: list[Any]
    if settings.log_format == "json":
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Plain tracebacks, never with local variables (structlog's Rich formatter prints every
        # frame's locals: passwords and request bodies in the log). Rich is held out of
        # structlog's imports anyway (config/__init__.py).
        render = [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]

    structlog.configure(
        # Level first: an event below LOG_LEVEL (the access line at WARNING) costs no more
        # processing (measured: 9 % of a cached read's CPU went to dropped access lines).
        processors=[structlog.stdlib.filter_by_level, *shared, _wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Access lines are emitted by our own middleware with the request id; pymongo is chatty.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)
    # Library warnings (e.g. PyJWT's key-length warning) become log lines, not raw stderr text.
    logging.captureWarnings(True)


def _wrap_for_formatter(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``ProcessorFormatter.wrap_for_formatter`` that also hands ``exc_info`` to the stdlib
    record (structlog keeps it inside the event dict only)."""
    exc_info = _exc_info(event_dict.get("exc_info"))
    if exc_info is not None:
        event_dict["exc_info"] = exc_info
    args, extra = structlog.stdlib.ProcessorFormatter.wrap_for_formatter(logger, name, event_dict)
    kwargs: dict[str, Any] = dict(extra)
    if exc_info is not None:
        kwargs["exc_info"] = exc_info
    return args, kwargs


def _exc_info(value: Any) -> tuple[type[BaseException], BaseException, Any] | None:
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and value[0] is not None:
        return value
    if value is True:
        current = sys.exc_info()
        if current[0] is not None:
            return current
    return None


#: The process name stamped on every line. Read at log time, not captured at configure time:
#: loggers cache their processor chain on first use, and a later set-up (tests build several
#: processes in one interpreter) must still name the process right.
_PROCESS = {"name": "unknown"}


def _add_process(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("process", _PROCESS["name"])
    return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger; bound context (request id, user id) is added automatically."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
