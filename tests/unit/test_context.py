"""UserContext: only real-looking ids get in, and nothing can change a context once built."""

from __future__ import annotations

import dataclasses

import pytest

from threadline.context import InvalidContextError, UserContext
from threadline.errors import InvalidInputError
from threadline.ids import IdPrefix, new_id

pytestmark = pytest.mark.unit


@pytest.fixture
def user_id() -> str:
    return new_id(IdPrefix.USER)


@pytest.fixture
def ctx(user_id: str) -> UserContext:
    return UserContext.create(user_id, request_id="req-1")


def test_create_with_every_id(user_id: str) -> None:
    thread_id, run_id = new_id(IdPrefix.THREAD), new_id(IdPrefix.RUN)

    ctx = UserContext.create(
        user_id,
        request_id="0f1e2d3c4b5a",
        thread_id=thread_id,
        run_id=run_id,
        connection_id="conn:7",
    )

    assert (ctx.user_id, ctx.request_id, ctx.thread_id, ctx.run_id, ctx.connection_id) == (
        user_id,
        "0f1e2d3c4b5a",
        thread_id,
        run_id,
        "conn:7",
    )


def test_create_with_only_a_user(user_id: str) -> None:
    ctx = UserContext.create(user_id)

    assert ctx == UserContext(user_id)
    assert ctx.thread_id is ctx.run_id is ctx.request_id is ctx.connection_id is None


@pytest.mark.parametrize("field", ["user_id", "thread_id", "run_id", "request_id"])
def test_context_is_frozen(ctx: UserContext, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(ctx, field, new_id(IdPrefix.USER))


def test_context_takes_no_new_attributes(ctx: UserContext) -> None:
    # slots=True as well as frozen: no side channel to hang another identity on.
    with pytest.raises((AttributeError, TypeError)):
        ctx.acting_as = new_id(IdPrefix.USER)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="whitespace"),
        pytest.param("None", id="None"),
        pytest.param("null", id="null"),
        pytest.param("NULL", id="NULL"),
        pytest.param("undefined", id="undefined"),
        pytest.param("test", id="test"),
        pytest.param(" nil ", id="nil-padded"),
        pytest.param(new_id(IdPrefix.THREAD), id="thread-id-as-user"),
        pytest.param("usr_123", id="malformed"),
        pytest.param("usr_01jd3x5q0b7w4w3m9r8p2v6kzn", id="lowercase"),
        pytest.param(" " + new_id(IdPrefix.USER), id="padded"),
    ],
)
def test_bad_user_ids_are_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidContextError) as caught:
        UserContext.create(bad)

    assert caught.value.field == "user_id"
    assert str(caught.value).startswith("user_id:")
    assert caught.value.code == "invalid_context"
    assert isinstance(caught.value, InvalidInputError)  # so the API answers 422, not 500


@pytest.mark.parametrize("bad", [None, 42, b"usr_01JD3X5Q0B7W4W3M9R8P2V6KZN", ["usr_x"]])
def test_non_string_user_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidContextError) as caught:
        UserContext.create(bad)  # type: ignore[arg-type]

    assert caught.value.field == "user_id"


@pytest.mark.parametrize(
    ("field", "wrong"),
    [
        ("thread_id", new_id(IdPrefix.USER)),
        ("thread_id", "null"),
        ("thread_id", ""),
        ("thread_id", 7),
        ("run_id", new_id(IdPrefix.THREAD)),
        ("run_id", "undefined"),
        ("run_id", "run_"),
    ],
)
def test_bad_optional_ids_are_refused_naming_the_field(
    user_id: str, field: str, wrong: object
) -> None:
    with pytest.raises(InvalidContextError) as caught:
        UserContext.create(user_id, **{field: wrong})  # type: ignore[arg-type]

    assert caught.value.field == field
    assert field in str(caught.value)


# --- Narrowing ---------------------------------------------------------------------------------


def test_for_thread_returns_a_new_context(ctx: UserContext) -> None:
    thread_id = new_id(IdPrefix.THREAD)

    narrowed = ctx.for_thread(thread_id)

    assert narrowed.thread_id == thread_id
    assert (narrowed.user_id, narrowed.request_id) == (ctx.user_id, ctx.request_id)
    assert ctx.thread_id is None


@pytest.mark.parametrize("bad", [new_id(IdPrefix.RUN), "None", "", "thr_x", None])
def test_for_thread_validates(ctx: UserContext, bad: str | None) -> None:
    with pytest.raises(InvalidContextError) as caught:
        ctx.for_thread(bad)  # type: ignore[arg-type]

    assert caught.value.field == "thread_id"


def test_for_run_sets_run_and_thread(ctx: UserContext) -> None:
    run_id, thread_id = new_id(IdPrefix.RUN), new_id(IdPrefix.THREAD)

    narrowed = ctx.for_run(run_id, thread_id=thread_id)

    assert (narrowed.run_id, narrowed.thread_id, narrowed.user_id) == (
        run_id,
        thread_id,
        ctx.user_id,
    )
    assert ctx.run_id is None


@pytest.mark.parametrize(
    ("run_id", "thread_id", "field"),
    [
        (new_id(IdPrefix.THREAD), new_id(IdPrefix.THREAD), "run_id"),
        ("undefined", new_id(IdPrefix.THREAD), "run_id"),
        (new_id(IdPrefix.RUN), new_id(IdPrefix.RUN), "thread_id"),
        (new_id(IdPrefix.RUN), "null", "thread_id"),
    ],
)
def test_for_run_validates_both_ids(
    ctx: UserContext, run_id: str, thread_id: str, field: str
) -> None:
    with pytest.raises(InvalidContextError) as caught:
        ctx.for_run(run_id, thread_id=thread_id)

    assert caught.value.field == field


# --- Request and connection ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id", ["a", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "edge.lb-01:req_42", "x" * 128]
)
def test_request_ids_that_are_accepted(user_id: str, request_id: str) -> None:
    assert UserContext.create(user_id, request_id=request_id).request_id == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 129, id="too-long"),
        pytest.param("has space", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param("abc\r\nX-Injected: 1", id="crlf-inside"),
        pytest.param("ünïcode", id="non-ascii"),
    ],
)
@pytest.mark.parametrize("field", ["request_id", "connection_id"])
def test_request_and_connection_ids_are_checked(user_id: str, field: str, request_id: str) -> None:
    with pytest.raises(InvalidContextError) as caught:
        UserContext.create(user_id, **{field: request_id})  # type: ignore[arg-type]

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:")


@pytest.mark.parametrize("field", ["request_id", "connection_id"])
def test_a_trailing_newline_is_refused(user_id: str, field: str) -> None:
    with pytest.raises(InvalidContextError):
        UserContext.create(user_id, **{field: "abc\n"})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["request_id", "connection_id"])
def test_a_non_string_request_id_is_an_invalid_context(user_id: str, field: str) -> None:
    with pytest.raises(InvalidContextError) as caught:
        UserContext.create(user_id, **{field: 12345})  # type: ignore[arg-type]

    assert caught.value.field == field
