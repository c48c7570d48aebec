"""Collector pauses of every Python process started with this directory on PYTHONPATH.

    GC_PROBE_DIR=/tmp/gc PYTHONPATH=$PWD/bench/gc_probe python bench/runs.py --backend postgres ...

bench/runs.py passes PYTHONPATH on to the servers it starts (in other directories: hence the
absolute path), so each server, and the client, writes `<GC_PROBE_DIR>/gc-<pid>.json` when it
exits: every full (generation 2) collection and any other one over 5 ms, as [seconds since
start, generation, pause ms, objects collected], plus the objects still tracked and frozen.
Python imports `sitecustomize` at start-up by itself; nothing else here is imported by the
benchmark or by Threadline.
"""

import atexit
import gc
import json
import os
import time

_DIRECTORY = os.environ.get("GC_PROBE_DIR")
_STARTED = time.monotonic()
_SLOW_MS = 5.0
_began: dict[int, float] = {}
_pauses: list[tuple[float, int, float, int]] = []


def _observe(phase: str, info: dict[str, int]) -> None:
    generation = info["generation"]
    if phase == "start":
        _began[generation] = time.perf_counter()
        return
    pause_ms = (time.perf_counter() - _began.pop(generation, time.perf_counter())) * 1000
    if generation == 2 or pause_ms > _SLOW_MS:
        since = round(time.monotonic() - _STARTED, 2)
        _pauses.append((since, generation, round(pause_ms, 1), info.get("collected", 0)))


def _write() -> None:
    path = os.path.join(_DIRECTORY or ".", f"gc-{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump(
            {"pauses": _pauses, "tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()},
            out,
        )


if _DIRECTORY:
    gc.callbacks.append(_observe)
    atexit.register(_write)
