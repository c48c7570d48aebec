"""Sign-in with an external OIDC issuer served by the test on loopback: valid tokens of every
allowed algorithm, each refusal with its own code, key rotation with a bounded refresh rate,
provisioning once across processes, and isolation exactly as for password users."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.integration._support import app_client, assert_error
from tests.oidc_issuer import LoopbackIssuer, loopback_issuer
from threadline.settings import Settings
from threadline.store.db import create_engine
from threadline.store.tables import external_identities, users

pytestmark = pytest.mark.integration


@pytest.fixture
def issuer() -> Iterator[LoopbackIssuer]:
    with loopback_issuer("RS256", "ES256", "EdDSA") as served:
        yield served


@pytest.fixture
def oidc_settings(settings_factory: Callable[..., Settings], issuer: LoopbackIssuer) -> Settings:
    return settings_factory(oidc_issuers=[issuer.settings()])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/v1/auth/me", headers=bearer(token))


async def test_a_valid_token_of_each_algorithm_signs_in_with_no_registration(
    oidc_settings: Settings, issuer: LoopbackIssuer
) -> None:
    async with app_client(oidc_settings) as client:
        seen = set()
        for key in issuer.keys:
            token = issuer.token("alice", key=key, email="Alice@Example.com")
            response = await me(client, token)
            assert response.status_code == 200, (key.alg, response.text)
            seen.add(response.json()["id"])
            assert response.json()["email"] == "alice@example.com"
        assert len(seen) == 1, "one issuer and subject is one user, whatever key signed"
        other = await me(client, issuer.token("bob"))
        assert other.status_code == 200 and other.json()["id"] not in seen


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        (lambda i: i.token("eve", exp=1_000_000), "token_expired"),
        (lambda i: i.token("eve", aud="someone-else"), "token_wrong_audience"),
        (lambda i: i.token("eve", iss="https://evil.example"), "token_wrong_issuer"),
        (lambda i: i.forged_none("eve"), "token_algorithm_not_allowed"),
        (lambda i: i.forged_hs256_with_public_key("eve"), "token_algorithm_not_allowed"),
        (lambda i: i.token("eve", key=_unpublished_key()), "token_unknown_key"),
        (lambda i: i.token("eve")[:-4] + "AAAA", "token_invalid"),
    ],
    ids=["expired", "audience", "issuer", "none", "hs256-public-key", "unknown-key", "bad-sig"],
)
async def test_every_forged_or_foreign_token_is_refused_with_its_code(
    oidc_settings: Settings,
    issuer: LoopbackIssuer,
    forge: Callable[[LoopbackIssuer], str],
    code: str,
) -> None:
    async with app_client(oidc_settings) as client:
        assert (await me(client, issuer.token("warm-up"))).status_code == 200
        assert_error(await me(client, forge(issuer)), 401, code)
        assert await _subjects(oidc_settings) == ["warm-up"], "a refused token provisions nobody"


async def _subjects(settings: Settings) -> list[str]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(external_identities.c.subject))
            return [str(subject) for subject in rows.scalars()]
    finally:
        await engine.dispose()


def _unpublished_key() -> Any:
    from tests.oidc_issuer import new_key

    return new_key("RS256")


async def test_an_algorithm_the_issuer_does_not_allow_is_refused(
    settings_factory: Callable[..., Settings], issuer: LoopbackIssuer
) -> None:
    settings = settings_factory(oidc_issuers=[issuer.settings(algorithms=["ES256"])])
    rsa_key = next(k for k in issuer.keys if k.alg == "RS256")
    ec_key = next(k for k in issuer.keys if k.alg == "ES256")
    async with app_client(settings) as client:
        assert_error(
            await me(client, issuer.token("eve", key=rsa_key)), 401, "token_algorithm_not_allowed"
        )
        assert (await me(client, issuer.token("eve", key=ec_key))).status_code == 200


async def test_key_rotation_is_picked_up_and_unknown_kids_refetch_at_a_bounded_rate(
    settings_factory: Callable[..., Settings], issuer: LoopbackIssuer
) -> None:
    rotating = settings_factory(oidc_issuers=[issuer.settings(jwks_min_refresh_seconds=0)])
    async with app_client(rotating) as client:
        assert (await me(client, issuer.token("carol"))).status_code == 200
        new = issuer.rotate("ES256")
        rotated = await me(client, issuer.token("carol", key=new))
        assert rotated.status_code == 200, rotated.text
        assert issuer.jwks_requests == 2

    bounded = settings_factory(oidc_issuers=[issuer.settings(jwks_min_refresh_seconds=3600)])
    before = issuer.jwks_requests
    async with app_client(bounded) as client:
        assert (await me(client, issuer.token("carol"))).status_code == 200
        forged = [issuer.token("carol", key=_unpublished_key()) for _ in range(5)]
        responses = await asyncio.gather(*(me(client, token) for token in forged))
        assert {r.json()["error"]["code"] for r in responses} == {"token_unknown_key"}
        assert issuer.jwks_requests == before + 1, "unknown kids must not hammer the issuer"


async def test_external_users_are_isolated_exactly_like_password_users(
    oidc_settings: Settings, issuer: LoopbackIssuer
) -> None:
    async with app_client(oidc_settings) as client:
        alice, bob = issuer.token("alice"), issuer.token("bob")
        created = await client.post("/v1/threads", json={"title": "a"}, headers=bearer(alice))
        assert created.status_code == 201, created.text
        thread_id = created.json()["id"]
        assert_error(
            await client.get(f"/v1/threads/{thread_id}", headers=bearer(bob)),
            404,
            "thread_not_found",
        )
        listed = await client.get("/v1/threads", headers=bearer(bob))
        assert listed.json()["data"] == []
        password_user = await _register(client)
        assert_error(
            await client.get(f"/v1/threads/{thread_id}", headers=password_user),
            404,
            "thread_not_found",
        )
        own = await create_thread_for(client, password_user)
        assert_error(
            await client.get(f"/v1/threads/{own}", headers=bearer(alice)), 404, "thread_not_found"
        )


async def _register(client: httpx.AsyncClient) -> dict[str, str]:
    from tests.conftest import register_user

    return (await register_user(client)).headers


async def create_thread_for(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.post("/v1/threads", json={}, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_password_sign_in_can_be_turned_off(
    settings_factory: Callable[..., Settings], issuer: LoopbackIssuer
) -> None:
    settings = settings_factory(oidc_issuers=[issuer.settings()], password_auth=False)
    credentials = {"email": "p@example.com", "password": "correct horse battery"}
    async with app_client(settings) as client:
        assert_error(
            await client.post("/v1/auth/register", json=credentials), 403, "password_auth_disabled"
        )
        assert_error(
            await client.post("/v1/auth/token", json=credentials), 403, "password_auth_disabled"
        )
        assert (await me(client, issuer.token("dave"))).status_code == 200


async def test_signing_out_revokes_an_external_token(
    oidc_settings: Settings, issuer: LoopbackIssuer
) -> None:
    async with app_client(oidc_settings) as client:
        token = issuer.token("erin")
        assert (await client.post("/v1/auth/logout", headers=bearer(token))).status_code == 204
        assert_error(await me(client, token), 401, "token_revoked")
        assert (await me(client, issuer.token("erin"))).status_code == 200


def _provision_in_a_process(settings_json: str, token: str, barrier: Any, out: Any) -> None:
    """A separate process: its own engine and key cache, released with the others at once."""
    from threadline.runtime import open_runtime

    settings = Settings.model_validate_json(settings_json)

    async def main() -> str:
        async with open_runtime(settings, worker=False) as runtime:
            await runtime.external.cache(settings.oidc_issuers[0].issuer).load()  # type: ignore[union-attr]
            barrier.wait(timeout=60)
            claims = await runtime.auth.validate(token)
            return claims.user_id

    out.put(asyncio.run(main()))


async def test_two_processes_provisioning_one_new_subject_at_once_make_one_user(
    oidc_settings: Settings, issuer: LoopbackIssuer
) -> None:
    async with app_client(oidc_settings):
        pass  # migrated (SQLite) and ready
    token = issuer.token("zoe")
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    values = oidc_settings.model_dump(mode="json")
    values["secret_key"] = oidc_settings.secret_key.get_secret_value()  # type: ignore[union-attr]
    payload = json.dumps(values)
    processes = [
        context.Process(target=_provision_in_a_process, args=(payload, token, barrier, out))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    results = await asyncio.to_thread(lambda: [out.get(timeout=90) for _ in processes])
    for process in processes:
        await asyncio.to_thread(process.join, 30)
        assert process.exitcode == 0
    assert results[0] == results[1]
    engine = create_engine(oidc_settings.database_url)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(sa.select(sa.func.count()).select_from(users))
            identities = await conn.scalar(
                sa.select(sa.func.count()).select_from(external_identities)
            )
    finally:
        await engine.dispose()
    assert (count, identities) == (1, 1)


async def test_the_plan_claim_sets_the_users_plan_on_every_sign_in(
    settings_factory: Callable[..., Settings], issuer: LoopbackIssuer
) -> None:
    settings = settings_factory(oidc_issuers=[issuer.settings()])
    async with app_client(settings) as client:
        free = await client.get("/v1/me/usage", headers=bearer(issuer.token("fay", plan="free")))
        assert free.json()["plan"] == "free", free.text
        pro = await client.get("/v1/me/usage", headers=bearer(issuer.token("fay", plan="pro")))
        assert pro.json()["plan"] == "pro"
        unknown = issuer.token("fay", plan="platinum")  # not configured: ignored, plan kept
        assert (await client.get("/v1/me/usage", headers=bearer(unknown))).json()["plan"] == "pro"
