"""Notifications: emails (welcome, due soon) and, later, the in-app feed.

Every send is keyed (``email_log._id``) so a message delivered twice by the broker sends once.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

from config.logging import get_logger
from core.accounts import get_user
from core.context import Context
from core.errors import NotFound
from core.mail import Mailer
from core.store import utcnow

log = get_logger(__name__)


def welcome_message(ctx: Context, *, to: str, name: str, user_id: str) -> EmailMessage:
    """The welcome email."""
    msg = EmailMessage()
    msg["From"] = ctx.settings.mail_from
    msg["To"] = to
    msg["Subject"] = "Welcome to Task Manager"
    # A stable Message-ID lets mail systems drop a duplicate if a retry ever resends it.
    msg["Message-ID"] = make_msgid(idstring=f"welcome.{user_id}", domain="taskmanager")
    msg.set_content(
        f"Hello {name},\n\nyour account is ready. Create your first task with "
        "POST /api/v1/tasks.\n\n-- Task Manager\n"
    )
    return msg


async def send_welcome(ctx: Context, mailer: Mailer, user_id: str) -> bool:
    """Send the welcome email once; returns whether it was sent now."""
    key = f"welcome:{user_id}"
    log_coll = ctx.store["email_log"]
    if await log_coll.find_one({"_id": key, "status": "sent"}) is not None:
        log.info("mail.duplicate_skipped", key=key)
        return False
    try:
        user = await get_user(ctx, user_id)
    except NotFound:
        log.info("mail.user_gone", user_id=user_id)
        return False
    if not user.get("notification_prefs", {}).get("email_welcome", True):
        return False
    await mailer.send(welcome_message(ctx, to=user["email"], name=user["name"], user_id=user_id))
    await log_coll.update_one(
        {"_id": key},
        {"$set": {"status": "sent", "user_id": user_id, "kind": "welcome", "sent_at": utcnow()}},
        upsert=True,
    )
    log.info("mail.sent", key=key, user_id=user_id)
    return True
