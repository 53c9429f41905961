"""The busy view's arguments summary (workers/heartbeat.py): short, ids and types kept, nested
data elided, secret-looking values masked; and the process's memory reading."""

from __future__ import annotations

from workers.heartbeat import ARGS_SUMMARY_MAX, args_summary, rss_bytes


def test_an_event_shows_its_ids_and_type_not_its_data() -> None:
    event = {
        "id": "65a1b2c3d4e5f60718293a4b",
        "type": "task.created",
        "user_id": "u1",
        "data": {"title": "call the bank about my PIN", "notes": "1234"},
    }
    text = args_summary((event,), {})
    assert text == (
        '{id: "65a1b2c3d4e5f60718293a4b", type: "task.created", user_id: "u1", data: {\u2026}}'
    )
    assert "PIN" not in text


def test_secret_looking_values_are_masked_and_lists_counted() -> None:
    text = args_summary(
        ("d1", 3), {"token": "abc", "ids": [1, 2, 3], "opts": {"api_key": "k", "n": 1}}
    )
    assert text == '"d1", 3, token=***, ids=[3 items], opts={api_key: ***, n: 1}'
    assert "abc" not in text and '"k"' not in text


def test_long_arguments_are_cut() -> None:
    text = args_summary(tuple("x" * 30 for _ in range(20)), {})
    assert len(text) == ARGS_SUMMARY_MAX
    assert text.endswith("\u2026")
    value = args_summary(("y" * 100,), {})
    assert value == '"' + "y" * 38 + "\u2026"


def test_rss_is_read() -> None:
    rss = rss_bytes()
    assert rss is not None and rss > 10 * 2**20
