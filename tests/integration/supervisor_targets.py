"""Targets for `tests/integration/test_supervisor.py`'s children (importable by name: a child
unpickles its target)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def first_one_fails(directory: str) -> None:
    """The first child to get here exits 3; the others wait for a signal (SIGTERM ends them)."""
    try:
        os.close(os.open(Path(directory) / "first", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        while True:
            signal.pause()
    sys.exit(3)


def ignore_sigterm(directory: str) -> None:
    """Stay up through SIGTERM (a stuck child), once it has said so in `directory`."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (Path(directory) / f"ready-{os.getpid()}").touch()
    while True:
        signal.pause()
