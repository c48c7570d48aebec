"""`threadline admin ...`: users, service keys, webhooks and usage, straight against the
database.

Every command prints a table for people, or with `--json` one JSON document for scripts.
Failures a user can fix end in one line on stderr and exit status 2, like the other commands.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

import click
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.auth.service_keys import SCOPES, ServiceKeyStore
from threadline.errors import ThreadlineError
from threadline.settings import Settings, load_settings
from threadline.store.accounts import Account, AccountStore
from threadline.store.db import create_engine
from threadline.store.migrate import ensure_schema_current, upgrade_to_head
from threadline.usage.store import UsageStore
from threadline.webhooks.store import SUBSCRIBABLE, WebhookEvent, WebhookStore

T = TypeVar("T")
Row = dict[str, object]

admin = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Manage users, service keys and usage."
)
users_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Users.")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Service keys.")
admin.add_typer(users_app, name="users")
admin.add_typer(keys_app, name="keys")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
UserArgument = Annotated[str, typer.Argument(help="The user's id (usr_...) or email.")]


def _run(action: Callable[[AsyncConnection, Settings], Awaitable[T]]) -> T:
    """Run `action` in one transaction on the configured database; errors are one line."""
    try:
        settings = load_settings()
    except ThreadlineError as exc:
        raise _fail("Configuration error", exc) from exc

    async def main() -> T:
        engine = create_engine(
            settings.database_url,
            pool_size=1,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
        )
        try:
            if settings.is_sqlite:
                await upgrade_to_head(engine)
            else:
                await ensure_schema_current(engine)
            async with engine.begin() as conn:
                return await action(conn, settings)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except ThreadlineError as exc:
        raise _fail("Error", exc) from exc


def _fail(title: str, exc: BaseException | str) -> typer.Exit:
    click.echo(f"{click.style(title + ':', fg='red')} {exc}", err=True)
    return typer.Exit(2)


def _print(rows: list[Row], *, as_json: bool, title: str, single: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(rows[0] if single else rows, default=str, indent=2))
        return
    if not rows:
        click.echo(f"No {title.lower()}.")
        return
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row.values()))
    Console(width=200).print(table)


def _account_row(account: Account) -> Row:
    return {
        "id": account.id,
        "email": account.email,
        "plan": account.plan,
        "disabled": account.disabled,
        "issuer": account.issuer,
        "subject": account.subject,
        "threads": account.threads,
        "created_at": account.created_at.isoformat(),
    }


@users_app.command("list")
def users_list(
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many users.")] = 100,
) -> None:
    """List users, oldest first."""

    async def action(conn: AsyncConnection, _: Settings) -> list[Account]:
        return await AccountStore().list(conn, limit=limit)

    _print([_account_row(a) for a in _run(action)], as_json=as_json, title="Users")


@users_app.command("show")
def users_show(user: UserArgument, as_json: JsonOption = False) -> None:
    """One user, with today's usage."""

    async def action(conn: AsyncConnection, _: Settings) -> Row:
        account = await AccountStore().get(conn, user)
        days = await UsageStore().per_day(conn, user_id=account.id, since=datetime.now(UTC).date())
        row = _account_row(account)
        row["tokens_today"] = days[0].total_tokens if days else 0
        return row

    _print([_run(action)], as_json=as_json, title="User", single=True)


def _set_disabled(user: str, disabled: bool) -> None:
    async def action(conn: AsyncConnection, _: Settings) -> str:
        accounts = AccountStore()
        account = await accounts.get(conn, user)
        await accounts.set_disabled(conn, account.id, disabled)
        return account.id

    user_id = _run(action)
    click.echo(f"{'Disabled' if disabled else 'Enabled'} {user_id}.")


@users_app.command("disable")
def users_disable(user: UserArgument) -> None:
    """Refuse every token of the user from now on, on every process."""
    _set_disabled(user, True)


@users_app.command("enable")
def users_enable(user: UserArgument) -> None:
    """Undo `disable`."""
    _set_disabled(user, False)


