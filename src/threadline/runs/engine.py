"""The execution engine: runs one claimed run to exactly one terminal state.

Model:
- `ExecutionEngine` is process-wide: it owns the agent registry, the providers, the per-user
  slot counts and the tasks of the runs executing here. `create_for_user(ctx)` gives the
  `UserRunEngine` that executes that user's runs; it refuses a run beyond the user's
  concurrent-run limit.
- A run ends as completed, failed, timed_out or cancelled, and the status change and its one
  terminal event (`agent_completed`, `agent_failed`, `run_cancelled`) are written in one
  transaction conditional on this worker's lease: a run can never get two outcomes.
- Cancellation is task cancellation. The reason decides the outcome: a user's cancel or an
  interrupt ends the run as cancelled; shutdown hands the run back to the queue for another
  worker, with no terminal event.
- Whatever way a run ends, every tool call it made is left with a result in the thread (a
  synthetic error result for one that did not finish), so the history stays valid for every
  provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.agents.agent import Agent
from threadline.agents.context import DepsFactory, RunContext, RunInfo
from threadline.agents.history import repair_history, window_history
from threadline.agents.loop import AgentOutcome, run_agent
from threadline.agents.registry import AgentRegistry
from threadline.context import UserContext
from threadline.errors import ThreadlineError
from threadline.events.publisher import EventPublisher
from threadline.events.types import EventType
from threadline.llm.providers import ProviderSet
from threadline.llm.types import ChatMessage
from threadline.logs import bound
from threadline.metrics import Metrics
from threadline.runs.conversation import close_unanswered_tool_calls, to_chat_history
from threadline.runs.sink import RunEventSink
from threadline.store.db import read_transaction
from threadline.store.messages import MessageRole, MessageStore
from threadline.store.runs import Run, RunStatus, RunStore

logger = logging.getLogger(__name__)
JSONObject = dict[str, object]


class CancelReason(StrEnum):
    USER = "user"
    INTERRUPT = "interrupted"
    SHUTDOWN = "shutdown"


class RunLimitError(ThreadlineError):
    code = "run_limit_exceeded"

    def __init__(self, user_id: str, limit: int) -> None:
        super().__init__(f"At most {limit} runs may execute at once for one user")
        self.user_id = user_id
        self.limit = limit


@dataclass(frozen=True, slots=True)
class EngineConfig:
    run_timeout_seconds: float = 300.0
    per_user_concurrency: int = 4
    max_attempts: int = 3
    lease_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: RunStatus
    event: EventType
    data: JSONObject
    result: JSONObject | None = None
    error: JSONObject | None = None


@dataclass
class ExecutionEngine:
    db: AsyncEngine
    registry: AgentRegistry
    providers: ProviderSet
    publisher: EventPublisher
    runs: RunStore
    messages: MessageStore
    metrics: Metrics
    deps: DepsFactory | None = None
    """The application's per-run deps, for agents that declare no `deps_factory` of their own."""
    config: EngineConfig = field(default_factory=EngineConfig)
    _slots: dict[str, int] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[object]] = field(default_factory=dict)
    _cancel_reasons: dict[str, CancelReason] = field(default_factory=dict)

    def create_for_user(self, ctx: UserContext) -> UserRunEngine:
        return UserRunEngine(self, ctx)

    def cancel_local(self, run_id: str, reason: CancelReason) -> bool:
        """Cancel the run if it executes in this process. Returns whether it did."""
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        self._cancel_reasons.setdefault(run_id, reason)
        task.cancel()
        return True

    @property
    def active_run_ids(self) -> list[str]:
        return list(self._tasks)

    def running_for(self, user_id: str) -> int:
        return self._slots.get(user_id, 0)

    @contextmanager
    def _slot(self, user_id: str) -> Iterator[None]:
        if self._slots.get(user_id, 0) >= self.config.per_user_concurrency:
            raise RunLimitError(user_id, self.config.per_user_concurrency)
        self._slots[user_id] = self._slots.get(user_id, 0) + 1
        self.metrics.runs_active.inc()
        try:
            yield
        finally:
            self.metrics.runs_active.dec()
            self._slots[user_id] -= 1
            if not self._slots[user_id]:
                del self._slots[user_id]


