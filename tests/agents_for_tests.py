"""Agents for the run, engine and guarantee integration tests.

Each agent pairs a model the tests control with tools whose behaviour they control:
- the offline demo model asks for a tool named `calculator` whenever the user asks arithmetic
  ("what is 12*7?"), so an agent with its own `calculator` (blocking, sleeping, failing,
  counting...) decides what that tool call does, with no other model needed;
- `openai:fake` and `anthropic:fake` go to the local fake vendor servers of
  `tests.fakes.llm_servers` (the test sets `openai_base_url` / `anthropic_base_url`).

Tools record what they did in a `Controls`, which they receive as their run's deps: the test
builds one, and hands it to the app with `create_app(settings, agents=agents,
deps=lambda _run: controls)` (see `running_app` in `tests/integration/test_runs_support.py`).
There is no module-level state, so two apps in one process never share a gate.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from threadline.agents import Agent, RunContext, tool
from threadline.agents.demo import evaluate_arithmetic
from threadline.llm.types import ModelEvent, ModelProvider, ModelRequest, Role

__all__ = ["Controls", "GatedModel", "agents"]


@dataclass
class Controls:
    """What the test tools did, and the gates they wait on. One per app (and test)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Blocking tools wait for it; set it to let them (and every later call) through."""
    model_gate: asyncio.Event = field(default_factory=asyncio.Event)
    """`GatedModel` holds a model step that follows tool results until this is set."""
    hold_model_after_tools: bool = False
    started: list[str] = field(default_factory=list)
    """Run id of every tool call that started, in order."""
    completed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    """Run id of every tool call that observed `CancelledError`."""
    invocations: Counter[str] = field(default_factory=Counter)
    """Counting-tool calls by run id."""
    model_held: list[str] = field(default_factory=list)
    """Last message content of every model step `GatedModel` held."""
    active: int = 0
    max_active: int = 0
    active_by_thread: Counter[str] = field(default_factory=Counter)
    max_active_by_thread: Counter[str] = field(default_factory=Counter)
    active_by_user: Counter[str] = field(default_factory=Counter)
    max_active_by_user: Counter[str] = field(default_factory=Counter)

    def enter(self, ctx: RunContext[object]) -> None:
        self.started.append(ctx.run_id)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for key, active, peak in (
            (ctx.thread_id, self.active_by_thread, self.max_active_by_thread),
            (ctx.user.user_id, self.active_by_user, self.max_active_by_user),
        ):
            active[key] += 1
            peak[key] = max(peak[key], active[key])

    def leave(self, ctx: RunContext[object], *, cancelled: bool) -> None:
        self.active -= 1
        self.active_by_thread[ctx.thread_id] -= 1
        self.active_by_user[ctx.user.user_id] -= 1
        (self.cancelled if cancelled else self.completed).append(ctx.run_id)

    def open_all(self) -> None:
        """Let every blocked tool and model step go, so an app can shut down without waiting."""
        self.gate.set()
        self.model_gate.set()


def _compute(expression: str) -> str:
    value = evaluate_arithmetic(expression)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@contextmanager
def _tracking(ctx: RunContext[Controls]) -> Iterator[None]:
    """One tracked tool call: its entry, its exit, and whether it was cancelled."""
    controls = ctx.deps
    controls.enter(ctx)
    cancelled = False
    try:
        yield
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        controls.leave(ctx, cancelled=cancelled)


@tool(name="calculator")
async def blocking_calculator(ctx: RunContext[Controls], expression: str) -> str:
    """Evaluate arithmetic, once the test opens the gate.

    Args:
        expression: Arithmetic such as "12*7".
    """
    with _tracking(ctx):
        await ctx.deps.gate.wait()
    return _compute(expression)


@tool(name="calculator")
async def sleeping_calculator(ctx: RunContext[Controls], expression: str) -> str:
    """Evaluate arithmetic, after a minute's sleep (longer than any test's run timeout).

    Args:
        expression: Arithmetic such as "12*7".
    """
    with _tracking(ctx):
        await asyncio.sleep(60)
    return _compute(expression)


@tool(name="calculator")
async def failing_calculator(ctx: RunContext[Controls], expression: str) -> str:
    """Always fails.

    Args:
        expression: Arithmetic such as "12*7".
    """
    ctx.deps.started.append(ctx.run_id)
    raise RuntimeError(f"calculator exploded on {expression}")


@tool(name="calculator")
async def counting_calculator(ctx: RunContext[Controls], expression: str) -> str:
    """Evaluate arithmetic and say which invocation (per run) computed it.

    Args:
        expression: Arithmetic such as "12*7".
    """
    ctx.deps.invocations[ctx.run_id] += 1
    number = ctx.deps.invocations[ctx.run_id]
    with _tracking(ctx):
        await asyncio.sleep(0)
    return f"{_compute(expression)} (invocation {number})"


@tool(name="calculator")
async def tracking_calculator(ctx: RunContext[Controls], expression: str) -> str:
    """Evaluate arithmetic slowly enough that two overlapping calls would be seen.

    Args:
        expression: Arithmetic such as "12*7".
    """
    with _tracking(ctx):
        await asyncio.sleep(0.02)
    return _compute(expression)


def _broken_deps() -> object:
    raise RuntimeError("the agent's dependencies could not be built")


class GatedModel:
    """Wraps a provider: while `hold_model_after_tools` of its controls is set, a model step that
    follows tool results waits for `controls.model_gate` (a model stuck mid-run)."""

    def __init__(self, inner: ModelProvider, controls: Controls) -> None:
        self._inner = inner
        self._controls = controls
        self.name = inner.name

    async def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        last = request.messages[-1] if request.messages else None
        controls = self._controls
        if controls.hold_model_after_tools and last is not None and last.role is Role.TOOL:
            controls.model_held.append(last.content)
            await controls.model_gate.wait()
        async for event in self._inner.stream(request, model=model):
            yield event


_DEMO_INSTRUCTIONS = "Use the calculator for arithmetic. Answer briefly."

agents = [
    Agent(
        name="blocker",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(blocking_calculator,),
        tool_timeout_seconds=300,
        description="Its calculator waits until the test opens the gate.",
    ),
    Agent(
        name="sleeper",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(sleeping_calculator,),
        tool_timeout_seconds=300,
        description="Its calculator sleeps for a minute.",
    ),
    Agent(
        name="crasher",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(failing_calculator,),
        description="Its calculator raises.",
    ),
    Agent(
        name="counter",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(counting_calculator,),
        description="Its calculator counts its invocations.",
    ),
    Agent(
        name="tracker",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(tracking_calculator,),
        description="Its calculator records how many calls overlap.",
    ),
    Agent(
        name="echo",
        instructions="Repeat what the user said.",
        model="demo",
        description="No tools: the demo model echoes the message.",
    ),
    Agent(
        name="broken",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(counting_calculator,),
        deps_factory=_broken_deps,
        description="Fails before its first model call.",
    ),
    Agent(
        name="one-step",
        instructions=_DEMO_INSTRUCTIONS,
        model="demo",
        tools=(counting_calculator,),
        max_steps=1,
        description="Asks for a tool on its only step, so it fails with max_steps_exceeded.",
    ),
    Agent(
        name="openai-fake",
        instructions="You are the OpenAI-compatible test agent.",
        model="openai:fake",
        tools=(counting_calculator,),
    ),
    Agent(
        name="openai-short",
        instructions="You are the OpenAI-compatible test agent with a short memory.",
        model="openai:fake",
        tools=(counting_calculator,),
        history_window=3,
    ),
    Agent(
        name="anthropic-fake",
        instructions="You are the Anthropic test agent.",
        model="anthropic:fake",
        tools=(counting_calculator,),
    ),
]
