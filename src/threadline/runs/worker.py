"""The worker: claims queued runs, executes them, keeps their leases alive, reaps dead ones.

Model:
- Up to `concurrency` runs execute at once, each in a task of the worker's TaskGroup with a
  heartbeat beside it. A heartbeat extends the lease and also notices a cancel requested from
  another process whose control message did not reach this one.
- A claim is one transaction that claims the run (`RunQueue.claim`: fair order, one active run
  per thread, the per-user limit exact under its advisory lock) and starts it
  (`ExecutionEngine.begin`: budget, history, input placement, `agent_started`); the run's task
  executes it once that committed, with the lease the claim set and the heartbeat from then on.
  If the start fails, the claim rolls back with it: on a lost database connection the run
  simply stays queued for a later claim (never started, no attempt counted); on any other
  error the run is ended failed from the queue (`fail_unstarted`), so that no claim takes it
  again and fails the same way; over the engine's per-user slots in this process
  (RunLimitError) it stays queued until one of that user's runs here ends.
- The worker claims again at once only when its last claim saw another claimable run
  (`Claimed.more`, looked for while a slot is free). Else it waits to be woken: by `notify()`
  (a run was queued in this process), by a `Waker`'s signal (on PostgreSQL: `LISTEN` on the
  channel every run insert notifies, `runs/wakeup.py`), by a run of its own ending while the
  last claim held runs back (behind a thread, or a user at the limit: `Claimed.held_back`), by
  the reaper, or every `poll_seconds` as a safety net (a notification lost while the
  listening connection was down). The wake event is cleared only just before the claim it
  leads to, and a claim counts as holding runs back until it tells otherwise: a run queued or
  ended while a claim is in progress wakes the next one, never lost. A run queued in this
  process while this worker has room (`has_room`) is announced by `notify` only: its insert
  notifies nobody (`runs/service.py`). One queued while it is full is announced twice, by
  `notify` and by the `LISTEN` echo of its insert, in either order: the second is ignored
  (`_Announced`), or every such run would cost an empty claim.
- The reaper finds running runs whose lease expired (their worker died): it requeues them until
  `max_attempts`, then ends them as failed (`worker_lost`) through `RunFinisher`. No run stays
  `running` forever.
- A run whose executor lost the database connection is handed back (or, if the database is
  still unreachable, left for its lease to expire): it is retried, not failed.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.events.bus import EventBus, Unsubscribe
from threadline.events.control import CancelRun, SessionEnded
from threadline.runs.engine import BegunRun, ExecutionEngine, RunLimitError, RunStartError
from threadline.runs.outcomes import CancelReason, Outcome, RunFinisher
from threadline.store.failures import is_database_unavailable
from threadline.store.queue import RunQueue
from threadline.store.runs import Run

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int = 32
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    reap_seconds: float = 5.0
    grace_seconds: float = 20.0
    lease_seconds: float = 30.0
    per_user_limit: int = 4


class Waker(Protocol):
    """Calls `wake` whenever a run may have been queued by another process, until cancelled:
    with the run's id, or None when it cannot say which (anything may have been queued)."""

    async def run(self, wake: Callable[[str | None], None]) -> None: ...


class _Announced:
    """The ids of runs announced once (bounded: an id whose second announcement never comes,
    a run queued by another process, is forgotten after `limit` more)."""

    def __init__(self, limit: int = 1024) -> None:
        self._ids: dict[str, None] = {}
        self._limit = limit

    def again(self, run_id: str) -> bool:
        """Whether `run_id` was announced before (and is forgotten now); else remember it."""
        if run_id in self._ids:
            del self._ids[run_id]
            return True
        self._ids[run_id] = None
        if len(self._ids) > self._limit:
            del self._ids[next(iter(self._ids))]
        return False