class UserRunEngine:
    """Executes runs for one user. Built per run from the claimed run's context."""

    def __init__(self, engine: ExecutionEngine, ctx: UserContext) -> None:
        self._engine = engine
        self._ctx = ctx

    async def execute(self, run: Run, *, worker_id: str) -> RunStatus | None:
        """Run to a terminal state and return it; None when the run went back to the queue."""
        if run.user_id != self._ctx.user_id:
            raise ValueError("a run may only be executed by its own user's engine")
        ctx = self._ctx.for_run(run.id, thread_id=run.thread_id)
        engine = self._engine
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("execute must run inside a task")
        with bound(ctx), engine._slot(ctx.user_id):
            engine._tasks[run.id] = task
            engine.metrics.runs_started.inc()
            started = time.monotonic()
            try:
                outcome = await self._guarded(run, ctx)
            finally:
                engine._tasks.pop(run.id, None)
            if outcome is None:
                return None
            await asyncio.shield(self._finish(run, ctx, outcome, worker_id=worker_id))
            engine.metrics.run_duration.observe(time.monotonic() - started)
            return outcome.status

    async def _guarded(self, run: Run, ctx: UserContext) -> _Outcome | None:
        engine = self._engine
        sink = RunEventSink(
            db=engine.db, publisher=engine.publisher, messages=engine.messages, ctx=ctx
        )
        try:
            async with asyncio.timeout(engine.config.run_timeout_seconds):
                outcome = await self._run_agent(run, ctx, sink)
            await sink.flush()
            last = sink.last_assistant
            result: JSONObject = {
                "message_id": last.id if last else None,
                "text": outcome.final_text,
                "usage": {
                    "input_tokens": outcome.usage.input_tokens,
                    "output_tokens": outcome.usage.output_tokens,
                },
                "steps": outcome.steps,
                "tool_calls": sink.tool_calls,
            }
            data = {k: result[k] for k in ("message_id", "text", "usage")}
            return _Outcome(RunStatus.COMPLETED, EventType.AGENT_COMPLETED, data, result=result)
        except TimeoutError:
            seconds = engine.config.run_timeout_seconds
            return _failure(RunStatus.TIMED_OUT, "run_timed_out", f"The run exceeded {seconds} s")
        except asyncio.CancelledError:
            reason = engine._cancel_reasons.pop(run.id, None)
            if reason in (None, CancelReason.SHUTDOWN):
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            cancelled: JSONObject = {"reason": reason.value}
            return _Outcome(
                RunStatus.CANCELLED, EventType.RUN_CANCELLED, cancelled, error=cancelled
            )
        except ThreadlineError as exc:
            return _failure(RunStatus.FAILED, exc.code, exc.message)
        except Exception as exc:
            logger.exception("Agent run failed")
            return _failure(RunStatus.FAILED, "agent_error", f"{type(exc).__name__}: {exc}")
        finally:
            # Counted however the run ends: a tool that ran in a cancelled run still ran.
            engine.metrics.tool_calls.inc(sink.tool_calls)

    async def _run_agent(self, run: Run, ctx: UserContext, sink: RunEventSink) -> AgentOutcome:
        engine = self._engine
        await sink.emit(EventType.AGENT_STARTED, {"agent": run.agent, "attempt": run.attempt})
        agent = engine.registry.build(run.agent)
        provider, model = engine.providers.resolve(agent.model)
        input_position = await self._place_input_message(run, ctx)
        history = await self._history(run, ctx, agent, input_position=input_position)
        context: RunContext[object] = RunContext(
            user=ctx,
            thread_id=run.thread_id,
            run_id=run.id,
            agent_name=agent.name,
            deps=self._deps(run, ctx, agent),
        )
        return await run_agent(
            agent,
            history=history,
            context=context,
            provider=provider,
            model=model,
            sink=sink,
        )

    def _deps(self, run: Run, ctx: UserContext, agent: Agent) -> object:
        factory = self._engine.deps
        if agent.deps_factory is not None or factory is None:
            return agent.new_deps()
        info = RunInfo(user=ctx, thread_id=run.thread_id, run_id=run.id, agent_name=agent.name)
        return factory(info)

    async def _place_input_message(self, run: Run, ctx: UserContext) -> int | None:
        """The position of the message this run answers, after moving it behind the output of
        runs that finished while it waited in the queue."""
        message_id = run.input.get("message_id")
        if not isinstance(message_id, str):
            return None
        engine = self._engine
        async with engine.db.begin() as conn:
            placed = await engine.messages.place_after_agent_output(
                conn, ctx, run.thread_id, message_id, run_id=run.id
            )
            if placed is None:
                return None
            position, moved = placed
            if moved:
                await engine.publisher.emit(
                    conn,
                    ctx,
                    run.thread_id,
                    EventType.MESSAGE_MOVED,
                    {"message_id": message_id, "position": position},
                    run_id=run.id,
                )
        return position

    async def _history(
        self, run: Run, ctx: UserContext, agent: Agent, *, input_position: int | None
    ) -> list[ChatMessage]:
        """The thread's recent messages up to the one this run answers (later questions belong
        to later runs), plus this run's own output, repaired. A trailing tool call of *this*
        run that has no result yet is kept pending: a retried run resumes where it stopped."""
        async with read_transaction(self._engine.db) as conn:
            stored = await self._engine.messages.recent(
                conn, ctx, run.thread_id, window=agent.history_window * 2 + 8
            )
        if input_position is not None:
            stored = [m for m in stored if m.position <= input_position or m.run_id == run.id]
        last_calls = next(
            (m for m in reversed(stored) if m.role is MessageRole.ASSISTANT and m.tool_calls),
            None,
        )
        resuming = last_calls is not None and last_calls.run_id == run.id
        history = repair_history(to_chat_history(stored), keep_pending_tail=resuming)
        return window_history(history, agent.history_window)

    async def _finish(
        self, run: Run, ctx: UserContext, outcome: _Outcome, *, worker_id: str
    ) -> None:
        engine = self._engine
        async with engine.db.begin() as conn:
            if outcome.status is not RunStatus.COMPLETED:
                await close_unanswered_tool_calls(conn, engine.messages, ctx, run=run)
            applied = await engine.runs.finish(
                conn,
                run.id,
                status=outcome.status,
                worker_id=worker_id,
                result=outcome.result,
                error=outcome.error,
            )
            if applied:
                await engine.publisher.emit(
                    conn, ctx, run.thread_id, outcome.event, outcome.data, run_id=run.id
                )
        if applied:
            engine.metrics.runs_finished.labels(outcome.status.value).inc()
        else:
            logger.warning("Run %s lost its lease before finishing; outcome dropped", run.id)


def _failure(status: RunStatus, code: str, message: str) -> _Outcome:
    error: JSONObject = {"code": code, "message": message}
    return _Outcome(status, EventType.AGENT_FAILED, error, error=error)
