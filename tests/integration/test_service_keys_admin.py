"""Service keys and the admin CLI: keys created by `threadline admin keys create` (shown once,
stored hashed), scopes, acting for a user with exactly that user's isolation, revocation seen
at once by another app instance; users listed, disabled, put on a plan and deleted with
everything they own; usage per day."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient
from typer.testing import CliRunner

from tests.conftest import register_user
from tests.integration._support import app_client, assert_error, create_thread
from tests.integration.test_runs_support import wait_until
from tests.oidc_issuer import loopback_issuer
from threadline.api.app import create_app
from threadline.cli import app as cli_app
from threadline.settings import Settings
from threadline.store.db import create_engine
from threadline.store.tables import service_keys, threads

pytestmark = pytest.mark.integration
ACT_AS = "X-Threadline-Act-As"


async def admin(settings: Settings, *args: str) -> str:
    """Run `threadline admin ARGS` against the test's database; its stdout."""
    env = {"THREADLINE_DATABASE_URL": settings.database_url}
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app, ["admin", *args], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.stdout


async def admin_json(settings: Settings, *args: str) -> Any:
    return json.loads(await admin(settings, *args, "--json"))


def as_user(key: str, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", ACT_AS: user_id}


async def test_a_key_acts_for_one_user_with_that_users_isolation(settings: Settings) -> None:
    created = await admin_json(settings, "keys", "create", "--name", "backend")
    key = created["key"]
    assert created["scopes"] == ["act_as"] and key.startswith(created["id"] + ".")
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(service_keys))).one()
    finally:
        await engine.dispose()
    assert key.split(".", 1)[1] not in json.dumps([str(v) for v in stored]), "stored hashed"

    async with app_client(settings) as client:
        alice, bob = await register_user(client), await register_user(client)
        mine = await client.post(
            "/v1/threads", json={"title": "by key"}, headers=as_user(key, alice.id)
        )
        assert mine.status_code == 201, mine.text
        seen_by_alice = await client.get(f"/v1/threads/{mine.json()['id']}", headers=alice.headers)
        assert seen_by_alice.status_code == 200, "the thread is alice's own"
        bobs = await create_thread(client, bob)
        assert_error(
            await client.get(f"/v1/threads/{bobs['id']}", headers=as_user(key, alice.id)),
            404,
            "thread_not_found",
        )
        me = await client.get("/v1/auth/me", headers=as_user(key, bob.id))
        assert me.json()["id"] == bob.id


async def test_scopes_and_every_refusal_of_a_key(settings: Settings) -> None:
    key = (await admin_json(settings, "keys", "create", "--name", "k"))["key"]
    async with app_client(settings) as client:
        user = await register_user(client)
        bearer_only = {"Authorization": f"Bearer {key}"}
        assert_error(await client.get("/v1/threads", headers=bearer_only), 401, "act_as_missing")
        assert_error(
            await client.get("/v1/threads", headers=as_user(key, "usr_01JD0000000000000000000000")),
            401,
            "act_as_user_not_found",
        )
        wrong_secret = key.rsplit(".", 1)[0] + ".not-the-secret"
        assert_error(
            await client.get("/v1/threads", headers=as_user(wrong_secret, user.id)),
            401,
            "service_key_invalid",
        )
        user_acting = {**user.headers, ACT_AS: user.id}
        assert_error(
            await client.get("/v1/threads", headers=user_acting), 403, "act_as_not_allowed"
        )
        assert_error(
            await client.post("/v1/auth/logout", headers=as_user(key, user.id)),
            409,
            "service_key_logout",
        )


async def test_unknown_scopes_are_refused_by_the_cli(settings: Settings) -> None:
    env = {"THREADLINE_DATABASE_URL": settings.database_url}
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli_app,
        ["admin", "keys", "create", "--name", "k", "--scope", "root"],
        env=env,
    )
    assert result.exit_code == 2 and "Unknown scopes root" in result.output


async def test_revocation_is_seen_at_once_by_another_app_instance(settings: Settings) -> None:
    created = await admin_json(settings, "keys", "create", "--name", "k")
    async with app_client(settings) as first, app_client(settings) as second:
        user = await register_user(first)
        headers = as_user(created["key"], user.id)
        for client in (first, second):
            assert (await client.get("/v1/threads", headers=headers)).status_code == 200
        await admin(settings, "keys", "revoke", created["id"])
        for client in (second, first):
            assert_error(
                await client.get("/v1/threads", headers=headers), 401, "service_key_revoked"
            )
    listed = await admin_json(settings, "keys", "list")
    assert listed[0]["id"] == created["id"] and listed[0]["revoked_at"] is not None
    assert "key" not in listed[0]


