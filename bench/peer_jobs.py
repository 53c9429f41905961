"""The same job for three task queues (``bench/peers.py``): one Redis ``INCR`` per message.

Which framework this module sets up is chosen by ``PEER_FRAMEWORK`` in the environment, read
at import (each worker process imports only its own framework, so none pays for the others):

* ``dramatiq``: a plain ``RedisBroker`` and the ``incr`` actor (``dramatiq bench.peer_jobs``);
* ``celery``: a Celery app on the same Redis, results ignored
  (``celery -A bench.peer_jobs:celery_app worker``);
* ``rq``: nothing to declare; RQ imports :func:`rq_incr` by its dotted path.

The job, in every framework, is :func:`incr`: ``INCR`` of :data:`COUNTER` on ``PEER_REDIS_URL``
through a module-level client (a connection pool, safe across threads).
"""

from __future__ import annotations

import os
from typing import Any

import redis

#: The key every job increments; the benchmark polls it to time the drain.
COUNTER = "peer:count"
#: The queue (Dramatiq, Celery) or RQ queue name the benchmark sends to.
QUEUE = "peer"
FRAMEWORK = os.environ.get("PEER_FRAMEWORK", "")
URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/15")

_client = redis.Redis.from_url(URL)


def incr() -> None:
    """The job: one ``INCR``."""
    _client.incr(COUNTER)


def rq_incr() -> None:
    """The job as RQ calls it (by its dotted path ``bench.peer_jobs.rq_incr``)."""
    incr()


broker: Any = None
celery_app: Any = None
dramatiq_incr: Any = None
celery_incr: Any = None

if FRAMEWORK == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=URL)
    dramatiq.set_broker(broker)
    dramatiq_incr = dramatiq.actor(incr, actor_name="incr", queue_name=QUEUE, max_retries=0)
elif FRAMEWORK == "celery":
    from celery import Celery

    celery_app = Celery("peer", broker=URL)
    celery_app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    celery_incr = celery_app.task(name="incr")(incr)
