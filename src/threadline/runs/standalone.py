"""`threadline worker`: the services a worker needs, without the HTTP app, until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from threadline.api.services import open_services
from threadline.settings import Settings


async def run_worker(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # open_services runs the worker in its TaskGroup and stops it (gracefully) on exit.
    async with open_services(settings):
        await stop.wait()
