"""The execution engine: runs one claimed run to exactly one terminal state.

Model:
- One `ExecutionEngine` per process: it owns the agent registry, the providers, the per-user
  slot counts and the tasks of the runs executing here. `execute(run)` builds the run's user
  context from the claimed run itself, and refuses a run beyond the user's concurrent-run
  limit in this process (`begin` refuses it already, so that its claim rolls back).
- A run ends as completed, failed, timed_out or cancelled through `RunFinisher.finish`
  (`runs/outcomes.py`), conditional on this attempt's lease: a run can never get two outcomes.
  When the write does not apply, the run was taken over, already ended (a cancel of its
  thread), or deleted with its thread; only a lease really lost is worth a warning.
- Cancellation is task cancellation. The reason decides the outcome: a user's cancel, an
  interrupt, or its thread archived or deleted ends the run as cancelled; shutdown hands the
  run back to the queue for another worker, with no terminal event.
- A run is written one transaction per step, not per event (`runs/sink.py`): the first, its
  start (`_start`), reads the token budget and the history, places the input message, and
  emits `agent_started` with what the loop does first; the last is `RunFinisher.finish`, which
  also stores the final answer (the outcome carries it unstored), so the answer and the run's
  end commit together. The worker writes the start in its claim's transaction (`begin`, then
  `execute` of the `BegunRun`); `execute` of a bare claimed run writes it in one of its own.
  Either way a retried run's start finds what its earlier attempts stored: it resumes their
  pending tool calls, or ends with the answer one of them stored.
- A lost database connection is not the run's fault either: `execute` lets the error through
  (`store/failures.is_database_unavailable`) and the worker hands the run back to be retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.agents.agent import Agent
from threadline.agents.context import DepsFactory, RunContext, RunInfo
from threadline.agents.history import repair_history, window_history
from threadline.agents.loop import AgentOutcome, resumed_calls, run_agent
from threadline.agents.registry import AgentRegistry
from threadline.context import UserContext
from threadline.errors import ThreadlineError
from threadline.events import payloads
from threadline.events.publisher import EventPublisher, EventSpec
from threadline.events.types import EventType
from threadline.llm.providers import ProviderSet
from threadline.llm.types import ChatMessage, ModelProvider, Usage
from threadline.logs import bound
from threadline.metrics import Metrics
from threadline.plans import UserPlan
from threadline.runs.conversation import to_chat_history
from threadline.runs.outcomes import CancelReason, Outcome, RunFinisher
from threadline.runs.sink import RunEventSink
from threadline.store.failures import is_database_unavailable
from threadline.store.messages import Message, MessageRole, MessageStore
from threadline.store.queue import RunQueue, unclaimed
from threadline.store.runs import Run, RunStatus
from threadline.usage.meter import UsageMeter
from threadline.usage.quotas import Quotas

logger = logging.getLogger(__name__)
JSONObject = dict[str, object]


class RunLimitError(ThreadlineError):
    code = "run_limit_exceeded"

    def __init__(self, user_id: str, limit: int) -> None:
        super().__init__(f"At most {limit} runs may execute at once for one user")
        self.user_id = user_id
        self.limit = limit


class RunStartError(ThreadlineError):
    """A claimed run's start failed, for a reason other than the database, in its claim's
    transaction (`ExecutionEngine.begin`): the claim rolled back with it, and the run is to be
    ended as failed (`ExecutionEngine.fail_unstarted`), not claimed again."""

    code = "run_start_failed"

    def __init__(self, run: Run, cause: Exception) -> None:
        super().__init__(f"Run {run.id} could not start: {type(cause).__name__}: {cause}")
        self.run = run
        self.cause = cause


@dataclass(frozen=True, slots=True)
class EngineConfig:
    run_timeout_seconds: float = 300.0
    per_user_concurrency: int = 4


class ExecutionEngine:
    def __init__(
        self,
        *,
        db: AsyncEngine,
        registry: AgentRegistry,
        providers: ProviderSet,
        publisher: EventPublisher,
        messages: MessageStore,
        queue: RunQueue,
        finisher: RunFinisher,
        metrics: Metrics,
        deps: DepsFactory | None = None,
        config: EngineConfig = EngineConfig(),
        quotas: Quotas | None = None,
    ) -> None:
        self._quotas = quotas
        self.registry = registry
        self.providers = providers
        """Public so a test can wrap a provider (a model held at a chosen step)."""
        self.config = config
        self._db = db
        self._publisher = publisher
        self._messages = messages
        self._queue = queue
        self._finisher = finisher
        self._metrics = metrics
        self._deps = deps
        self._slots: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[object]] = {}
        self._cancel_reasons: dict[str, CancelReason] = {}

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

    def task_for(self, run_id: str) -> asyncio.Task[object] | None:
        return self._tasks.get(run_id)

    def running_for(self, user_id: str) -> int:
        return self._slots.get(user_id, 0)

    async def begin(self, conn: AsyncConnection, run: Run, *, user_plan: str | None) -> BegunRun:
        """Start the claimed `run` in the caller's transaction: the claim's own (`Worker`), so
        that claiming and starting a run cost one transaction. `execute` takes the result on
        once that transaction committed. Call it last in the transaction: the start's events
        are published just before the commit (`EventPublisher.emit_many`).

        What the start does is `execute`'s first step otherwise: build the agent (if that
        fails, `agent_started` is written all the same, and the run fails with the error once
        executed), read the token budget and the history, place the input message, and emit
        `agent_started` with what the loop does first. `user_plan`: the user's plan as the
        claim read it (`Claimed.user_plan`), for the token budget.

        Raises:
            RunLimitError: this process executes the user's limit already; the caller rolls
                the claim back (the run stays queued) and claims again when a run ends.
            RunStartError: any failure of the start that is not a lost database connection,
                with its cause; the caller rolls back, then ends the run with
                `fail_unstarted`, or every claim would take it and fail the same way.
        A lost database connection is raised as it is: rolled back, the run stays queued and
        is claimed again later (it was never started, so no attempt is counted).
        """
        if self.running_for(run.user_id) >= self.config.per_user_concurrency:
            raise RunLimitError(run.user_id, self.config.per_user_concurrency)
        ctx = _context_of(run)
        sink = self._sink(ctx)
        with bound(ctx):
            try:
                plan = self._quotas.plans.resolve(user_plan) if self._quotas else None
                return await self._begin(conn, run, ctx, sink, plan)
            except Exception as exc:
                if is_database_unavailable(exc):
                    raise
                raise RunStartError(run, exc) from exc

    async def fail_unstarted(self, error: RunStartError) -> bool:
        """End a run whose start failed in its claim's transaction (`begin`), which rolled
        back: the run is still queued, and ends failed from there, conditional on that (another
        worker may have claimed it meanwhile). Returns whether it applied."""
        run = unclaimed(error.run)
        with bound(_context_of(run)):
            outcome = _failed(error.cause)
            async with self._db.begin() as conn:
                return await self._finisher.finish(conn, run, outcome)

    async def execute(self, claimed: Run | BegunRun) -> RunStatus | None:
        """Run a claimed run (its `lease_owner` is this worker) to a terminal state and return
        it; None when the run went back to the queue (shutdown) or was taken from this worker.

        `claimed` is begun already when its claim's transaction started it (`begin`); a bare
        `Run` is started here, in a transaction of its own. The user's slot in this process
        is taken here: `begin` only checks it, so a claim that committed can never leave a slot
        taken; of two runs begun for a user with one slot left, the second raises
        RunLimitError here, and its worker hands it back."""
        begun = claimed if isinstance(claimed, BegunRun) else None
        run = claimed.run if isinstance(claimed, BegunRun) else claimed
        ctx = begun.ctx if begun is not None else _context_of(run)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("execute must run inside a task")
        with bound(ctx), self._slot(ctx.user_id):
            self._tasks[run.id] = task
            self._metrics.runs_started.inc()
            started = time.monotonic()
            try:
                outcome = await self._guarded(run, ctx, begun)
            finally:
                self._tasks.pop(run.id, None)
            if outcome is None:
                return None
            applied = await asyncio.shield(self._finish(run, outcome))
            self._metrics.run_duration.observe(time.monotonic() - started)
            return outcome.status if applied else None

    def _sink(self, ctx: UserContext) -> RunEventSink:
        return RunEventSink(
            db=self._db, publisher=self._publisher, messages=self._messages, ctx=ctx
        )

    @contextmanager
    def _slot(self, user_id: str) -> Iterator[None]:
        if self._slots.get(user_id, 0) >= self.config.per_user_concurrency:
            raise RunLimitError(user_id, self.config.per_user_concurrency)
        self._slots[user_id] = self._slots.get(user_id, 0) + 1
        self._metrics.runs_active.inc()
        try:
            yield
        finally:
            self._metrics.runs_active.dec()
            self._slots[user_id] -= 1
            if not self._slots[user_id]:
                del self._slots[user_id]

    async def _guarded(self, run: Run, ctx: UserContext, begun: BegunRun | None) -> Outcome | None:
        """The run's outcome, with the tokens it used (the plan's budget, read when the run
        starts, stops it early)."""
        meter = UsageMeter()
        outcome = await self._outcome(run, ctx, meter, begun)
        return None if outcome is None else replace(outcome, usage=meter.usage)

    async def _outcome(
        self, run: Run, ctx: UserContext, meter: UsageMeter, begun: BegunRun | None
    ) -> Outcome | None:
        sink = begun.sink if begun is not None else self._sink(ctx)
        try:
            outcome = await self._ending(run, ctx, sink, meter, begun)
        finally:
            await sink.discard()  # whatever it still holds can no longer go out in order
            # Counted however the run ends: a tool that ran in a cancelled run still ran.
            self._metrics.tool_calls.inc(sink.tool_calls)
        # The last step's message is not stored yet: it is stored with the outcome, in the
        # transaction that ends the run (`RunFinisher.finish`).
        if outcome is None:
            return None
        return replace(outcome, message=sink.unsaved_answer, held=sink.unsaved_held)

    async def _ending(
        self,
        run: Run,
        ctx: UserContext,
        sink: RunEventSink,
        meter: UsageMeter,
        begun: BegunRun | None,
    ) -> Outcome | None:
        try:
            async with asyncio.timeout(self.config.run_timeout_seconds):
                outcome = await self._run_agent(run, ctx, sink, meter, begun)
            await sink.flush()
            return Outcome.completed(
                {
                    "message_id": sink.answer_id,
                    "text": outcome.final_text,
                    "usage": {
                        "input_tokens": outcome.usage.input_tokens,
                        "output_tokens": outcome.usage.output_tokens,
                    },
                    "steps": outcome.steps,
                    "tool_calls": sink.tool_calls,
                }
            )
        except TimeoutError:
            seconds = self.config.run_timeout_seconds
            return Outcome.failed(
                "run_timed_out", f"The run exceeded {seconds} s", status=RunStatus.TIMED_OUT
            )
        except asyncio.CancelledError:
            reason = self._cancel_reasons.pop(run.id, None)
            if reason in (None, CancelReason.SHUTDOWN):
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return Outcome.cancelled(reason)
        except Exception as exc:
            if is_database_unavailable(exc):
                raise  # not the run's fault: the worker hands it back to be retried
            return _failed(exc)

    async def _run_agent(
        self,
        run: Run,
        ctx: UserContext,
        sink: RunEventSink,
        meter: UsageMeter,
        begun: BegunRun | None,
    ) -> AgentOutcome:
        if begun is None:
            async with self._db.begin() as conn:
                begun = await self._begin(conn, run, ctx, sink, None)
        start = begun.start
        if isinstance(start, Exception):
            raise start  # the agent could not be built; its agent_started went out
        meter.budget = start.budget
        if start.answered is not None:
            # An earlier attempt stored its final answer, then lost its worker or database
            # before the run was ended: end it with that answer rather than answer twice.
            sink.last_assistant = start.answered
            return AgentOutcome(final_text=start.answered.content, usage=Usage(), steps=0)
        built = start.built
        context: RunContext[object] = RunContext(
            user=ctx,
            thread_id=run.thread_id,
            run_id=run.id,
            agent_name=built.agent.name,
            deps=built.deps,
        )
        return await run_agent(
            built.agent,
            history=start.history,
            context=context,
            provider=meter.wrap(built.provider),
            model=built.model,
            sink=sink,
        )

    async def _begin(
        self,
        conn: AsyncConnection,
        run: Run,
        ctx: UserContext,
        sink: RunEventSink,
        plan: UserPlan | None,
    ) -> BegunRun:
        """The run's start in `conn`'s transaction, its first: the agent built, then `_start`.
        `plan`: the user's, when the caller knows it (None: `_start` reads it)."""
        try:
            agent = self.registry.build(run.agent)
            provider, model = self.providers.resolve(agent.model)
            deps = self._deps_for(run, ctx, agent)
        except Exception as exc:
            # Announced even so: every run that executes starts before it ends.
            started = payloads.agent_started(run.agent, run.attempt)
            await sink.write(conn, [(EventType.AGENT_STARTED, started)])
            return BegunRun(run=run, ctx=ctx, sink=sink, start=exc)
        built = _Built(agent=agent, provider=provider, model=model, deps=deps)
        start = await self._start(conn, run, ctx, built, sink, plan)
        return BegunRun(run=run, ctx=ctx, sink=sink, start=start)

    def _deps_for(self, run: Run, ctx: UserContext, agent: Agent) -> object:
        if agent.deps_factory is not None or self._deps is None:
            return agent.new_deps()
        info = RunInfo(user=ctx, thread_id=run.thread_id, run_id=run.id, agent_name=agent.name)
        return self._deps(info)

    async def _start(
        self,
        conn: AsyncConnection,
        run: Run,
        ctx: UserContext,
        built: _Built,
        sink: RunEventSink,
        plan: UserPlan | None,
    ) -> _Start:
        """The token budget, the input message placed after the output of the runs it waited
        behind, the history read, and `agent_started` with what the loop does first (its model
        call, or the calls a retried run resumes), last, in the caller's transaction."""
        agent = built.agent
        budget = await self._quotas.token_budget(conn, run.user_id, plan) if self._quotas else None
        stored, moved = await self._stored(conn, run, ctx, agent)
        answered = _stored_answer(stored, run)
        history = _history(stored, run, agent)
        resumed = resumed_calls(history) if answered is None else ()
        specs: list[EventSpec] = [
            (EventType.AGENT_STARTED, payloads.agent_started(run.agent, run.attempt))
        ]
        if moved is not None:
            specs.append((EventType.MESSAGE_MOVED, payloads.message_moved(*moved)))
        await sink.write(
            conn,
            specs,
            step_follows=answered is None and not resumed,
            calls_follow=resumed,
        )
        return _Start(built=built, budget=budget, history=history, answered=answered)

    async def _stored(
        self, conn: AsyncConnection, run: Run, ctx: UserContext, agent: Agent
    ) -> tuple[list[Message], tuple[str, int] | None]:
        """The thread's recent messages up to the one this run answers (later questions belong
        to later runs), plus this run's own output; and (message id, position) if the input
        message had to move behind the output of runs that finished while it waited."""
        window = agent.history_window * 2 + 8
        stored = await self._messages.recent(conn, ctx, run.thread_id, window=window)
        message_id = run.input.get("message_id")
        if not isinstance(message_id, str):
            return stored, None
        position, moved = _placement(stored, message_id, run.id), None
        if position is None:
            # Not in the window, or overtaken: the store decides and moves it (rare: a run
            # that waited behind another one's output).
            placed = await self._messages.place_after_agent_output(
                conn, ctx, run.thread_id, message_id, run_id=run.id
            )
            if placed is None:
                return stored, None  # the message is gone
            position, was_moved = placed
            if was_moved:
                moved = (message_id, position)
                stored = await self._messages.recent(conn, ctx, run.thread_id, window=window)
        return [m for m in stored if m.position <= position or m.run_id == run.id], moved

    async def _finish(self, run: Run, outcome: Outcome) -> bool:
        async with self._db.begin() as conn:
            if await self._finisher.finish(conn, run, outcome):
                return True
            status = await self._queue.status_of(conn, run.id)
        if status is None:
            logger.info("Run %s ended with its thread deleted", run.id)
        elif status.value in ("queued", "running"):
            logger.warning("Run %s lost its lease before finishing; outcome dropped", run.id)
        else:
            logger.info("Run %s was already %s; outcome dropped", run.id, status.value)
        return False


