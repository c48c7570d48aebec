"""Shared helpers of the run, engine and guarantee tests (`test_runs_*`, `test_engine_*`,
`test_guarantees_*`). This module holds no tests.

- `running_app(settings)`: an app with its full lifespan (and embedded worker) offering the test
  agents, an HTTP client over it, its runtime and gateway, and the `Controls` its agents' tools
  receive as their deps (fresh per app, opened before shutdown).
- `Harness`: shortcuts over the HTTP API (users, threads, runs, messages) and the event store.
- `Watcher`: a live gateway subscription (what the WebSocket and SSE endpoints use), read with
  bounded waits. httpx's ASGI transport buffers whole responses, so SSE cannot be read live
  in-process; the gateway subscription is the same stream one layer down.
- Checks that a provider request answers every tool call it contains.

Every wait here is bounded; there is no fixed sleep that a test relies on.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from tests import agents_for_tests
from tests.conftest import TestUser, register_user
from tests.integration._support import all_messages
from threadline.api.app import create_app
from threadline.api.live.gateway import Connection, Gateway, ThreadSubscription
from threadline.api.live.streams import subscribe
from threadline.context import UserContext
from threadline.events.types import Event
from threadline.llm.providers import ProviderSet
from threadline.runtime import Runtime
from threadline.settings import Settings
from threadline.store.tables import runs as runs_table

TERMINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})
TERMINAL_EVENTS = frozenset({"agent_completed", "agent_failed", "run_cancelled"})
WAIT_SECONDS = 30.0
# Nothing listens here: the agents module declares `openai:` and `anthropic:` agents, and the
# app checks at start-up that every agent's provider is configured, so apps that do not talk
# to a fake vendor server still need these settings.
_UNUSED_OPENAI = "http://127.0.0.1:9/v1"
_UNUSED_ANTHROPIC = "http://127.0.0.1:9"


def run_settings(
    settings_factory: Callable[..., Settings],
    *,
    openai_url: str | None = None,
    anthropic_url: str | None = None,
    **overrides: object,
) -> Settings:
    """Settings for this test's backend with the fake vendors' URLs (the test agents come
    from `running_app`)."""
    values: dict[str, object] = {
        "worker_poll_seconds": 0.05,
        "openai_base_url": openai_url or _UNUSED_OPENAI,
        "anthropic_api_key": "test-anthropic-key",
        "anthropic_base_url": anthropic_url or _UNUSED_ANTHROPIC,
    }
    values.update(overrides)
    return settings_factory(**values)


async def wait_until(
    predicate: Callable[[], object | Awaitable[object]],
    *,
    seconds: float = WAIT_SECONDS,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy, and return that."""
    last: object = None
    try:
        async with asyncio.timeout(seconds):
            while True:
                last = predicate()
                if inspect.isawaitable(last):
                    last = await last
                if last:
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {seconds} s waiting for {what}; last: {last!r}"
        ) from None


