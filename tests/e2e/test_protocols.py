"""AG-UI and the AI SDK UI message stream against a real `threadline serve`, with the
protocols' own unmodified clients: the `ag-ui-validate` package (PyPI), `@ag-ui/client`'s
`HttpAgent` and the `ai` package's `DefaultChatTransport` + `readUIMessageStream` (npm,
installed by `.ci/run` from tests/node/package-lock.json). The Node scripts print JSON that
these tests assert on; each runs as a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ag_ui_validate.pytest_plugin import validate_agui_endpoint

from tests.e2e.sockets_support import ServerProcess, server_factory

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
NODE_TIMEOUT = 90.0
WAIT = 30.0
PASSWORD = "correct horse battery staple"
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # the server imports tests.e2e.protocol_agents
    try:
        with server_factory("sqlite", request, tmp_path_factory.mktemp("protocols")) as start:
            yield start(agents="tests.e2e.protocol_agents", demo_delay_seconds=0.01)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def register(server: ServerProcess) -> dict[str, str]:
    email = f"proto-{uuid.uuid4().hex[:12]}@example.com"
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        token = http.post("/v1/auth/token", json={"email": email, "password": PASSWORD})
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def node(script: str, *args: str) -> JSON:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir():
        raise AssertionError("run `npm ci --prefix tests/node` first (.ci/run does)")
    done = subprocess.run(
        ["node", script, *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"node {script} failed:\n{done.stderr[-3000:]}"
    result: JSON = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def agui_input(thread_id: str, text: str, *, message_id: str = "u-1") -> JSON:
    return {
        "threadId": thread_id,
        "runId": f"client-run-{uuid.uuid4().hex[:8]}",
        "messages": [{"id": message_id, "role": "user", "content": text}],
        "tools": [],
        "context": [],
        "state": {},
        "forwardedProps": {},
    }


def sse_events(lines: Iterator[str], *, until: str, limit: int = 10_000) -> list[JSON]:
    """AG-UI events (with their SSE id under `_id`) from `response.iter_lines()`, until one
    of type `until`."""
    events: list[JSON] = []
    last_id: str | None = None
    for line in lines:
        if line.startswith("id: "):
            last_id = line[4:]
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            event["_id"] = last_id
            last_id = None
            events.append(event)
            if event["type"] == until or len(events) >= limit:
                return events
    raise AssertionError(f"the stream ended before {until}: {[e['type'] for e in events]}")


def thread_id_of(server: ServerProcess, headers: dict[str, str], client_id: str) -> str:
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        threads = http.get("/v1/threads").json()["data"]
    (thread,) = [t for t in threads if t["metadata"].get("client_thread_id") == client_id]
    return str(thread["id"])


def wait_idle(server: ServerProcess, headers: dict[str, str], thread_id: str) -> list[JSON]:
    deadline = time.monotonic() + WAIT
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        while time.monotonic() < deadline:
            runs: list[JSON] = http.get(f"/v1/threads/{thread_id}/runs").json()["data"]
            if runs and all(r["status"] not in ("queued", "running") for r in runs):
                return runs
            time.sleep(0.1)  # polling a server process; bounded by the deadline
    raise AssertionError("the thread's runs did not finish")


# ------------------------------------------------------------------------------ AG-UI


async def test_ag_ui_validator_passes_a_run_with_a_tool_call(server: ServerProcess) -> None:
    headers = register(server)
    report = await validate_agui_endpoint(
        f"{server.base_url}/v1/agui/demo",
        headers=headers,
        input=agui_input(f"validate-{uuid.uuid4().hex[:6]}", "What is 12*7?"),
        timeout_ms=60_000,
    )
    found = [(d.rule, d.severity, d.message) for d in report.diagnostics]
    assert report.summary.errors == 0 and report.summary.warnings == 0, found
    assert report.event_count > 5 and not report.internal_errors


def test_http_agent_runs_twice_on_one_thread(server: ServerProcess) -> None:
    headers = register(server)
    token = headers["Authorization"].removeprefix("Bearer ")
    client_thread = f"agui-{uuid.uuid4().hex[:8]}"
    result = node("agui_run.mjs", server.base_url, token, client_thread, "demo")
    first, second = result["runs"]

    convo = [m for m in first["messages"] if m["role"] != "reasoning"]
    assert [m["role"] for m in convo] == ["user", "assistant", "tool", "assistant"]
    user, calling, tool_result, answer = convo
    assert user == {"id": "user-1", "role": "user", "content": "What is 12*7?"}
    (call,) = calling["toolCalls"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "12*7"}
    assert tool_result["toolCallId"] == call["id"] and tool_result["content"] == "84"
    assert answer["content"] == "12*7 = 84."

    later = [m for m in second["messages"] if m["role"] != "reasoning"]
    assert later[:4] == convo and later[4]["id"] == "user-2"
    assert later[-1]["role"] == "assistant" and later[-1]["content"] == "5*5 = 25."
    assert "RUN_STARTED" in result["events"] and "RUN_FINISHED" in result["events"]

    # The thread holds each user message once, though the client sent user-1 twice.
    thread_id = thread_id_of(server, headers, client_thread)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        stored = http.get(f"/v1/threads/{thread_id}/messages").json()["data"]
    assert [m["content"] for m in stored if m["role"] == "user"] == [
        "What is 12*7?",
        "And what is 5*5?",
    ]


def test_thread_events_replay_across_runs_and_resume(server: ServerProcess) -> None:
    headers = register(server)
    client_thread = f"replay-{uuid.uuid4().hex[:8]}"
    base = server.base_url
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for n, text in enumerate(("What is 12*7?", "What is 5*5?")):
            body = agui_input(client_thread, text, message_id=f"u-{n}")
            with http.stream("POST", "/v1/agui/demo", json=body) as response:
                assert response.status_code == 200
                sse_events(response.iter_lines(), until="RUN_FINISHED")

        with http.stream("GET", f"/v1/agui/threads/{client_thread}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            events = sse_events(lines, until="RUN_FINISHED")
            events += sse_events(lines, until="RUN_FINISHED")
        types = [e["type"] for e in events]
        assert types.count("RUN_STARTED") == 2 and types.count("RUN_FINISHED") == 2
        texts = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
        assert texts == ["What is 12*7?", "12*7 = 84.", "What is 5*5?", "5*5 = 25."]
        assert any(e["type"] == "TOOL_CALL_RESULT" and e["content"] == "84" for e in events)

        # A reloaded client resumes after the first run: only the second one comes back.
        first_end = next(int(e["_id"]) for e in events if e["type"] == "RUN_FINISHED")
        resume = {"Last-Event-ID": str(first_end)}
        path = f"/v1/agui/threads/{client_thread}/events"
        with http.stream("GET", path, headers=resume) as response:
            again = sse_events(response.iter_lines(), until="RUN_FINISHED")
        assert [e["delta"] for e in again if e["type"] == "TEXT_MESSAGE_CONTENT"] == [
            "What is 5*5?",
            "5*5 = 25.",
        ]
        ids = [int(e["_id"]) for e in again if e["_id"]]
        assert ids == sorted(ids) and ids[0] > first_end


def test_a_reloaded_http_agent_catches_up_from_its_last_seq(server: ServerProcess) -> None:
    headers = register(server)
    token = headers["Authorization"].removeprefix("Bearer ")
    client_thread = f"reload-{uuid.uuid4().hex[:8]}"

    def run(n: int, text: str) -> None:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
            body = agui_input(client_thread, text, message_id=f"u-{n}")
            with http.stream("POST", "/v1/agui/demo", json=body) as response:
                sse_events(response.iter_lines(), until="RUN_FINISHED")

    run(1, "What is 12*7?")
    run(2, "What is 5*5?")
    fresh = node("agui_reload.mjs", server.base_url, token, client_thread)
    convo = [(m["role"], m.get("content")) for m in fresh["messages"] if m["role"] != "reasoning"]
    assert convo == [
        ("user", "What is 12*7?"),
        ("assistant", None),
        ("tool", "84"),
        ("assistant", "12*7 = 84."),
        ("user", "What is 5*5?"),
        ("assistant", None),
        ("tool", "25"),
        ("assistant", "5*5 = 25."),
    ]
    assert fresh["events"].count("RUN_STARTED") == 2

    run(3, "What is 2*3?")
    again = node("agui_reload.mjs", server.base_url, token, client_thread, str(fresh["lastSeq"]))
    texts = [m.get("content") for m in again["messages"] if m["role"] in ("user", "assistant")]
    assert [t for t in texts if t] == ["What is 2*3?", "2*3 = 6."]
    assert again["lastSeq"] > fresh["lastSeq"]


def test_an_idle_stream_gets_a_keep_alive_within_15_seconds(server: ServerProcess) -> None:
    headers = register(server)
    client_thread = f"idle-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        body = agui_input(client_thread, "hello")
        with http.stream("POST", "/v1/agui/demo", json=body) as response:
            sse_events(response.iter_lines(), until="RUN_FINISHED")
        path = f"/v1/agui/threads/{client_thread}/events"
        with http.stream("GET", path, timeout=httpx.Timeout(60, read=20)) as response:
            lines = response.iter_lines()
            sse_events(lines, until="RUN_FINISHED")  # the replay; then the thread is idle
            caught_up = time.monotonic()
            comment = next(line for line in lines if line.startswith(":"))
            waited = time.monotonic() - caught_up
    assert comment == ": keep-alive" and waited < 16, waited


def test_the_multitask_strategy_holds_on_the_protocol_endpoints(server: ServerProcess) -> None:
    headers = register(server)
    client_thread = f"busy-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        first = agui_input(client_thread, "What is 6*7?", message_id="u-1")
        with http.stream("POST", "/v1/agui/slow", json=first) as response:
            lines = response.iter_lines()
            sse_events(lines, until="RUN_STARTED")
            second = {
                **agui_input(client_thread, "And 2*3?", message_id="u-2"),
                "forwardedProps": {"multitask_strategy": "reject"},
            }
            refused = http.post("/v1/agui/slow", json=second)
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "run_in_progress"
            rest = sse_events(lines, until="RUN_FINISHED")
    assert rest[-1]["outcome"] == {"type": "success"}
    # Nothing of the refused request was written: its message is not in the thread.
    thread_id = thread_id_of(server, headers, client_thread)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        stored = http.get(f"/v1/threads/{thread_id}/messages").json()["data"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["What is 6*7?"]


def test_a_dropped_client_loses_nothing(server: ServerProcess) -> None:
    headers = register(server)
    client_thread = f"drop-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        body = agui_input(client_thread, "What is 6*7?")
        with http.stream("POST", "/v1/agui/slow", json=body) as response:
            sse_events(response.iter_lines(), until="RUN_STARTED")
        # The client is gone mid-run; the run goes on and its events are all in the log.
        runs = wait_idle(server, headers, thread_id_of(server, headers, client_thread))
        assert [r["status"] for r in runs] == ["completed"]
        with http.stream("GET", f"/v1/agui/threads/{client_thread}/events") as response:
            events = sse_events(response.iter_lines(), until="RUN_FINISHED")
    assert any(e["type"] == "TOOL_CALL_RESULT" and e["content"] == "42" for e in events)
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["outcome"]["type"] == "success"


# --------------------------------------------------------------------------- AI SDK


def test_default_chat_transport_assembles_the_ui_message(server: ServerProcess) -> None:
    headers = register(server)
    token = headers["Authorization"].removeprefix("Bearer ")
    chat = f"chat-{uuid.uuid4().hex[:8]}"
    message = node("aisdk_chat.mjs", "send", server.base_url, token, chat, "demo", "12*7?")[
        "message"
    ]
    assert message["role"] == "assistant"
    (tool,) = [p for p in message["parts"] if p["type"] == "tool-calculator"]
    assert tool["state"] == "output-available"
    assert tool["input"] == {"expression": "12*7"} and tool["output"] == "84"
    text = "".join(p["text"] for p in message["parts"] if p["type"] == "text")
    assert text == "12*7 = 84."
    # No run is active now: reconnecting returns nothing (204).
    assert node("aisdk_chat.mjs", "resume", server.base_url, token, chat) == {"resumed": None}


def test_reconnect_to_stream_resumes_a_slow_run(server: ServerProcess) -> None:
    headers = register(server)
    token = headers["Authorization"].removeprefix("Bearer ")
    chat = f"slow-{uuid.uuid4().hex[:8]}"
    out = node("aisdk_chat.mjs", "send-then-resume", server.base_url, token, chat, "slow", "6*7?")
    assert out["first"]["type"] == "start"
    resumed = out["resumed"]
    assert resumed is not None and resumed["id"] == out["first"]["messageId"]
    (tool,) = [p for p in resumed["parts"] if p["type"] == "tool-calculator"]
    assert tool["output"] == "42"
    assert "".join(p["text"] for p in resumed["parts"] if p["type"] == "text") == "6*7 = 42."


def test_stop_cancels_the_active_run(server: ServerProcess) -> None:
    headers = register(server)
    chat = f"stop-{uuid.uuid4().hex[:8]}"
    body = {
        "id": chat,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "6*7?"}]}],
        "agent": "slow",
    }
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/ai-sdk/chat", json=body) as response:
            assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
            lines = response.iter_lines()
            assert (
                json.loads(next(line for line in lines if line.startswith("data: "))[6:])["type"]
                == "start"
            )
            stopped = http.post(f"/v1/ai-sdk/chat/{chat}/stop")
            assert stopped.status_code == 200 and stopped.json()["run"] is not None
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2]) == {"type": "abort", "reason": "user"}
        assert http.post(f"/v1/ai-sdk/chat/{chat}/stop").json() == {"run": None}


def test_regenerate_answers_again_without_storing_the_message_twice(
    server: ServerProcess,
) -> None:
    headers = register(server)
    chat = f"regen-{uuid.uuid4().hex[:8]}"
    user = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "What is 12*7?"}]}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        for trigger in ("submit-message", "regenerate-message"):
            body = {"id": chat, "messages": [user], "trigger": trigger}
            with http.stream("POST", "/v1/ai-sdk/chat", json=body) as response:
                parts = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert parts[-1] == "[DONE]" and json.loads(parts[-2])["type"] == "finish"
        thread_id = thread_id_of(server, headers, chat)
        stored = http.get(f"/v1/threads/{thread_id}/messages").json()["data"]
    assert [m["role"] for m in stored].count("user") == 1
    assert [m["content"] for m in stored if m["role"] == "assistant"][-1] == "12*7 = 84."
    assert len(wait_idle(server, headers, thread_id)) == 2


# ------------------------------------------------------------------ isolation and input


def test_another_users_thread_is_refused_on_every_endpoint(server: ServerProcess) -> None:
    owner, other = register(server), register(server)
    client_thread = f"mine-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = agui_input(client_thread, "What is 12*7?")
        with http.stream("POST", "/v1/agui/demo", json=body, headers=owner) as response:
            sse_events(response.iter_lines(), until="RUN_FINISHED")
        thread_id = thread_id_of(server, owner, client_thread)
        ui_body = {"id": thread_id, "messages": []}
        refused = [
            http.post("/v1/agui/demo", json=agui_input(thread_id, "hi"), headers=other),
            http.get(f"/v1/agui/threads/{thread_id}/events", headers=other),
            http.post("/v1/ai-sdk/chat", json=ui_body, headers=other),
            http.get(f"/v1/ai-sdk/chat/{thread_id}/stream", headers=other),
            http.post(f"/v1/ai-sdk/chat/{thread_id}/stop", headers=other),
        ]
        assert [r.status_code for r in refused] == [404] * 5
        assert {r.json()["error"]["code"] for r in refused} == {"thread_not_found"}
        # The owner's own client id names nothing of the owner's for someone else.
        assert (
            http.get(f"/v1/agui/threads/{client_thread}/events", headers=other).status_code == 404
        )
        # And without a token nothing answers.
        assert http.post("/v1/agui/demo", json=body).status_code == 401


def test_bad_input_gets_clear_errors_and_never_a_5xx(server: ServerProcess) -> None:
    headers = register(server)
    good = agui_input(f"bad-{uuid.uuid4().hex[:8]}", "What is 12*7?")
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        answers = {
            "malformed": http.post("/v1/agui/demo", json={"threadId": "x", "messages": "no"}),
            "not json": http.post(
                "/v1/agui/demo", content=b"{", headers={"Content-Type": "application/json"}
            ),
            "unknown agent": http.post("/v1/agui/nobody", json=good),
            "oversized": http.post("/v1/agui/demo", json=agui_input("big", "x" * 200_000)),
            "bad cursor": http.get(
                "/v1/agui/threads/whatever/events", headers={"Last-Event-ID": "soon"}
            ),
            "bad trigger": http.post(
                "/v1/ai-sdk/chat", json={"id": "c", "messages": [], "trigger": "again"}
            ),
            "unknown chat agent": http.post(
                "/v1/ai-sdk/chat", json={"id": "c", "messages": [], "agent": "nobody"}
            ),
            "bad strategy": http.post(
                "/v1/agui/demo", json={**good, "forwardedProps": {"multitask_strategy": "x"}}
            ),
        }
    for name, response in answers.items():
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        assert response.json()["error"]["code"], name
    assert answers["unknown agent"].status_code == 404
    assert answers["unknown agent"].json()["error"]["code"] == "agent_not_found"
