"""Agents for the browser tests (`threadline serve --agents tests.e2e.page_agents`).

Besides the built-in `demo`: `slow`, whose calculator takes a few seconds (long enough to watch
a run live from two pages, or to drop the connection in the middle of it), `sleeper`, whose
calculator takes a minute (a run to cancel), `crasher` (a tool error), `one-step` (a failed
run) and `echo`, which repeats the message (hostile Markdown comes back as an answer).
"""

from __future__ import annotations

import asyncio

from threadline.agents import Agent, RunContext, tool
from threadline.agents.demo import evaluate_arithmetic

SLOW_TOOL_SECONDS = 4.0
SLEEPER_TOOL_SECONDS = 60.0
_INSTRUCTIONS = "Use the calculator for arithmetic. Answer briefly."


def _compute(expression: str) -> str:
    value = evaluate_arithmetic(expression)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@tool(name="calculator")
async def slow_calculator(ctx: RunContext[object], expression: str) -> str:
    """Evaluate arithmetic, slowly.

    Args:
        expression: Arithmetic such as "12*7".
    """
    await asyncio.sleep(SLOW_TOOL_SECONDS)
    return _compute(expression)


@tool(name="calculator")
async def sleeping_calculator(ctx: RunContext[object], expression: str) -> str:
    """Evaluate arithmetic after a minute (longer than any test waits: a run to cancel).

    Args:
        expression: Arithmetic such as "12*7".
    """
    await asyncio.sleep(SLEEPER_TOOL_SECONDS)
    return _compute(expression)


@tool(name="calculator")
async def failing_calculator(ctx: RunContext[object], expression: str) -> str:
    """Always fails.

    Args:
        expression: Arithmetic such as "12*7".
    """
    raise RuntimeError(f"calculator exploded on {expression}")


agents = [
    Agent(
        name="slow",
        instructions=_INSTRUCTIONS,
        model="demo",
        tools=(slow_calculator,),
        description=f"Its calculator takes {SLOW_TOOL_SECONDS:g} s.",
    ),
    Agent(
        name="sleeper",
        instructions=_INSTRUCTIONS,
        model="demo",
        tools=(sleeping_calculator,),
        tool_timeout_seconds=300,
        description="Its calculator sleeps for a minute.",
    ),
    Agent(
        name="crasher",
        instructions=_INSTRUCTIONS,
        model="demo",
        tools=(failing_calculator,),
        description="Its calculator raises.",
    ),
    Agent(
        name="one-step",
        instructions=_INSTRUCTIONS,
        model="demo",
        tools=(slow_calculator,),
        max_steps=1,
        description="Asks for a tool on its only step, so the run fails.",
    ),
    Agent(
        name="echo",
        instructions="Repeat what the user said.",
        model="demo",
        description="No tools: the demo model echoes the message.",
    ),
]
