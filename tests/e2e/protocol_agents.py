"""Agents the protocol end-to-end tests load into a real server (`THREADLINE_AGENTS`)."""

from __future__ import annotations

import asyncio

from threadline import Agent, tool
from threadline.agents.demo import evaluate_arithmetic

SLOW_TOOL_SECONDS = 3.0


@tool(name="calculator")
async def slow_calculator(expression: str) -> str:
    """Evaluate arithmetic, slowly (so a test can reconnect while the run is active).

    Args:
        expression: Arithmetic such as "12*7".
    """
    await asyncio.sleep(SLOW_TOOL_SECONDS)
    value = evaluate_arithmetic(expression)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


agents = [
    Agent(
        name="slow",
        instructions="Use the calculator for arithmetic. Answer briefly.",
        model="demo",
        tools=(slow_calculator,),
        description=f"Its calculator takes {SLOW_TOOL_SECONDS} s.",
    ),
]
