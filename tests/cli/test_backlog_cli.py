"""``taskmanager backlog``: the users with the most messages waiting per queue, read from
SecantusDB with no ``JWT_SECRET``; table and ``--json``."""

from __future__ import annotations

import json
from typing import Any

from pymongo import MongoClient

from config.settings import Settings
from core import events
from tests.cli.conftest import invoke


def test_backlog_lists_the_top_users_per_queue(ops_env: Settings) -> None:
    assert invoke("backlog").output.strip() == "nothing waiting"
    client: MongoClient[dict[str, Any]] = MongoClient(ops_env.mongodb_url)
    with client:
        client[ops_env.mongodb_db]["events"].insert_many(
            [
                events.new_event(
                    events.EventType.TASK_CREATED, user_id=user, subject_id="t", data={"task": {}}
                )
                for user in ["alice"] * 5 + ["bob"] * 2 + ["carol"]
            ]
            + [events.new_event(events.EventType.USER_REGISTERED, user_id="dave")]
        )
    result = invoke("backlog", "--json")
    assert result.exit_code == 0, result.output
    queues = json.loads(result.output)["queues"]
    assert [(r["user_id"], r["waiting"], r["outbox"]) for r in queues["search"]] == [
        ("alice", 5, 5),
        ("bob", 2, 2),
        ("carol", 1, 1),
    ]
    assert queues["notifications"] == [
        {"user_id": "dave", "waiting": 1, "outbox": 1, "in_broker": 0}
    ]

    result = invoke("backlog", "--queue", "search", "--limit", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["QUEUE", "USER", "WAITING", "OUTBOX", "IN", "BROKER"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["search", "alice", "5"],
        ["search", "bob", "2"],
    ]
