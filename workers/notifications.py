"""Notification actors: emails (welcome; due-soon reminders) and the in-app feed."""

from __future__ import annotations

from core import notifications
from workers.actors import DeclareOne, Event, bind_event
from workers.resources import WorkerResources

QUEUE = "notifications"


def declare(declare_one: DeclareOne, res: WorkerResources) -> None:
    """Declare this concern's actors."""

    async def send_welcome_email(event: Event) -> None:
        """Welcome a newly registered user in the feed and by email (each once)."""
        bind_event(event)
        ctx = await res.context()
        # The feed entry first: it cannot fail on SMTP, and a retry after a mail failure
        # finds it already there (deduped by key).
        await notifications.notify_welcome(ctx, event["user_id"])
        await notifications.send_welcome(ctx, res.mailer, event["user_id"])

    declare_one(QUEUE, send_welcome_email)
