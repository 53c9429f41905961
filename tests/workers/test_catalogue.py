"""The catalogue (workers/catalogue.py): every event type is routed, every routed or scheduled
name is a declared actor taking that payload, a bad table stops the broker build with a message
naming the problem, and actors are plain functions that can be called in a test."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from config.connections import Connections
from core import events, tasks
from core import search as search_index
from core.events import EventType
from core.task_models import TaskCreate
from jobs.schedule import SCHEDULE
from workers import search
from workers.actors import ActorContext, ActorSpec, CatalogueError
from workers.broker import Platform, build_broker
from workers.catalogue import CATALOGUE

#: The actor and queue names messages in flight and dead letters refer to: never renamed.
WIRE_NAMES = {
    "send_welcome_email": "notifications",
    "refresh_user_cache": "cache",
    "index_task": "search",
    "fan_out_webhooks": "webhooks",
    "deliver_webhook": "webhooks",
    "webhook_delivery_exhausted": "webhooks",
    "redeliver_webhook": "webhooks",
    "send_due_soon_reminders": "maintenance",
    "rollup_analytics": "maintenance",
    "run_backup": "maintenance",
    "fold_analytics": "analytics",
}


@pytest.fixture
async def platform(settings: Any) -> AsyncIterator[Platform]:
    made = build_broker(Connections(settings))
    yield made
    await made.resources.aclose()
    made.close()


def test_every_event_type_is_routed_to_declared_actors_taking_its_payload() -> None:
    declared = {spec.name for spec in CATALOGUE.actors}
    assert set(CATALOGUE.routes) == set(EventType)
    for event_type in EventType:
        names = CATALOGUE.actors_for(event_type)
        assert names, event_type
        assert set(names) <= declared, event_type
    assert CATALOGUE.problems() == []


def test_every_scheduled_job_runs_a_declared_actor() -> None:
    declared = {spec.name for spec in CATALOGUE.actors}
    assert set(CATALOGUE.schedule.values()) <= declared
    assert {job.name: job.actor for job in SCHEDULE} == dict(CATALOGUE.schedule)


def test_the_broker_declares_the_catalogue_under_the_wire_names(platform: Platform) -> None:
    assert {name: a.queue_name for name, a in platform.actors.items()} == WIRE_NAMES
    options = platform.actors["deliver_webhook"].options
    settings = platform.resources.settings
    assert options["max_retries"] == settings.webhook_max_retries
    assert options["on_retry_exhausted"] == "webhook_delivery_exhausted"
    assert platform.actors["run_backup"].options["time_limit"] == 6 * 3600_000
    assert platform.actors["refresh_user_cache"].options["max_retries"] == 3


def _without(event_type: EventType) -> dict[EventType, tuple[str, ...]]:
    return {t: names for t, names in CATALOGUE.routes.items() if t != event_type}


BAD = {
    "unrouted": (
        {"routes": _without(EventType.USER_LOGGED_IN)},
        "event type 'user.logged_in' is not routed to any actor",
    ),
    "routed to a typo": (
        {"routes": {**CATALOGUE.routes, EventType.TASK_UPDATED: ("index_tsak",)}},
        "event type 'task.updated' is routed to 'index_tsak', which is not a declared actor",
    ),
    "routed to an actor of another payload": (
        {"routes": {**CATALOGUE.routes, EventType.USER_REGISTERED: ("index_task",)}},
        "event type 'user.registered' is routed to 'index_task', which does not take UserEvent",
    ),
    "scheduled typo": (
        {"schedule": {**CATALOGUE.schedule, "backup": "run_backpu"}},
        "scheduled job 'backup' runs 'run_backpu', which is not a declared actor",
    ),
    "declared twice": (
        {"actors": (*CATALOGUE.actors, ActorSpec(search.index_task, "search"))},
        "actor 'index_task' is declared twice",
    ),
    "callback typo": (
        {
            "actors": tuple(
                dataclasses.replace(s, options={**s.options, "on_retry_exhausted": "nope"})
                if s.name == "deliver_webhook"
                else s
                for s in CATALOGUE.actors
            )
        },
        "actor 'deliver_webhook' has on_retry_exhausted='nope', which is not a declared actor",
    ),
}


@pytest.mark.parametrize(("change", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_catalogue_stops_the_broker_build_naming_the_problem(
    settings: Any, change: dict[str, Any], message: str
) -> None:
    bad = dataclasses.replace(CATALOGUE, **change)
    with pytest.raises(CatalogueError) as raised:
        build_broker(Connections(settings), bad)
    assert message in str(raised.value)
    assert "workers/catalogue.py" in str(raised.value)


async def test_an_actor_is_a_plain_function(ctx: Any, platform: Platform) -> None:
    task = await tasks.create(ctx, "u-catalogue", TaskCreate(title="Buy oat milk"))
    stored = await ctx.store["events"].find_one({"subject_id": str(task["_id"])})
    event = events.payload(stored)
    assert isinstance(event, events.TaskEvent)
    actor_ctx = ActorContext.of(ctx, platform.resources.mailer, platform.broker)
    await search.index_task(actor_ctx, event)
    assert await ctx.store[search_index.COLLECTION].find_one({"_id": task["_id"]}) is not None


async def test_the_declared_actor_parses_its_event_and_refuses_others(
    ctx: Any, platform: Platform
) -> None:
    run = platform.actors["index_task"].fn.__wrapped__  # Dramatiq's async-to-sync wraps it
    task = await tasks.create(ctx, "u-catalogue", TaskCreate(title="Call the plumber"))
    stored = await ctx.store["events"].find_one({"subject_id": str(task["_id"])})
    await run(events.public_event(stored))
    assert await ctx.store[search_index.COLLECTION].find_one({"_id": task["_id"]}) is not None
    welcome = events.new_event(EventType.USER_REGISTERED, user_id="u-catalogue")
    with pytest.raises(TypeError, match=r"index_task does not take user\.registered events"):
        await run(events.public_event(welcome))
    with pytest.raises(ValidationError, match=r"data\.task"):
        await run({**events.public_event(stored), "data": {}})
    with pytest.raises(events.UnknownEventType):
        await run({**events.public_event(stored), "type": "task.archived"})
