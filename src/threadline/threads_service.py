"""Thread changes together with the events that announce them, in one transaction."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.publisher import EventPublisher
from threadline.events.types import EventType
from threadline.runs.outcomes import CancelReason
from threadline.runs.service import RunService
from threadline.store.accounts import Standing
from threadline.store.events import EventStore
from threadline.store.threads import JSONObject, Thread, ThreadChanges, ThreadStatus, ThreadStore
from threadline.usage.quotas import Quotas
from threadline.webhooks import payloads as webhook_payloads
from threadline.webhooks.store import WebhookEvent, WebhookStore


class ThreadService:
    """Thread changes with their events. Archiving or deleting a thread ends its queued and
    running runs as cancelled (`run_cancelled`, reason `thread_archived` / `thread_deleted`)
    rather than leaving them to vanish or run on into a thread nobody sees.

    The executors of running runs are told before the transaction commits (the caller owns
    it): an executor's own terminal write waits on the locks this transaction holds on the run,
    so it lands after the commit; only a failed commit would leave such a run cancelled.
    """

    def __init__(
        self,
        *,
        threads: ThreadStore,
        events: EventStore,
        publisher: EventPublisher,
        runs: RunService,
        quotas: Quotas | None = None,
        webhooks: WebhookStore | None = None,
    ):
        self._quotas = quotas
        self._webhooks = webhooks
        self._threads = threads
        self._events = events
        self._publisher = publisher
        self._runs = runs

    async def create(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        *,
        title: str | None,
        metadata: JSONObject,
        standing: Standing | None = None,
    ) -> Thread:
        """`standing`: the account as this transaction read it (see `Quotas.check_thread`)."""
        if self._quotas is not None:
            await self._quotas.check_thread(conn, ctx, standing=standing)
        thread = await self._threads.create(conn, ctx, title=title, metadata=metadata)
        await self._publisher.emit(
            conn, ctx, thread.id, EventType.THREAD_CREATED, payloads.thread_changed(thread)
        )
        return thread

    async def update(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        changes: ThreadChanges,
        *,
        expected_version: int | None,
    ) -> Thread:
        before = await self._threads.get(conn, ctx, thread_id)
        thread = await self._threads.update(
            conn, ctx, thread_id, changes, expected_version=expected_version
        )
        if thread.version != before.version:
            await self._publisher.emit(
                conn, ctx, thread.id, EventType.THREAD_UPDATED, payloads.thread_changed(thread)
            )
        archived = ThreadStatus.ARCHIVED
        if thread.status is archived and before.status is not archived:
            reason = CancelReason.THREAD_ARCHIVED
            running = await self._runs.end_thread_runs(conn, ctx, thread_id, reason=reason)
            await self._runs.stop_executing(running, reason=reason)
        return thread

    async def archive(self, conn: AsyncConnection, ctx: UserContext, thread_id: str) -> Thread:
        changes = ThreadChanges(status=ThreadStatus.ARCHIVED)
        return await self.update(conn, ctx, thread_id, changes, expected_version=None)

    async def delete(self, conn: AsyncConnection, ctx: UserContext, thread_id: str) -> None:
        await self._threads.get(conn, ctx, thread_id, for_update=True)
        reason = CancelReason.THREAD_DELETED
        running = await self._runs.end_thread_runs(conn, ctx, thread_id, reason=reason)
        seq = await self._events.next_seq(conn, ctx, thread_id)
        await self._threads.delete(conn, ctx, thread_id)
        await self._publisher.publish_deleted(ctx, thread_id, seq)
        if self._webhooks is not None:
            data = webhook_payloads.thread_deleted(thread_id=thread_id, user_id=ctx.user_id)
            await self._webhooks.enqueue(conn, WebhookEvent.THREAD_DELETED, data)
        await self._runs.stop_executing(running, reason=reason)