@dataclass(frozen=True, slots=True)
class _Built:
    """The run's agent, built from the registry as the run starts, with its model and deps."""

    agent: Agent
    provider: ModelProvider
    model: str
    deps: object


@dataclass(frozen=True, slots=True)
class _Start:
    built: _Built
    budget: int | None
    history: list[ChatMessage]
    answered: Message | None
    """The final answer an earlier attempt stored: the run ends with it."""


@dataclass(frozen=True, slots=True)
class BegunRun:
    """A claimed run whose start is written in its claim's transaction
    (`ExecutionEngine.begin`), for `execute` once that transaction committed."""

    run: Run
    ctx: UserContext
    sink: RunEventSink
    """The run's sink, which knows what the start announced (the loop skips that call)."""
    start: _Start | Exception
    """The start, or the error that kept the agent from being built: the run fails with it
    once executed (its `agent_started` went out with the start)."""


def _context_of(run: Run) -> UserContext:
    return UserContext.create(run.user_id, thread_id=run.thread_id, run_id=run.id)


def _failed(exc: Exception) -> Outcome:
    """The outcome of a run that `exc` ended: a domain error's own code, else agent_error."""
    if isinstance(exc, ThreadlineError):
        return Outcome.failed(exc.code, exc.message)
    logger.error("Agent run failed", exc_info=exc)
    return Outcome.failed("agent_error", f"{type(exc).__name__}: {exc}")


