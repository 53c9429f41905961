"""Leader election over Redis: one scheduler replica fires jobs at a time.

The leader holds ``{prefix}scheduler:leader`` (value: its instance id, ``host:pid:random``)
with a TTL; renewal and release are compare-and-set Lua scripts, so a replica never extends or
deletes a lock it lost. A replica counts itself leader only until its last successful
acquisition or renewal plus the TTL (measured from before the call, on its own monotonic
clock), so it stops firing no later than the key expires in Redis. When the leader dies, the
key expires and the next replica to try takes over; a leader that stops releases the key, so
a follower takes over at its next try.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.logging import get_logger

log = get_logger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaderLock:
    """A renewable, self-expiring lock naming one instance as leader."""

    def __init__(self, redis: aioredis.Redis, key: str, *, ttl_ms: int = 6_000):
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.is_leader = False
        #: Monotonic time until which this instance's hold is certain.
        self.valid_until = 0.0

    @property
    def leads(self) -> bool:
        """Whether this instance holds the lock now (not merely at its last tick)."""
        return self.is_leader and time.monotonic() < self.valid_until

    async def tick(self) -> bool:
        """Acquire or renew; returns whether this instance leads now."""
        asked_at = time.monotonic()
        try:
            if self.is_leader:
                renewed = await self.redis.eval(_RENEW, 1, self.key, self.instance, self.ttl_ms)
                self.is_leader = bool(renewed)
                if not self.is_leader:
                    log.warning("scheduler.leadership_lost", instance=self.instance)
            if not self.is_leader:
                took = await self.redis.set(self.key, self.instance, nx=True, px=self.ttl_ms)
                if took:
                    log.info("scheduler.leadership_acquired", instance=self.instance)
                self.is_leader = bool(took)
        except RedisError:
            # Without Redis we cannot prove leadership: stop firing until it is back.
            if self.is_leader:
                log.warning("scheduler.leadership_unknown", instance=self.instance)
            self.is_leader = False
        self.valid_until = asked_at + self.ttl_ms / 1000 if self.is_leader else 0.0
        return self.is_leader

    async def release(self) -> None:
        """Give up leadership (on shutdown) so another replica takes over at once."""
        with contextlib.suppress(RedisError):
            await self.redis.eval(_RELEASE, 1, self.key, self.instance)
        self.is_leader = False
        self.valid_until = 0.0

    async def holder(self) -> str | None:
        """The instance currently leading, if any."""
        value = await self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
