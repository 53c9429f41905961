"""``taskmanager backup`` with remote targets (a real moto S3 server on loopback): ``create``
reports the copies, ``list`` says which target holds each backup and which one is failing,
``replicate`` catches up, ``restore --from`` restores from the S3 copy alone."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from click.testing import CliRunner, Result
from pymongo import MongoClient

from cli.main import main
from config.settings import Settings
from tests.conftest import MotoServer


@pytest.fixture
def env(
    cli_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    moto_server: MotoServer,
    aws_env: dict[str, str],
) -> dict[str, Any]:
    """The settings as environment variables; BACKUP_DIR in a temporary folder; the primary
    target a bucket of the moto server; the off-site one a server that is down."""
    offsite = MotoServer()
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv(
        "BACKUP_TARGET", f"s3://{moto_server.bucket()}/tm?endpoint_url={moto_server.endpoint}"
    )
    monkeypatch.setenv(
        "BACKUP_OFFSITE_TARGET", f"s3://tm-offsite/tm?endpoint_url={offsite.endpoint}"
    )
    return {"dir": tmp_path / "backups", "offsite": offsite, "aws": aws_env}


@pytest.fixture
def db(settings: Settings) -> Iterator[Any]:
    """The test database, through a synchronous client."""
    with MongoClient(settings.mongodb_url, tz_aware=True) as client:
        yield client[settings.mongodb_db]


def invoke(*args: str) -> Result:
    """Run ``taskmanager backup ...`` as the console script would."""
    return CliRunner().invoke(main, ["backup", *args])


def test_targets_from_the_command_line(env: dict[str, Any], db: Any, settings: Settings) -> None:
    tasks = [{"_id": ObjectId(), "title": f"t{i}"} for i in range(300)]
    db["tasks"].insert_many(tasks)

    created = invoke("create")
    assert created.exit_code == 0, created.output
    backup_id = re.search(r"^backup (\S+):", created.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert "target primary (s3://" in created.stdout and "up to date" in created.stdout
    assert "target offsite (s3://tm-offsite/tm/" in created.stderr
    assert "replication FAILED" in created.stderr
    assert env["aws"]["AWS_SECRET_ACCESS_KEY"] not in created.output

    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(backup_id)]
    assert row.split()[-1] == "local,primary"
    assert "target primary: 1 full backup(s), 0 segment(s)" in listed.stdout
    offsite_line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("target offsite"))
    assert "unreachable now" in offsite_line and "LAST REPLICATION FAILED" in offsite_line
    as_json = json.loads(invoke("list", "--json").stdout)
    assert as_json[0]["targets"] == ["local", "primary"]

    # The off-site region comes back: `replicate` catches up.
    env["offsite"].start()
    try:
        env["offsite"].bucket("tm-offsite")
        replicated = invoke("replicate")
        assert replicated.exit_code == 0, replicated.output
        assert (
            "target offsite" in replicated.stdout
            and "uploaded 1 full backup(s)" in replicated.stdout
        )
        listed = invoke("list", "--json")
        assert json.loads(listed.stdout)[0]["targets"] == ["local", "primary", "offsite"]
    finally:
        env["offsite"].stop()

    # The local disk is lost: restore from the S3 copy alone.
    shutil.rmtree(env["dir"])
    into = settings.mongodb_db + "_from_s3"
    try:
        restored = invoke("restore", backup_id, "--from", "primary", "--database", into, "--yes")
        assert restored.exit_code == 0, restored.output
        assert "downloading from target primary" in restored.stderr
        assert "restored 300 documents" in restored.stdout
        copy = db.client[into]
        assert list(copy["tasks"].find().sort("_id", 1)) == sorted(tasks, key=lambda t: t["_id"])
        missing = invoke("restore", "20200101T000000Z-abcdef", "--from", "primary", "--yes")
        assert missing.exit_code == 1 and "holds no complete backup" in missing.output
        unknown = invoke("verify", backup_id, "--from", "elsewhere")
        assert unknown.exit_code == 1 and "no backup target 'elsewhere'" in unknown.output
        verified = invoke("verify", backup_id, "--from", "primary")
        assert verified.exit_code == 0, verified.output
    finally:
        db.client.drop_database(into)
