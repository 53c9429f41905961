"""The embedded server's connection string (cli/embedded.py)."""

from __future__ import annotations

from pymongo import AsyncMongoClient

from cli.embedded import EmbeddedMongo


async def test_embedded_url_turns_retryable_writes_off() -> None:
    # SecantusDB's bookkeeping of retryable writes makes every write slower once it holds
    # 10,000 of them (``python -m bench store``: 9-18x fewer writes/s past that); the
    # embedded URL opts out, and still connects directly to the single node.
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        EmbeddedMongo(port=27999).url, connect=False
    )
    try:
        assert client.options.retry_writes is False
        assert client.options.direct_connection is True
        assert client.options.retry_reads is True  # reads keep the driver's default
    finally:
        await client.close()
