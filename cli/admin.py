"""``taskmanager admin create|revoke-sessions``: administrator accounts."""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from cli.common import domain_call, load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging


@click.group()
def admin() -> None:
    """Administrator accounts."""


@admin.command("create")
@click.option("--email", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option(
    "--promote-existing",
    is_flag=True,
    help="If an account already has this email, make it admin: its password becomes the one "
    "given here and every one of its sessions is ended.",
)
def admin_create(email: str, password: str, promote_existing: bool) -> None:
    """Create an admin account.

    An existing account with that email is refused unless --promote-existing is given:
    whoever registered the address may not be the operator, so promotion sets the password
    given here and revokes every login of the account (its tokens stop working at once).
    """
    from core import accounts

    _check_new_account(email, password)
    settings = load_settings()
    setup_logging(settings, process="cli")

    async def go() -> tuple[dict[str, Any], str, int]:
        from core.context import open_context

        async with open_context(settings, Connections(settings)) as ctx:
            await ctx.store.ensure_indexes()
            user, outcome = await accounts.ensure_admin(
                ctx, email, password, promote_existing=promote_existing
            )
            hooks = await ctx.store["webhooks"].count_documents({"owner": str(user["_id"])})
            return user, outcome, hooks

    user, outcome, hooks = domain_call(run_async, go)
    if outcome == "exists":
        raise click.ClickException(
            f"an account with email {user['email']} already exists (role {user.get('role')}, id "
            f"{user['_id']}) and was not changed. To make it an admin, run again with "
            "--promote-existing: its password becomes the one given and all its sessions end"
        )
    click.echo(f"{outcome} admin {user['email']} (id {user['_id']})")
    if outcome == "promoted":
        click.echo("its password was replaced and every session of the account was ended")
        if hooks:
            click.echo(
                f"note: the account has {hooks} webhook(s) registered before the promotion; "
                "review them (GET /api/v1/webhooks as this admin)",
                err=True,
            )


@admin.command("revoke-sessions")
@click.option("--email", default=None, help="The account's email.")
@click.option("--user-id", default=None, help="The account's id.")
def admin_revoke_sessions(email: str | None, user_id: str | None) -> None:
    """End every login of one account now (its access and refresh tokens stop working)."""
    from core import accounts
    from core.errors import NotFound

    if (email is None) == (user_id is None):
        raise click.UsageError("give either --email or --user-id")
    settings = load_settings()
    setup_logging(settings, process="cli")

    async def go() -> tuple[str, int]:
        from core.context import open_context

        async with open_context(settings, Connections(settings)) as ctx:
            if user_id is not None:
                user = await accounts.get_user(ctx, user_id)
            else:
                found = await ctx.store["users"].find_one(
                    {"email": accounts.normalize_email(email or "")}
                )
                if found is None:
                    raise NotFound(f"No account with email {email}")
                user = found
            return user["email"], await accounts.revoke_user_logins(ctx, str(user["_id"]))

    who, count = domain_call(run_async, go)
    click.echo(f"revoked {count} login(s) of {who}")


def _check_new_account(email: str, password: str) -> None:
    """Registration's rules for the email and password (core.accounts.RegisterIn), as
    parameter errors (exit 2) before anything is contacted."""
    from core.accounts import RegisterIn

    try:
        RegisterIn.model_validate({"email": email, "password": password, "name": "Administrator"})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "email"
        message = error["msg"].removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint=f"--{field}") from exc
