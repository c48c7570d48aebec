"""Agents for tests that run `threadline serve` and `threadline worker` as real processes
(loaded with `THREADLINE_AGENTS=tests.e2e.process_agents`, `PYTHONPATH` at the repository).

A process of its own cannot share objects with the test, so its tool reports through a file:
`logged-calculator` appends one line `<run id>` to the file named by `PROCESS_AGENTS_TOOL_LOG`
each time it computes, which is how a test counts executions across processes (a worker that
was killed included). `stalling-calculator` does the same, but the first time a run calls it,
it first writes `<run id>` to `<that file>.started` and stalls for a minute (a worker can be
killed while the tool runs); a second call of the same run (a retry) computes at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from threadline.agents import Agent, RunContext, tool
from threadline.agents.demo import evaluate_arithmetic

TOOL_LOG_VARIABLE = "PROCESS_AGENTS_TOOL_LOG"


@tool(name="calculator")
async def logged_calculator(ctx: RunContext[object], expression: str) -> str:
    """Evaluate arithmetic, and record that it did.

    Args:
        expression: Arithmetic such as "12*7".
    """
    return await _compute_and_log(ctx, expression)


@tool(name="calculator")
async def stalling_calculator(ctx: RunContext[object], expression: str) -> str:
    """Evaluate arithmetic, stalling on a run's first call.

    Args:
        expression: Arithmetic such as "12*7".
    """
    path = os.environ.get(TOOL_LOG_VARIABLE)
    started = Path(f"{path}.started") if path else None
    if started and await asyncio.to_thread(_first_call, started, str(ctx.run_id)):
        await asyncio.sleep(60)
    return await _compute_and_log(ctx, expression)


async def _compute_and_log(ctx: RunContext[object], expression: str) -> str:
    value = evaluate_arithmetic(expression)
    path = os.environ.get(TOOL_LOG_VARIABLE)
    if path:
        await asyncio.to_thread(_append, Path(path), f"{ctx.run_id}\n")
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _first_call(started: Path, run_id: str) -> bool:
    """Record that `run_id` called the tool; whether it had not before."""
    first = not started.exists() or run_id not in started.read_text().split()
    _append(started, f"{run_id}\n")
    return first


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as log:
        log.write(line)


agents = [
    Agent(
        name="logged-calculator",
        instructions="Use the calculator for arithmetic. Answer briefly.",
        model="demo",
        tools=(logged_calculator,),
        description="Its calculator records each execution in a file.",
    ),
    Agent(
        name="stalling-calculator",
        instructions="Use the calculator for arithmetic. Answer briefly.",
        model="demo",
        tools=(stalling_calculator,),
        description="Its calculator stalls on a run's first call, then records executions.",
    ),
]
