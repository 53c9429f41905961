"""Backup targets: where copies of ``BACKUP_DIR`` go (the copying and retention are
:mod:`core.backup_replication`).

``BACKUP_DIR`` (the *local* target) is the working copy: full backups (:mod:`core.backups`)
and archive segments (:mod:`core.archive`) are written there first, then copied to the remote
targets: ``BACKUP_TARGET`` (named *primary*) and ``BACKUP_OFFSITE_TARGET`` (*offsite*, the copy
in another region or with another provider). A target holds the layout of ``BACKUP_DIR``:
``<id>/<collection>.bson.gz`` and ``<id>/manifest.json``, ``archive/<chain>/<segment>``.
Targets are named by URL:

- ``s3://bucket/prefix?endpoint_url=http://host:9000&region=eu-west-1&keep=N``: any
  S3-compatible object store (AWS, MinIO, Ceph, R2, ...) through boto3; credentials come from
  boto3's usual sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``, an instance role), never from the URL, and are never logged;
- ``file:///path?keep=N``: a folder (another disk, an NFS mount), 0700/0600 like ``BACKUP_DIR``.

``keep=N``: the full backups that target keeps (default ``BACKUP_KEEP``). One object is
written whole or not at all: S3 ``PutObject`` and multipart uploads become visible only once
complete; a folder target writes aside and renames. Every method blocks: callers run them on a
thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from config.logging import get_logger
from config.settings import Settings
from core.backup_format import DIR_MODE, FILE_MODE, fsync_dir

log = get_logger(__name__)


class TargetError(Exception):
    """A target URL that cannot be used, or a target that does not hold what was asked."""


# -- Targets ---------------------------------------------------------------------------------


class Target(Protocol):
    """Where backups are copied. Every method blocks (run it on a thread)."""

    name: str
    keep: int | None

    def describe(self) -> str:
        """The target for messages: its URL without query or credentials."""

    def put(self, key: str, source: Path) -> None:
        """Store ``source`` as ``key``, visible whole or not at all."""

    def get(self, key: str, dest: Path) -> None:
        """Download ``key`` into ``dest`` (mode 0600); ``FileNotFoundError`` when absent."""

    def keys(self) -> dict[str, int]:
        """Every stored key with its size."""

    def delete(self, keys: Iterable[str]) -> None:
        """Remove ``keys`` (absent ones are ignored)."""

    def close(self) -> None:
        """Release connections (the target may be used again: they are made anew)."""


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TargetError(f"{key!r} is not a backup key")


class LocalTarget:
    """A folder holding the layout of ``BACKUP_DIR`` (owner-only, like it)."""

    def __init__(self, name: str, root: Path, keep: int | None = None):
        self.name = name
        self.root = root
        self.keep = keep

    def describe(self) -> str:
        """``file://`` and the folder."""
        return f"file://{self.root}"

    def close(self) -> None:
        """Nothing to release."""

    def put(self, key: str, source: Path) -> None:
        """Copy aside (``.part``), fsync, rename into place, fsync the folder."""
        _check_key(key)
        dest = self.root / key
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        folder = self.root
        for part in key.split("/")[:-1]:
            folder = folder / part
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(dest.parent)

    def get(self, key: str, dest: Path) -> None:
        """Copy ``key`` to ``dest``."""
        _check_key(key)
        _copy_private(self.root / key, dest)

    def keys(self) -> dict[str, int]:
        """Files under the folder (``.part``/``.tmp`` leftovers excluded)."""
        found: dict[str, int] = {}
        if not self.root.is_dir():
            return found
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith((".part", ".tmp")):
                    continue
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    found[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return found

    def delete(self, keys: Iterable[str]) -> None:
        """Unlink each file, then folders left empty."""
        parents = set()
        for key in keys:
            _check_key(key)
            path = self.root / key
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if parent != self.root:
                    parent.rmdir()


def _copy_private(source: Path, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)


class S3Target:
    """A bucket (and key prefix) of an S3-compatible object store, through boto3."""

    def __init__(
        self,
        name: str,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        keep: int | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 4,
    ):
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.keep = keep
        self._config = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
        }
        self._client: Any = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        """``s3://bucket/prefix`` (and the endpoint's host when not AWS's)."""
        where = f"s3://{self.bucket}/{self.prefix}"
        if self.endpoint_url:
            host = urlsplit(self.endpoint_url).netloc.rpartition("@")[2]
            where += f" at {host}"
        return where

    @property
    def client(self) -> Any:
        """The boto3 S3 client (made on first use; boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=Config(**self._config),
                )
            return self._client

    def close(self) -> None:
        """Close the client's connection pool."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def put(self, key: str, source: Path) -> None:
        """``upload_file``: one PUT, or a multipart upload visible only once completed."""
        _check_key(key)
        self.client.upload_file(str(source), self.bucket, self.prefix + key)

    def get(self, key: str, dest: Path) -> None:
        """``download_file`` into ``dest`` (0600)."""
        from botocore.exceptions import ClientError

        _check_key(key)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out:
                self.client.download_fileobj(self.bucket, self.prefix + key, out)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.describe()}{key}") from exc
            raise

    def keys(self) -> dict[str, int]:
        """``ListObjectsV2`` under the prefix, every page."""
        found: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                found[str(obj["Key"])[len(self.prefix) :]] = int(obj["Size"])
        return found

    def delete(self, keys: Iterable[str]) -> None:
        """``DeleteObjects``, 1,000 keys a call, in the order given."""
        batch = [{"Key": self.prefix + k} for k in keys]
        for i in range(0, len(batch), 1000):
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch[i : i + 1000], "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise OSError(f"delete refused for {first.get('Key')}: {first.get('Code')}")


