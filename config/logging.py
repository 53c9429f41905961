"""Structured logging: JSON lines (or console) for our code and every library.

Request and message ids live in ``structlog.contextvars`` so every line logged while handling
a request or a message carries them, including lines from libraries using stdlib logging.
"""

from __future__ import annotations

import logging
import sys
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
        _add_process(process),
    ]
    renderer: Any
    if settings.log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Access lines are emitted by our own middleware with the request id; pymongo is chatty.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def _add_process(process: str) -> Any:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("process", process)
        return event

    return processor


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger; bound context (request id, user id) is added automatically."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
