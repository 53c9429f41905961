"""The embedded server's write rate as writes accumulate, with PyMongo's retryable writes on
and off, side by side (``python -m bench store``).

Why the embedded URL (``cli/embedded.py``) turns retryable writes off: SecantusDB keeps the
reply of every retryable write for 30 minutes (so that a driver's retry replays it rather than
applying the write twice) and, on each retryable write, walks all it keeps, then, above 10,000
records, sorts them all to drop the oldest, under its one global lock. A server that has taken
10,000 writes in half an hour (about a minute of the pipeline at 20 writes/s) spends
milliseconds on that bookkeeping per write, for every client. This benchmark shows it: two
fresh servers, one written to with retryable writes (PyMongo's default) and one without, the
same writes (an ``update_one`` by ``_id`` and an ``insert_one``, in turns) sent to each in
interleaved blocks, each block's rate printed as the writes accumulate.

On a single-node server on loopback a retryable write buys little: the driver retries once
after a network error or a primary stepping down, and the embedded server has no other member
to step up (a dropped connection means the process died; the retry would fail as well).
Writes to a real MongoDB (``MONGODB_URL``) keep the driver's default.

A second table shows why nothing of ours sends findAndModify (``core.store.update_then_read``):
SecantusDB runs it as a scan of the whole collection, so its cost grows with the collection,
while the same update by ``_id`` followed by a read of the document stays flat. Both are timed
on one fresh server, in turns, as the collection grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pymongo
from pymongo import AsyncMongoClient

from bench.procs import cpu_model, publish, write_json
from cli.embedded import EmbeddedMongo
from core.store import update_then_read

RESULTS = Path(__file__).resolve().parent / "results"
#: Documents updated by ``_id`` (the inserts go to a collection of their own).
DOCS = 2_000
#: Collection sizes at which findAndModify and its replacement are timed (``--fam-sizes``).
SIZES = "1000,3000,10000"


@dataclass
class Variant:
    """One server and the client that writes to it."""

    label: str
    retry_writes: bool
    server: EmbeddedMongo
    client: AsyncMongoClient[dict[str, object]] | None = None
    rates: list[float] = field(default_factory=list)
    written: int = 0

    async def connect(self) -> None:
        """Connect (with or without retryable writes) and store the documents to update."""
        self.client = AsyncMongoClient(
            f"mongodb://127.0.0.1:{self.server.port}/?directConnection=true",
            retryWrites=self.retry_writes,
        )
        await self.client.bench.docs.insert_many([{"_id": i, "n": 0} for i in range(DOCS)])

    async def block(self, writes: int) -> None:
        """``writes`` writes, one at a time; the block's rate is kept."""
        assert self.client is not None
        db = self.client.bench
        began = time.perf_counter()
        for i in range(writes):
            if i % 2:
                await db.log.insert_one({"i": i, "text": "x" * 200})
            else:
                await db.docs.update_one({"_id": (self.written + i) % DOCS}, {"$inc": {"n": 1}})
        self.rates.append(writes / (time.perf_counter() - began))
        self.written += writes