def parse_target(name: str, url: str) -> Target:
    """The target a URL names (``s3://`` or ``file://``); :class:`TargetError` otherwise."""
    parts = urlsplit(url.strip())
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"endpoint_url", "region", "keep"}
    if unknown:
        raise TargetError(f"{name} target: unknown option(s) {', '.join(sorted(unknown))}")
    keep = None
    if "keep" in query:
        if not query["keep"].isdigit() or int(query["keep"]) < 1:
            raise TargetError(f"{name} target: keep must be a whole number of at least 1")
        keep = int(query["keep"])
    if "@" in parts.netloc:
        raise TargetError(
            f"{name} target: no credentials in the URL; use AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise TargetError(f"{name} target: a folder is file:///absolute/path")
        return LocalTarget(name, Path(unquote(parts.path)), keep)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise TargetError(f"{name} target: s3://bucket/prefix names no bucket")
        return S3Target(
            name,
            parts.netloc,
            unquote(parts.path),
            endpoint_url=query.get("endpoint_url"),
            region=query.get("region"),
            keep=keep,
        )
    raise TargetError(f"{name} target: {parts.scheme or 'no'}:// is not s3:// or file://")


def remote_targets(settings: Settings) -> list[Target]:
    """The configured remote targets: ``primary`` (``BACKUP_TARGET``), then ``offsite``."""
    out = []
    for name, url in (
        ("primary", settings.backup_target),
        ("offsite", settings.backup_offsite_target),
    ):
        if url:
            out.append(parse_target(name, url))
    return out


def local_target(settings: Settings) -> LocalTarget:
    """``BACKUP_DIR``, the working copy, as a target."""
    return LocalTarget("local", Path(settings.backup_dir), settings.backup_keep)


def find_target(settings: Settings, name: str) -> Target:
    """A target by name (``local``, ``primary``, ``offsite``) or by URL."""
    if name == "local":
        return local_target(settings)
    for target in remote_targets(settings):
        if target.name == name:
            return target
    if "://" in name:
        return parse_target("given", name)
    known = ", ".join(["local", *(t.name for t in remote_targets(settings))])
    raise TargetError(f"no backup target {name!r} (configured: {known})")
