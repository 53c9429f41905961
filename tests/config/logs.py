"""Capture what :func:`config.logging.setup_logging` writes, and undo it afterwards.

``setup_logging`` reconfigures process-wide state (structlog, the root logger, warnings);
tests that call it must restore all of it so later tests see the defaults again.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from config.logging import setup_logging
from config.settings import Settings

JsonLines = Callable[[], list[dict[str, Any]]]


@contextmanager
def captured_logs(settings: Settings, *, process: str = "test") -> Iterator[JsonLines]:
    """Set up logging as a process would, sending our handler's output to a buffer.

    Yields a function returning every line written so far, parsed as JSON: a line that is
    not JSON fails the test.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    quieted = ("aiohttp.access", "pymongo")
    saved_levels = {name: logging.getLogger(name).level for name in quieted}
    buffer = io.StringIO()
    setup_logging(settings, process=process)
    try:
        # Cached loggers would keep this configuration after structlog is reset.
        structlog.configure(cache_logger_on_first_use=False)
        [ours] = root.handlers
        assert isinstance(ours, logging.StreamHandler)
        ours.setStream(buffer)

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

        yield lines
    finally:
        structlog.reset_defaults()
        logging.captureWarnings(False)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
