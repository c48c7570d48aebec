"""The new user's first conversation, watched live over the WebSocket and over SSE, against a
real `threadline serve` process (SQLite)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest
from websockets.asyncio.client import connect

from tests.e2e.sockets_support import (
    EventSocket,
    ServerProcess,
    assert_run_lifecycle,
    assert_strictly_increasing,
    compact,
    create_thread,
    durable,
    http_client,
    messages_of,
    open_socket,
    open_sse,
    post_message,
    register,
    server_factory,
)
from tests.live_order import assert_ordered
from threadline.ids import IdPrefix, new_id

pytestmark = pytest.mark.e2e
QUESTION = "what is 12*7?"
ANSWER = "12*7 = 84."


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    # A little model latency, so that a stream can be cut while the run is still going.
    with server_factory("sqlite", request, tmp_path_factory.mktemp("flow")) as start:
        yield start(demo_delay_seconds=0.02)


def index_of(events: list[dict[str, object]], kind: str, *, last: bool = False) -> int:
    positions = [i for i, e in enumerate(events) if e["type"] == kind]
    assert positions, f"no {kind} in {[e['type'] for e in events]}"
    return positions[-1] if last else positions[0]


def check_demo_run(events: list[dict[str, object]], run_id: str) -> None:
    """The documented order of one `what is 12*7?` run of the demo agent."""
    run = [e for e in events if e.get("run_id") == run_id]
    assert_run_lifecycle(run, run_id)
    started = index_of(run, "agent_started")
    thinking = index_of(run, "agent_thinking")
    executing = index_of(run, "tool_executing")
    completed_tool = index_of(run, "tool_completed")
    first_delta = index_of(run, "message_delta")
    last_delta = index_of(run, "message_delta", last=True)
    done = index_of(run, "agent_completed")
    assert started < thinking < executing < completed_tool < first_delta <= last_delta < done
    assert run[executing]["data"] == {
        "tool": "calculator",
        "call_id": run[executing]["data"]["call_id"],  # type: ignore[index]
        "arguments": {"expression": "12*7"},
    }
    tool_done = run[completed_tool]["data"]
    assert tool_done["result"] == "84" and tool_done["is_error"] is False  # type: ignore[index]
    assert tool_done["call_id"] == run[executing]["data"]["call_id"]  # type: ignore[index]
    streamed = "".join(
        str(e["data"]["text"])  # type: ignore[index]
        for e in run[completed_tool:]
        if e["type"] == "message_delta"
    )
    assert streamed == ANSWER
    assert run[done]["data"]["text"] == ANSWER  # type: ignore[index]
    assert_ordered(run)


async def test_first_conversation_is_streamed_to_its_owner_only(server: ServerProcess) -> None:
    async with asyncio.timeout(90), http_client(server) as http:
        alice, bob = await register(http), await register(http)
        alice_thread = await create_thread(http, alice, "arithmetic")
        bob_thread = await create_thread(http, bob, "bob's own")
        # Alice authenticates with the subprotocol header, Bob with a first `auth` message.
        async with (
            open_socket(server, alice.token) as alice_ws,
            open_socket(server, bob.token, auth="message") as bob_ws,
        ):
            assert alice_ws.ws.subprotocol == "threadline"
            snapshot = await alice_ws.subscribe(alice_thread)
            assert snapshot["active_run"] is None and snapshot["last_seq"] >= 1
            await bob_ws.subscribe(bob_thread)
            await bob_ws.send({"type": "subscribe", "thread_id": alice_thread})
            refused = await bob_ws.until_type("error")
            assert refused["code"] == "thread_not_found", refused

            await alice_ws.send(
                {
                    "type": "send_message",
                    "thread_id": alice_thread,
                    "content": QUESTION,
                    "agent": "demo",
                }
            )
            accepted = await alice_ws.until_type("message_accepted")
            run_id = str(accepted["run_id"])
            assert run_id.startswith("run_") and str(accepted["message_id"]).startswith("msg_")
            await alice_ws.until_type("agent_completed", run_id=run_id)

            events = alice_ws.events
            assert {e["thread_id"] for e in events} == {alice_thread}
            assert_strictly_increasing(events)
            check_demo_run(events, run_id)
            kinds = [e["type"] for e in events]
            # The question is stored (and announced) before its run is queued.
            assert kinds.index("message_created") < kinds.index("run_queued")

            # Bob's socket is still open and answering, and got nothing of Alice's.
            await bob_ws.ping()
            leaked = [
                m
                for m in bob_ws.messages
                if (m.get("thread_id") == alice_thread and m.get("type") != "error")
                or m.get("run_id") == run_id
            ]
            assert leaked == []
            assert [e["thread_id"] for e in bob_ws.events] == []  # nothing happened on his

        messages = await messages_of(http, alice, alice_thread)
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        assert messages[0]["content"] == QUESTION
        assert messages[1]["tool_calls"][0]["name"] == "calculator"
        assert messages[2]["content"] == "84"
        assert messages[3]["content"] == ANSWER and messages[3]["run_id"] == run_id
        # Bob cannot read Alice's thread either.
        forbidden = await http.get(f"/v1/threads/{alice_thread}/messages", headers=bob.headers)
        assert forbidden.status_code == 404


@pytest.mark.parametrize("auth", ["subprotocol", "message"])
async def test_a_bad_token_closes_the_socket_with_4001(server: ServerProcess, auth: str) -> None:
    async with asyncio.timeout(60), http_client(server) as http:
        user = await register(http)
        for token in ("not-a-token", user.token[:-4] + "AAAA"):
            offered = ["threadline", f"bearer.{token}"] if auth == "subprotocol" else []
            async with connect(server.ws_url, subprotocols=offered or None) as ws:  # type: ignore[arg-type]
                sock = EventSocket(ws)
                if auth == "message":
                    await sock.send({"type": "auth", "token": token})
                error = await sock.next()
                assert error["type"] == "error" and error["code"] != "internal_error", error
                closed = await sock.drain_until_closed()
                assert closed.rcvd is not None and closed.rcvd.code == 4001, closed


def _forge(secret: str, **claims: object) -> str:
    payload = {"jti": uuid.uuid4().hex, "iss": "threadline", "iat": int(time.time()), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


async def test_signed_tokens_of_a_missing_user_or_absurd_expiry_close_the_socket(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The WebSocket refuses them like every HTTP endpoint, with the same codes."""
    secret = "e2e-known-secret-key-0123456789abcdefghijklmnop"
    with server_factory("sqlite", request, tmp_path_factory.mktemp("forged")) as start:
        server = start(secret_key=secret)
        async with asyncio.timeout(60), http_client(server) as http:
            user = await register(http)
            later = int(time.time()) + 3600
            cases = {
                "token_user_not_found": _forge(secret, sub=new_id(IdPrefix.USER), exp=later),
                "token_invalid": _forge(secret, sub=user.id, exp=10**30),
            }
            for code, token in cases.items():
                offered = ["threadline", f"bearer.{token}"]
                async with connect(server.ws_url, subprotocols=offered) as ws:  # type: ignore[arg-type]
                    sock = EventSocket(ws)
                    error = await sock.next()
                    assert error == {"type": "error", "code": code, "message": "Not authenticated"}
                    closed = await sock.drain_until_closed()
                    assert closed.rcvd is not None and closed.rcvd.code == 4001, closed
                    assert closed.rcvd.reason == code
                over_http = await http.get(
                    "/v1/threads", headers={"Authorization": f"Bearer {token}"}
                )
                assert over_http.status_code == 401 and over_http.json()["error"]["code"] == code


