"""Notification actors: the welcome (feed entry and email). Due-soon reminders are a
maintenance actor (workers/maintenance.py)."""

from __future__ import annotations

from core import notifications
from core.events import UserEvent
from workers.actors import ActorContext

QUEUE = "notifications"


async def send_welcome_email(ctx: ActorContext, event: UserEvent) -> None:
    """Welcome a newly registered user in the feed and by email (each once)."""
    # The feed entry first: it cannot fail on SMTP, and a retry after a mail failure finds it
    # already there (deduped by key).
    await notifications.notify_welcome(ctx, event.user_id)
    await notifications.send_welcome(ctx, ctx.mailer, event.user_id)
