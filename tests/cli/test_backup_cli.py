"""``taskmanager backup``: the console commands, configured from the environment like in
production, against the test database and a temporary BACKUP_DIR."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from click.testing import CliRunner, Result
from pymongo import MongoClient

from cli.main import main
from config.settings import Settings


@pytest.fixture
def env(cli_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The settings as environment variables (``cli_env``), ``BACKUP_DIR`` in a temporary
    directory."""
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    return tmp_path / "backups"


@pytest.fixture
def db(settings: Settings) -> Iterator[Any]:
    """The test database, through a synchronous client."""
    with MongoClient(settings.mongodb_url, tz_aware=True) as client:
        yield client[settings.mongodb_db]


def invoke(*args: str, stdin: str | None = None) -> Result:
    """Run ``taskmanager backup ...`` as the console script would."""
    return CliRunner().invoke(main, ["backup", *args], input=stdin)


def test_create_list_verify_restore(env: Path, db: Any) -> None:
    tasks = [{"_id": ObjectId(), "title": f"t{i}", "n": i} for i in range(1500)]
    db["tasks"].insert_many(tasks)
    db["users"].insert_one({"_id": ObjectId(), "email": "a@example.com"})

    created = invoke("create")
    assert created.exit_code == 0, created.output
    match = re.search(r"^backup (\S+): 1501 documents in 2 collections", created.stdout, re.M)
    assert match, created.stdout
    backup_id = match.group(1)
    assert f"path {env / backup_id}" in created.stdout
    assert "1500/1500" in created.stderr  # the progress bar, on stderr

    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(backup_id)]
    assert row.split()[1] == "succeeded" and "complete" in row.split()

    verified = invoke("verify", backup_id)
    assert verified.exit_code == 0, verified.output
    assert f"backup {backup_id}: ok (1501 documents in 2 collections)" in verified.stdout

    db["tasks"].delete_many({"n": {"$lt": 1000}})
    db["tasks"].insert_one({"title": "after the backup"})
    refused = invoke("restore", backup_id, "--yes")
    assert refused.exit_code == 1
    assert "holds data" in refused.output and "--drop" in refused.output
    assert db["tasks"].count_documents({}) == 501  # untouched

    declined = invoke("restore", backup_id, "--drop", stdin="n\n")
    assert declined.exit_code == 1
    assert "DELETES 502 documents in 2 collections" in declined.stderr
    assert db["tasks"].count_documents({}) == 501

    restored = invoke("restore", backup_id, "--drop", "--yes")
    assert restored.exit_code == 0, restored.output
    assert "restored 1501 documents into 2 collections" in restored.stdout
    assert "docs/s" in restored.stdout
    assert list(db["tasks"].find().sort("_id", 1)) == tasks
    assert "email_unique" in db["users"].index_information()


def test_verify_fails_on_a_damaged_backup(env: Path, db: Any) -> None:
    db["tasks"].insert_many([{"title": f"t{i}"} for i in range(50)])
    created = invoke("create")
    assert created.exit_code == 0, created.output
    backup_id = created.stdout.split()[1].rstrip(":")
    tasks_file = env / backup_id / "tasks.bson.gz"
    data = bytearray(tasks_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tasks_file.write_bytes(bytes(data))

    verified = invoke("verify", backup_id)
    assert verified.exit_code == 1
    assert "problem: tasks: sha256 differs from the manifest" in verified.stderr
    restored = invoke("restore", backup_id, "--drop", "--yes")
    assert restored.exit_code == 1 and "failed verification" in restored.output
    assert db["tasks"].count_documents({}) == 50

    unknown = invoke("verify", "nope")
    assert unknown.exit_code == 1 and "No backup 'nope'" in unknown.output


def test_verify_reports_a_corrupt_deflate_stream_naming_the_file(env: Path, db: Any) -> None:
    """A file whose deflate data is garbage raises zlib.error (no OSError) while reading:
    the report names the collection and its file, no traceback, exit 1."""
    db["tasks"].insert_many([{"title": f"t{i}"} for i in range(50)])
    created = invoke("create")
    assert created.exit_code == 0, created.output
    backup_id = created.stdout.split()[1].rstrip(":")
    tasks_file = env / backup_id / "tasks.bson.gz"
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    tasks_file.write_bytes(gzip_header + b"\xff" * 200)

    verified = invoke("verify", backup_id)
    assert verified.exit_code == 1, verified.output
    assert isinstance(verified.exception, SystemExit), verified.exception
    assert "Traceback" not in verified.output
    problems = [line for line in verified.stderr.splitlines() if line.startswith("problem: ")]
    assert any(
        p.startswith("problem: tasks: unreadable") and "tasks.bson.gz" in p for p in problems
    ), problems
    assert f"backup {backup_id}: " in verified.stdout and "problem(s)" in verified.stdout


def test_list_shows_the_restorable_window(env: Path, db: Any) -> None:
    from datetime import timedelta

    from core import archive

    db["tasks"].insert_one({"title": "t"})
    created = invoke("create")
    assert created.exit_code == 0, created.output
    backup_id = re.search(r"^backup (\S+):", created.stdout, re.M).group(1)  # type: ignore[union-attr]
    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    assert "restorable window: none" in listed.stdout

    # An archive chain from before the backup to 30 s after its reads ended.
    [full] = archive.full_backups(Settings(backup_dir=str(env)))
    chain = env / "archive" / "20200101T000000Z-abcdef"
    chain.mkdir(parents=True)
    end = (full.consistent[0] + 30, 0)
    writer = archive.SegmentWriter(chain, chain.name, 1, (full.start[0] - 60, 0), None)
    writer.close(end, {"_data": "t"}, archive.ct_moment(end))
    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    start = archive.ct_moment(full.consistent) + timedelta(seconds=1)
    assert (
        f"restorable window: {start.isoformat(timespec='seconds')} to "
        f"{archive.ct_moment(end).isoformat(timespec='seconds')} (full backup {backup_id}, "
        f"archive chain {chain.name})"
    ) in listed.stdout
