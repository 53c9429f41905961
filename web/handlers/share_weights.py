"""Operator view and control of the fair-share weights (``core/fairness.py``): a user (or a
class of users, ``role:<role>``, or ``default``) gets ``weight`` times ``FAIR_SHARE_WINDOW``
events in flight. ``FAIR_SHARE_WEIGHTS`` sets some; those set here (collection
``share_weights``) override them key by key and reach every relay within a few seconds.
``taskmanager share-weights`` (cli/share_weights.py) shows the same list."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, Field

from config.logging import get_logger
from core import fairness
from core.accounts import Strict
from core.context import Context
from core.errors import FieldError, Invalid, NotFound
from core.store import Doc
from web.keys import CONTEXT
from web.routing import body, claims, json_response

log = get_logger(__name__)


def _whole_number(value: object) -> object:
    """JSON Schema's ``integer`` includes ``2.0``: take it as 2 (strict mode refuses floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class WeightIn(Strict):
    """``PUT /admin/share-weights/{key}`` body."""

    weight: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_whole_number)] = Field(
        description="Multiplies FAIR_SHARE_WINDOW for this key"
    )


class ShareWeight(BaseModel):
    """One key's weight and where it comes from."""

    key: str = Field(description="A user id, role:<role> (every user of that role) or default")
    weight: int
    source: Literal["settings", "admin"] = Field(
        description="settings: FAIR_SHARE_WEIGHTS; admin: set through this API (wins)"
    )
    window: int = Field(description="Events in flight at most: FAIR_SHARE_WINDOW times weight")
    updated_at: datetime | None = Field(description="When it was set here (null: settings)")
    updated_by: str | None = Field(description="Who set it here (null: settings)")


class ShareWeights(BaseModel):
    """The weights in effect, by key: the settings' ones and those set through the API (which
    win for the same key). A user not named, nor by role, gets ``default`` (else 1)."""

    window: int = Field(description="FAIR_SHARE_WINDOW: events in flight per user of weight 1")
    budget: int = Field(
        description="FAIR_SHARE_BUDGET: events in flight across all users at most (0: none)"
    )
    fair_share: bool = Field(description="FAIR_SHARE: whether the relay applies the windows")
    items: list[ShareWeight]


def _settings_weights(ctx: Context) -> dict[str, int]:
    return dict(fairness.Windows.from_settings(ctx.settings).weights)


def _stored(ctx: Context, doc: Doc) -> ShareWeight:
    weight = int(doc["weight"])
    by = doc.get("updated_by")
    when = doc.get("updated_at")
    return ShareWeight(
        key=str(doc["_id"]),
        weight=weight,
        source="admin",
        window=ctx.settings.fair_share_window * weight,
        updated_at=when if isinstance(when, datetime) else None,
        updated_by=None if by is None else str(by),
    )


async def effective_weights(ctx: Context) -> ShareWeights:
    """The settings' weights with the stored ones over them, sorted by key."""
    size = ctx.settings.fair_share_window
    items = {
        key: ShareWeight(
            key=key,
            weight=weight,
            source="settings",
            window=size * weight,
            updated_at=None,
            updated_by=None,
        )
        for key, weight in _settings_weights(ctx).items()
    }
    for doc in await ctx.store[fairness.WEIGHTS].find({}).to_list():
        item = _stored(ctx, doc)
        items[item.key] = item
    return ShareWeights(
        window=size,
        budget=ctx.settings.fair_share_budget,
        fair_share=ctx.settings.fair_share,
        items=[items[key] for key in sorted(items)],
    )


async def set_share_weight(ctx: Context, key: str, weight: int, by: str | None) -> ShareWeight:
    """Store ``weight`` for ``key`` (``ValueError`` naming what is wrong); the stored item."""
    await fairness.set_weight(ctx, key, weight, by=by)
    doc = await ctx.store[fairness.WEIGHTS].find_one({"_id": key})
    assert doc is not None
    return _stored(ctx, doc)


async def unset_share_weight(ctx: Context, key: str) -> None:
    """Drop the stored weight of ``key``; :class:`NotFound` when there is none (saying so when
    the settings give that key a weight, which only the settings can change)."""
    if await fairness.unset_weight(ctx, key):
        return
    from_settings = _settings_weights(ctx).get(key)
    if from_settings is not None:
        raise NotFound(
            f"No weight for {key!r} was set through the admin API; its weight "
            f"{from_settings} comes from FAIR_SHARE_WEIGHTS, which only the settings can change"
        )
    raise NotFound(f"No weight is stored for {key!r}")


async def list_share_weights(request: web.Request) -> web.Response:
    """The fair-share weights in effect: ``FAIR_SHARE_WEIGHTS`` and those set through the API
    (``source``), each with its window (events in flight at most), sorted by key."""
    return json_response(await effective_weights(request.app[CONTEXT]))


async def put_share_weight(request: web.Request) -> web.Response:
    """Give a user id, ``role:<role>`` or ``default`` a weight (1-1000); it overrides the
    settings' weight for that key and reaches every relay within a few seconds (422 for a key
    that is none of those)."""
    key = request.match_info["key"]
    weight = body(request, WeightIn).weight
    by = claims(request).subject
    try:
        item = await set_share_weight(request.app[CONTEXT], key, weight, by)
    except ValueError as exc:
        raise Invalid(str(exc), [FieldError(field="key", message=str(exc))]) from exc
    log.info("admin.share_weight_set", key=key, weight=weight, by=by)
    return json_response(item)


async def delete_share_weight(request: web.Request) -> web.Response:
    """Drop the weight set through the API for a key: the settings' weight (if any) applies
    again. 404 when none is stored (a weight from FAIR_SHARE_WEIGHTS cannot be deleted here)."""
    key = request.match_info["key"]
    await unset_share_weight(request.app[CONTEXT], key)
    log.info("admin.share_weight_unset", key=key, by=claims(request).subject)
    return web.Response(status=204)
