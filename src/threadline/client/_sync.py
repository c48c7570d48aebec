"""`Threadline`: the same client for code that is not async.

It runs an `AsyncThreadline` on an event loop in a thread of its own (started by the
constructor, stopped by `close()` or the end of a `with` block) and waits for each call, so
both clients behave the same in every respect: one implementation, one set of tests. A
`KeyboardInterrupt` while waiting cancels the call in progress.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

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
from threadline.client._async import (
    DEFAULT_URL,
    UNSET,
    AsyncThreadline,
    Metadata,
    Transport,
    _Unset,
)
from threadline.client._models import Event, RunResult, Snapshot
from threadline.client._streams import EventStream
from threadline.client._websocket import WebSocketEvents
from threadline.statuses import MultitaskStrategy, ThreadStatus

T = TypeVar("T")
_STOP_SECONDS = 10.0


class _Portal:
    """An event loop on its own thread, and a blocking way to run coroutines on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="threadline-client", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # a KeyboardInterrupt here stops the call on the loop too
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        while items := self.call(_next(iterator)):
            yield items[0]

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        if self.closed:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_STOP_SECONDS)
        self._loop.close()


async def _next(iterator: AsyncIterator[T]) -> list[T]:
    """The next item, or none at the end: StopAsyncIteration should not cross a future."""
    try:
        return [await anext(iterator)]
    except StopAsyncIteration:
        return []


async def _within(seconds: float, coroutine: Coroutine[Any, Any, T]) -> T:
    async with asyncio.timeout(seconds):
        return await coroutine


class SyncEventStream:
    """An `EventStream` for sync code: `with client.events(thread) as stream: for e in stream`."""

    def __init__(self, portal: _Portal, stream: EventStream) -> None:
        self._portal = portal
        self.stream = stream

    @property
    def last_seq(self) -> dict[str, int]:
        return self.stream.last_seq

    @property
    def snapshots(self) -> dict[str, Snapshot]:
        return self.stream.snapshots

    @property
    def reconnects(self) -> int:
        return self.stream.reconnects

    @property
    def reconnecting(self) -> bool:
        return self.stream.reconnecting

    def __enter__(self) -> Self:
        self._portal.call(self.stream.open())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self.stream.aclose())

    def __iter__(self) -> Iterator[Event]:
        return self._portal.iterate(self.stream)

    def subscribe(self, thread_id: str, *, after_seq: int | None = None) -> Snapshot:
        """Add a thread (WebSocket streams only)."""
        if not isinstance(self.stream, WebSocketEvents):
            raise TypeError("an SSE stream follows one thread")
        return self._portal.call(self.stream.subscribe(thread_id, after_seq=after_seq))


