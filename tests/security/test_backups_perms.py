"""Backups (issue 7): they hold password hashes and emails, so only their owner may read
them; and a crafted manifest can never make a verify or a restore read outside the backup."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import bson
import pytest

from config.settings import Settings
from core import backups, restore
from core.context import Context


@pytest.fixture
def settings(make_settings: Any, tmp_path: Path) -> Settings:
    """The test settings, with ``BACKUP_DIR`` in a temporary directory (conftest's ``ctx``
    is built over them)."""
    settings: Settings = make_settings(backup_dir=str(tmp_path / "backups"))
    return settings


async def test_backup_files_are_owner_only(ctx: Context) -> None:
    await ctx.store["users"].insert_one({"email": "ann@example.com", "password_hash": "$argon"})
    old = os.umask(0o022)  # the usual umask: what the code does not restrict stays readable
    try:
        result = await backups.create(ctx)
    finally:
        os.umask(old)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o700
    files = list(result.path.iterdir())
    assert any(f.name == "manifest.json" for f in files) and len(files) > 1
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


def _outside_file(path: Path) -> dict[str, Any]:
    """A well-formed collection file outside the backup, and a manifest entry describing it."""
    raw = bson.encode({"_id": "planted", "email": "mallory@example.com", "role": "admin"})
    path.write_bytes(gzip.compress(raw))
    data = path.read_bytes()
    return {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "documents": 1,
        "read": "plain",
        "options": {},
        "indexes": [],
    }


@pytest.mark.parametrize("spelling", ["absolute", "dotdot", "subdir"])
async def test_restore_refuses_file_names_leaving_the_backup(
    ctx: Context, tmp_path: Path, spelling: str
) -> None:
    await ctx.store["tasks"].insert_one({"title": "kept"})
    result = await backups.create(ctx)
    outside = tmp_path / "planted.bson.gz"
    entry = _outside_file(outside)
    name = {
        "absolute": str(outside),
        "dotdot": os.path.relpath(outside, result.path),
        "subdir": "sub/planted.bson.gz",
    }[spelling]
    if spelling == "subdir":
        (result.path / "sub").mkdir()
        (result.path / "sub" / "planted.bson.gz").write_bytes(outside.read_bytes())
    manifest_path = result.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["collections"]["users"] = {**entry, "file": name}
    manifest_path.write_text(json.dumps(manifest))

    report = restore.verify(result.path)
    assert not report.ok
    assert any("not a file of this backup" in p for p in report.problems), report.problems
    with pytest.raises(restore.CorruptBackup):
        await restore.restore(ctx, result.id, drop=True)
    assert await ctx.store["users"].count_documents({"_id": "planted"}) == 0
    assert await ctx.store["tasks"].count_documents({}) == 1  # nothing was dropped


async def test_verify_refuses_a_manifest_naming_a_system_collection(ctx: Context) -> None:
    result = await backups.create(ctx)
    manifest_path = result.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["collections"]["system.users"] = next(iter(manifest["collections"].values()))
    manifest_path.write_text(json.dumps(manifest))
    problems = restore.verify(result.path).problems
    assert any(p.startswith("system.users:") for p in problems), problems
