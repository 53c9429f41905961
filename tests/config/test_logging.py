"""config.logging: JSON lines, bound context, exceptions and warnings."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import structlog

from config.logging import get_logger
from tests.config.logs import captured_logs


class _Records(logging.Handler):
    """Keeps the stdlib records, as any other handler (Sentry's) would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_lines_are_json_with_bound_context(make_settings: Any) -> None:
    with captured_logs(make_settings(log_format="json"), process="unit") as lines:
        structlog.contextvars.bind_contextvars(request_id="r-1")
        try:
            get_logger("unit").info("thing.done", count=3)
            logging.getLogger("some.library").warning("plain %s", "stdlib")
        finally:
            structlog.contextvars.clear_contextvars()
        ours, library = lines()
    assert ours["event"] == "thing.done"
    assert ours["count"] == 3
    assert ours["level"] == "info"
    assert ours["logger"] == "unit"
    assert ours["process"] == "unit"
    assert ours["timestamp"].endswith("Z")
    # Lines from libraries using stdlib logging get the same shape and context.
    assert library["event"] == "plain stdlib"
    assert library["logger"] == "some.library"
    assert library["request_id"] == "r-1"


def test_exceptions_are_rendered_and_kept_on_the_record(make_settings: Any) -> None:
    records = _Records()
    with captured_logs(make_settings(log_format="json")) as lines:
        logging.getLogger().addHandler(records)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            get_logger("unit").exception("went.wrong")
        [line] = lines()
    assert line["event"] == "went.wrong"
    assert line["level"] == "error"
    assert "ZeroDivisionError" in line["exception"]
    assert "exc_info" not in line
    # Other handlers get the exception itself, not just text inside the message.
    [record] = records.records
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError


def test_console_format_renders_exceptions_too(make_settings: Any) -> None:
    records = _Records()
    with captured_logs(make_settings(log_format="console")):
        root = logging.getLogger()
        root.addHandler(records)
        try:
            raise KeyError("missing")
        except KeyError:
            get_logger("unit").exception("went.wrong")
        text = root.handlers[0].format(records.records[0])
    assert "went.wrong" in text
    assert "KeyError" in text


def test_library_warnings_become_log_lines(make_settings: Any) -> None:
    with captured_logs(make_settings(log_format="json")) as lines:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old thing is deprecated", DeprecationWarning, stacklevel=1)
        [line] = lines()
    assert line["logger"] == "py.warnings"
    assert "old thing is deprecated" in line["event"]
