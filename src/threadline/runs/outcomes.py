"""How a run ends, written once: `RunFinisher.finish` is the only way any run reaches a
terminal state, whoever ends it (the engine that executed it, the reaper that found its worker
dead, a cancel of a queued run, the archive or deletion of its thread).

In the caller's transaction, it:
1. writes the terminal status, conditional on the run being exactly as the caller saw it (the
   lease of the attempt that ends it, or still queued), so a run gets one outcome;
2. only if that applied: stores the run's final assistant message when the outcome carries one
   (the engine's last step is written here, not in a transaction of its own: the answer and
   the run's end commit together, so a run is never left answered but unfinished), gives every
   unanswered tool call of the run a synthetic error result (the history stays valid for every
   provider), records usage and the webhook outbox rows, and emits, as one batch, last: what
   the engine still held just before that message (its reasoning and the text behind it), the
   message's `message_created`, and the single terminal event (`agent_completed`, `agent_failed` or
   `run_cancelled`); and counts the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.publisher import EventPublisher, EventSpec, durable_count
from threadline.events.types import EventType
from threadline.llm.types import Usage
from threadline.metrics import Metrics
from threadline.runs.conversation import close_unanswered_tool_calls
from threadline.store.messages import MessageStore, NewMessage
from threadline.store.queue import RunQueue
from threadline.store.runs import Run, RunStatus
from threadline.usage.store import UsageStore
from threadline.webhooks import payloads as webhook_payloads
from threadline.webhooks.store import WebhookStore

JSONObject = dict[str, object]


class CancelReason(StrEnum):
    """Why a run is cancelled. All but `SHUTDOWN` end it as cancelled; shutdown hands it back
    to the queue for another worker."""

    USER = "user"
    INTERRUPT = "interrupted"
    THREAD_ARCHIVED = "thread_archived"
    THREAD_DELETED = "thread_deleted"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: RunStatus
    event: EventType
    data: JSONObject
    """The terminal event's data."""
    result: JSONObject | None = None
    error: JSONObject | None = None
    usage: Usage | None = None
    """The model tokens this attempt used, recorded with the run's duration."""
    message: NewMessage | None = None
    """The run's final assistant message, not stored yet: stored with the outcome."""
    held: tuple[EventSpec, ...] = ()
    """What the engine still held just before `message` (its reasoning, and the text streamed
    behind it: `runs/sink.py`), emitted just before the message's `message_created`."""

    @classmethod
    def completed(cls, result: JSONObject) -> Outcome:
        message_id, text, usage = result.get("message_id"), result.get("text"), result.get("usage")
        data = payloads.agent_completed(
            message_id=message_id if isinstance(message_id, str) else None,
            text=text if isinstance(text, str) else "",
            usage=dict(usage) if isinstance(usage, dict) else {},
        )
        return cls(RunStatus.COMPLETED, EventType.AGENT_COMPLETED, data, result=result)

    @classmethod
    def failed(cls, code: str, message: str, *, status: RunStatus = RunStatus.FAILED) -> Outcome:
        error = payloads.agent_failed(code, message)
        return cls(status, EventType.AGENT_FAILED, error, error=error)

    @classmethod
    def cancelled(cls, reason: CancelReason) -> Outcome:
        data = payloads.run_cancelled(reason.value)
        return cls(RunStatus.CANCELLED, EventType.RUN_CANCELLED, data, error=data)


class RunFinisher:
    def __init__(
        self,
        *,
        queue: RunQueue,
        messages: MessageStore,
        publisher: EventPublisher,
        metrics: Metrics,
        usage: UsageStore | None = None,
        webhooks: WebhookStore | None = None,
    ) -> None:
        self._usage = usage
        self._webhooks = webhooks
        self._queue = queue
        self._messages = messages
        self._publisher = publisher
        self._metrics = metrics

    async def finish(self, conn: AsyncConnection, run: Run, outcome: Outcome) -> bool:
        """End `run` (as the caller saw it) with `outcome`. Returns whether it applied; when it
        did not, someone else already ended or took over the run and nothing was written."""
        applied = await self._queue.finish(
            conn, run, status=outcome.status, result=outcome.result, error=outcome.error
        )
        if not applied:
            return False
        ctx = UserContext.create(run.user_id, thread_id=run.thread_id, run_id=run.id)
        specs: list[EventSpec] = list(outcome.held)
        reserved = None
        if outcome.message is not None:
            # Its position and the numbers of the whole batch (what was held, its
            # message_created and the terminal event) come from one update of the thread's row.
            stored, reserved = await self._messages.append_announced(
                conn, ctx, run.thread_id, outcome.message, events=durable_count(specs) + 2
            )
            specs.append((EventType.MESSAGE_CREATED, payloads.message_created(stored)))
        if outcome.status is not RunStatus.COMPLETED:
            await close_unanswered_tool_calls(conn, self._messages, ctx, run=run)
        usage = outcome.usage or Usage()
        if self._usage is not None and (run.started_at is not None or outcome.usage):
            await self._usage.record(conn, run, status=outcome.status, usage=usage)
        webhook_event = webhook_payloads.run_event(outcome.status)
        if self._webhooks is not None and webhook_event is not None:
            data = webhook_payloads.run_finished(run, outcome, usage=usage)
            await self._webhooks.enqueue(conn, webhook_event, data)  # the outbox: same commit
        specs.append((outcome.event, outcome.data))
        await self._publisher.emit_many(
            conn, ctx, run.thread_id, specs, run_id=run.id, reserved=reserved
        )
        self._metrics.runs_finished.labels(outcome.status.value).inc()
        return True
