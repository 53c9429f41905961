"""Dead-letter notes: why a message died, recorded by worker middleware when it is
dead-lettered, and read back when the dead-letter queue is listed (:mod:`workers.queue_admin`).
"""

from __future__ import annotations

import json
import traceback
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name, xq_name

from config.connections import Connections
from config.sentry import capture_exception
from workers.actors import EXPECTED

# KEYS: dead zset, dead hash; ARGV: id, body. Only while the letter is still there, so a purge
# or replay racing the worker's note does not leave an orphan body behind.
_NOTE_LUA = """
if redis.call("zscore", KEYS[1], ARGV[1]) then
    redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
    return 1
end
return 0
"""


def error_summary(exc: BaseException | None, tb: str | None) -> str | None:
    """``Type: message`` of a failure, from the exception or the last line of a traceback."""
    if exc is not None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    elif tb:
        lines = [line for line in tb.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    else:
        return None
    return text[:500]


def note_key(prefix: str, message_id: str) -> str:
    """Why a message died, for brokers whose dead letters cannot be rewritten (RabbitMQ)."""
    return f"{prefix}deadnote:{message_id}"


#: RabbitMQ keeps dead letters this long (Dramatiq's ``x-message-ttl`` on the ``.XQ`` queue).
NOTE_TTL_SECONDS = 7 * 86400


class DeadLetterNotes(dramatiq.Middleware):
    """Records why a message died.

    Dramatiq dead-letters the body as it was enqueued, which says nothing about the failure
    that killed it. On Redis this rewrites the dead letter with ``dead_letter_error`` and
    ``traceback``; on RabbitMQ (whose queues cannot be rewritten) it stores them beside, in
    Redis under ``{prefix}deadnote:<message id>`` for as long as RabbitMQ keeps the letter.
    """

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self._scripts: dict[int, Any] = {}
        self._notes: Any = None

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.broker.MessageProxy) -> None:
        """Annotate the dead letter just written by ``nack``."""
        exc: BaseException | None = getattr(message, "_exception", None)
        tb = message.options.get("traceback")
        if tb is None and exc is not None:
            tb = "".join(traceback.format_exception(exc, limit=30))
        note = {"dead_letter_error": error_summary(exc, tb), "traceback": tb}
        if exc is not None and not isinstance(exc, EXPECTED):
            # A malformed message or a bug: Sentry's integration skips `throws`, so say it here.
            capture_exception(exc)
        try:
            if isinstance(broker, RedisBroker):
                self._rewrite(broker, message, note)
            else:
                if self._notes is None:
                    self._notes = self.connections.redis_sync()
                key = note_key(self.connections.settings.redis_prefix, message.message_id)
                self._notes.set(key, json.dumps(note), ex=NOTE_TTL_SECONDS)
        except redis.RedisError:
            # The letter is dead either way; only its explanation is missing.
            return

    def _rewrite(
        self, broker: RedisBroker, message: dramatiq.broker.MessageProxy, note: dict[str, Any]
    ) -> None:
        rid = message.options.get("redis_message_id")
        if rid is None:
            return
        annotated = message.copy(options=note)
        script = self._scripts.get(id(broker))
        if script is None:
            script = self._scripts[id(broker)] = broker.client.register_script(_NOTE_LUA)
        xq = f"{broker.namespace}:{xq_name(q_name(message.queue_name))}"
        script(keys=[xq, f"{xq}.msgs"], args=[rid, annotated.encode()])
