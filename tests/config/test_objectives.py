"""``QUEUE_LATENCY_OBJECTIVES``: parsed at start, refused with the bad item named; queues not
listed get ``default=`` or the documented default."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from config.settings import (
    DEFAULT_LATENCY_OBJECTIVE,
    DEFAULT_LATENCY_OBJECTIVES,
    parse_latency_objectives,
)


def test_the_default_names_every_queue_with_its_objective(make_settings: Any) -> None:
    settings = make_settings()
    assert settings.queue_latency_objectives == DEFAULT_LATENCY_OBJECTIVES
    assert settings.latency_objective("notifications") == 60.0
    assert settings.latency_objective("webhooks") == 300.0
    assert settings.latency_objective("maintenance") == 900.0
    assert settings.latency_objective("not-listed") == DEFAULT_LATENCY_OBJECTIVE == 300.0


def test_listed_queues_and_the_default_entry(make_settings: Any) -> None:
    settings = make_settings(queue_latency_objectives=" webhooks = 120 , default=45.5,")
    assert settings.latency_objective("webhooks") == 120.0
    assert settings.latency_objective("notifications") == 45.5
    assert parse_latency_objectives("") == {}
    assert make_settings(queue_latency_objectives="").latency_objective("x") == 300.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("webhooks", "item 'webhooks': expected queue=seconds (e.g. webhooks=300)"),
        ("=60", "item '=60': expected queue=seconds"),
        ("web hooks=60", "item 'web hooks=60': expected queue=seconds"),
        ("webhooks=soon", "item 'webhooks=soon': seconds must be a number above 0"),
        ("webhooks=0", "item 'webhooks=0': seconds must be a number above 0"),
        ("webhooks=-5", "item 'webhooks=-5': seconds must be a number above 0"),
        ("webhooks=nan", "item 'webhooks=nan': seconds must be a number above 0"),
        (
            "webhooks=1e9",
            "item 'webhooks=1e9': seconds must be a number above 0 and at most 604800",
        ),
        ("cache=60,cache=90", "item 'cache=90': queue 'cache' is given twice"),
    ],
)
def test_a_bad_value_is_refused_naming_the_item(
    make_settings: Any, value: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        make_settings(queue_latency_objectives=value)
    assert f"QUEUE_LATENCY_OBJECTIVES {message}" in str(caught.value)
