"""The protocol endpoints in-process, on SQLite and on PostgreSQL + Redis: whole responses
(the run completes on the embedded worker), the thread mapping under concurrency, and the
durable log behind both protocols. The real-server, real-client tests are in
tests/e2e/test_protocols.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from ag_ui_validate.pytest_plugin import assert_valid_agui

pytestmark = pytest.mark.integration


def data_lines(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


async def test_ag_ui_run_is_valid_and_its_events_are_durable(client, make_user):
    user = await make_user()
    body = {
        "threadId": "client-thread-1",
        "runId": "client-run-1",
        "messages": [{"id": "u1", "role": "user", "content": "What is 12*7?"}],
    }
    response = await client.post("/v1/agui/demo", json=body, headers=user.headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line) for line in data_lines(response.text)]
    assert_valid_agui(events, max_warnings=0)
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["runId"] == "client-run-1"

    # The SSE ids are the thread's seqs; the run's events are in the thread's own log. A text
    # delta is not numbered: its frame repeats the id of the durable event it follows.
    ids: list[tuple[int, str]] = []
    for frame in response.text.split("\n\n"):
        lines = frame.splitlines()
        if lines and lines[0].startswith("id: "):
            ids.append((int(lines[0][4:]), json.loads(data_lines(frame)[-1])["type"]))
    for (before, _), (seq, kind) in zip(ids, ids[1:], strict=False):
        assert seq > before or (seq == before and kind == "TEXT_MESSAGE_CONTENT"), ids
    assert any(kind == "TEXT_MESSAGE_CONTENT" for _, kind in ids), ids
    threads = (await client.get("/v1/threads", headers=user.headers)).json()["data"]
    (thread,) = threads
    assert thread["metadata"] == {"client_thread_id": "client-thread-1"}
    runs = (await client.get(f"/v1/threads/{thread['id']}/runs", headers=user.headers)).json()
    assert [r["status"] for r in runs["data"]] == ["completed"]


async def test_first_use_of_a_chat_id_at_once_makes_one_thread(client, make_user):
    user = await make_user()

    async def send(n: int) -> str:
        message = {"id": f"m{n}", "role": "user", "parts": [{"type": "text", "text": f"{n}*7?"}]}
        body = {"id": "same-chat", "messages": [message]}
        response = await client.post("/v1/ai-sdk/chat", json=body, headers=user.headers)
        assert response.status_code == 200, response.text
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        return response.text

    bodies = await asyncio.gather(*(send(n) for n in range(1, 5)))
    for text in bodies:
        parts = data_lines(text)
        assert parts[-1] == "[DONE]" and json.loads(parts[-2])["type"] == "finish"
    threads = (await client.get("/v1/threads", headers=user.headers)).json()["data"]
    assert len(threads) == 1
    messages = await client.get(f"/v1/threads/{threads[0]['id']}/messages", headers=user.headers)
    users = [m for m in messages.json()["data"] if m["role"] == "user"]
    assert sorted(m["metadata"]["client_message_id"] for m in users) == ["m1", "m2", "m3", "m4"]


async def test_a_threadline_thread_id_is_used_as_is(client, make_user):
    user = await make_user()
    created = await client.post("/v1/threads", json={"title": "mine"}, headers=user.headers)
    thread_id = created.json()["id"]
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}
    body = {"id": thread_id, "messages": [message], "agent": "demo"}
    response = await client.post("/v1/ai-sdk/chat", json=body, headers=user.headers)
    assert response.status_code == 200
    assert len((await client.get("/v1/threads", headers=user.headers)).json()["data"]) == 1
    stream = await client.get(f"/v1/ai-sdk/chat/{thread_id}/stream", headers=user.headers)
    assert stream.status_code == 204  # the run is over


def ui_message(message_id: str, *parts: dict[str, object], role: str = "user") -> dict[str, object]:
    return {"id": message_id, "role": role, "parts": list(parts)}


@pytest.mark.parametrize(
    ("request_body", "status", "code"),
    [
        # A body naming an unknown agent is refused even when the query names a good one.
        (
            {
                "id": "c1",
                "agent": "nobody",
                "messages": [ui_message("m1", {"type": "text", "text": "hi"})],
            },
            404,
            "agent_not_found",
        ),
        # A message id with a control character, whatever the message's role.
        (
            {
                "id": "c1",
                "messages": [ui_message("a\x01", {"type": "text", "text": "hi"}, role="assistant")],
            },
            422,
            "invalid_client_id",
        ),
        # A text part whose text is not a string, and a user message with no text.
        (
            {"id": "c1", "messages": [ui_message("m1", {"type": "text", "text": 7})]},
            422,
            "invalid_part",
        ),
        ({"id": "c1", "messages": [ui_message("m1", {"type": "image"})]}, 422, "message_empty"),
    ],
)
async def test_an_ai_sdk_request_is_refused_whole_before_anything_is_written(
    client, make_user, request_body, status, code
):
    user = await make_user()
    response = await client.post(
        "/v1/ai-sdk/chat?agent=demo", json=request_body, headers=user.headers
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert (await client.get("/v1/threads", headers=user.headers)).json()["data"] == []


async def test_a_resent_message_is_checked_like_a_new_one(client, make_user):
    # The OpenAPI document states one rule for a request, whatever the thread already holds: a
    # user message the thread has is still refused when it has no text.
    user = await make_user()
    first = {"id": "chat", "messages": [ui_message("m1", {"type": "text", "text": "hello"})]}
    assert (
        await client.post("/v1/ai-sdk/chat", json=first, headers=user.headers)
    ).status_code == 200
    again = {"id": "chat", "messages": [ui_message("m1", {"type": "text", "text": "  "})]}
    response = await client.post("/v1/ai-sdk/chat", json=again, headers=user.headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "message_empty"


async def test_an_ag_ui_message_of_any_role_needs_a_clean_id(client, make_user):
    user = await make_user()
    body = {
        "threadId": "t1",
        "runId": "r1",
        "messages": [
            {"id": "a\x1b[2J", "role": "assistant", "content": "earlier answer"},
            {"id": "u1", "role": "user", "content": "What is 12*7?"},
        ],
    }
    response = await client.post("/v1/agui/demo", json=body, headers=user.headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_client_id"
    assert (await client.get("/v1/threads", headers=user.headers)).json()["data"] == []
