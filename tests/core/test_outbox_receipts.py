"""The sweeper's rule (core/events.py, receipts): which awaited messages are sent again, when,
and that receipts landing in any order or racing a sweep never lose one."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from core import events
from core.events import Expected
from core.store import utcnow

BOUND = timedelta(seconds=60)


def test_overdue_is_unfinished_and_past_due() -> None:
    now = utcnow()
    doc = {
        "awaiting": {
            "index_task": {"actor": "index_task", "due": now - timedelta(seconds=1)},
            "fold_analytics": {"actor": "fold_analytics", "due": now},
            "fan_out_webhooks": {"actor": "fan_out_webhooks", "due": now + timedelta(seconds=1)},
            "refresh_user_cache": {"actor": "refresh_user_cache", "due": now - BOUND},
        },
        "finished": ["refresh_user_cache"],
    }
    assert sorted(events.overdue(doc, now)) == ["fold_analytics", "index_task"]


def test_a_retrying_message_is_due_after_its_eta_plus_the_bound() -> None:
    now = utcnow()
    eta = now + timedelta(hours=1)  # webhook backoff: the message comes back in an hour
    doc = {"awaiting": {"deliver_webhook:m1": {"actor": "deliver_webhook", "due": eta + BOUND}}}
    for later in (now, now + BOUND * 2, eta, eta + BOUND - timedelta(seconds=1)):
        assert events.overdue(doc, later) == []
        plan = events.sweep_plan(doc, later, BOUND)
        assert plan.resend == []
        assert plan.update["$set"] == {"recheck_at": eta + BOUND}
    assert events.overdue(doc, eta + BOUND) == ["deliver_webhook:m1"]


def test_sweep_plan_resends_overdue_with_doubling_and_rechecks_at_the_earliest_due() -> None:
    now = utcnow()
    doc = {
        "awaiting": {
            "index_task": {"actor": "index_task", "due": now},
            "deliver_webhook:m1": {
                "actor": "deliver_webhook",
                "due": now - timedelta(seconds=5),
                "message": "{...}",
                "retries": 3,
                "resends": 2,
            },
            "fold_analytics": {"actor": "fold_analytics", "due": now + timedelta(seconds=30)},
            "fan_out_webhooks": {"actor": "fan_out_webhooks", "due": now - BOUND},
        },
        "finished": ["fan_out_webhooks"],
        "receipts_rev": 7,
    }
    plan = events.sweep_plan(doc, now, BOUND)
    by_key = {r.key: r for r in plan.resend}
    assert set(by_key) == {"index_task", "deliver_webhook:m1"}
    assert by_key["index_task"].message is None and by_key["index_task"].resends == 1
    follow_up = by_key["deliver_webhook:m1"]
    assert (follow_up.actor, follow_up.message, follow_up.retries, follow_up.resends) == (
        "deliver_webhook",
        "{...}",
        3,
        3,
    )
    sets = plan.update["$set"]
    assert sets["awaiting.index_task.due"] == now + BOUND
    assert sets["awaiting.deliver_webhook:m1.due"] == now + BOUND * 4  # third resend
    assert sets["recheck_at"] == now + timedelta(seconds=30)  # fold_analytics comes first
    assert plan.update["$inc"] == {"receipts_rev": 1}


def test_resend_backoff_is_capped() -> None:
    now = utcnow()
    assert events.resend_due(now, BOUND, 1) == now + BOUND
    assert events.resend_due(now, BOUND, 2) == now + 2 * BOUND
    cap = BOUND * 2**events.MAX_DOUBLINGS
    assert events.resend_due(now, BOUND, 50) == now + cap


def test_everything_finished_cleans_up() -> None:
    now = utcnow()
    doc = {
        "awaiting": {"index_task": {"actor": "index_task", "due": now - BOUND}},
        "finished": ["index_task", "fold_analytics"],
    }
    plan = events.sweep_plan(doc, now, BOUND)
    assert plan.resend == []
    assert plan.update == {
        "$unset": {"awaiting": "", "recheck_at": ""},
        "$inc": {"receipts_rev": 1},
    }


async def test_receipts_in_any_order_agree(ctx: Any) -> None:
    """A worker's receipts may land before the relay's dispatch update, and a retry before its
    parent records it: finished stays finished, and a due only moves later."""
    coll = ctx.store["events"]
    now = utcnow()
    dispatch = events.receipt((), [Expected("index_task", "index_task", now + BOUND)])
    retried = events.receipt(
        (),
        [Expected("deliver_webhook:m1", "deliver_webhook", now + timedelta(hours=1), retries=1)],
    )
    recorded = events.receipt(
        ["fan_out_webhooks"],
        [Expected("deliver_webhook:m1", "deliver_webhook", now + BOUND, message="{body}")],
    )
    done = events.receipt(["index_task"], ())
    orders = [[dispatch, retried, recorded, done], [done, recorded, retried, dispatch]]
    docs = []
    for n, order in enumerate(orders):
        await coll.insert_one({"_id": n, "type": "task.created"})
        for update in order:
            await coll.update_one({"_id": n}, update)
        doc = await coll.find_one({"_id": n})
        assert doc is not None
        docs.append(doc)
    for doc in docs:
        assert sorted(doc["finished"]) == ["fan_out_webhooks", "index_task"]
        assert list(events.unfinished(doc)) == ["deliver_webhook:m1"]
        entry = doc["awaiting"]["deliver_webhook:m1"]
        assert entry["due"] == now + timedelta(hours=1)
        assert (entry["message"], entry["retries"]) == ("{body}", 1)
        assert doc["recheck_at"] == now + BOUND
        assert doc["receipts_rev"] == 4


async def test_one_of_two_sweepers_claims_and_cleanups_use_the_index(ctx: Any) -> None:
    coll = ctx.store["events"]
    await ctx.store.ensure_indexes()
    now = utcnow()
    past = now - timedelta(seconds=1)
    await coll.insert_one(
        {"_id": 1, "type": "user.logged_in", "user_id": "u", "created_at": now}
        | {"awaiting": {"refresh_user_cache": {"actor": "refresh_user_cache", "due": past}}}
        | {"recheck_at": past, "receipts_rev": 1}
    )
    await coll.insert_one(
        {"_id": 2, "awaiting": {"index_task": {"actor": "index_task", "due": past}}}
        | {"finished": ["index_task"], "recheck_at": past, "receipts_rev": 3}
    )
    await coll.insert_one({"_id": 3, "recheck_at": now + BOUND, "awaiting": {}})
    # Both sweepers read before either writes: the compare-and-set lets one through.
    first, looked = await events.claim_overdue(ctx, now, BOUND)
    assert looked == 2
    assert [(r.event["_id"], r.key) for r in first] == [(1, "refresh_user_cache")]
    again, _ = await events.claim_overdue(ctx, now, BOUND)
    assert again == []  # due a bound later now
    doc2 = await coll.find_one({"_id": 2})
    assert doc2 is not None and "recheck_at" not in doc2 and "awaiting" not in doc2
    assert doc2["finished"] == ["index_task"]
    plan = await coll.find({"recheck_at": {"$lte": now}}).explain()
    assert "receipts" in str(plan["queryPlanner"]["winningPlan"])
    # A send that failed gives the claim back, due again soon and uncounted.
    await events.release(ctx, first, now + timedelta(seconds=2))
    doc1 = await coll.find_one({"_id": 1})
    assert doc1 is not None
    entry = doc1["awaiting"]["refresh_user_cache"]
    assert (entry["due"], entry["resends"]) == (now + timedelta(seconds=2), 0)
    assert doc1["recheck_at"] == now + timedelta(seconds=2)


async def test_a_lost_claim_race_resends_nothing(ctx: Any) -> None:
    """A receipt landing between a sweep's read and its claim makes the claim miss."""
    coll = ctx.store["events"]
    now = utcnow()
    past = now - timedelta(seconds=1)
    doc = {
        "_id": 1,
        "awaiting": {"index_task": {"actor": "index_task", "due": past}},
        "recheck_at": past,
        "receipts_rev": 1,
    }
    await coll.insert_one(doc)
    await coll.update_one({"_id": 1}, events.receipt(["index_task"], ()))
    plan = events.sweep_plan(doc, now, BOUND)  # planned from the stale read
    result = await coll.update_one({"_id": 1, "receipts_rev": 1}, plan.update)
    assert result.modified_count == 0
    claimed, _ = await events.claim_overdue(ctx, now, BOUND)
    assert claimed == []


