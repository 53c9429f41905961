"""Due-soon reminders and the in-app feed against the real MongoDB test server, real Redis and a
real SMTP sink."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from typing import Any

import pytest
from bson import ObjectId

from core import notifications, tasks
from core.context import Context
from core.errors import Unavailable
from core.mail import Mailer, SmtpMailer
from core.notifications import NewNotification
from core.store import INDEXES, Doc, utcnow
from core.task_models import TaskCreate
from tests.conftest import SmtpSink
from tests.core.plans import scans


@pytest.fixture
def mailer(smtp: SmtpSink) -> SmtpMailer:
    return SmtpMailer(smtp.url)


async def make_user(ctx: Context, name: str, **prefs: Any) -> str:
    """A stored user (inserted directly: hashing a password is beside the point here)."""
    doc: Doc = {
        "_id": ObjectId(),
        "email": f"{name.lower()}@example.com",
        "name": name,
        "role": "user",
        "notification_prefs": {
            "email_welcome": True,
            "email_due_soon": True,
            "in_app": True,
            "due_soon_window_hours": 24,
            **prefs,
        },
        "created_at": utcnow(),
        "updated_at": utcnow(),
    }
    await ctx.store["users"].insert_one(doc)
    return str(doc["_id"])


async def make_task(
    ctx: Context, owner: str, title: str, due_in: timedelta | None, status: str = "todo"
) -> str:
    due = utcnow() + due_in if due_in is not None else None
    body = TaskCreate(title=title, due_at=due, status=status)  # type: ignore[arg-type]
    return str((await tasks.create(ctx, owner, body))["_id"])


@pytest.fixture
async def ann(ctx: Context) -> str:
    """Ann, a user with the default reminder window (24 h)."""
    return await make_user(ctx, "Ann")


async def feed(ctx: Context, user_id: str) -> list[Doc]:
    return await ctx.store["notifications"].find({"user_id": user_id}).sort("_id", 1).to_list()


def by_recipient(messages: list[Message]) -> dict[str, Message]:
    out = {str(m["To"]): m for m in messages}
    assert len(out) == len(messages), "more than one email to one recipient"
    return out


H = timedelta(hours=1)


async def test_reminds_tasks_within_each_owners_window(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    bob = await make_user(ctx, "Bob", due_soon_window_hours=2)
    soon = await make_task(ctx, ann, "Pay rent", 1 * H)
    later_today = await make_task(ctx, ann, "Call mum", 20 * H)
    await make_task(ctx, ann, "Next week", 30 * H)
    await make_task(ctx, ann, "Already late", -1 * H)
    await make_task(ctx, ann, "Finished", 1 * H, status="done")
    await make_task(ctx, ann, "Someday", None)
    bob_soon = await make_task(ctx, bob, "Ship it", 1 * H)
    await make_task(ctx, bob, "Outside Bob's window", 5 * H)

    assert await notifications.send_due_soon_reminders(ctx, mailer) == 3

    mails = by_recipient(smtp.messages)
    assert set(mails) == {"ann@example.com", "bob@example.com"}
    ann_mail = mails["ann@example.com"].get_payload()
    assert mails["ann@example.com"]["Subject"] == "2 tasks due soon"
    assert "Pay rent" in ann_mail and "Call mum" in ann_mail
    for absent in ("Next week", "Already late", "Finished", "Someday"):
        assert absent not in ann_mail
    assert mails["bob@example.com"]["Subject"] == "Due soon: Ship it"
    assert "Outside" not in mails["bob@example.com"].get_payload()

    assert {n["task_id"] for n in await feed(ctx, ann)} == {soon, later_today}
    [bob_note] = await feed(ctx, bob)
    assert (bob_note["task_id"], bob_note["kind"], bob_note["read_at"]) == (
        bob_soon,
        "due_soon",
        None,
    )
    assert bob_note["title"] == "Due soon: Ship it"


async def test_running_twice_reminds_once(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    await make_task(ctx, ann, "Pay rent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert len(smtp.messages) == 1
    assert len(await feed(ctx, ann)) == 1


async def test_only_new_tasks_are_listed_on_a_later_run(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    await make_task(ctx, ann, "First", 3 * H)
    await notifications.send_due_soon_reminders(ctx, mailer)
    await make_task(ctx, ann, "Second", 4 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    first, second = smtp.messages
    assert second["Subject"] == "Due soon: Second"
    assert "First" not in second.get_payload()
    assert first["Message-ID"] != second["Message-ID"]


async def test_changing_the_due_date_rearms_the_reminder(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    task_id = await make_task(ctx, ann, "Pay rent", 3 * H)
    await notifications.send_due_soon_reminders(ctx, mailer)
    await tasks.update(ctx, ann, task_id, {"due_at": utcnow() + 5 * H}, None)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert [m["Subject"] for m in smtp.messages] == ["Due soon: Pay rent"] * 2
    notes = await feed(ctx, ann)
    assert [n["task_id"] for n in notes] == [task_id, task_id]
    assert notes[0]["key"] != notes[1]["key"]


async def test_a_task_entering_the_window_later_is_reminded_then(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink
) -> None:
    ann = await make_user(ctx, "Ann", due_soon_window_hours=1)
    await make_task(ctx, ann, "Pay rent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert await notifications.send_due_soon_reminders(ctx, mailer, now=utcnow() + 2.5 * H) == 1
    assert [m["Subject"] for m in smtp.messages] == ["Due soon: Pay rent"]


async def test_done_tasks_are_skipped(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    task_id = await make_task(ctx, ann, "Pay rent", 3 * H)
    await tasks.update(ctx, ann, task_id, {"status": "done"}, None)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert smtp.messages == []
    assert await feed(ctx, ann) == []


async def test_email_off_gives_only_the_in_app_notification(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink
) -> None:
    ann = await make_user(ctx, "Ann", email_due_soon=False)
    task_id = await make_task(ctx, ann, "Pay rent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert smtp.messages == []
    assert [n["task_id"] for n in await feed(ctx, ann)] == [task_id]


async def test_in_app_off_gives_only_the_email(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink
) -> None:
    ann = await make_user(ctx, "Ann", in_app=False)
    await make_task(ctx, ann, "Pay rent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert [m["To"] for m in smtp.messages] == ["ann@example.com"]
    assert await feed(ctx, ann) == []


async def test_both_off_sends_nothing_and_a_later_opt_in_does_not_replay(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink
) -> None:
    ann = await make_user(ctx, "Ann", in_app=False, email_due_soon=False)
    await make_task(ctx, ann, "Pay rent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    await ctx.store["users"].update_one(
        {"_id": ObjectId(ann)},
        {"$set": {"notification_prefs.in_app": True, "notification_prefs.email_due_soon": True}},
    )
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert smtp.messages == []
    assert await feed(ctx, ann) == []


async def test_titles_with_line_breaks_make_a_valid_email(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    await make_task(ctx, ann, "Pay\nrent", 3 * H)
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert smtp.messages[0]["Subject"] == "Due soon: Pay rent"


class FailingFor(Mailer):
    """Delivers through ``inner`` except to ``bad`` recipients (like a refused address)."""

    def __init__(self, inner: Mailer, bad: set[str]):
        self.inner = inner
        self.bad = bad

    async def send(self, message: EmailMessage) -> None:
        if message["To"] in self.bad:
            raise ConnectionError("550 mailbox unavailable")
        await self.inner.send(message)


async def test_one_failing_email_does_not_hold_back_the_others(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    bob = await make_user(ctx, "Bob")
    await make_task(ctx, ann, "Pay rent", 3 * H)
    await make_task(ctx, bob, "Ship it", 3 * H)
    with pytest.raises(Unavailable):
        await notifications.send_due_soon_reminders(ctx, FailingFor(mailer, {"bob@example.com"}))
    assert [m["To"] for m in smtp.messages] == ["ann@example.com"]
    # The retry (the actor's) sends only what failed; Bob's feed entry is not duplicated.
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 1
    assert [m["To"] for m in smtp.messages] == ["ann@example.com", "bob@example.com"]
    assert len(await feed(ctx, bob)) == 1


async def test_reminders_of_deleted_accounts_are_dropped(
    ctx: Context, mailer: SmtpMailer, smtp: SmtpSink, ann: str
) -> None:
    await make_task(ctx, ann, "Pay rent", 3 * H)
    await ctx.store["users"].delete_one({"_id": ObjectId(ann)})
    assert await notifications.send_due_soon_reminders(ctx, mailer) == 0
    assert smtp.messages == []


async def test_the_due_soon_index_serves_the_candidate_scan(ctx: Context, ann: str) -> None:
    for i in range(1, 5):
        await make_task(ctx, ann, f"t{i}", i * H)
    await make_task(ctx, ann, "done", 1 * H, status="done")
    await make_task(ctx, ann, "late", -1 * H)
    # Explained with the index as a hint: the product sends the scan unhinted (SecantusDB
    # walks a hinted index whole), and SecantusDB's explain() of an unhinted query reports
    # COLLSCAN even where it answers through an index (see tests/core/test_task_indexes.py).
    hinted = notifications.candidate_cursor(ctx, utcnow()).hint(notifications.DUE_SOON_INDEX)
    ixscans, _ = await scans(hinted)
    assert [s["indexName"] for s in ixscans] == ["due_soon"]
    assert [ix.document["key"] for ix in INDEXES["tasks"] if ix.document["name"] == "due_soon"]
    assert len(await notifications.candidate_cursor(ctx, utcnow()).to_list()) == 4


async def test_concurrent_creates_of_one_key_make_one_notification(ctx: Context) -> None:
    item = NewNotification(user_id="u1", key="k", kind="welcome", title="Hi", body="Hello")
    created = await asyncio.gather(
        *(notifications.create_notifications(ctx, [item]) for _ in range(8))
    )
    assert sum(created) == 1
    assert await ctx.store["notifications"].count_documents({"user_id": "u1"}) == 1


async def test_welcome_notification_once_and_only_when_wanted(ctx: Context, ann: str) -> None:
    bob = await make_user(ctx, "Bob", in_app=False)
    assert await notifications.notify_welcome(ctx, ann) is True
    assert await notifications.notify_welcome(ctx, ann) is False
    assert await notifications.notify_welcome(ctx, bob) is False
    assert await notifications.notify_welcome(ctx, str(ObjectId())) is False
    [note] = await feed(ctx, ann)
    assert (note["kind"], note["title"]) == ("welcome", "Welcome to Task Manager")
    assert await feed(ctx, bob) == []


async def test_due_key_is_stable_across_time_zones() -> None:
    from datetime import UTC, timezone

    moment = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    other = moment.astimezone(timezone(timedelta(hours=5)))
    assert notifications.due_key("t", moment) == notifications.due_key("t", other)
    assert notifications.due_key("t", moment) == "due:t:2030-01-01T12:00:00.000Z"
