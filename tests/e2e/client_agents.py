"""Agents for the client and terminal-chat e2e tests (`--agents tests.e2e.client_agents`).

`gated`: the demo model with a `calculator` that waits until the test opens the gate of the
run's thread (a file named after the thread id in the directory `CLIENT_E2E_GATES`), so a
test holds a run in the middle, between `tool_executing` and `tool_completed`, for as long as
it needs: to drop connections while it runs, to let it finish while the client is offline,
or never, to cancel it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from threadline.agents import Agent, RunContext, tool
from threadline.agents.demo import evaluate_arithmetic

GATES_VARIABLE = "CLIENT_E2E_GATES"
_POLL_SECONDS = 0.02


@tool(name="calculator")
async def gated_calculator(ctx: RunContext[object], expression: str) -> str:
    """Evaluate arithmetic once the test lets this thread's run go on.

    Args:
        expression: Arithmetic such as "12*7".
    """
    gate = Path(os.environ[GATES_VARIABLE]) / ctx.thread_id
    # The gate is a file another process creates: there is nothing to await, so poll.
    while not gate.exists():  # noqa: ASYNC110
        await asyncio.sleep(_POLL_SECONDS)
    value = evaluate_arithmetic(expression)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


agents = [
    Agent(
        name="gated",
        instructions="Use the calculator for arithmetic. Answer briefly.",
        model="demo",
        tools=(gated_calculator,),
        tool_timeout_seconds=600,
        description="Its calculator waits for the test's gate.",
    )
]