def test_awaited_keys_are_field_names() -> None:
    assert events.awaited_key("index_task") == "index_task"
    assert events.awaited_key("deliver_webhook", "m-1") == "deliver_webhook:m-1"
    assert events.awaited_key("pkg.actor", "$x") == "pkg_actor:_x"


async def test_merged_receipts_do_what_they_do_in_turn(ctx: Any) -> None:
    """A worker merges the receipts of one event waiting for the same flush into one update
    (core/events.py ``merge_receipts``): it must leave the event as the receipts applied one
    after another do, in either order."""
    coll = ctx.store["events"]
    now = utcnow()
    receipts = [
        events.receipt((), [Expected("index_task", "index_task", now + BOUND)]),
        events.receipt(
            (),
            [
                Expected(
                    "deliver_webhook:m1", "deliver_webhook", now + timedelta(hours=1), retries=1
                )
            ],
        ),
        events.receipt(
            ["fan_out_webhooks"],
            [Expected("deliver_webhook:m1", "deliver_webhook", now + BOUND, message="{body}")],
        ),
        events.receipt(["index_task", "fan_out_webhooks"], ()),
        events.receipt(
            (), [Expected("deliver_webhook:m1", "deliver_webhook", now, message="{later}")]
        ),
    ]
    for n, order in enumerate([receipts, receipts[::-1]]):
        await coll.insert_many([{"_id": f"{n}-turns"}, {"_id": f"{n}-merged"}])
        for update in order:
            await coll.update_one({"_id": f"{n}-turns"}, update)
        await coll.update_one({"_id": f"{n}-merged"}, events.merge_receipts(order))
        turns = await coll.find_one({"_id": f"{n}-turns"}, {"_id": 0})
        merged = await coll.find_one({"_id": f"{n}-merged"}, {"_id": 0})
        assert merged == turns
        assert merged is not None and merged["receipts_rev"] == 5
    with pytest.raises(ValueError, match=r"not a receipt's operator: \$unset"):
        events.merge_receipts([{"$unset": {"awaiting": ""}}])