async def test_admin_users_disable_set_plan_delete_and_usage(settings: Settings) -> None:
    async with app_client(settings) as client:
        user = await register_user(client)
        thread = await create_thread(client, user)
        posted = await client.post(
            f"/v1/threads/{thread['id']}/messages",
            json={"content": "hello", "run": {"agent": "demo"}},
            headers=user.headers,
        )
        assert posted.status_code == 201
        await _until_usage(settings, user.id)

        listed = await admin_json(settings, "users", "list")
        assert [u["id"] for u in listed] == [user.id] and listed[0]["threads"] == 1
        table = await admin(settings, "users", "list")
        assert user.email in table
        usage = await admin_json(settings, "usage", "--user", user.email)
        assert usage[0]["runs"] == 1 and usage[0]["total_tokens"] > 0

        await admin(settings, "users", "set-plan", user.id, "free")
        shown = await admin_json(settings, "users", "show", user.email)
        assert shown["plan"] == "free" and shown["tokens_today"] == usage[0]["total_tokens"]
        assert (await client.get("/v1/me/usage", headers=user.headers)).json()["plan"] == "free"

        await admin(settings, "users", "disable", user.id)
        assert_error(await client.get("/v1/threads", headers=user.headers), 403, "user_disabled")
        await admin(settings, "users", "enable", user.id)
        assert (await client.get("/v1/threads", headers=user.headers)).status_code == 200

        await admin(settings, "users", "delete", user.id, "--yes")
        assert_error(
            await client.get("/v1/threads", headers=user.headers), 401, "token_user_not_found"
        )
    assert await admin_json(settings, "users", "list") == []
    assert await admin_json(settings, "usage") == []
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(sa.select(sa.func.count()).select_from(threads)) == 0
    finally:
        await engine.dispose()


async def _until_usage(settings: Settings, user_id: str) -> None:
    await wait_until(
        lambda: admin_json(settings, "usage", "--user", user_id), what="the run's usage"
    )


async def test_a_tenant_key_acts_only_for_users_of_its_issuer(
    settings_factory: Callable[..., Settings],
) -> None:
    with loopback_issuer() as issuer:
        settings = settings_factory(oidc_issuers=[issuer.settings()])
        key = (
            await admin_json(settings, "keys", "create", "--name", "t", "--tenant", issuer.issuer)
        )["key"]
        async with app_client(settings) as client:
            token = issuer.token("tenant-user")
            external = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
            external_id = external.json()["id"]
            assert (
                await client.get("/v1/threads", headers=as_user(key, external_id))
            ).status_code == 200
            outsider = await register_user(client)
            assert_error(
                await client.get("/v1/threads", headers=as_user(key, outsider.id)),
                401,
                "act_as_user_not_found",
            )


def test_a_key_acts_for_a_user_over_the_websocket_and_a_disabled_user_is_refused(
    settings: Settings,
) -> None:
    """The socket's first message names the user (`act_as`), like the HTTP header."""
    env = {"THREADLINE_DATABASE_URL": settings.database_url}
    created = CliRunner().invoke(
        cli_app, ["admin", "keys", "create", "--name", "ws", "--json"], env=env
    )
    key = json.loads(created.stdout)["key"]
    with TestClient(create_app(settings)) as client:
        credentials = {"email": "ws@example.com", "password": "correct horse battery"}
        user_id = client.post("/v1/auth/register", json=credentials).json()["id"]
        with client.websocket_connect("/v1/ws") as ws:
            ws.send_json({"type": "auth", "token": key, "act_as": user_id})
            assert ws.receive_json() == {"type": "authenticated", "user_id": user_id}
        disabled = CliRunner().invoke(cli_app, ["admin", "users", "disable", user_id], env=env)
        assert disabled.exit_code == 0, disabled.output
        with client.websocket_connect("/v1/ws") as ws:
            ws.send_json({"type": "auth", "token": key, "act_as": user_id})
            refused = ws.receive_json()
            assert (refused["type"], refused["code"]) == ("error", "user_disabled")