@users_app.command("delete")
def users_delete(
    user: UserArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete the user and everything they own (threads, messages, runs, events, usage)."""
    if not yes:
        typer.confirm(f"Delete {user} and everything they own?", abort=True)

    async def action(conn: AsyncConnection, _: Settings) -> str:
        accounts = AccountStore()
        account = await accounts.get(conn, user)
        await accounts.delete(conn, account.id)
        return account.id

    click.echo(f"Deleted {_run(action)} and everything it owned.")


@users_app.command("set-plan")
def users_set_plan(
    user: UserArgument,
    plan: Annotated[str, typer.Argument(help="A plan of THREADLINE_PLANS, or `none`.")],
) -> None:
    """Put the user on a plan (`none`: the default plan)."""

    async def action(conn: AsyncConnection, settings: Settings) -> str:
        if plan != "none" and plan not in settings.plans:
            known = ", ".join(sorted(settings.plans))
            raise ThreadlineError(f"Unknown plan {plan!r}; the plans are: {known}")
        accounts = AccountStore()
        account = await accounts.get(conn, user)
        await accounts.set_plan(conn, account.id, None if plan == "none" else plan)
        return account.id

    click.echo(f"{_run(action)} is now on plan {plan}.")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for, e.g. billing-backend.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help=f"A scope (repeatable): {', '.join(sorted(SCOPES))}."),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Only act for users of this OIDC issuer.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a service key. The key is printed once and cannot be shown again."""

    async def action(conn: AsyncConnection, _: Settings) -> Row:
        created = await ServiceKeyStore().create(
            conn, name=name, scopes=list(scope or ["act_as"]), tenant=tenant
        )
        return {
            "id": created.key.id,
            "name": name,
            "scopes": created.key.scopes,
            "key": created.secret,
        }

    row = _run(action)
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    click.echo(f"Created service key {row['id']} ({', '.join(row['scopes'])}).")  # type: ignore[arg-type]
    click.echo("Store it now; it is not shown again:")
    click.echo(str(row["key"]))


@keys_app.command("list")
def keys_list(as_json: JsonOption = False) -> None:
    """List service keys (never their secrets)."""

    async def action(conn: AsyncConnection, _: Settings) -> list[Row]:
        return [
            {
                "id": key.id,
                "name": key.name,
                "scopes": ",".join(key.scopes),
                "tenant": key.tenant,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }
            for key in await ServiceKeyStore().list(conn)
        ]

    _print(_run(action), as_json=as_json, title="Service keys")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")]) -> None:
    """Revoke a key: refused on every process from the next request."""

    async def action(conn: AsyncConnection, _: Settings) -> None:
        await ServiceKeyStore().revoke(conn, key_id)

    _run(action)
    click.echo(f"Revoked {key_id}.")


@admin.command("usage")
def usage(
    user: Annotated[str | None, typer.Option(help="Only this user (id or email).")] = None,
    days: Annotated[int, typer.Option(min=1, help="How many days back.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Tokens, runs and run time per user per UTC day, newest first."""

    async def action(conn: AsyncConnection, _: Settings) -> list[Row]:
        user_id = (await AccountStore().get(conn, user)).id if user else None
        since = (datetime.now(UTC) - timedelta(days=days - 1)).date()
        return [
            {
                "day": row.day,
                "user_id": row.user_id,
                "runs": row.runs,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "total_tokens": row.total_tokens,
                "duration_ms": row.duration_ms,
            }
            for row in await UsageStore().per_day(conn, user_id=user_id, since=since)
        ]

    _print(_run(action), as_json=as_json, title="Usage")


webhooks_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Webhooks.")
admin.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST the events.")],
    event: Annotated[
        list[str] | None,
        typer.Option(help=f"An event type (repeatable): {', '.join(SUBSCRIBABLE)}."),
    ] = None,
    secret: Annotated[
        str | None, typer.Option(help="A Standard Webhooks secret (whsec_...); else generated.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add an endpoint (every run and thread event unless --event is given)."""

    async def action(conn: AsyncConnection, _: Settings) -> Row:
        types = list(event or [e for e in SUBSCRIBABLE if e != "approval.requested"])
        endpoint = await WebhookStore().add(conn, url=url, event_types=types, secret=secret)
        return {
            "id": endpoint.id,
            "url": endpoint.url,
            "events": endpoint.event_types,
            "secret": endpoint.secret,
        }

    row = _run(action)
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    click.echo(f"Added webhook {row['id']} for {row['url']}.")
    click.echo(f"Signing secret (verify deliveries with it): {row['secret']}")


@webhooks_app.command("list")
def webhooks_list(as_json: JsonOption = False) -> None:
    """List endpoints (without their secrets)."""

    async def action(conn: AsyncConnection, _: Settings) -> list[Row]:
        return [
            {
                "id": e.id,
                "url": e.url,
                "events": ",".join(e.event_types),
                "created_at": e.created_at.isoformat(),
            }
            for e in await WebhookStore().endpoints(conn)
        ]

    _print(_run(action), as_json=as_json, title="Webhooks")


@webhooks_app.command("remove")
def webhooks_remove(endpoint_id: Annotated[str, typer.Argument(help="whk_...")]) -> None:
    """Remove an endpoint and its pending deliveries."""

    async def action(conn: AsyncConnection, _: Settings) -> None:
        await WebhookStore().remove(conn, endpoint_id)

    _run(action)
    click.echo(f"Removed {endpoint_id}.")


@webhooks_app.command("test")
def webhooks_test(endpoint_id: Annotated[str, typer.Argument(help="whk_...")]) -> None:
    """Queue a `webhook.test` event for the endpoint (a running server delivers it)."""

    async def action(conn: AsyncConnection, _: Settings) -> list[str]:
        data: dict[str, object] = {"message": "Test delivery from threadline admin"}
        return await WebhookStore().enqueue(conn, WebhookEvent.TEST, data, endpoint_id=endpoint_id)

    (delivery_id,) = _run(action)
    click.echo(f"Queued test delivery {delivery_id}.")


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    endpoint_id: Annotated[str | None, typer.Argument(help="Only this endpoint.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent deliveries: status (pending, delivered, dead), attempts, last error."""

    async def action(conn: AsyncConnection, _: Settings) -> list[Row]:
        found = await WebhookStore().deliveries(conn, endpoint_id=endpoint_id, limit=limit)
        return [
            {
                "id": d.id,
                "endpoint": d.endpoint_id,
                "type": d.event_type,
                "status": d.status.value,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "created_at": d.created_at.isoformat(),
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            }
            for d in found
        ]

    _print(_run(action), as_json=as_json, title="Deliveries")
