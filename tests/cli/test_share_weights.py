"""``taskmanager share-weights [set|unset]``: the fair-share weights of FAIR_SHARE_WEIGHTS and
those stored in SecantusDB, with no ``JWT_SECRET``; table and ``--json``; bad keys, bad
weights and unknown keys exit 1."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pymongo import MongoClient

from config.settings import Settings
from core import fairness
from tests.cli.conftest import invoke


def _stored(settings: Settings) -> dict[str, Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_url)
    with client:
        docs = client[settings.mongodb_db][fairness.WEIGHTS].find({})
        return {d["_id"]: d for d in docs}


def test_set_list_and_unset(ops_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIR_SHARE_WINDOW", "10")
    monkeypatch.setenv("FAIR_SHARE_WEIGHTS", "alice=4,role:admin=2")

    result = invoke("share-weights", "set", "bob", "3")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "bob: weight 3 (window 30)"
    result = invoke("share-weights", "set", "alice", "7")
    assert result.exit_code == 0, result.output
    stored = _stored(ops_env)
    assert {k: (d["weight"], d["updated_by"]) for k, d in stored.items()} == {
        "alice": (7, "cli"),
        "bob": (3, "cli"),
    }

    result = invoke("share-weights")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("KEY")
    assert lines[0].split()[1:4] == ["WEIGHT", "WINDOW", "SOURCE"]
    assert "UPDATED AT" in lines[0] and lines[0].endswith("UPDATED BY")
    rows = [line.split() for line in lines[1:]]
    assert [r[:4] for r in rows] == [
        ["alice", "7", "70", "admin"],
        ["bob", "3", "30", "admin"],
        ["role:admin", "2", "20", "settings"],
    ]
    assert rows[0][4].endswith("Z") and rows[0][5] == "cli"
    assert rows[2][4:] == ["-", "-"]

    result = invoke("share-weights", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert (listed["window"], listed["fair_share"]) == (10, True)
    assert [(i["key"], i["weight"], i["source"], i["window"]) for i in listed["items"]] == [
        ("alice", 7, "admin", 70),
        ("bob", 3, "admin", 30),
        ("role:admin", 2, "settings", 20),
    ]
    assert listed["items"][2]["updated_at"] is None

    result = invoke("share-weights", "unset", "alice")
    assert result.exit_code == 0, result.output
    assert set(_stored(ops_env)) == {"bob"}
    listed = json.loads(invoke("share-weights", "--json").output)
    assert listed["items"][0] == {
        "key": "alice",
        "weight": 4,
        "source": "settings",
        "window": 40,
        "updated_at": None,
        "updated_by": None,
    }


def test_nothing_set(ops_env: Settings) -> None:
    result = invoke("share-weights")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no weights: every user has weight 1 (window 32)"


def test_errors_exit_1(ops_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIR_SHARE_WEIGHTS", "alice=4")
    for args, message in (
        (("set", "a.b", "2"), "'a.b' is not a weight key"),
        (("set", "role:Admin", "2"), "is not a weight key"),
        (("set", "bob", "0"), "from 1 to 1000"),
        (("set", "bob", "1001"), "from 1 to 1000"),
        (("set", "bob", "two"), "from 1 to 1000"),
        (("unset", "bob"), "No weight is stored for 'bob'"),
        (("unset", "alice"), "FAIR_SHARE_WEIGHTS"),
    ):
        result = invoke("share-weights", *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
    assert _stored(ops_env) == {}
