"""`threadline worker`: the runtime with its worker on and no HTTP part, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from threadline.agents.context import DepsFactory
from threadline.runtime import AgentsArg, open_runtime
from threadline.settings import Settings

logger = logging.getLogger(__name__)


async def run_worker(
    settings: Settings,
    *,
    agents: AgentsArg = None,
    deps: DepsFactory | None = None,
    on_ready: Callable[[str], None] = lambda _worker_id: None,
) -> None:
    """Run a worker until SIGTERM or SIGINT. `on_ready(worker_id)` is called once it works."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # open_runtime runs the worker in its TaskGroup and stops it (gracefully) on exit.
    async with open_runtime(settings, agents=agents, deps=deps, worker=True) as runtime:
        if runtime.worker is not None:
            logger.info("Worker %s ready", runtime.worker.worker_id)
            on_ready(runtime.worker.worker_id)
        await stop.wait()
        logger.info("Stopping: running runs get %s s to finish", settings.shutdown_grace_seconds)
