"""Module the Dramatiq CLI loads in each worker process (``taskmanager worker``).

It builds this process's settings, logging, Sentry (before the broker, so the Dramatiq
integration is in place) and the broker with every actor declared.
"""

from __future__ import annotations

from config.connections import Connections
from config.logging import setup_logging
from config.sentry import setup_sentry
from config.settings import Settings
from workers.broker import build_broker

settings = Settings()
setup_logging(settings, process="worker")
setup_sentry(settings, process="worker")
platform = build_broker(Connections(settings))
broker = platform.broker