class _WakeUp:
    """The claim loop's wake-up: set by whatever may have made a run claimable. A wake-up that
    only announced runs this worker has claimed since is withdrawn (`claimed`): the claim it
    would lead to could only find nothing. Any other wake-up (an unnamed run, a run ending, a
    run handed back) stays until the loop wakes on it, which is when all are cleared."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._runs: set[str] = set()
        self._unnamed = False

    def set(self, run_id: str | None = None) -> None:
        if run_id is None:
            self._unnamed = True
        else:
            self._runs.add(run_id)
        self._event.set()

    def claimed(self, run_id: str) -> None:
        """This worker claimed `run_id` (and its claim committed)."""
        self._runs.discard(run_id)
        if not self._runs and not self._unnamed:
            self._event.clear()

    async def wait(self, seconds: float) -> None:
        """Until woken, or for `seconds` at most; then cleared, right before the claim it leads
        to: a wake-up that comes during that claim stays set, for the claim after it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._event.wait()
        self._event.clear()
        self._runs.clear()
        self._unnamed = False


def new_worker_id() -> str:
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        engine: ExecutionEngine,
        *,
        db: AsyncEngine,
        queue: RunQueue,
        finisher: RunFinisher,
        bus: EventBus,
        config: WorkerConfig = WorkerConfig(),
        waker: Waker | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.worker_id = worker_id or new_worker_id()
        self._db = db
        self._queue = queue
        self._finisher = finisher
        self._bus = bus
        self._waker = waker
        self._wake = _WakeUp()
        self._announced = _Announced()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._executing: set[asyncio.Task[None]] = set()
        # Whether the last claim left queued runs behind that a run ending here may free.
        self._held_back = True

    def has_room(self) -> bool:
        """Whether a run queued now is claimed at once when `notify` tells of it: a slot is
        free and the worker is not stopping (`runs/service.py` then notifies no other worker)."""
        return not self._slots.locked() and not self._stopping.is_set()

    def notify(self, run_id: str | None = None, *, echoed: bool = True) -> None:
        """A run (`run_id`, or maybe several: None) was queued; claim unless that run was
        announced already. `echoed`: the run is announced twice (its insert's NOTIFY echo
        follows or came first); else this is its only announcement."""
        if run_id is not None and echoed and self._announced.again(run_id):
            return
        self._wake.set(run_id)

    async def run(self) -> None:
        """Work until `stop()`; then drain gracefully and return."""
        unsubscribe: Unsubscribe = self._bus.subscribe_control(self._on_control)
        try:
            async with asyncio.TaskGroup() as group:
                reaper = group.create_task(self._reap_loop())
                waker = group.create_task(self._waker.run(self.notify)) if self._waker else None
                await self._claim_loop(group)
                await self._drain()
                reaper.cancel()
                if waker is not None:
                    waker.cancel()
        finally:
            unsubscribe()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _on_control(self, message: CancelRun | SessionEnded) -> None:
        if isinstance(message, CancelRun):
            self.engine.cancel_local(message.run_id, CancelReason(message.reason))

    async def _claim_loop(self, group: asyncio.TaskGroup) -> None:
        claim_now = True
        while not self._stopping.is_set():
            if not claim_now:
                await self._sleep_until_woken()
            await self._slots.acquire()
            if self._stopping.is_set():
                self._slots.release()
                return
            try:
                begun, claim_now = await self._claim()
            except Exception:
                logger.exception("Claiming a run failed; retrying")
                begun, claim_now = None, False
            if begun is None:
                self._slots.release()
                continue
            # Announced, maybe during a claim, and taken now: not worth another claim.
            self._wake.claimed(begun.run.id)
            task = group.create_task(self._execute(begun))
            self._executing.add(task)
            task.add_done_callback(self._executing.discard)

    async def _sleep_until_woken(self) -> None:
        await self._wake.wait(self.config.poll_seconds)

    async def _claim(self) -> tuple[BegunRun | None, bool]:
        """Claim a run and start it, in one transaction; and whether to claim again at once
        (the claim saw another claimable run)."""
        # Until this claim tells, a run that ends meanwhile must wake the next one: this
        # claim's snapshot may predate that end and miss the run it frees.
        self._held_back = True
        try:
            async with self._db.begin() as conn:
                claimed = await self._queue.claim(
                    conn,
                    worker_id=self.worker_id,
                    lease_seconds=self.config.lease_seconds,
                    per_user_limit=self.config.per_user_limit,
                    # Look for a next run only when a slot is left to take it with.
                    look_ahead=not self._slots.locked(),
                )
                self._held_back = claimed.held_back
                if claimed.run is None:
                    return None, False
                begun = await self.engine.begin(conn, claimed.run, user_plan=claimed.user_plan)
                return begun, claimed.more
        except RunLimitError:
            # Rolled back: the run stays queued until one of this user's runs here ends,
            # which wakes the claim.
            self._held_back = True
            return None, False
        except RunStartError as error:
            logger.error("Run %s could not start; failing it", error.run.id, exc_info=error)
            await self.engine.fail_unstarted(error)
            return None, True  # the queue may hold more than the run that failed

    async def _execute(self, begun: BegunRun) -> None:
        run = begun.run
        try:
            await self._execute_with_heartbeat(begun)
        except RunLimitError:
            await self._release(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(run))
            raise
        except Exception as exc:
            if not is_database_unavailable(exc):
                logger.exception("Run %s crashed its executor", run.id)
            else:
                logger.warning("Run %s lost its database connection; handing it back", run.id)
                await self._release_or_let_expire(run)
        finally:
            self._slots.release()
            if self._held_back:
                # The run's thread, or its user's limit, may have held back a queued run.
                self._wake.set()

    async def _execute_with_heartbeat(self, begun: BegunRun) -> None:
        # A plain task, not a TaskGroup: a TaskGroup would wrap RunLimitError and the
        # executor's errors in an ExceptionGroup. The heartbeat is owned and awaited here.
        heartbeat = asyncio.create_task(self._heartbeat(begun.run))
        try:
            await self.engine.execute(begun)
        finally:
            heartbeat.cancel()
            await asyncio.wait({heartbeat})

    async def _release(self, run: Run, *, count_attempt: bool = False) -> None:
        async with self._db.begin() as conn:
            await self._queue.release(conn, run, count_attempt=count_attempt)
        self._held_back = True  # handed back: queued again, and claimable once a run ends

    async def _release_or_let_expire(self, run: Run) -> None:
        try:
            await self._release(run, count_attempt=True)
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            # Still unreachable: the lease runs out and the reaper requeues the run.
            logger.warning("Could not hand run %s back; its lease will expire", run.id)

    async def _heartbeat(self, run: Run) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                async with self._db.begin() as conn:
                    cancel = await self._queue.heartbeat(
                        conn, run, lease_seconds=self.config.lease_seconds
                    )
                    gone = cancel is None and await self._queue.status_of(conn, run.id) is None
            except Exception:
                # The database is briefly unreachable: try again at the next beat; the lease
                # is several beats long.
                logger.warning("Heartbeat of run %s failed; retrying", run.id, exc_info=True)
                continue
            if gone:
                logger.info("Run %s was deleted with its thread; stopping it here", run.id)
                self.engine.cancel_local(run.id, CancelReason.THREAD_DELETED)
                return
            if cancel is None:
                logger.warning("Run %s lost its lease; stopping it here", run.id)
                self.engine.cancel_local(run.id, CancelReason.SHUTDOWN)
                return
            if cancel:
                self.engine.cancel_local(run.id, CancelReason.USER)

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
        handled = 0
        async with self._db.begin() as conn:
            for run in await self._queue.expired(conn):
                if run.attempt < run.max_attempts:
                    handled += await self._queue.requeue_expired(conn, run)
                    continue
                lost = Outcome.failed(
                    "worker_lost", f"The worker stopped responding {run.attempt} times"
                )
                handled += await self._finisher.finish(conn, run, lost)
        if handled:
            logger.info("Reaped %d run(s) whose worker stopped responding", handled)
            self._wake.set()
        return handled

    async def _drain(self) -> None:
        if not self._executing:
            return
        _, pending = await asyncio.wait(set(self._executing), timeout=self.config.grace_seconds)
        for task in pending:
            task.cancel()
