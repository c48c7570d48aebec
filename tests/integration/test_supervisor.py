"""`threadline.supervisor.Supervisor` with trivial children (the servers it runs are tested in
tests/e2e/test_serve_workers.py): a child that exits on its own is reported and the others are
stopped; a child that ignores the stop is killed after the deadline and reported."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.integration import supervisor_targets
from threadline.supervisor import Supervisor

WAIT_SECONDS = 30.0


def _when(condition: Callable[[], bool], then: Callable[[], None]) -> threading.Thread:
    """Run `then` in a thread once `condition` holds (polled, bounded)."""

    def watch() -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_child_that_exits_is_reported_and_the_others_are_stopped(tmp_path: Path) -> None:
    reports: list[str] = []
    supervisor = Supervisor(
        name="Test process",
        count=2,
        target=supervisor_targets.first_one_fails,
        args=(str(tmp_path),),
        stop_timeout_seconds=WAIT_SECONDS,
        report=reports.append,
    )
    outcome = supervisor.run()
    assert outcome.failed and outcome.signal is None
    (line,) = reports
    assert line.startswith("Test process ") and "exited with status 3; stopping the others" in line
    assert not [pid for pid in supervisor.pids if psutil.pid_exists(pid)]


def test_a_child_that_ignores_the_stop_is_killed_after_the_deadline(tmp_path: Path) -> None:
    reports: list[str] = []
    supervisor = Supervisor(
        name="Test process",
        count=2,
        target=supervisor_targets.ignore_sigterm,
        args=(str(tmp_path),),
        stop_timeout_seconds=1.0,
        report=reports.append,
    )
    # The stop, as `systemctl stop` sends it, once both children ignore SIGTERM.
    _when(
        lambda: len(list(tmp_path.glob("ready-*"))) == 2,
        lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    started = time.monotonic()
    outcome = supervisor.run()
    assert outcome.failed and outcome.signal == signal.SIGTERM
    assert time.monotonic() - started < WAIT_SECONDS
    assert len(reports) == 2 and all("did not stop within 1 s; killed" in r for r in reports)
    assert not [pid for pid in supervisor.pids if psutil.pid_exists(pid)]
