"""The engine's side of the agent loop: persist what the run produces and publish its events.

One transaction per step of the loop, not per event. Each write carries the events of what it
stores plus those of what the loop said comes right after it (`AgentEventSink`), numbered as
one batch (`EventPublisher.emit_many`):
- the run's start (the engine's transaction: `agent_started`, the input message's placement,
  the history read) announces the first model call (`agent_thinking`), or the calls a
  retried run resumes (`tool_executing`);
- an assistant message that asks for tools: `message_created` and each `tool_executing`;
- a tool result: `tool_completed`, and for the step's last one the next model call;
- the final assistant message is not written here: the run's outcome carries it
  (`unsaved_answer`) and `RunFinisher.finish` stores it with the terminal status and event.
An announced event goes out with the write just before its moment, never after it: the
announced call of the loop is then skipped. Nothing live waits behind a model call or a tool.

Reasoning text (the model's `ReasoningDelta`s, stored as `agent_thinking`) is coalesced at the
trailing edge: held for at most `delta_flush_seconds`, then stored as one event in a
transaction of its own, unless a write comes first (the step's message), which then carries it
at the head of its batch; the final answer's is `RunFinisher.finish`'s batch (the outcome's
`held`). Text the model streams while reasoning is held is held with it, and goes out as a
delta in the same batch, right after the reasoning (`EventPublisher.emit_many` publishes a
batch's deltas between its durable events). A reasoning model's hundreds of chunks cost a
transaction per interval, not per chunk; a step that reasons, then writes or calls tools
within the interval, costs none extra; the text of a slower one streams at most one interval
late. Held reasoning always goes out before any later event or delta of the run.

Text deltas are coalesced at the leading edge: a chunk goes out at once unless another went out
less than `delta_flush_seconds` ago; then it waits for the next chunk after that interval or for
the next event. A slow model's text is never held back, and a fast one costs a few events per
answer instead of one per token. Deltas touch no database (`EventPublisher.publish_ephemeral`).
A pending delta is always flushed before any later event, so nothing is reordered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.agents.events import THINKING
from threadline.agents.tools import ToolResult
from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.publisher import EventPublisher, EventSpec, durable_count
from threadline.events.types import EventType
from threadline.ids import IdPrefix, new_id
from threadline.llm.types import ChatMessage, ToolCall
from threadline.runs.conversation import assistant_message, tool_result_message
from threadline.store.messages import Message, MessageStore, NewMessage


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
        self._pending_reasoning: list[str] = []
        self._reasoning_timer: asyncio.Task[None] | None = None
        # The id of the assistant message being streamed: its deltas carry it, and the
        # message is stored under it, so a client can tie the two together.
        self._message_id: str | None = None
        self._last_flush = float("-inf")
        # Tools run concurrently; their events must still be numbered one at a time.
        self._lock = asyncio.Lock()
        # What the last write announced ahead of the loop's call for it.
        self._step_announced = False
        self._calls_announced: set[str] = set()
        self.last_assistant: Message | None = None
        """An answer an earlier attempt stored (the engine ends the run with it)."""
        self.unsaved_answer: NewMessage | None = None
        """The run's final assistant message, for `RunFinisher.finish` to store."""
        self.unsaved_held: tuple[EventSpec, ...] = ()
        """What was still held when the final answer came (its reasoning, and the text
        streamed behind it), for `RunFinisher.finish` to emit just before the answer."""
        self.tool_calls = 0

    @property
    def answer_id(self) -> str | None:
        if self.unsaved_answer is not None:
            return self.unsaved_answer.id
        return self.last_assistant.id if self.last_assistant else None

    async def write(
        self,
        conn: AsyncConnection,
        specs: Sequence[EventSpec],
        *,
        step_follows: bool = False,
        calls_follow: Sequence[ToolCall] = (),
    ) -> None:
        """Emit `specs` in the caller's transaction (last before commit), announcing what the
        loop does right after: a model call, or these tool calls."""
        batch = [*self._take_held(), *specs, *self._announcements(step_follows, calls_follow)]
        await self._publisher.emit_many(
            conn, self._ctx, self._thread_id, batch, run_id=self._run_id
        )
        self._announced(step_follows, calls_follow)

    async def _store_and_emit(
        self,
        new: NewMessage,
        spec: Callable[[Message], EventSpec],
        *,
        held: Sequence[EventSpec],
        step_follows: bool = False,
        calls_follow: Sequence[ToolCall] = (),
    ) -> Message:
        """One transaction: store `new` and emit `held` (`_take_held`), its event
        `spec(stored)` and what follows; the message's position and the batch's numbers come
        from one update of the thread."""
        announcements = self._announcements(step_follows, calls_follow)
        async with self._db.begin() as conn:
            stored, last = await self._messages.append_announced(
                conn,
                self._ctx,
                self._thread_id,
                new,
                events=durable_count(held) + 1 + len(announcements),
            )
            await self._publisher.emit_many(
                conn,
                self._ctx,
                self._thread_id,
                [*held, spec(stored), *announcements],
                run_id=self._run_id,
                reserved=last,
            )
        self._announced(step_follows, calls_follow)
        return stored

    @staticmethod
    def _announcements(step_follows: bool, calls_follow: Sequence[ToolCall]) -> list[EventSpec]:
        batch: list[EventSpec] = []
        if step_follows:
            batch.append((EventType.AGENT_THINKING, payloads.agent_thinking(THINKING)))
        for call in calls_follow:
            data = payloads.tool_executing(
                tool=call.name, call_id=call.call_id, arguments=call.arguments
            )
            batch.append((EventType.TOOL_EXECUTING, data))
        return batch

    def _announced(self, step_follows: bool, calls_follow: Sequence[ToolCall]) -> None:
        # Recorded once the batch is out: a write that failed announced nothing.
        self._step_announced = self._step_announced or step_follows
        self._calls_announced.update(call.call_id for call in calls_follow)

    async def emit(self, event_type: EventType, data: dict[str, object]) -> None:
        async with self._lock:
            await self._flush_text()
            async with self._db.begin() as conn:
                await self.write(conn, [(event_type, data)])

    async def step_started(self) -> None:
        if self._step_announced:
            self._step_announced = False
            return
        await self.emit(EventType.AGENT_THINKING, payloads.agent_thinking(THINKING))

    async def thinking(self, text: str) -> None:
        async with self._lock:
            self._pending_reasoning.append(text)
            if self._reasoning_timer is None:
                self._reasoning_timer = asyncio.create_task(self._store_reasoning_soon())

    async def _store_reasoning_soon(self) -> None:
        await asyncio.sleep(self._flush_after)
        async with self._lock:
            self._reasoning_timer = None  # this task ends here: nothing to cancel any more
            await self._store_reasoning()

    async def _store_reasoning(self) -> None:
        """Held reasoning (and the text behind it), stored in a transaction of its own
        (under the lock)."""
        if self._pending_reasoning:
            async with self._db.begin() as conn:
                await self.write(conn, [])

    def _take_held(self) -> list[EventSpec]:
        """The held reasoning, then the text streamed behind it as one delta, as the head of
        a batch (empty: no reasoning held); the caller's write emits them, so the timer is
        stopped."""
        if self._reasoning_timer is not None:
            self._reasoning_timer.cancel()
            self._reasoning_timer = None
        if not self._pending_reasoning:
            return []
        text, self._pending_reasoning = "".join(self._pending_reasoning), []
        held: list[EventSpec] = [(EventType.AGENT_THINKING, payloads.agent_thinking(text))]
        if self._pending_text:
            held.append(self._take_text_delta())
        return held

    def _take_text_delta(self) -> EventSpec:
        text, self._pending_text = "".join(self._pending_text), []
        self._last_flush = time.monotonic()
        if self._message_id is None:
            self._message_id = new_id(IdPrefix.MESSAGE)
        return EventType.MESSAGE_DELTA, payloads.message_delta(self._message_id, text)

    async def discard(self) -> None:
        """The run ended without `flush` (it failed or was cancelled): nothing held may go
        out after its terminal event, so the timer is stopped and waited for."""
        timer, self._reasoning_timer = self._reasoning_timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        self._pending_reasoning.clear()
        self._pending_text.clear()

    async def text_delta(self, text: str) -> None:
        async with self._lock:
            self._pending_text.append(text)
            if self._message_id is None:
                self._message_id = new_id(IdPrefix.MESSAGE)
            if time.monotonic() - self._last_flush >= self._flush_after:
                await self._flush_text()

    async def assistant_message(self, message: ChatMessage, *, final: bool) -> None:
        async with self._lock:
            await self._flush_text()
            held = self._take_held()  # its delta carries the message's id: taken before
            new = assistant_message(message, run_id=self._run_id)
            message_id, self._message_id = self._message_id or new_id(IdPrefix.MESSAGE), None
            new = dataclasses.replace(new, id=message_id)
            if final:
                # The run ends right after: stored with its outcome, with what was held just
                # before it, in the transaction that ends the run.
                self.unsaved_held = tuple(held)
                self.unsaved_answer = new
                return
            await self._store_and_emit(
                new,
                lambda stored: (EventType.MESSAGE_CREATED, payloads.message_created(stored)),
                held=held,
                calls_follow=message.tool_calls,
            )

    async def tool_executing(self, call: ToolCall) -> None:
        if call.call_id in self._calls_announced:
            self._calls_announced.discard(call.call_id)
            return
        await self.emit(
            EventType.TOOL_EXECUTING,
            payloads.tool_executing(tool=call.name, call_id=call.call_id, arguments=call.arguments),
        )

    async def tool_completed(self, call: ToolCall, result: ToolResult, *, last: bool) -> None:
        self.tool_calls += 1
        async with self._lock:
            await self._flush_text()
            new = tool_result_message(
                call,
                content=result.content,
                is_error=result.is_error,
                duration_ms=result.duration_ms,
                run_id=self._run_id,
            )

            def completed(stored: Message) -> EventSpec:
                data = payloads.tool_completed(
                    tool=call.name,
                    call_id=call.call_id,
                    message_id=stored.id,
                    content=result.content,
                    is_error=result.is_error,
                    duration_ms=result.duration_ms,
                )
                return EventType.TOOL_COMPLETED, data

            await self._store_and_emit(new, completed, held=self._take_held(), step_follows=last)

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_text()
            await self._store_reasoning()

    async def _flush_text(self) -> None:
        """Send the text held by coalescing, unless it is held behind reasoning: then the
        write that takes the reasoning sends it (`_take_held`)."""
        if not self._pending_text or self._pending_reasoning:
            return
        event_type, data = self._take_text_delta()
        # No database work: a delta is published, placed after the run's last durable event.
        await self._publisher.publish_ephemeral(
            self._ctx, self._thread_id, event_type, data, run_id=self._run_id
        )