async def measure(writes: int, block: int) -> list[Variant]:
    """Both variants, in interleaved blocks of ``block`` writes until each did ``writes``."""
    variants: list[Variant] = []
    try:
        # Started inside the try: a second server that fails to start stops the first.
        for label, retry_writes in (
            ("retryable writes (PyMongo's default)", True),
            ("retryWrites=false (the embedded URL)", False),
        ):
            variants.append(Variant(label, retry_writes, EmbeddedMongo(":memory:").start()))
            await variants[-1].connect()
        for turn in range(writes // block):
            # ABBA, so neither always goes first.
            for variant in variants if turn % 2 == 0 else variants[::-1]:
                await variant.block(block)
    finally:
        for variant in variants:
            if variant.client is not None:
                await variant.client.close()
            variant.server.stop()
    return variants


async def find_and_modify(ops: int, sizes: list[int]) -> list[tuple[int, float, float]]:
    """Per size in ``sizes`` (rising): ms per findAndModify by ``_id`` and per
    :func:`update_then_read` of the same update, ``ops`` of each in turns (ABBA)."""
    server = EmbeddedMongo(":memory:").start()
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(server.url)
    rows: list[tuple[int, float, float]] = []
    try:
        coll = client.bench.leases
        stored = 0
        for size in sizes:
            await coll.insert_many([{"_id": i, "n": 0} for i in range(stored, size)])
            stored = size
            spent = {"fam": 0.0, "two": 0.0}
            for i in range(ops):
                key = i * 7919 % size  # spread over the collection
                for way in ("fam", "two") if i % 2 == 0 else ("two", "fam"):
                    began = time.perf_counter()
                    if way == "fam":
                        await coll.find_one_and_update(
                            {"_id": key},
                            {"$inc": {"n": 1}},
                            return_document=pymongo.ReturnDocument.AFTER,
                        )
                    else:
                        await update_then_read(coll, {"_id": key}, {"$inc": {"n": 1}})
                    spent[way] += time.perf_counter() - began
            rows.append((size, 1000 * spent["fam"] / ops, 1000 * spent["two"] / ops))
    finally:
        await client.close()
        server.stop()
    return rows


def report_fam(rows: list[tuple[int, float, float]], ops: int) -> str:
    """The second table: findAndModify against an update and a read, by collection size."""
    lines = [
        f"  findAndModify by _id against update_one by _id + find_one by _id ({ops} of each "
        "per size, in turns, one fresh server):",
        f"  {'documents':>14}  {'findAndModify ms':>18}  {'update + read ms':>19}  ratio",
    ]
    for size, fam, two in rows:
        lines.append(f"  {size:>14,}  {fam:>18.2f}  {two:>19.2f}  {fam / two:5.1f}x")
    return "\n".join(lines) + "\n"


def report(variants: list[Variant], block: int, took: float) -> str:
    """The rates by block, side by side, and the last block's ratio."""
    on, off = variants
    lines = [
        "Embedded store benchmark (python -m bench store): measured in one run",
        f"  when      {datetime.now(UTC).isoformat(timespec='seconds')}, {took:.0f} s in all",
        f"  machine   {cpu_model()}, {platform.system()}, Python {platform.python_version()}, "
        f"PyMongo {pymongo.version}",
        "  load      one client per server, one write at a time: update_one by _id and "
        f"insert_one in turns; blocks of {block} writes, the servers in turns (ABBA)",
        "",
        f"  {'writes so far':>14}  {'retryable writes/s':>18}  {'retryWrites=false/s':>19}  ratio",
    ]
    for i, (a, b) in enumerate(zip(on.rates, off.rates, strict=True)):
        lines.append(f"  {(i + 1) * block:>14,}  {a:>18,.0f}  {b:>19,.0f}  {b / a:5.1f}x")
    lines += [
        "",
        f"  last block: {off.label} {off.rates[-1]:,.0f} writes/s, "
        f"{on.label} {on.rates[-1]:,.0f} writes/s ({off.rates[-1] / on.rates[-1]:.1f}x)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m bench store [--writes N] [--block N]``."""
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__)
    parser.add_argument("--writes", type=int, default=16_000, help="writes to each server")
    parser.add_argument("--block", type=int, default=2_000, help="writes per timed block")
    parser.add_argument("--fam-ops", type=int, default=200, help="findAndModify ops per size")
    parser.add_argument("--fam-sizes", default=SIZES, help="collection sizes, rising")
    parser.add_argument("--out", default=str(RESULTS / "store-latest.txt"), help="'-': none")
    parser.add_argument("--json", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.writes < args.block or args.block < 1:
        parser.error("--writes must be at least --block, and --block at least 1")
    try:
        sizes = [int(n) for n in args.fam_sizes.split(",")]
    except ValueError:
        parser.error(f"--fam-sizes: not a list of numbers: {args.fam_sizes!r}")
    if not sizes or sizes != sorted(sizes) or sizes[0] < 1:
        parser.error("--fam-sizes must be rising positive numbers, e.g. 1000,3000,10000")
    began = time.monotonic()
    variants = asyncio.run(measure(args.writes, args.block))
    fam = asyncio.run(find_and_modify(args.fam_ops, sizes)) if args.fam_ops > 0 else []
    out = None if args.out == "-" else Path(args.out)
    text = report(variants, args.block, time.monotonic() - began)
    publish(text + (report_fam(fam, args.fam_ops) if fam else ""), out)
    if args.json:
        results = {
            "block": args.block,
            "variants": [
                {
                    "label": v.label,
                    "retry_writes": v.retry_writes,
                    "writes": v.written,
                    "rates": [round(r, 1) for r in v.rates],
                }
                for v in variants
            ],
            "find_and_modify": [
                {
                    "documents": size,
                    "find_and_modify_ms": round(a, 3),
                    "update_read_ms": round(b, 3),
                }
                for size, a, b in fam
            ],
        }
        write_json(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0
