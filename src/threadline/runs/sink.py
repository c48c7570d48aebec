"""The engine's side of the agent loop: persist what the run produces and publish its events.

Text deltas are coalesced at the leading edge: a chunk goes out at once unless another went out
less than `delta_flush_seconds` ago; then it waits for the next chunk after that interval or for
the next event. A slow model's text is never held back, and a fast one costs a few events per
answer instead of one database round trip per token. A pending delta is always flushed before
any later event, so nothing is reordered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.agents.tools import ToolResult
from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.publisher import EventPublisher
from threadline.events.types import EventType
from threadline.ids import IdPrefix, new_id
from threadline.llm.types import ChatMessage, ToolCall
from threadline.runs.conversation import assistant_message, tool_result_message
from threadline.store.messages import Message, MessageStore


class RunEventSink:
    def __init__(
        self,
        *,
        db: AsyncEngine,
        publisher: EventPublisher,
        messages: MessageStore,
        ctx: UserContext,
        delta_flush_seconds: float = 0.02,
    ) -> None:
        if ctx.thread_id is None or ctx.run_id is None:
            raise ValueError("a run's sink needs a context with thread_id and run_id")
        self._db = db
        self._publisher = publisher
        self._messages = messages
        self._ctx = ctx
        self._thread_id: str = ctx.thread_id
        self._run_id: str = ctx.run_id
        self._flush_after = delta_flush_seconds
        self._pending_text: list[str] = []
        # The id of the assistant message being streamed: its deltas carry it, and the
        # message is stored under it, so a client can tie the two together.
        self._message_id: str | None = None
        self._last_flush = float("-inf")
        # Tools run concurrently; their events must still be numbered one at a time.
        self._lock = asyncio.Lock()
        self.last_assistant: Message | None = None
        self.tool_calls = 0

    async def emit(self, event_type: EventType, data: dict[str, object]) -> None:
        async with self._lock:
            await self._flush()
            await self._publisher.emit_now(
                self._ctx, self._thread_id, event_type, data, run_id=self._run_id
            )

    async def thinking(self, text: str) -> None:
        await self.emit(EventType.AGENT_THINKING, payloads.agent_thinking(text))

    async def text_delta(self, text: str) -> None:
        async with self._lock:
            self._pending_text.append(text)
            if self._message_id is None:
                self._message_id = new_id(IdPrefix.MESSAGE)
            if time.monotonic() - self._last_flush >= self._flush_after:
                await self._flush()

    async def assistant_message(self, message: ChatMessage) -> None:
        async with self._lock:
            await self._flush()
            new = assistant_message(message, run_id=self._run_id)
            new, self._message_id = dataclasses.replace(new, id=self._message_id), None
            async with self._db.begin() as conn:
                stored = await self._messages.append(conn, self._ctx, self._thread_id, new)
                await self._publisher.emit(
                    conn,
                    self._ctx,
                    self._thread_id,
                    EventType.MESSAGE_CREATED,
                    payloads.message_created(stored),
                    run_id=self._run_id,
                )
            self.last_assistant = stored

    async def tool_executing(self, call: ToolCall) -> None:
        await self.emit(
            EventType.TOOL_EXECUTING,
            payloads.tool_executing(tool=call.name, call_id=call.call_id, arguments=call.arguments),
        )

    async def tool_completed(self, call: ToolCall, result: ToolResult) -> None:
        self.tool_calls += 1
        async with self._lock:
            await self._flush()
            async with self._db.begin() as conn:
                stored = await self._messages.append(
                    conn,
                    self._ctx,
                    self._thread_id,
                    tool_result_message(
                        call,
                        content=result.content,
                        is_error=result.is_error,
                        duration_ms=result.duration_ms,
                        run_id=self._run_id,
                    ),
                )
                await self._publisher.emit(
                    conn,
                    self._ctx,
                    self._thread_id,
                    EventType.TOOL_COMPLETED,
                    payloads.tool_completed(
                        tool=call.name,
                        call_id=call.call_id,
                        message_id=stored.id,
                        content=result.content,
                        is_error=result.is_error,
                        duration_ms=result.duration_ms,
                    ),
                    run_id=self._run_id,
                )

    async def flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending_text:
            return
        text, self._pending_text = "".join(self._pending_text), []
        self._last_flush = time.monotonic()
        message_id = self._message_id or new_id(IdPrefix.MESSAGE)
        self._message_id = message_id
        # No database work: a delta is published, placed after the run's last durable event.
        await self._publisher.publish_ephemeral(
            self._ctx,
            self._thread_id,
            EventType.MESSAGE_DELTA,
            payloads.message_delta(message_id, text),
            run_id=self._run_id,
        )
