"""Webhooks across a real crash: the worker that ended a run is SIGKILLed before anything
delivered the event (delivery is off in every process), and a worker started afterwards
delivers it from the outbox, signed, to a receiver that verifies it with `standardwebhooks`."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import run_cli
from tests.e2e.processes import Cluster, cluster, wait_for
from tests.webhook_receiver import webhook_receiver

__all__ = ["cluster"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


def test_an_event_of_a_killed_worker_is_delivered_after_a_restart(cluster: Cluster) -> None:
    with webhook_receiver() as receiver:
        added = run_cli(
            "admin",
            "webhooks",
            "add",
            receiver.url,
            "--event",
            "run.completed",
            "--json",
            cwd=cluster.workdir,
            env=cluster.env(),
        )
        assert added.returncode == 0, added.stderr
        receiver.secret = json.loads(added.stdout)["secret"]
        quiet = {"webhook_delivery": "false"}
        api = cluster.client(cluster.api(**quiet))
        worker = cluster.worker(**quiet)
        user = api.user()
        thread = api.thread(user)
        run_id = api.start(user, thread, "hello", agent="demo")
        assert api.wait_run(user, thread, run_id, TERMINAL, seconds=60)["status"] == "completed"
        assert cluster.query("SELECT status FROM webhook_deliveries") == [{"status": "pending"}]
        worker.kill()
        assert receiver.requests == 0

        cluster.worker(webhook_poll_seconds=0.1)
        wait_for(receiver.events, seconds=60, what="the delivery after the restart")
        (event,) = receiver.events()
        assert event["type"] == "run.completed" and event["data"]["run_id"] == run_id
        assert receiver.bad_signatures == 0
        wait_for(
            lambda: (
                cluster.query("SELECT status FROM webhook_deliveries") == [{"status": "delivered"}]
            ),
            seconds=30,
            what="the delivery to be settled",
        )
