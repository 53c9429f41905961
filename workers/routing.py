"""Which actors each event feeds. The relay enqueues one message per (event, actor)."""

from __future__ import annotations

EVENT_ACTORS: dict[str, tuple[str, ...]] = {
    "user.registered": ("send_welcome_email",),
    "user.logged_in": ("refresh_user_cache",),
    "task.created": ("refresh_user_cache", "index_task", "fan_out_webhooks", "fold_analytics"),
    "task.updated": ("refresh_user_cache", "index_task", "fan_out_webhooks"),
    "task.completed": ("refresh_user_cache", "index_task", "fan_out_webhooks", "fold_analytics"),
    "task.deleted": ("refresh_user_cache", "index_task", "fan_out_webhooks", "fold_analytics"),
    "webhook.redelivery_requested": ("redeliver_webhook",),
}


def actors_for(event_type: str) -> tuple[str, ...]:
    """The actor names an event is delivered to (possibly none: activity-only events)."""
    return EVENT_ACTORS.get(event_type, ())
