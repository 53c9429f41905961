"""The catalogue: every actor with its queue and options, the actors each event type feeds, and
the actor each scheduled job runs.

The relay sends one message per (event, actor) of :attr:`Catalogue.routes`; the scheduler
(``jobs/schedule.py``) and ``POST /admin/backups`` name their actor through
:attr:`Catalogue.schedule`. :func:`workers.actors.declare_actors` checks the catalogue when a
broker is built: an event type without a route, or a routed or scheduled name that is not a
declared actor, stops start-up with a message naming it. Steps to add an event type or an
actor: docs/DESIGN.md.
"""

from __future__ import annotations

from core.events import EventType
from workers import analytics, cache, maintenance, notifications, search, webhooks
from workers.actors import PERMANENT, ActorSpec, Catalogue

_MAINTENANCE = {"max_retries": 3, "time_limit": maintenance.TIME_LIMIT_MS}

CATALOGUE = Catalogue(
    actors=(
        ActorSpec(notifications.send_welcome_email, notifications.QUEUE),
        ActorSpec(cache.refresh_user_cache, cache.QUEUE, {"max_retries": 3}),
        ActorSpec(search.index_task, search.QUEUE),
        ActorSpec(webhooks.fan_out_webhooks, webhooks.QUEUE),
        ActorSpec(
            webhooks.deliver_webhook,
            webhooks.QUEUE,
            {
                "throws": (*PERMANENT, webhooks.DeliveryRefused),
                "on_retry_exhausted": "webhook_delivery_exhausted",
            },
            configure=webhooks.retry_options,
        ),
        ActorSpec(webhooks.webhook_delivery_exhausted, webhooks.QUEUE),
        ActorSpec(webhooks.redeliver_webhook, webhooks.QUEUE),
        ActorSpec(maintenance.send_due_soon_reminders, maintenance.QUEUE, _MAINTENANCE),
        ActorSpec(maintenance.rollup_analytics, maintenance.QUEUE, _MAINTENANCE),
        ActorSpec(
            maintenance.run_backup,
            maintenance.QUEUE,
            {**_MAINTENANCE, "time_limit": maintenance.BACKUP_TIME_LIMIT_MS},
        ),
        ActorSpec(analytics.fold_analytics, analytics.QUEUE),
    ),
    routes={
        EventType.USER_REGISTERED: ("send_welcome_email",),
        EventType.USER_LOGGED_IN: ("refresh_user_cache",),
        EventType.TASK_CREATED: (
            "refresh_user_cache",
            "index_task",
            "fan_out_webhooks",
            "fold_analytics",
        ),
        EventType.TASK_UPDATED: ("refresh_user_cache", "index_task", "fan_out_webhooks"),
        EventType.TASK_COMPLETED: (
            "refresh_user_cache",
            "index_task",
            "fan_out_webhooks",
            "fold_analytics",
        ),
        EventType.TASK_DELETED: (
            "refresh_user_cache",
            "index_task",
            "fan_out_webhooks",
            "fold_analytics",
        ),
        EventType.WEBHOOK_REDELIVERY_REQUESTED: ("redeliver_webhook",),
    },
    schedule={
        "due-soon-reminders": "send_due_soon_reminders",
        "analytics-rollup": "rollup_analytics",
        "backup": "run_backup",
    },
)
