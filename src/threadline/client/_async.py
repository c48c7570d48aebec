"""`AsyncThreadline`: every call of the HTTP API, typed with the API's own schemas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Literal, Self, TypeVar

import httpx
from pydantic import BaseModel, JsonValue

from threadline.api.schemas import (
    AgentOut,
    HealthOut,
    ListOut,
    MessageOut,
    MessagePosted,
    RunOut,
    ThreadOut,
    TokenOut,
    UserOut,
)
from threadline.client._errors import APIConnectionError, APIError
from threadline.client._models import Event, RunResult
from threadline.client._sse import SSEEvents
from threadline.client._streams import EventStream
from threadline.client._websocket import WebSocketEvents
from threadline.statuses import MultitaskStrategy, ThreadStatus

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P")
Transport = Literal["websocket", "sse"]
Metadata = dict[str, JsonValue]
DEFAULT_URL = "http://localhost:8000"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()
"""A field left as it is by `update_thread` (as opposed to `None`, which clears a title)."""


class AsyncThreadline:
    """An async client for one Threadline server and (once signed in) one user.

    Args:
        base_url: The server, e.g. `http://localhost:8000`.
        token: A bearer token from an earlier `login()`; or call `login()` first.
        timeout: Seconds every HTTP request may take (connect, each read, write).
        reconnect_timeout: How long an event stream keeps trying to resume after it lost
            its connection before it raises `APIConnectionError`.
        http_client: An `httpx.AsyncClient` to use instead of a new one (you close it).

    Every method raises `APIError` (with the API's `code`, `status` and, for 429,
    `retry_after`) when the API refuses, and `APIConnectionError` when it cannot be reached
    in time.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": "threadline-client"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # ------------------------------------------------------------------ identity

    async def register(self, email: str, password: str) -> UserOut:
        """Create an account (`409 email_taken` if it exists). Does not sign in."""
        body = {"email": email, "password": password}
        return await self._call("POST", "/v1/auth/register", UserOut, json=body, auth=False)

    async def login(self, email: str, password: str) -> TokenOut:
        """Exchange email and password for a bearer token, which this client then uses."""
        body = {"email": email, "password": password}
        issued = await self._call("POST", "/v1/auth/token", TokenOut, json=body, auth=False)
        self.token = issued.access_token
        return issued

    async def logout(self) -> None:
        """Revoke the current token (on every server process) and forget it."""
        await self._request("POST", "/v1/auth/logout")
        self.token = None

    async def me(self) -> UserOut:
        return await self._call("GET", "/v1/auth/me", UserOut)

    # ------------------------------------------------------------------ threads

    async def create_thread(
        self, *, title: str | None = None, metadata: Metadata | None = None
    ) -> ThreadOut:
        """A new thread; with no title, the first message titles it."""
        body: dict[str, object] = {"metadata": metadata or {}}
        if title is not None:
            body["title"] = title
        return await self._call("POST", "/v1/threads", ThreadOut, json=body)

    async def get_thread(self, thread_id: str) -> ThreadOut:
        return await self._call("GET", f"/v1/threads/{thread_id}", ThreadOut)

    async def list_threads(
        self,
        *,
        status: ThreadStatus | str | None = None,
        metadata: Metadata | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ListOut[ThreadOut]:
        """One page, newest activity first; pass `next_cursor` back as `cursor` for more.
        `metadata` keeps threads whose metadata contains it; `q` searches titles."""
        params = {
            "status": status,
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "q": q,
            "limit": limit,
            "cursor": cursor,
        }
        return await self._call("GET", "/v1/threads", ListOut[ThreadOut], params=params)

    def iter_threads(
        self,
        *,
        status: ThreadStatus | str | None = None,
        metadata: Metadata | None = None,
        q: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[ThreadOut]:
        """Every matching thread, page after page."""

        def page(cursor: str | None) -> Awaitable[ListOut[ThreadOut]]:
            return self.list_threads(
                status=status, metadata=metadata, q=q, limit=page_size, cursor=cursor
            )

        return _paged(page)

    async def update_thread(
        self,
        thread_id: str,
        *,
        title: str | None | _Unset = UNSET,
        metadata: Metadata | None = None,
        status: ThreadStatus | str | None = None,
        expected_version: int | None = None,
    ) -> ThreadOut:
        """Change what is given: `title` (None clears it), `metadata` (merged per key; a None
        value removes its key), `status` (`409 invalid_status_transition` if not allowed).
        With `expected_version`, fail with `409 thread_version_conflict` if the thread
        changed since that version."""
        body: dict[str, object] = {}
        if not isinstance(title, _Unset):
            body["title"] = title
        if metadata is not None:
            body["metadata"] = metadata
        if status is not None:
            body["status"] = str(status)
        headers = {"If-Match": f'"{expected_version}"'} if expected_version is not None else None
        return await self._call(
            "PATCH", f"/v1/threads/{thread_id}", ThreadOut, json=body, headers=headers
        )

    async def archive_thread(self, thread_id: str) -> None:
        """Soft delete: archived, restorable with `restore_thread`."""
        await self._request("DELETE", f"/v1/threads/{thread_id}")

    async def restore_thread(self, thread_id: str) -> ThreadOut:
        return await self.update_thread(thread_id, status=ThreadStatus.ACTIVE)

    async def delete_thread(self, thread_id: str) -> None:
        """Permanent delete: the thread, its messages, runs and events are gone."""
        await self._request("DELETE", f"/v1/threads/{thread_id}", params={"permanent": "true"})

    # ------------------------------------------------------------------ messages and runs

    async def post_message(
        self,
        thread_id: str,
        content: str,
        *,
        agent: str | None = None,
        multitask_strategy: MultitaskStrategy | str | None = None,
        metadata: Metadata | None = None,
    ) -> MessagePosted:
        """Append a user message; with `agent`, also start a run (returned in `.run`)."""
        body: dict[str, object] = {"content": content, "metadata": metadata or {}}
        if agent is not None:
            run: dict[str, object] = {"agent": agent}
            if multitask_strategy is not None:
                run["multitask_strategy"] = str(multitask_strategy)
            body["run"] = run
        return await self._call(
            "POST", f"/v1/threads/{thread_id}/messages", MessagePosted, json=body
        )

    async def list_messages(
        self,
        thread_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> ListOut[MessageOut]:
        params = {"limit": limit, "cursor": cursor, "order": order}
        path = f"/v1/threads/{thread_id}/messages"
        return await self._call("GET", path, ListOut[MessageOut], params=params)

    def iter_messages(
        self, thread_id: str, *, order: Literal["asc", "desc"] = "asc", page_size: int = 100
    ) -> AsyncIterator[MessageOut]:
        """The whole history of a thread, page after page."""

        def page(cursor: str | None) -> Awaitable[ListOut[MessageOut]]:
            return self.list_messages(thread_id, limit=page_size, cursor=cursor, order=order)

        return _paged(page)

    async def create_run(
        self,
        thread_id: str,
        agent: str,
        *,
        multitask_strategy: MultitaskStrategy | str | None = None,
    ) -> RunOut:
        """Run an agent on the thread's history as it is (no new message)."""
        body: dict[str, object] = {"agent": agent}
        if multitask_strategy is not None:
            body["multitask_strategy"] = str(multitask_strategy)
        return await self._call("POST", f"/v1/threads/{thread_id}/runs", RunOut, json=body)

    async def list_runs(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> ListOut[RunOut]:
        params = {"limit": limit, "cursor": cursor}
        path = f"/v1/threads/{thread_id}/runs"
        return await self._call("GET", path, ListOut[RunOut], params=params)

    async def get_run(self, thread_id: str, run_id: str) -> RunOut:
        return await self._call("GET", f"/v1/threads/{thread_id}/runs/{run_id}", RunOut)

    async def cancel_run(self, thread_id: str, run_id: str) -> RunOut:
        """Stop a queued or running run (`run_cancelled` follows); a finished run is returned
        as it is."""
        path = f"/v1/threads/{thread_id}/runs/{run_id}/cancel"
        return await self._call("POST", path, RunOut)

    async def ask(
        self,
        thread_id: str,
        content: str,
        *,
        agent: str,
        multitask_strategy: MultitaskStrategy | str | None = None,
    ) -> RunResult:
        """Post `content`, run `agent` on it and wait for the run to end (completed, failed
        or cancelled: check `.ok`). The subscription opens before the message is posted, so
        every event of the run is in `.events`. A run takes as long as its agent does: bound
        the wait with `asyncio.timeout` (the sync client's `ask` takes a `timeout`)."""
        async with self.events(thread_id) as stream:
            posted = await self.post_message(
                thread_id, content, agent=agent, multitask_strategy=multitask_strategy
            )
            if posted.run is None:  # pragma: no cover - the API returns the run it queued
                raise APIError("No run was started", code="no_run", status=500)
            events = await _run_events(stream, posted.run.id)
            run = await self.get_run(thread_id, posted.run.id)
        return RunResult(message=posted, run=run, events=tuple(events))

    # ------------------------------------------------------------------ agents, health

    async def agents(self) -> list[AgentOut]:
        """The agents this server runs, with their tools' JSON schemas."""
        return (await self._call("GET", "/v1/agents", ListOut[AgentOut])).data

    async def health(self) -> HealthOut:
        """`/healthz`: the process is up."""
        return await self._call("GET", "/healthz", HealthOut, auth=False)

    async def ready(self) -> HealthOut:
        """`/readyz`: its database (and Redis) answer; `status` is `unavailable` if not."""
        response = await self._send("GET", "/readyz", auth=False)
        if response.status_code not in (200, 503):
            raise APIError.from_response(response)
        return HealthOut.model_validate(response.json())

    # ------------------------------------------------------------------ live events

    def events(
        self,
        thread_id: str,
        *,
        after_seq: int | None = None,
        transport: Transport = "websocket",
    ) -> EventStream:
        """The thread's live events, from now on or after `after_seq` (then the stored ones
        first), resumed across disconnects. Use with `async with`."""
        if transport == "sse":
            return SSEEvents(
                self._http,
                thread_id,
                headers=self._auth_headers(),
                after_seq=after_seq,
                open_timeout=self.timeout,
                reconnect_timeout=self.reconnect_timeout,
            )
        return self.socket(thread_id, after_seq=after_seq)

    def socket(self, *thread_ids: str, after_seq: int | None = None) -> WebSocketEvents:
        """One WebSocket for the events of several threads; `subscribe()` adds more."""
        scheme, sep, rest = self.base_url.partition("://")
        url = f"{'wss' if scheme == 'https' else 'ws'}{sep}{rest}/v1/ws"
        return WebSocketEvents(
            url,
            self._require_token(),
            threads=thread_ids,
            after_seq=after_seq,
            open_timeout=self.timeout,
            reconnect_timeout=self.reconnect_timeout,
        )

    # ------------------------------------------------------------------ plumbing

    def _require_token(self) -> str:
        if self.token is None:
            raise APIError("Sign in first (login())", code="not_authenticated", status=401)
        return self.token

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._require_token()}"}

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        auth: bool = True,
        params: Mapping[str, object] | None = None,
        json: object = None,
        headers: dict[str, str] | None = None,
    ) -> M:
        response = await self._request(
            method, path, auth=auth, params=params, json=json, headers=headers
        )
        return model.model_validate(response.json())

    async def _request(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        params: Mapping[str, object] | None = None,
        json: object = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        response = await self._send(
            method, path, auth=auth, params=params, json=json, headers=headers
        )
        if response.is_error:
            raise APIError.from_response(response)
        return response

    async def _send(
        self,
        method: str,
        path: str,
        *,
        auth: bool,
        params: Mapping[str, object] | None = None,
        json: object = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = {**(self._auth_headers() if auth else {}), **(headers or {})}
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            return await self._http.request(
                method, path, params=query, json=json, headers=all_headers
            )
        except httpx.TransportError as exc:  # timeouts included
            raise APIConnectionError(
                f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}"
            ) from exc


async def _paged(
    fetch: Callable[[str | None], Awaitable[ListOut[P]]],
) -> AsyncIterator[P]:
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        for item in page.data:
            yield item
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


async def _run_events(stream: EventStream, run_id: str) -> list[Event]:
    events: list[Event] = []
    async for event in stream:
        if event.run_id == run_id:
            events.append(event)
            if event.terminal:
                return events
    raise APIError("The thread was deleted during the run", code="thread_not_found", status=404)