class Watcher:
    """One live subscription to a thread, as a client connection sees it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.received: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    async def next(self, *, seconds: float = WAIT_SECONDS) -> dict[str, Any]:
        if not self._pending:
            try:
                async with asyncio.timeout(seconds):
                    self._pending.extend(await self.connection.next_batch())
            except TimeoutError:
                raise AssertionError(
                    f"no event within {seconds} s; received so far: {self.received}"
                ) from None
        message = self._pending.pop(0)
        self.received.append(message)
        return message

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], *, seconds: float = WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        """Messages up to and including the first one matching `predicate`."""
        taken: list[dict[str, Any]] = []
        async with asyncio.timeout(seconds):
            while True:
                message = await self.next(seconds=seconds)
                taken.append(message)
                if predicate(message):
                    return taken

    async def until_terminal(self, run_id: str, **kwargs: float) -> list[dict[str, Any]]:
        return await self.until(
            lambda m: m.get("run_id") == run_id and m.get("type") in TERMINAL_EVENTS, **kwargs
        )


@dataclass
class Harness:
    client: httpx.AsyncClient
    services: Runtime
    gateway: Gateway
    controls: agents_for_tests.Controls = field(default_factory=agents_for_tests.Controls)

    # --- users and threads ---

    async def user(self) -> TestUser:
        return await register_user(self.client)

    @staticmethod
    def ctx(user: TestUser) -> UserContext:
        return UserContext.create(user.id)

    async def thread(self, user: TestUser, title: str = "runs") -> str:
        response = await self.client.post(
            "/v1/threads", json={"title": title}, headers=user.headers
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    # --- runs ---

    async def post(
        self,
        user: TestUser,
        thread_id: str,
        content: str,
        *,
        agent: str | None = None,
        strategy: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"content": content}
        if agent is not None:
            body["run"] = {"agent": agent}
            if strategy is not None:
                body["run"]["multitask_strategy"] = strategy
        return await self.client.post(
            f"/v1/threads/{thread_id}/messages", json=body, headers=user.headers
        )

    async def start(
        self,
        user: TestUser,
        thread_id: str,
        content: str = "what is 12*7?",
        *,
        agent: str = "demo",
        strategy: str | None = None,
    ) -> dict[str, Any]:
        """Post a message with a run; return the run as the response shows it."""
        response = await self.post(user, thread_id, content, agent=agent, strategy=strategy)
        assert response.status_code == 201, response.text
        run: dict[str, Any] = response.json()["run"]
        assert run is not None
        return run

    async def get_run(self, user: TestUser, thread_id: str, run_id: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/v1/threads/{thread_id}/runs/{run_id}", headers=user.headers
        )
        assert response.status_code == 200, response.text
        run: dict[str, Any] = response.json()
        return run

    async def list_runs(self, user: TestUser, thread_id: str) -> list[dict[str, Any]]:
        response = await self.client.get(
            f"/v1/threads/{thread_id}/runs", params={"limit": 100}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    async def cancel(self, user: TestUser, thread_id: str, run_id: str) -> httpx.Response:
        return await self.client.post(
            f"/v1/threads/{thread_id}/runs/{run_id}/cancel", headers=user.headers
        )

    async def wait_run(
        self,
        user: TestUser,
        thread_id: str,
        run_id: str,
        *,
        statuses: frozenset[str] | set[str] = TERMINAL,
        seconds: float = WAIT_SECONDS,
    ) -> dict[str, Any]:
        """Poll the run over the API until its status is one of `statuses`."""
        last: dict[str, Any] = {}

        async def reached() -> dict[str, Any] | None:
            nonlocal last
            last = await self.get_run(user, thread_id, run_id)
            return last if last["status"] in statuses else None

        try:
            result: dict[str, Any] = await wait_until(reached, seconds=seconds, interval=0.03)
        except AssertionError:
            raise AssertionError(f"run {run_id} never reached {set(statuses)}: {last}") from None
        return result

    async def wait_tool_started(self, run_id: str, count: int = 1) -> None:
        await wait_until(
            lambda: self.controls.started.count(run_id) >= count,
            what=f"{count} tool call(s) of {run_id} to start",
        )

    async def wait_idle(self, user: TestUser) -> None:
        """Until the engine holds no task and no slot (a run's slot is freed just after its
        terminal state is committed)."""
        execution = self.services.execution
        await wait_until(
            lambda: execution.active_run_ids == [] and execution.running_for(user.id) == 0,
            what="the execution engine to be idle",
        )

    # --- messages and events ---

    async def messages(self, user: TestUser, thread_id: str) -> list[dict[str, Any]]:
        return await all_messages(self.client, user, thread_id, limit=200)

    async def events(self, user: TestUser, thread_id: str, *, after: int = 0) -> list[Event]:
        """Durable events of the thread, from the store."""
        async with self.services.engine.connect() as conn:
            stored = await self.services.events.after(
                conn, self.ctx(user), thread_id, after_seq=after
            )
        return stored.events

    async def run_events(self, user: TestUser, thread_id: str, run_id: str) -> list[Event]:
        return [e for e in await self.events(user, thread_id) if e.run_id == run_id]

    @asynccontextmanager
    async def watch(
        self, user: TestUser, thread_id: str, *, after_seq: int | None = None
    ) -> AsyncIterator[Watcher]:
        """Subscribe like a client connection: a snapshot, the replay after `after_seq`, then
        live events."""
        services = self.services
        connection = Connection(
            user_id=user.id,
            connection_id=f"test-{uuid.uuid4().hex[:12]}",
            queue_size=10_000,
            metrics=services.metrics,
        )
        subscribed = await subscribe(
            services, self.gateway, connection, self.ctx(user), thread_id, after_seq=after_seq
        )
        subscription: ThreadSubscription = subscribed.subscription
        try:
            yield Watcher(connection)
        finally:
            self.gateway.detach(subscription)

    # --- the database, directly ---

    async def expire_lease(self, run_id: str) -> None:
        """What time does to the lease of a worker that died: it runs out."""
        async with self.services.engine.begin() as conn:
            result = await conn.execute(
                runs_table.update()
                .where(runs_table.c.id == run_id, runs_table.c.status == "running")
                .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
            assert result.rowcount == 1, f"run {run_id} is not running"

    async def run_row(self, run_id: str) -> dict[str, Any]:
        async with self.services.engine.connect() as conn:
            row = (await conn.execute(sa.select(runs_table).where(runs_table.c.id == run_id))).one()
        return dict(row._mapping)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Harness]:
    """An app with its lifespan and embedded worker; tool gates are opened before shutdown so a
    failing test never leaves the worker waiting out its grace period."""
    controls = agents_for_tests.Controls()
    app = create_app(settings, agents=agents_for_tests.agents, deps=lambda _run: controls)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as client:
            try:
                yield Harness(client, app.state.runtime, app.state.gateway, controls)
            finally:
                controls.open_all()


# --- what a provider request must look like ---


def unanswered_in_openai_request(body: dict[str, Any]) -> list[str]:
    """Problems in an OpenAI chat request: a tool call not answered by the `tool` messages
    right after it, or a `tool` message that answers no call just before it."""
    problems: list[str] = []
    messages: list[dict[str, Any]] = body["messages"]
    open_calls: set[str] = set()
    for message in messages:
        if message["role"] == "tool":
            if message["tool_call_id"] not in open_calls:
                problems.append(f"orphan tool result {message['tool_call_id']}")
            open_calls.discard(message["tool_call_id"])
            continue
        problems.extend(f"unanswered call {call_id}" for call_id in sorted(open_calls))
        open_calls = {call["id"] for call in message.get("tool_calls") or ()}
    problems.extend(f"unanswered call {call_id}" for call_id in sorted(open_calls))
    return problems


def _blocks(message: dict[str, Any] | None, role: str) -> list[dict[str, Any]]:
    """The content blocks of an Anthropic turn of `role` (none for another role or text)."""
    if message is None or message["role"] != role or not isinstance(message["content"], list):
        return []
    return list(message["content"])


def unanswered_in_anthropic_request(body: dict[str, Any]) -> list[str]:
    """Problems in an Anthropic Messages request: every `tool_use` must be answered by a
    `tool_result` at the start of the very next (user) turn, and every result answer one."""
    problems: list[str] = []
    messages: list[dict[str, Any]] = body["messages"]
    for index, message in enumerate(messages):
        previous = messages[index - 1] if index else None
        following = messages[index + 1] if index + 1 < len(messages) else None
        results = [b for b in _blocks(message, "user") if b.get("type") == "tool_result"]
        asked = {b["id"] for b in _blocks(previous, "assistant") if b.get("type") == "tool_use"}
        problems.extend(
            f"orphan tool result {b['tool_use_id']}"
            for b in results
            if b["tool_use_id"] not in asked
        )
        if _blocks(message, "user")[: len(results)] != results:
            problems.append(f"tool results not first in user turn {index}")
        calls = [b["id"] for b in _blocks(message, "assistant") if b.get("type") == "tool_use"]
        answered = {
            b["tool_use_id"] for b in _blocks(following, "user") if b.get("type") == "tool_result"
        }
        problems.extend(f"unanswered call {c}" for c in calls if c not in answered)
    return problems


def unanswered_in_thread(messages: list[dict[str, Any]]) -> list[str]:
    """Tool calls of stored assistant messages that no later stored tool message answers."""
    problems = []
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            answers = [
                m
                for m in messages[index + 1 :]
                if m["role"] == "tool" and m["tool_call_id"] == call["id"]
            ]
            if len(answers) != 1:
                problems.append(f"call {call['id']} has {len(answers)} results")
    return problems


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


async def metric_samples(client: httpx.AsyncClient) -> dict[MetricKey, float]:
    """`GET /metrics`, parsed: value by (sample name, sorted labels)."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def hold_the_model_after_tools(h: Harness) -> None:
    """Make the demo model hang on every step that follows tool results, until
    `controls.model_gate` is set: a model stuck mid-run, at a point the test chooses."""
    original = h.services.execution.providers
    providers = {name: original.resolve(f"{name}:model")[0] for name in original.names}
    providers["demo"] = agents_for_tests.GatedModel(providers["demo"], h.controls)
    h.services.execution.providers = ProviderSet(providers)
    h.controls.hold_model_after_tools = True
