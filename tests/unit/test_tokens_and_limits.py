"""Bearer tokens, the in-process rate limiter, and list cursors."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from unittest.mock import patch

import jwt
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from threadline.auth.tokens import TokenCodec
from threadline.context import UserContext
from threadline.errors import AuthError, InvalidInputError
from threadline.ids import IdPrefix, new_id
from threadline.ratelimit import MemoryRateLimiter
from threadline.store.pagination import (
    POSITION_CURSOR,
    parse_id_cursor,
    parse_position_cursor,
    parse_time_id_cursor,
    position_cursor,
    time_id_cursor,
    time_id_cursor_pattern,
)
from threadline.store.tables import metadata_obj
from threadline.store.threads import ThreadStore

pytestmark = pytest.mark.unit

# 64 bytes: long enough for PyJWT to sign HS512 with it too without an InsecureKeyLengthWarning.
SECRET = "unit-test-signing-key-0123456789abcdef-0123456789abcdef-01234567"
OTHER_SECRET = "another-signing-key-fedcba9876543210"


@pytest.fixture
def codec() -> TokenCodec:
    return TokenCodec(SECRET, ttl_seconds=3600)


def _sign(payload: dict[str, object], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def _claims(**overrides: object) -> dict[str, object]:
    now = datetime.now(UTC)
    payload: dict[str, object] = {
        "sub": new_id(IdPrefix.USER),
        "jti": "jti-1",
        "iss": "threadline",
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(hours=1)).timestamp()),
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


# --- Tokens ------------------------------------------------------------------------------------


def test_issue_then_decode_roundtrip(codec: TokenCodec) -> None:
    user_id = new_id(IdPrefix.USER)
    now = datetime.now(UTC).replace(microsecond=0)

    issued = codec.issue(user_id, now=now)
    claims = codec.decode(issued.token)

    assert claims == issued.claims
    assert claims.user_id == user_id
    assert claims.expires_at == now + timedelta(hours=1)
    assert issued.expires_in == 3600


def test_every_token_has_its_own_jti(codec: TokenCodec) -> None:
    user_id = new_id(IdPrefix.USER)

    jtis = {codec.decode(codec.issue(user_id).token).jti for _ in range(50)}

    assert len(jtis) == 50


# HS256 wants a key of at least 32 bytes (RFC 7518 3.2); PyJWT warns on every use of a shorter one.
@pytest.mark.parametrize("secret", ["too-short", "s" * 20, "s" * 31, "é" * 15])
def test_a_secret_shorter_than_32_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenCodec(secret, ttl_seconds=60)


def test_a_32_byte_secret_signs_without_warnings() -> None:
    # pytest runs with filterwarnings=error: an InsecureKeyLengthWarning would fail this test.
    codec = TokenCodec("s" * 32, ttl_seconds=60)

    assert codec.decode(codec.issue(new_id(IdPrefix.USER)).token).jti


def test_an_expired_token_is_token_expired(codec: TokenCodec) -> None:
    issued = codec.issue(new_id(IdPrefix.USER), now=datetime.now(UTC) - timedelta(hours=2))

    with pytest.raises(AuthError) as caught:
        codec.decode(issued.token)

    assert caught.value.code == "token_expired"


def _tamper_signature(token: str) -> str:
    # Change a character in the middle of the signature: the last base64url character of an
    # HS256 signature carries padding bits, so changing it may leave the signature valid.
    head, payload, signature = token.split(".")
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{payload}.{signature[:middle]}{swapped}{signature[middle + 1 :]}"


def _tamper_payload(token: str) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = new_id(IdPrefix.USER)  # act as someone else, keep the signature
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{head}.{forged}.{signature}"


def _alg_none(token: str) -> str:
    payload = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(payload, None, algorithm="none")


def test_a_verified_token_is_checked_again_only_for_its_expiry() -> None:
    now = [datetime.now(UTC).replace(microsecond=0).timestamp()]
    codec = TokenCodec(SECRET, ttl_seconds=60, clock=lambda: now[0])
    issued = codec.issue(new_id(IdPrefix.USER), now=datetime.fromtimestamp(now[0], UTC))
    assert codec.decode(issued.token) == issued.claims
    with patch("jwt.decode", side_effect=AssertionError("verified again")):
        assert codec.decode(issued.token) == issued.claims  # kept: not verified again
        now[0] = issued.claims.expires_at.timestamp()  # `exp` reached: expired, as PyJWT says
        with pytest.raises(AuthError) as expired:
            codec.decode(issued.token)
    assert expired.value.code == "token_expired"


def test_only_verified_tokens_are_kept_and_only_so_many() -> None:
    codec = TokenCodec(SECRET, ttl_seconds=3600, kept=2)
    genuine = codec.issue(new_id(IdPrefix.USER)).token
    codec.decode(genuine)
    # Same claims, another signature: its own text, verified on its own, refused every time.
    header, payload, _ = genuine.split(".")
    forged = f"{header}.{payload}.{_sign(_claims()).split('.')[2]}"
    for _ in range(2):
        with pytest.raises(AuthError) as refused:
            codec.decode(forged)
        assert refused.value.code == "token_invalid"
    for _ in range(2):  # two more clients: the least recently used one goes
        codec.decode(codec.issue(new_id(IdPrefix.USER)).token)
    verify = patch("jwt.decode", side_effect=AssertionError("verified again"))
    with verify as verified, pytest.raises(AssertionError):
        codec.decode(genuine)  # forgotten: verified again
    assert verified.called


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(_tamper_signature, id="tampered-signature"),
        pytest.param(_tamper_payload, id="tampered-payload"),
        pytest.param(_alg_none, id="alg-none"),
        pytest.param(lambda t: t.rsplit(".", 1)[0] + ".", id="signature-stripped"),
        pytest.param(lambda t: t + "x", id="trailing-garbage"),
    ],
)
def test_forged_tokens_are_token_invalid(codec: TokenCodec, forge: object) -> None:
    token = codec.issue(new_id(IdPrefix.USER)).token
    forged = forge(token)  # type: ignore[operator]
    assert forged != token

    with pytest.raises(AuthError) as caught:
        codec.decode(forged)

    assert caught.value.code == "token_invalid"


def test_a_token_from_another_secret_is_token_invalid(codec: TokenCodec) -> None:
    other = TokenCodec(OTHER_SECRET, ttl_seconds=3600).issue(new_id(IdPrefix.USER)).token

    with pytest.raises(AuthError) as caught:
        codec.decode(other)

    assert caught.value.code == "token_invalid"


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "....", "Bearer x", "eyJhbGciOiJIUzI1NiJ9", "ü.ö.ä"],
)
def test_garbage_is_token_invalid(codec: TokenCodec, token: str) -> None:
    with pytest.raises(AuthError) as caught:
        codec.decode(token)

    assert caught.value.code == "token_invalid"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_claims(iss="someone-else"), id="other-issuer"),
        pytest.param(_claims(iss=None), id="no-issuer"),
        pytest.param(_claims(jti=None), id="no-jti"),
        pytest.param(_claims(exp=None), id="no-expiry"),
        pytest.param(_claims(sub=None), id="no-subject"),
        pytest.param(_claims(sub="thr_01JD3X5Q0B7W4W3M9R8P2V6KZN"), id="subject-not-a-user"),
        pytest.param(_claims(sub="null"), id="subject-placeholder"),
        pytest.param(_claims(jti=12345), id="jti-not-a-string"),
    ],
)
def test_correctly_signed_but_wrong_claims_are_token_invalid(
    codec: TokenCodec, payload: dict[str, object]
) -> None:
    with pytest.raises(AuthError) as caught:
        codec.decode(_sign(payload))

    assert caught.value.code == "token_invalid"


def test_another_hmac_algorithm_with_the_same_secret_is_token_invalid(codec: TokenCodec) -> None:
    with pytest.raises(AuthError) as caught:
        codec.decode(_sign(_claims(), algorithm="HS512"))

    assert caught.value.code == "token_invalid"


# --- Rate limits -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


WINDOW_START = 1_700_000_040.0  # a multiple of 60: the start of a one-minute window


@pytest.mark.parametrize("offset", [0.0, 0.25, 30.0, 59.0, 59.9999])
async def test_the_limit_is_reached_then_retry_after_says_when(offset: float) -> None:
    clock = FakeClock(WINDOW_START + offset)
    limiter = MemoryRateLimiter(clock=clock)

    decisions = [await limiter.hit("u1", limit=3, window_seconds=60) for _ in range(4)]

    assert [d.allowed for d in decisions] == [True, True, True, False]
    retry_after = decisions[-1].retry_after_seconds
    assert 1 <= retry_after <= 60
    # Waiting that long always lands in the next window.
    assert int((clock.now + retry_after) // 60) == int(clock.now // 60) + 1


async def test_retry_after_counts_down_through_the_window() -> None:
    clock = FakeClock(WINDOW_START)
    limiter = MemoryRateLimiter(clock=clock)
    seen = []
    for offset in (0.0, 10.0, 45.5, 59.0):
        clock.now = WINDOW_START + offset
        seen.append((await limiter.hit("u1", limit=1, window_seconds=60)).retry_after_seconds)

    assert seen == [60, 50, 15, 1]


async def test_the_next_window_starts_from_zero() -> None:
    clock = FakeClock(WINDOW_START + 58)
    limiter = MemoryRateLimiter(clock=clock)
    for _ in range(2):
        await limiter.hit("u1", limit=2, window_seconds=60)
    assert not (await limiter.hit("u1", limit=2, window_seconds=60)).allowed

    clock.now = WINDOW_START + 60

    assert [(await limiter.hit("u1", limit=2, window_seconds=60)).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]


async def test_keys_are_counted_apart() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(WINDOW_START))

    assert (await limiter.hit("u1", limit=1, window_seconds=60)).allowed
    assert not (await limiter.hit("u1", limit=1, window_seconds=60)).allowed
    assert (await limiter.hit("u2", limit=1, window_seconds=60)).allowed


async def test_old_windows_are_forgotten_without_losing_the_current_one() -> None:
    clock = FakeClock(WINDOW_START)
    limiter = MemoryRateLimiter(clock=clock)
    for i in range(10_001):
        await limiter.hit(f"old-{i}", limit=1, window_seconds=60)
    clock.now += 60
    await limiter.hit("current", limit=2, window_seconds=60)

    # The next hit sweeps the 10,001 stale windows but must still count "current".
    assert (await limiter.hit("current", limit=2, window_seconds=60)).allowed
    assert not (await limiter.hit("current", limit=2, window_seconds=60)).allowed
    assert len(limiter._counts) == 1


# --- Cursors -----------------------------------------------------------------------------------


def test_cursors_roundtrip_and_match_their_documented_patterns() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    thread_id, run_id = new_id(IdPrefix.THREAD), new_id(IdPrefix.RUN)
    cursor = time_id_cursor(moment, thread_id)
    assert re.fullmatch(time_id_cursor_pattern(IdPrefix.THREAD), cursor)
    assert parse_time_id_cursor(cursor, IdPrefix.THREAD) == (moment, thread_id)
    assert re.fullmatch(POSITION_CURSOR, position_cursor(42))
    assert parse_position_cursor(position_cursor(42)) == 42
    assert parse_id_cursor(run_id, IdPrefix.RUN) == run_id
    for text in (cursor, position_cursor(42), run_id):
        assert text.isascii() and not set(text) & set("/+=&?# ")  # safe in a URL as is


def test_every_cursor_the_pattern_allows_is_accepted() -> None:
    """What the OpenAPI document promises: a position past every message is an empty page."""
    assert parse_position_cursor("9999999999") == 2**31 - 1
    assert parse_position_cursor("0") == 0
    earliest, _ = parse_time_id_cursor("0." + new_id(IdPrefix.THREAD), IdPrefix.THREAD)
    assert earliest == datetime(1970, 1, 1, tzinfo=UTC)
    latest, _ = parse_time_id_cursor("9" * 16 + "." + new_id(IdPrefix.THREAD), IdPrefix.THREAD)
    assert latest.year > 2200


@pytest.mark.parametrize(
    "cursor",
    ["", "!!!!", "é", "-1", "1.5", "12345678901", "1 ", "e30", "thr_x", "1.thr_x"],
)
def test_malformed_cursors_are_invalid_cursor(cursor: str) -> None:
    for parse in (
        parse_position_cursor,
        lambda c: parse_id_cursor(c, IdPrefix.RUN),
        lambda c: parse_time_id_cursor(c, IdPrefix.THREAD),
    ):
        with pytest.raises(InvalidInputError) as caught:
            parse(cursor)
        assert caught.value.code == "invalid_cursor"
        assert caught.value.field == "cursor"


def test_a_cursor_of_another_list_is_invalid_cursor() -> None:
    with pytest.raises(InvalidInputError):
        parse_id_cursor(new_id(IdPrefix.THREAD), IdPrefix.RUN)
    with pytest.raises(InvalidInputError):
        parse_time_id_cursor(f"1.{new_id(IdPrefix.RUN)}", IdPrefix.THREAD)


@pytest.fixture
async def sqlite_conn() -> AsyncIterator[AsyncConnection]:
    """An in-memory SQLite with the tables: enough to run the thread store's cursor parsing."""
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata_obj.create_all)
            yield conn
    finally:
        await engine.dispose()


async def test_a_thread_store_refuses_a_malformed_cursor(
    sqlite_conn: AsyncConnection,
) -> None:
    store = ThreadStore(max_metadata_bytes=8192)
    ctx = UserContext.create(new_id(IdPrefix.USER))
    for cursor in ("yesterday.thr_x", f"2024-05-01T12:00:00.{new_id(IdPrefix.THREAD)}"):
        with pytest.raises(InvalidInputError) as caught:
            await store.page(sqlite_conn, ctx, cursor=cursor)
        assert caught.value.code == "invalid_cursor"