async def test_a_first_message_that_is_not_auth_closes_with_4001(server: ServerProcess) -> None:
    async with asyncio.timeout(60):
        for first in ('{"type": "ping"}', "not json", '{"type": "auth"}'):
            async with connect(server.ws_url) as ws:
                sock = EventSocket(ws)
                await ws.send(first)
                error = await sock.next()
                assert error["type"] == "error", error
                closed = await sock.drain_until_closed()
                assert closed.rcvd is not None and closed.rcvd.code == 4001, (first, closed)


async def test_ping_unknown_and_invalid_messages(server: ServerProcess) -> None:
    async with asyncio.timeout(60), http_client(server) as http:
        user = await register(http)
        async with open_socket(server, user.token) as ws:
            await ws.send({"type": "ping"})
            assert await ws.next() == {"type": "pong"}
            await ws.send({"type": "shout", "thread_id": "thr_x"})
            unknown = await ws.next()
            assert unknown["type"] == "error" and unknown["code"] == "unknown_message_type"
            await ws.ws.send("{not json")
            invalid = await ws.next()
            assert invalid["type"] == "error" and invalid["code"] == "validation_error"
            await ws.send({"type": "subscribe"})  # no thread_id
            missing = await ws.next()
            assert missing["type"] == "error" and missing["code"] == "validation_error"
            await ws.send({"type": "subscribe", "thread_id": "thr_does_not_exist"})
            absent = await ws.next()
            assert absent["type"] == "error" and absent["code"] == "thread_not_found"
            # None of this closed the connection.
            await ws.send({"type": "ping"})
            assert await ws.next() == {"type": "pong"}
            with pytest.raises(TimeoutError):  # and nothing else arrives unasked
                await ws.next(within=0.3)