class Threadline:
    """A blocking client; the same arguments, methods and errors as `AsyncThreadline`.

    Use it in a `with` block, or call `close()`, to stop its background thread.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
    ) -> None:
        self._portal = _Portal()
        self.aio = AsyncThreadline(
            base_url, token=token, timeout=timeout, reconnect_timeout=reconnect_timeout
        )

    @property
    def token(self) -> str | None:
        return self.aio.token

    @token.setter
    def token(self, value: str | None) -> None:
        self.aio.token = value

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._portal.closed:
            return
        try:
            self._portal.call(self.aio.aclose())
        finally:
            self._portal.close()

    def register(self, email: str, password: str) -> UserOut:
        return self._portal.call(self.aio.register(email, password))

    def login(self, email: str, password: str) -> TokenOut:
        return self._portal.call(self.aio.login(email, password))

    def logout(self) -> None:
        self._portal.call(self.aio.logout())

    def me(self) -> UserOut:
        return self._portal.call(self.aio.me())

    def create_thread(
        self, *, title: str | None = None, metadata: Metadata | None = None
    ) -> ThreadOut:
        return self._portal.call(self.aio.create_thread(title=title, metadata=metadata))

    def get_thread(self, thread_id: str) -> ThreadOut:
        return self._portal.call(self.aio.get_thread(thread_id))

    def list_threads(
        self,
        *,
        status: ThreadStatus | str | None = None,
        metadata: Metadata | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ListOut[ThreadOut]:
        return self._portal.call(
            self.aio.list_threads(status=status, metadata=metadata, q=q, limit=limit, cursor=cursor)
        )

    def iter_threads(
        self,
        *,
        status: ThreadStatus | str | None = None,
        metadata: Metadata | None = None,
        q: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[ThreadOut]:
        pages = self.aio.iter_threads(status=status, metadata=metadata, q=q, page_size=page_size)
        return self._portal.iterate(pages)

    def update_thread(
        self,
        thread_id: str,
        *,
        title: str | None | _Unset = UNSET,
        metadata: Metadata | None = None,
        status: ThreadStatus | str | None = None,
        expected_version: int | None = None,
    ) -> ThreadOut:
        return self._portal.call(
            self.aio.update_thread(
                thread_id,
                title=title,
                metadata=metadata,
                status=status,
                expected_version=expected_version,
            )
        )

    def archive_thread(self, thread_id: str) -> None:
        self._portal.call(self.aio.archive_thread(thread_id))

    def restore_thread(self, thread_id: str) -> ThreadOut:
        return self._portal.call(self.aio.restore_thread(thread_id))

    def delete_thread(self, thread_id: str) -> None:
        self._portal.call(self.aio.delete_thread(thread_id))

    def post_message(
        self,
        thread_id: str,
        content: str,
        *,
        agent: str | None = None,
        multitask_strategy: MultitaskStrategy | str | None = None,
        metadata: Metadata | None = None,
    ) -> MessagePosted:
        return self._portal.call(
            self.aio.post_message(
                thread_id,
                content,
                agent=agent,
                multitask_strategy=multitask_strategy,
                metadata=metadata,
            )
        )

    def list_messages(
        self,
        thread_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> ListOut[MessageOut]:
        return self._portal.call(
            self.aio.list_messages(thread_id, limit=limit, cursor=cursor, order=order)
        )

    def iter_messages(
        self, thread_id: str, *, order: Literal["asc", "desc"] = "asc", page_size: int = 100
    ) -> Iterator[MessageOut]:
        pages = self.aio.iter_messages(thread_id, order=order, page_size=page_size)
        return self._portal.iterate(pages)

    def create_run(
        self,
        thread_id: str,
        agent: str,
        *,
        multitask_strategy: MultitaskStrategy | str | None = None,
    ) -> RunOut:
        return self._portal.call(
            self.aio.create_run(thread_id, agent, multitask_strategy=multitask_strategy)
        )

    def list_runs(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> ListOut[RunOut]:
        return self._portal.call(self.aio.list_runs(thread_id, limit=limit, cursor=cursor))

    def get_run(self, thread_id: str, run_id: str) -> RunOut:
        return self._portal.call(self.aio.get_run(thread_id, run_id))

    def cancel_run(self, thread_id: str, run_id: str) -> RunOut:
        return self._portal.call(self.aio.cancel_run(thread_id, run_id))

    def ask(
        self,
        thread_id: str,
        content: str,
        *,
        agent: str,
        multitask_strategy: MultitaskStrategy | str | None = None,
        timeout: float = 300.0,
    ) -> RunResult:
        """`AsyncThreadline.ask`, raising `TimeoutError` if the run takes over `timeout` s."""
        asking = self.aio.ask(
            thread_id, content, agent=agent, multitask_strategy=multitask_strategy
        )
        return self._portal.call(_within(timeout, asking))

    def agents(self) -> list[AgentOut]:
        return self._portal.call(self.aio.agents())

    def health(self) -> HealthOut:
        return self._portal.call(self.aio.health())

    def ready(self) -> HealthOut:
        return self._portal.call(self.aio.ready())

    def events(
        self,
        thread_id: str,
        *,
        after_seq: int | None = None,
        transport: Transport = "websocket",
    ) -> SyncEventStream:
        stream = self.aio.events(thread_id, after_seq=after_seq, transport=transport)
        return SyncEventStream(self._portal, stream)

    def socket(self, *thread_ids: str, after_seq: int | None = None) -> SyncEventStream:
        return SyncEventStream(self._portal, self.aio.socket(*thread_ids, after_seq=after_seq))
