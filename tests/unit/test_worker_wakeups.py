"""A run queued in this process is announced to its worker twice, by the in-process notify and
by the `LISTEN` echo of its insert, in either order; only the first wakes the claim loop (the
second would cost an empty claim per run)."""

from __future__ import annotations

from threadline.runs.worker import _Announced


def test_the_second_announcement_of_a_run_is_ignored_in_either_order() -> None:
    announced = _Announced()
    assert announced.again("run_a") is False  # the in-process notify: wake
    assert announced.again("run_a") is True  # its LISTEN echo: ignored
    assert announced.again("run_b") is False  # the echo came first this time
    assert announced.again("run_b") is True
    # Announced twice only: a third announcement (a run requeued and inserted again is a new
    # id; this is a notification from elsewhere) wakes again.
    assert announced.again("run_a") is False


def test_runs_announced_once_are_forgotten_past_the_limit() -> None:
    announced = _Announced(limit=3)
    for run_id in ("r1", "r2", "r3", "r4"):  # queued by other processes: no echo ever comes
        assert announced.again(run_id) is False
    assert announced.again("r1") is False  # forgotten: a notification for it wakes again
    assert announced.again("r4") is True
