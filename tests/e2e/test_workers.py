"""`threadline worker` as a real process next to `threadline serve` (issue 7 item 3): the API
with its embedded worker off executes nothing, a worker wakes on `LISTEN/NOTIFY` (its poll set
far beyond the test's deadline, so nothing else could wake it), SIGTERM finishes or hands back
runs within the grace period, and an unreachable PostgreSQL or Redis is one line at start."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import free_port, run_cli
from tests.e2e.processes import Cluster, cluster

__all__ = ["cluster"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.e2e

RUN_SECONDS = 30.0
TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


def test_serve_without_its_worker_runs_nothing_and_a_worker_wakes_on_notify(
    cluster: Cluster,
) -> None:
    api_process = cluster.api(worker_poll_seconds=0.1)
    api = cluster.client(api_process)
    user = api.user()
    thread = api.thread(user)
    waiting = api.start(user, thread, "hello there", agent="demo")

    cluster.worker(worker_poll_seconds=600)
    done = api.wait_run(user, thread, waiting, TERMINAL, RUN_SECONDS)
    assert done["status"] == "completed" and done["attempt"] == 1, done

    # Queued after the worker went idle: only the run insert's NOTIFY can wake it now.
    other = api.thread(user)
    woken = api.start(user, other, "hello again", agent="demo")
    done = api.wait_run(user, other, woken, TERMINAL, 10.0)
    assert done["status"] == "completed" and done["attempt"] == 1, done
    # The API process never started a run: both were executed by the worker, once each.
    metrics = api.http.get("/metrics").text
    assert _sample(metrics, "threadline_runs_started_total") == 0, metrics


def _sample(metrics: str, name: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def test_sigterm_hands_a_running_run_back_within_the_grace_period(cluster: Cluster) -> None:
    api = cluster.client(cluster.api())
    user = api.user()
    thread = api.thread(user)
    slow = cluster.worker(demo_delay_seconds=2, shutdown_grace_seconds=1)
    run_id = api.start(user, thread, "what is 12*7?", agent="logged-calculator")
    api.wait_run(user, thread, run_id, {"running"}, RUN_SECONDS)

    started = time.monotonic()
    assert slow.terminate() == 0, slow.log()[-3000:]
    assert time.monotonic() - started < 1 + 10  # the grace period, plus a process's exit
    handed_back = api.run(user, thread, run_id)
    assert handed_back["status"] == "queued" and handed_back["attempt"] == 0, handed_back
    assert "Traceback" not in slow.log()

    cluster.worker()
    done = api.wait_run(user, thread, run_id, TERMINAL, RUN_SECONDS)
    assert done["status"] == "completed" and done["result"]["text"] == "12*7 = 84.", done  # type: ignore[index]
    answers = [m for m in api.messages(user, thread) if m["role"] == "assistant" and m["content"]]
    assert [m["content"] for m in answers] == ["12*7 = 84."]


def test_sigterm_lets_a_running_run_finish_within_the_grace_period(cluster: Cluster) -> None:
    api = cluster.client(cluster.api())
    user = api.user()
    thread = api.thread(user)
    worker = cluster.worker(demo_delay_seconds=0.3, shutdown_grace_seconds=30)
    run_id = api.start(user, thread, "what is 12*7?", agent="logged-calculator")
    api.wait_run(user, thread, run_id, {"running"}, RUN_SECONDS)

    assert worker.terminate() == 0, worker.log()[-3000:]
    done = api.run(user, thread, run_id)
    assert done["status"] == "completed", done
    assert cluster.tool_executions() == [run_id]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_worker_exits_with_one_line_when_postgres_is_unreachable(cluster: Cluster) -> None:
    closed = free_port()
    env = cluster.env(database_url=f"postgresql://postgres@127.0.0.1:{closed}/nothing")
    result = run_cli("worker", cwd=cluster.workdir, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    (line,) = _error_lines(output)
    assert "database" in line.lower(), line


def test_worker_exits_with_one_line_when_redis_is_unreachable(cluster: Cluster) -> None:
    closed = free_port()
    result = run_cli(
        "worker", cwd=cluster.workdir, env=cluster.env(redis_url=f"redis://127.0.0.1:{closed}/0")
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    (line,) = _error_lines(output)
    assert "Redis" in line, line
