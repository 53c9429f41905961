"""Sentry set-up shared by web, worker and scheduler processes."""

from __future__ import annotations

import sentry_sdk
from sentry_sdk.integrations.aiohttp import AioHttpIntegration
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.integrations.logging import LoggingIntegration

from config.settings import Settings


def setup_sentry(settings: Settings, *, process: str) -> bool:
    """Initialise Sentry when ``SENTRY_DSN`` is set; returns whether it was initialised.

    Call it before the broker is built: the Dramatiq integration patches the broker class.
    """
    if not settings.sentry_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.app_env,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        send_default_pii=False,
        integrations=[AioHttpIntegration(), DramatiqIntegration(), LoggingIntegration()],
    )
    sentry_sdk.set_tag("process", process)
    return True
