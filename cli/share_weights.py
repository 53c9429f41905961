"""``taskmanager share-weights``: the fair-share weights in effect, and setting or dropping one.

A user id, ``role:<role>`` (every user of that role) or ``default`` gets ``weight`` times
``FAIR_SHARE_WINDOW`` events in flight (``core/fairness.py``). ``FAIR_SHARE_WEIGHTS`` gives
some; those set here (or through ``PUT /api/v1/admin/share-weights/{key}``) override them key
by key and reach every relay within a few seconds. Talks to MongoDB directly, like
``GET /api/v1/admin/share-weights``; signs nothing, so no ``JWT_SECRET`` is needed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from cli.common import domain_call, echo_json, echo_table, iso, load_settings, or_dash, run_async
from config.connections import Connections
from config.logging import setup_logging
from core.context import Context, open_context

T = TypeVar("T")
#: ``updated_by`` of the weights set from the command line.
BY = "cli"


def _with_context(fn: Callable[[Context], Awaitable[T]]) -> T:
    # Writes only the weights: nothing is signed, so no JWT_SECRET (ReadOnlySettings).
    settings = load_settings(read_only=True)
    setup_logging(settings, process="cli")

    async def go() -> T:
        async with open_context(settings, Connections(settings)) as ctx:
            return await fn(ctx)

    return run_async(go)


@click.group("share-weights", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def share_weights(ctx: click.Context, as_json: bool) -> None:
    """Fair-share weights in effect (FAIR_SHARE_WEIGHTS and those set here, which win for the
    same key), each with its window; `set` and `unset` change those set here."""
    from web.handlers.share_weights import effective_weights

    if ctx.invoked_subcommand is not None:
        return
    weights = _with_context(effective_weights)
    if as_json:
        echo_json(weights.model_dump())
        return
    if not weights.fair_share:
        click.echo("fair dispatch is off (FAIR_SHARE=false): the weights have no effect", err=True)
    if not weights.items:
        click.echo(f"no weights: every user has weight 1 (window {weights.window})")
        return
    echo_table(
        ["KEY", "WEIGHT", "WINDOW", "SOURCE", "UPDATED AT", "UPDATED BY"],
        [
            [
                i.key,
                str(i.weight),
                str(i.window),
                i.source,
                iso(i.updated_at),
                or_dash(i.updated_by),
            ]
            for i in weights.items
        ],
    )


@share_weights.command("set")
@click.argument("key")
@click.argument("weight")
def share_weights_set(key: str, weight: str) -> None:
    """Give KEY (a user id, role:<role> or default) WEIGHT (1-1000), over the settings' weight
    for that key. Exit status 1 for a bad key or weight."""
    from core.fairness import check_weight
    from web.handlers.share_weights import set_share_weight

    try:
        value = int(weight)
    except ValueError as exc:
        raise click.ClickException("the weight must be a whole number from 1 to 1000") from exc
    try:
        check_weight(key, value)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    item = _with_context(lambda ctx: set_share_weight(ctx, key, value, BY))
    click.echo(f"{item.key}: weight {item.weight} (window {item.window})")


@share_weights.command("unset")
@click.argument("key")
def share_weights_unset(key: str) -> None:
    """Drop the weight set here for KEY: the settings' weight (if any) applies again. Exit
    status 1 when none is set here."""
    from web.handlers.share_weights import unset_share_weight

    # NotFound (none stored) becomes a readable exit 1.
    domain_call(_with_context, lambda ctx: unset_share_weight(ctx, key))
    click.echo(f"{key}: weight set here dropped (FAIR_SHARE_WEIGHTS or the default applies)")