async def test_sse_streams_the_run_and_resumes_from_last_event_id(server: ServerProcess) -> None:
    async with asyncio.timeout(90), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)

        async with open_sse(http, user, thread_id) as first:
            snapshot = await first.next()
            assert snapshot["event"] == "snapshot" and snapshot["id"] is None
            posted = await post_message(http, user, thread_id, QUESTION, agent="demo")
            run_id = posted["run"]["id"]
            # Cut the stream right after the tool result, while the answer is being written.
            cut = await first.until(lambda f: f["event"] == "tool_completed")
        cut_seq = int(cut["id"])
        before_cut = first.events
        for frame in first.frames:
            if frame["id"] is not None:
                assert frame["event"] == frame["data"]["type"]
                assert int(frame["id"]) == frame["data"]["seq"]

        async with open_sse(http, user, thread_id, last_event_id=cut_seq) as resumed:
            await resumed.until(
                lambda f: f["event"] == "agent_completed" and f["data"]["run_id"] == run_id
            )
        after_cut = resumed.events

        async with open_sse(http, user, thread_id, after=0) as replay:
            await replay.until(
                lambda f: f["event"] == "agent_completed" and f["data"]["run_id"] == run_id
            )
        log = replay.events
        assert log == durable(log), "replay carries stored events only"

        # The resumed stream carries every durable event after the cut, once, in order.
        assert compact(durable(after_cut)) == [e for e in compact(log) if e[0] > cut_seq]
        assert all(int(e["seq"]) > cut_seq for e in after_cut)
        # Together, the two streams hold the whole log, nothing twice.
        seen = [e["seq"] for e in durable(before_cut + after_cut)]
        assert seen == [e["seq"] for e in log if e["seq"] > snapshot["data"]["last_seq"]]
        check_demo_run(before_cut + after_cut, run_id)
        assert_strictly_increasing(before_cut + after_cut)

        # `?after=` resumes the same way as the header.
        async with open_sse(http, user, thread_id, after=cut_seq) as by_query:
            await by_query.until(
                lambda f: f["event"] == "agent_completed" and f["data"]["run_id"] == run_id
            )
        assert compact(by_query.events) == [e for e in compact(log) if e[0] > cut_seq]

        # `?after_seq=` is the WebSocket's name, and SSE's own too.
        async with open_sse(http, user, thread_id, after_seq=cut_seq) as by_seq:
            await by_seq.until(
                lambda f: f["event"] == "agent_completed" and f["data"]["run_id"] == run_id
            )
        assert compact(by_seq.events) == compact(by_query.events)
        # Given both, `after_seq` wins over its alias.
        async with open_sse(http, user, thread_id, after=0, after_seq=cut_seq) as both:
            await both.until(
                lambda f: f["event"] == "agent_completed" and f["data"]["run_id"] == run_id
            )
        assert compact(both.events) == compact(by_query.events)


async def test_sse_stream_ends_after_thread_deleted(server: ServerProcess) -> None:
    async with asyncio.timeout(60), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        async with open_sse(http, user, thread_id) as stream:
            assert (await stream.next())["event"] == "snapshot"
            deleted = await http.delete(
                f"/v1/threads/{thread_id}", params={"permanent": "true"}, headers=user.headers
            )
            assert deleted.status_code == 204
            rest = await stream.rest(within=10)
        assert [frame["event"] for frame in rest] == ["thread_deleted"]


async def test_sse_refuses_another_users_thread(server: ServerProcess) -> None:
    async with asyncio.timeout(60), http_client(server) as http:
        owner, other = await register(http), await register(http)
        thread_id = await create_thread(http, owner)
        response = await http.get(f"/v1/threads/{thread_id}/events", headers=other.headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "thread_not_found"
        anonymous = await http.get(f"/v1/threads/{thread_id}/events")
        assert anonymous.status_code == 401