def _placement(stored: list[Message], message_id: str, run_id: str) -> int | None:
    """The input message's position when `stored` (the thread's most recent messages) shows
    that it stays where it is: it is in the window, and no other run's output came after it.
    None when the store must decide (`MessageStore.place_after_agent_output`)."""
    for n, message in enumerate(stored):
        if message.id == message_id:
            later = stored[n + 1 :]
            if any(m.run_id is not None and m.run_id != run_id for m in later):
                return None
            return message.position
    return None


def _history(stored: list[Message], run: Run, agent: Agent) -> list[ChatMessage]:
    """The model's view of `stored`, repaired. A trailing tool call of *this* run that has no
    result yet is kept pending: a retried run resumes where it stopped."""
    last_calls = next(
        (m for m in reversed(stored) if m.role is MessageRole.ASSISTANT and m.tool_calls),
        None,
    )
    resuming = last_calls is not None and last_calls.run_id == run.id
    history = repair_history(to_chat_history(stored), keep_pending_tail=resuming)
    return window_history(history, agent.history_window)


def _stored_answer(stored: list[Message], run: Run) -> Message | None:
    """This run's final answer, if an earlier attempt already stored it: its last message is
    an assistant message that asks for no tool."""
    own = [m for m in stored if m.run_id == run.id]
    last = own[-1] if own else None
    if last is not None and last.role is MessageRole.ASSISTANT and not last.tool_calls:
        return last
    return None
