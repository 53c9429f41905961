"""``taskmanager backup restore --at T --from primary`` with the local disk lost: a real
``taskmanager archiver`` process and ``backup create`` copy the full backup and the archive
segments to a bucket of a real S3 server on loopback (moto's server mode); the restore
downloads what T needs into a temporary folder and brings back, in a fresh database, exactly
the documents the test's ledger says the source held at T."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result
from pymongo import MongoClient

from cli.main import main
from config.settings import Settings
from tests.conftest import MotoServer
from tests.e2e.helpers import process_env, start

pytestmark = pytest.mark.timeout(120)

State = dict[int, dict[str, Any]]


@pytest.fixture
def env(
    cli_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    moto_server: MotoServer,
    aws_env: dict[str, str],
) -> dict[str, Any]:
    """The settings as environment variables; BACKUP_DIR in a temporary folder; the primary
    target a fresh bucket of the moto server."""
    bucket = moto_server.bucket()
    target = f"s3://{bucket}/tm?endpoint_url={moto_server.endpoint}"
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("BACKUP_TARGET", target)
    monkeypatch.delenv("BACKUP_OFFSITE_TARGET", raising=False)
    return {
        "dir": tmp_path / "backups",
        "target": target,
        "bucket": bucket,
        "endpoint": moto_server.endpoint,
        "aws": aws_env,
    }


@pytest.fixture
def db(settings: Settings) -> Iterator[Any]:
    """The test database, through a synchronous client."""
    with MongoClient(settings.mongodb_url, tz_aware=True) as client:
        yield client[settings.mongodb_db]


def invoke(*args: str) -> Result:
    """Run ``taskmanager backup ...`` as the console script would."""
    return CliRunner().invoke(main, ["backup", *args])


class Ledger:
    """Creates, updates and deletes on one collection, each acknowledged write recorded with
    the collection's whole state after it."""

    def __init__(self, coll: Any):
        self.coll = coll
        self.state: State = {}
        self.entries: list[tuple[datetime, State]] = []
        self.next_id = 0

    def step(self, i: int) -> None:
        """One write: mostly creates at first, then updates and deletes as well."""
        if i % 5 in (0, 1) or len(self.state) < 5:
            doc = {"_id": self.next_id, "n": 0, "title": f"task {self.next_id}"}
            self.coll.insert_one(doc)
            self.state[self.next_id] = dict(doc)
            self.next_id += 1
        elif i % 5 in (2, 3):
            key = sorted(self.state)[i % len(self.state)]
            self.coll.update_one({"_id": key}, {"$inc": {"n": 1}, "$set": {"step": i}})
            self.state[key] = {**self.state[key], "n": self.state[key]["n"] + 1, "step": i}
        else:
            key = sorted(self.state)[(i * 7) % len(self.state)]
            self.coll.delete_one({"_id": key})
            del self.state[key]
        self.entries.append((datetime.now(UTC), {k: dict(v) for k, v in self.state.items()}))

    def at(self, moment: datetime) -> State:
        """The collection as it was at ``moment``."""
        before = [s for t, s in self.entries if t <= moment]
        return before[-1] if before else {}


def test_restore_at_a_moment_from_the_s3_copy_alone(
    env: dict[str, Any], db: Any, settings: Settings
) -> None:
    coll = db["tasks_pitr"]
    ledger = Ledger(coll)
    for i in range(30):
        ledger.step(i)
    archiver = start(
        ["archiver"],
        process_env(
            settings,
            APP_ENV="test",
            LOG_FORMAT="console",
            BACKUP_DIR=str(env["dir"]),
            BACKUP_TARGET=env["target"],
            ARCHIVE_INTERVAL="1",
            ARCHIVER_METRICS_PORT="0",
            **env["aws"],
        ),
    )
    into = settings.mongodb_db + "_at_s3"
    try:
        time.sleep(2)
        created = invoke("create")
        assert created.exit_code == 0, created.output
        assert "target primary (s3://" in created.stdout and "up to date" in created.stdout
        backup_id = re.search(r"^backup (\S+):", created.stdout, re.M).group(1)  # type: ignore[union-attr]
        time.sleep(1.5)  # the restorable window opens a second after the backup's reads
        for i in range(30, 130):
            ledger.step(i)
            time.sleep(0.02)
        time.sleep(3.5)  # the archiver closes (and copies) segments covering the last write
        code, _killed = archiver.stop()
        assert code == 0, archiver.describe()
        # Whatever the archiver had not copied yet when it stopped.
        replicated = invoke("replicate")
        assert replicated.exit_code == 0, replicated.output

        keys = _keys(env)
        fulls = {k.split("/")[1] for k in keys if k.endswith("/manifest.json")}
        assert backup_id in fulls
        for full in fulls:
            assert f"tm/{full}/tasks_pitr.bson.gz" in keys
            assert f"tm/{full}/tasks_pitr.metadata.json.gz" in keys  # mongodump's, copied too
        assert any(k.startswith("tm/archive/") and k.endswith(".jsonl.gz") for k in keys)

        # The local disk is lost: only the S3 copy is left.
        shutil.rmtree(env["dir"])
        moment = ledger.entries[75][0] + timedelta(milliseconds=5)
        expected = ledger.at(moment)
        assert expected != ledger.state and expected != ledger.entries[29][1]
        restored = invoke(
            "restore", "--at", moment.isoformat(), "--from", "primary", "--into", into, "--yes"
        )
        assert restored.exit_code == 0, restored.output
        assert "downloading from target primary" in restored.stderr
        # The newest full backup before T: ours or the one the archiver took as it started
        # its chain (it takes one when it finds no archive), both copied to the bucket.
        chosen = re.search(r"full backup (\S+) plus \d+ events", restored.stderr)
        assert chosen and f"tm/{chosen.group(1)}/manifest.json" in keys, restored.stderr
        assert f"restored {into!r} to {moment.isoformat()}" in restored.stdout
        copy = db.client[into]
        assert {d["_id"]: d for d in copy["tasks_pitr"].find()} == expected
        assert not env["dir"].exists()  # nothing written back to BACKUP_DIR

        # A moment before the oldest full backup on the target is refused, naming it.
        early = ledger.entries[0][0] - timedelta(minutes=5)
        refused = invoke(
            "restore", "--at", early.isoformat(), "--from", "primary", "--into", into + "x", "--yes"
        )
        assert refused.exit_code == 1, refused.output
        assert "before the oldest full backup" in refused.output
        assert into + "x" not in db.client.list_database_names()
    finally:
        archiver.close()
        db.client.drop_database(into)
        db.client.drop_database(into + "x")


def _keys(env: dict[str, Any]) -> set[str]:
    """Every key in the test's bucket."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=env["endpoint"], region_name="us-east-1"
    )
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"])
        return {o["Key"] for page in pages for o in page.get("Contents", [])}
    finally:
        client.close()
