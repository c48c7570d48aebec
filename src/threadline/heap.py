"""The long-running processes' heap, settled once their code is loaded.

CPython's collector walks every tracked object in a full (oldest-generation) collection. A
server's heap is mostly objects that live as long as the process: modules, classes, functions,
the app's routes and schemas, SQLAlchemy's and pydantic's own tables. Walking them paused the
event loop for 45 to 115 ms a few times a minute under load (measured with a `gc.callbacks`
probe during bench/runs.py at 32 users), which is every request's latency at that moment.
`gc.freeze()` moves what exists now out of the collector's sight, so a full collection walks
only what the process allocated since.

Called by the CLI's `serve` and `worker` just before their event loop starts, once per process:
not by `create_app`, since freezing is process-wide and an application embedding Threadline
owns its own heap.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect what start-up left behind, then freeze everything still alive."""
    gc.collect()
    gc.freeze()
