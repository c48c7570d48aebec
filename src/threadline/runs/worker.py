"""The worker: claims queued runs, executes them, keeps their leases alive, reaps dead ones.

Model:
- Up to `concurrency` runs execute at once, each in a task of the worker's TaskGroup with a
  heartbeat beside it. A heartbeat extends the lease and also notices a cancel requested from
  another process whose control message did not reach this one.
- Claiming wakes on `notify()` (a run was queued in this process) or every `poll_seconds`
  (queued elsewhere).
- The reaper finds running runs whose lease expired (their worker died): it requeues them until
  `max_attempts`, then fails them with `agent_failed` (code `worker_lost`). No run stays
  `running` forever.
- `stop()` stops claiming, lets running runs finish for `grace_seconds`, then cancels the rest,
  which hands them back to the queue for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from threadline.context import UserContext
from threadline.events.bus import EventBus, Unsubscribe
from threadline.events.control import CancelRun, SessionEnded
from threadline.events.types import EventType
from threadline.runs.conversation import close_unanswered_tool_calls
from threadline.runs.engine import CancelReason, ExecutionEngine, RunLimitError
from threadline.store.runs import Run, RunStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int = 32
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    reap_seconds: float = 5.0
    grace_seconds: float = 20.0


def new_worker_id() -> str:
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        engine: ExecutionEngine,
        *,
        bus: EventBus,
        config: WorkerConfig = WorkerConfig(),
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.config = config
        self.worker_id = worker_id or new_worker_id()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._executing: set[asyncio.Task[None]] = set()

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Work until `stop()`; then drain gracefully and return."""
        unsubscribe: Unsubscribe = self.bus.subscribe_control(self._on_control)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._reap_loop())
                await self._claim_loop(group)
                await self._drain()
        finally:
            unsubscribe()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _on_control(self, message: CancelRun | SessionEnded) -> None:
        if isinstance(message, CancelRun):
            self.engine.cancel_local(message.run_id, CancelReason(message.reason))

    async def _claim_loop(self, group: asyncio.TaskGroup) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            try:
                run = await self._claim()
            except Exception:
                logger.exception("Claiming a run failed; retrying")
                run = None
            if run is None:
                self._slots.release()
                await self._sleep_until_woken()
                continue
            task = group.create_task(self._execute(run))
            self._executing.add(task)
            task.add_done_callback(self._executing.discard)

    async def _sleep_until_woken(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.poll_seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _claim(self) -> Run | None:
        engine = self.engine
        async with engine.db.begin() as conn:
            return await engine.runs.claim_next(
                conn,
                worker_id=self.worker_id,
                lease_seconds=engine.config.lease_seconds,
                per_user_limit=engine.config.per_user_concurrency,
            )

    async def _execute(self, run: Run) -> None:
        try:
            ctx = UserContext.create(run.user_id, thread_id=run.thread_id, run_id=run.id)
            user_engine = self.engine.create_for_user(ctx)
            async with asyncio.TaskGroup() as group:
                heartbeat = group.create_task(self._heartbeat(run))
                try:
                    await user_engine.execute(run, worker_id=self.worker_id)
                finally:
                    heartbeat.cancel()
        except RunLimitError:
            await self._release(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(run))
            raise
        except Exception:
            logger.exception("Run %s crashed its executor", run.id)
        finally:
            self._slots.release()
            self._wake.set()  # a slot (and maybe a thread) is free: look for more work

    async def _release(self, run: Run) -> None:
        async with self.engine.db.begin() as conn:
            await self.engine.runs.release(conn, run.id, worker_id=self.worker_id)

    async def _heartbeat(self, run: Run) -> None:
        engine = self.engine
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            async with engine.db.begin() as conn:
                cancel = await engine.runs.heartbeat(
                    conn,
                    run.id,
                    worker_id=self.worker_id,
                    lease_seconds=engine.config.lease_seconds,
                )
            if cancel is None:
                logger.warning("Run %s lost its lease; stopping it here", run.id)
                engine.cancel_local(run.id, CancelReason.SHUTDOWN)
                return
            if cancel:
                engine.cancel_local(run.id, CancelReason.USER)

    async def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.reap_expired()
            except Exception:
                logger.exception("Reaping expired runs failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.reap_seconds):
                    await self._stopping.wait()

    async def reap_expired(self) -> int:
        """Requeue or fail every run whose lease expired. Returns how many were handled."""
        engine = self.engine
        handled = 0
        async with engine.db.begin() as conn:
            for run in await engine.runs.expired(conn):
                ctx = UserContext.create(run.user_id, thread_id=run.thread_id, run_id=run.id)
                if run.attempt < run.max_attempts:
                    if await engine.runs.requeue_expired(conn, run):
                        handled += 1
                    continue
                error: dict[str, object] = {
                    "code": "worker_lost",
                    "message": f"The worker stopped responding {run.attempt} times",
                }
                await close_unanswered_tool_calls(conn, engine.messages, ctx, run=run)
                if await engine.runs.finish(
                    conn, run.id, status=RunStatus.FAILED, worker_id=run.lease_owner, error=error
                ):
                    await engine.publisher.emit(
                        conn, ctx, run.thread_id, EventType.AGENT_FAILED, error, run_id=run.id
                    )
                    engine.metrics.runs_finished.labels(RunStatus.FAILED.value).inc()
                    handled += 1
        if handled:
            self._wake.set()
        return handled

    async def _drain(self) -> None:
        if not self._executing:
            return
        _, pending = await asyncio.wait(set(self._executing), timeout=self.config.grace_seconds)
        for task in pending:
            task.cancel()
