"""`threadline worker`: the runtime with its worker on and no HTTP part, until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from threadline.agents.context import DepsFactory
from threadline.runtime import AgentsArg, open_runtime
from threadline.settings import Settings


async def run_worker(
    settings: Settings, *, agents: AgentsArg = None, deps: DepsFactory | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # open_runtime runs the worker in its TaskGroup and stops it (gracefully) on exit.
    async with open_runtime(settings, agents=agents, deps=deps, worker=True):
        await stop.wait()
