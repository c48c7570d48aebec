"""Starting and cancelling runs: what the API and the WebSocket call.

Each method owns its transaction, so that it can act *after* the commit: wake the local worker,
and tell whichever process executes a run to cancel it. `post_in` is `post` inside the caller's
transaction (the HTTP request's own); the caller then calls `settle` once it has committed.

Waking workers: a queued run is announced to this process's own worker after the commit, and
to the workers of other processes by the NOTIFY its insert carries (PostgreSQL), but only when
this process's worker has no free slot (or there is none): a worker with room claims at once
when told, so waking the others would only make them race for the run, and every listening
process pays a transaction to read each NOTIFY. Nothing waits longer for it: a run the local
worker does not take after all (a slot taken meanwhile) is claimed by the next worker that
frees a slot or polls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.agents.registry import AgentRegistry
from threadline.context import UserContext
from threadline.errors import ConflictError, NotFoundError, RateLimitedError
from threadline.events import payloads
from threadline.events.bus import EventBus
from threadline.events.control import CancelRun
from threadline.events.publisher import EventPublisher, EventSpec
from threadline.events.types import EventType
from threadline.runs.outcomes import CancelReason, Outcome, RunFinisher
from threadline.statuses import MultitaskStrategy as MultitaskStrategy  # re-exported
from threadline.store.accounts import Standing
from threadline.store.db import read_transaction
from threadline.store.messages import Message, MessageRole, MessageStore, NewMessage
from threadline.store.runs import Run, RunStatus, RunStore
from threadline.store.threads import ThreadStatus, ThreadStore
from threadline.usage.quotas import Quotas


@dataclass(frozen=True, slots=True)
class RunRequest:
    agent: str
    multitask_strategy: MultitaskStrategy = MultitaskStrategy.ENQUEUE
    answers: str | None = None
    """A stored user message the run answers when it posts none (a regenerated answer)."""


@dataclass(frozen=True, slots=True)
class Posted:
    message: Message | None
    run: Run | None
    interrupted: tuple[str, ...] = ()
    """Running runs this post interrupted: their executors are told once it committed."""
    workers_notified: bool = False
    """Whether the run's insert notified the listening workers (else only the local one is
    told)."""


class LocalWorker(Protocol):
    """The worker executing runs in this process (`runs/worker.Worker`)."""

    def has_room(self) -> bool:
        """Whether it would claim a run queued now at once (a free slot, not stopping)."""
        ...

    def notify(self, run_id: str | None = None, *, echoed: bool = True) -> None:
        """A run was queued: `run_id` (None: maybe several); `echoed`: its NOTIFY echo
        follows."""
        ...


class RunService:
    def __init__(
        self,
        *,
        db: AsyncEngine,
        threads: ThreadStore,
        messages: MessageStore,
        runs: RunStore,
        registry: AgentRegistry,
        publisher: EventPublisher,
        bus: EventBus,
        max_attempts: int,
        max_active_per_user: int,
        finisher: RunFinisher,
        worker: LocalWorker | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._quotas = quotas
        self._db = db
        self._threads = threads
        self._messages = messages
        self._runs = runs
        self._registry = registry
        self._publisher = publisher
        self._bus = bus
        self._max_attempts = max_attempts
        self._max_active_per_user = max_active_per_user
        self._finisher = finisher
        self._worker = worker

    async def post(
        self,
        ctx: UserContext,
        thread_id: str,
        *,
        message: NewMessage | None,
        run: RunRequest | None,
    ) -> Posted:
        """Append a user message and/or queue a run, in one transaction."""
        async with self._db.begin() as conn:
            posted = await self.post_in(conn, ctx, thread_id, message=message, run=run)
        await self.settle(posted)
        return posted

    async def post_in(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        *,
        message: NewMessage | None,
        run: RunRequest | None,
        standing: Standing | None = None,
    ) -> Posted:
        """`post` in the caller's transaction; call `settle` after it commits. `standing`:
        the account as this transaction read it (locked: not locked and read again)."""
        if run is not None:
            self._registry.get(run.agent)  # unknown agent: fail before writing anything
        if run is not None and self._quotas is not None and not (standing and standing.locked):
            # The user's row lock first, always in this order (user, then thread), so that the
            # counts below are exact under concurrency.
            standing = await self._quotas.lock(conn, ctx)
        stored = None
        reserved: int | None = None  # the last event number the message's update reserved
        # The message's update numbers the run's `run_queued` too, except when the post
        # interrupts: the queued runs it ends number their `run_cancelled` in between, and a
        # thread's events must reach the bus in number order (`events/redis_bus.py` refuses an
        # append below the stream's last; a live subscriber takes a skipped number for a gap).
        reserves_run = run is not None and run.multitask_strategy is not MultitaskStrategy.INTERRUPT
        if message is not None and message.role is MessageRole.USER:
            # Its thread update takes the thread's row lock, refuses an archived thread (409)
            # and another user's (404), and numbers the events that announce it (its own,
            # and the run's), before anything else is read.
            stored, reserved = await self._messages.append_announced(
                conn, ctx, thread_id, message, events=1 + reserves_run
            )
        else:
            # The row lock serializes starts on one thread, so two `reject` requests cannot
            # both see an idle thread.
            thread = await self._threads.get(conn, ctx, thread_id, for_update=True)
            if thread.status is ThreadStatus.ARCHIVED:
                raise ConflictError(
                    "The thread is archived; restore it (status: active) to continue",
                    code="thread_archived",
                )
        created = None
        to_cancel: list[Run] = []
        notify_workers = self._worker is None or not self._worker.has_room()
        if run is not None:
            active_runs = await self._runs.count_active_for_user(conn, ctx)
            if self._quotas is not None:
                await self._quotas.check_run(conn, ctx, standing=standing, active_runs=active_runs)
            if active_runs >= self._max_active_per_user:
                raise RateLimitedError(
                    f"At most {self._max_active_per_user} runs may be queued or running per user",
                    retry_after_seconds=5,
                )
        announced: list[EventSpec] = []  # the message's event, when it rides with the run's
        if message is not None:
            if stored is None:
                stored = await self._messages.append(conn, ctx, thread_id, message)
            announced = [(EventType.MESSAGE_CREATED, payloads.message_created(stored))]
            if not reserves_run:
                await self._publisher.emit_many(conn, ctx, thread_id, announced, reserved=reserved)
                announced = []
        if run is not None:
            created, to_cancel = await self._queue(
                conn,
                ctx,
                thread_id,
                run,
                stored,
                touch_thread=stored is None,
                announced=announced,
                reserved=reserved if reserves_run else None,
                notify_workers=notify_workers,
            )
        return Posted(
            message=stored,
            run=created,
            interrupted=tuple(r.id for r in to_cancel),
            workers_notified=notify_workers,
        )

    async def settle(self, posted: Posted) -> None:
        """After the commit of a post: tell the executors of the runs it interrupted, and wake
        the local worker for the run it queued."""
        await self.stop_executing(list(posted.interrupted), reason=CancelReason.INTERRUPT)
        if posted.run is not None and self._worker is not None:
            self._worker.notify(posted.run.id, echoed=posted.workers_notified)

    async def _queue(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        request: RunRequest,
        message: Message | None,
        *,
        touch_thread: bool,
        announced: Sequence[EventSpec] = (),
        reserved: int | None = None,
        notify_workers: bool = True,
    ) -> tuple[Run, list[Run]]:
        """`announced`: the post's own events (its message's), emitted in one batch with the
        run's `run_queued` (one insert, one publish); `reserved`: the batch's last number,
        when this transaction reserved it."""
        to_cancel: list[Run] = []
        if request.multitask_strategy is MultitaskStrategy.ENQUEUE:
            active: list[Run] = []  # queued behind them: nothing to refuse or to cancel
        else:
            active = await self._runs.active_for_thread(conn, ctx, thread_id)
        if active and request.multitask_strategy is MultitaskStrategy.REJECT:
            raise ConflictError(
                f"Run {active[0].id} is still {active[0].status}; "
                "use multitask_strategy enqueue or interrupt",
                code="run_in_progress",
            )
        if request.multitask_strategy is MultitaskStrategy.INTERRUPT:
            for other in active:
                if other.status is RunStatus.QUEUED:
                    await self._cancel_queued(conn, ctx, other, CancelReason.INTERRUPT)
                else:
                    await self._runs.mark_cancel_requested(conn, ctx, other.id)
                    to_cancel.append(other)
        run = await self._runs.create(
            conn,
            ctx,
            thread_id,
            agent=request.agent,
            input={"message_id": message.id if message else request.answers},
            max_attempts=self._max_attempts,
            touch_thread=touch_thread,
            notify_workers=notify_workers,
        )
        queued: list[EventSpec] = [(EventType.RUN_QUEUED, payloads.run_queued(run))]
        await self._publisher.emit_groups(
            conn, ctx, thread_id, [(None, announced), (run.id, queued)], reserved=reserved
        )
        return run, to_cancel

    async def _cancel_queued(
        self, conn: AsyncConnection, ctx: UserContext, run: Run, reason: CancelReason
    ) -> bool:
        return await self._finisher.finish(conn, run, Outcome.cancelled(reason))

    async def end_thread_runs(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, *, reason: CancelReason
    ) -> list[str]:
        """In the transaction that archives or deletes the thread: end its queued runs as
        cancelled now, and its running ones too when the thread is deleted (their rows go with
        it, so their executor could not end them); a running run of an archived thread is asked
        to stop and ends itself. Returns the running runs' ids, whose executors must be told
        (`stop_executing`)."""
        running: list[str] = []
        for run in await self._runs.active_for_thread(conn, ctx, thread_id):
            if run.status is RunStatus.QUEUED or reason is CancelReason.THREAD_DELETED:
                await self._finisher.finish(conn, run, Outcome.cancelled(reason))
            else:
                await self._runs.mark_cancel_requested(conn, ctx, run.id)
            if run.status is RunStatus.RUNNING:
                running.append(run.id)
        return running

    async def stop_executing(self, run_ids: list[str], *, reason: CancelReason) -> None:
        """Tell whichever process executes each run to cancel it for `reason`."""
        for run_id in run_ids:
            await self._bus.publish_control(CancelRun(run_id=run_id, reason=reason.value))

    async def cancel(self, ctx: UserContext, thread_id: str, run_id: str) -> Run:
        """Cancel a queued run at once, or ask the process executing it to stop it.
        Cancelling a finished run changes nothing and returns it as it is."""
        async with self._db.begin() as conn:
            run = await self._runs.get(conn, ctx, run_id)
            if run.thread_id != thread_id:
                raise NotFoundError("run", run_id)
            if run.status is RunStatus.QUEUED:
                if await self._cancel_queued(conn, ctx, run, CancelReason.USER):
                    return await self._runs.get(conn, ctx, run_id)
                # A worker's claim committed between the read and the cancel (PostgreSQL: the
                # read locked nothing): cancel the run as it is now.
                run = await self._runs.get(conn, ctx, run_id)
            if run.status is not RunStatus.RUNNING:
                return run
            await self._runs.mark_cancel_requested(conn, ctx, run_id)
        await self.stop_executing([run_id], reason=CancelReason.USER)
        async with read_transaction(self._db) as conn:
            return await self._runs.get(conn, ctx, run_id)
