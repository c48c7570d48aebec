"""The auth service through the API (C1): sign-up, sign-in, tokens, sign-out on every process,
and the health checks. With production argon2 parameters."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest

from tests.conftest import TEST_SECRET, register_user
from tests.integration._support import app_client, assert_error, create_thread, error_code
from threadline.ids import IdPrefix, new_id
from threadline.settings import Settings

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


def _email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


def _forge(secret: str, **claims: object) -> str:
    now = int(time.time())
    payload = {"sub": None, "jti": uuid.uuid4().hex, "iss": "threadline", "iat": now}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


async def test_register_then_sign_in_then_me(client):
    email = _email()
    created = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    user = created.json()
    assert user["email"] == email
    assert user["id"].startswith("usr_")
    assert "password" not in created.text and "argon2" not in created.text

    token = await client.post("/v1/auth/token", json={"email": email, "password": PASSWORD})
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] > 0
    claims = jwt.decode(
        body["access_token"], TEST_SECRET, algorithms=["HS256"], issuer="threadline"
    )
    assert claims["sub"] == user["id"]
    assert claims["exp"] - claims["iat"] == body["expires_in"]

    me = await client.get(
        "/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert me.status_code == 200, me.text
    assert me.json()["id"] == user["id"] and me.json()["email"] == email


async def test_email_is_case_insensitive_and_unique(client):
    email = _email()
    first = await client.post(
        "/v1/auth/register", json={"email": email.upper(), "password": PASSWORD}
    )
    assert first.status_code == 201, first.text
    assert first.json()["email"] == email  # stored normalized
    for variant in (email, email.upper(), f"  {email.capitalize()} "):
        again = await client.post(
            "/v1/auth/register", json={"email": variant, "password": "another password"}
        )
        assert_error(again, 409, "email_taken")
    # Sign-in with any casing finds the one account.
    token = await client.post("/v1/auth/token", json={"email": email.upper(), "password": PASSWORD})
    assert token.status_code == 200, token.text
    # The duplicate attempts did not change the password.
    other = await client.post(
        "/v1/auth/token", json={"email": email, "password": "another password"}
    )
    assert_error(other, 401, "wrong_password")


async def test_invalid_registration_is_422(client):
    for body, code in (
        ({"email": "not-an-email", "password": PASSWORD}, "invalid_email"),
        ({"email": "@example.com", "password": PASSWORD}, "invalid_email"),
        ({"email": _email(), "password": "short"}, "invalid_password"),
        ({"email": _email()}, "validation_error"),
        ({"password": PASSWORD}, "validation_error"),
    ):
        response = await client.post("/v1/auth/register", json=body)
        assert response.status_code == 422, (body, response.text)
        assert error_code(response) == code, body


async def test_an_email_with_a_nul_character_is_refused_never_a_500(client):
    """Found by the fuzzer: PostgreSQL cannot compare or store a NUL in text."""
    email = "nul\x00@example.com"
    registered = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert registered.status_code in (201, 422), registered.text
    if registered.status_code == 422:
        error_code(registered)
    signed_in = await client.post("/v1/auth/token", json={"email": email, "password": PASSWORD})
    assert signed_in.status_code in (200, 401, 422), signed_in.text
    unknown = await client.post("/v1/auth/token", json={"email": "\x00i", "password": PASSWORD})
    assert unknown.status_code in (401, 422), unknown.text
    error_code(unknown)


async def test_sign_in_failures_have_distinct_codes(client):
    user = await register_user(client)
    wrong = await client.post(
        "/v1/auth/token", json={"email": user.email, "password": "not the password"}
    )
    assert_error(wrong, 401, "wrong_password")
    assert wrong.headers["www-authenticate"].lower().startswith("bearer")
    unknown = await client.post("/v1/auth/token", json={"email": _email(), "password": PASSWORD})
    assert_error(unknown, 401, "unknown_user")
    # Neither failure leaks the other user's data.
    assert user.id not in wrong.text and user.id not in unknown.text


async def test_requests_without_a_valid_token_are_401(client, make_user):
    user = await make_user()
    forged_with_other_key = _forge("some-other-secret-that-is-long-enough", sub=user.id, exp=2**31)
    header, payload, signature = user.token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    # Someone else's user id in the claims, with the original signature.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "usr_01J00000000000000000000000"
    swapped = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    cases = {
        "no header": ({}, "not_authenticated"),
        "not bearer": ({"Authorization": f"Basic {user.token}"}, "not_authenticated"),
        "garbage": ({"Authorization": "Bearer not.a.jwt"}, "token_invalid"),
        "tampered signature": (
            {"Authorization": f"Bearer {header}.{payload}.{flipped}"},
            "token_invalid",
        ),
        "tampered claims": (
            {"Authorization": f"Bearer {header}.{swapped}.{signature}"},
            "token_invalid",
        ),
        "other key": ({"Authorization": f"Bearer {forged_with_other_key}"}, "token_invalid"),
        "unsigned": (
            {"Authorization": "Bearer " + jwt.encode({"sub": user.id}, key=None, algorithm="none")},
            "token_invalid",
        ),
        "bad subject": (
            {"Authorization": f"Bearer {_forge(TEST_SECRET, sub='none', exp=2**31)}"},
            "token_invalid",
        ),
        "no expiry": (
            {"Authorization": f"Bearer {_forge(TEST_SECRET, sub=user.id)}"},
            "token_invalid",
        ),
    }
    for case, (headers, code) in cases.items():
        for method, path in (
            ("GET", "/v1/auth/me"),
            ("GET", "/v1/threads"),
            ("POST", "/v1/threads"),
        ):
            response = await client.request(
                method, path, headers=headers, json={} if method == "POST" else None
            )
            assert response.status_code == 401, (case, path, response.text)
            assert error_code(response) == code, (case, path)
    # The real token still works.
    assert (await client.get("/v1/auth/me", headers=user.headers)).status_code == 200


async def test_expired_token_is_401_token_expired(settings_factory):
    async with app_client(settings_factory(token_ttl_seconds=60)) as client:
        user = await register_user(client)
        issued = jwt.decode(user.token, TEST_SECRET, algorithms=["HS256"], issuer="threadline")
        assert issued["exp"] - issued["iat"] == 60
        expired = _forge(
            TEST_SECRET, sub=user.id, iat=int(time.time()) - 120, exp=int(time.time()) - 60
        )
        response = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {expired}"})
        assert_error(response, 401, "token_expired")
        threads = await client.get("/v1/threads", headers={"Authorization": f"Bearer {expired}"})
        assert_error(threads, 401, "token_expired")
        # A valid, unexpired token made the same way is accepted: only the expiry differs.
        fresh = _forge(TEST_SECRET, sub=user.id, exp=int(time.time()) + 60)
        assert (
            await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {fresh}"})
        ).status_code == 200


async def test_logout_revokes_that_token_only(client):
    user = await register_user(client)
    second = await client.post(
        "/v1/auth/token", json={"email": user.email, "password": user.password}
    )
    second_headers = {"Authorization": f"Bearer {second.json()['access_token']}"}
    thread = await create_thread(client, user, title="survives logout")

    out = await client.post("/v1/auth/logout", headers=user.headers)
    assert out.status_code == 204, out.text
    for method, path in (
        ("GET", "/v1/auth/me"),
        ("GET", "/v1/threads"),
        ("GET", f"/v1/threads/{thread['id']}"),
        ("POST", "/v1/auth/logout"),
    ):
        response = await client.request(method, path, headers=user.headers)
        assert_error(response, 401, "token_revoked")

    # The other sign-in of the same user (another device) is unaffected and sees the data.
    me = await client.get("/v1/auth/me", headers=second_headers)
    assert me.status_code == 200 and me.json()["id"] == user.id
    fetched = await client.get(f"/v1/threads/{thread['id']}", headers=second_headers)
    assert fetched.status_code == 200
    # Signing in again gives a working token.
    third = await client.post(
        "/v1/auth/token", json={"email": user.email, "password": user.password}
    )
    again = {"Authorization": f"Bearer {third.json()['access_token']}"}
    assert (await client.get("/v1/auth/me", headers=again)).status_code == 200


async def test_logout_on_one_process_is_refused_by_another(settings: Settings):
    """Two app instances on the same database (and Redis, on the postgres backend), as two
    API processes behind a load balancer: a sign-out through one holds on the other at once."""
    async with app_client(settings) as first, app_client(settings) as second:
        user = await register_user(first)
        assert (await second.get("/v1/auth/me", headers=user.headers)).status_code == 200
        other = await register_user(second)

        assert (await first.post("/v1/auth/logout", headers=user.headers)).status_code == 204
        assert_error(await second.get("/v1/auth/me", headers=user.headers), 401, "token_revoked")
        assert_error(await first.get("/v1/auth/me", headers=user.headers), 401, "token_revoked")
        # Only that token: another user's token is fine on both.
        assert (await first.get("/v1/auth/me", headers=other.headers)).status_code == 200
        assert (await second.get("/v1/auth/me", headers=other.headers)).status_code == 200

    # And a third instance started later still refuses it (the revocation is stored, not cached).
    async with app_client(settings) as third:
        assert_error(await third.get("/v1/auth/me", headers=user.headers), 401, "token_revoked")
        assert (await third.get("/v1/auth/me", headers=other.headers)).status_code == 200


async def test_health_and_readiness(client, backend):
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    if backend == "postgres":
        assert body["checks"]["redis"] == "ok"
    # Health checks never look at a token: a load balancer's stale header changes nothing.
    for path in ("/healthz", "/readyz"):
        stale = await client.get(path, headers={"Authorization": "Bearer not.a.token"})
        assert stale.status_code == 200, (path, stale.text)


def _every_authenticated_operation(spec: dict) -> list[tuple[str, str]]:
    operations = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if operation.get("security"):
                operations.append((method.upper(), path))
    return operations


async def test_a_signed_token_of_a_missing_user_or_with_an_absurd_expiry_is_401_everywhere(
    client, make_user
):
    """A database reset while the signing key stayed brings old tokens back: each is a 401
    `token_user_not_found` on every authenticated operation, never a 404, an empty list or a
    500. A token with an expiry no clock can hold is a 401 `token_invalid` (it was a 500)."""
    user = await make_user()
    thread_id = (await create_thread(client, user))["id"]
    later = int(time.time()) + 3600
    tokens = {
        "token_user_not_found": _forge(TEST_SECRET, sub=new_id(IdPrefix.USER), exp=later),
        "token_invalid": _forge(TEST_SECRET, sub=user.id, exp=10**30),
    }
    spec = (await client.get("/openapi.json")).json()
    operations = _every_authenticated_operation(spec)
    assert len(operations) >= 12, operations  # the whole API surface, not a sample
    for code, token in tokens.items():
        for method, path in operations:
            url = path.format(
                thread_id=thread_id, run_id=new_id(IdPrefix.RUN), agent="demo", chat_id=thread_id
            )
            response = await client.request(
                method,
                url,
                headers={"Authorization": f"Bearer {token}"},
                json={} if method in ("POST", "PATCH") else None,
            )
            assert response.status_code == 401, (code, method, path, response.text)
            assert error_code(response) == code, (method, path, response.text)
    # The user's own token still works on the same thread.
    own = await client.get(f"/v1/threads/{thread_id}", headers=user.headers)
    assert own.status_code == 200
