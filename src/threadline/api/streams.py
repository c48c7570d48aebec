"""Subscribing a connection to a thread: ownership check, snapshot, replay, then live."""

from __future__ import annotations

from dataclasses import dataclass

from threadline.api.gateway import Connection, Gateway, ThreadSubscription
from threadline.api.services import Services
from threadline.context import UserContext
from threadline.store.runs import Run

# Sequence numbers are 32-bit integers in the database.
MAX_SEQ = 2**31 - 1


def run_wire(run: Run) -> dict[str, object]:
    return {
        "id": run.id,
        "thread_id": run.thread_id,
        "agent": run.agent,
        "status": run.status.value,
        "attempt": run.attempt,
        "cancel_requested": run.cancel_requested,
        "created_at": run.created_at.isoformat(),
    }


@dataclass(frozen=True, slots=True)
class Subscribed:
    subscription: ThreadSubscription
    last_seq: int


async def subscribe(
    services: Services,
    gateway: Gateway,
    connection: Connection,
    ctx: UserContext,
    thread_id: str,
    *,
    after_seq: int | None,
) -> Subscribed:
    """Queue a `snapshot` (active run, last seq), then the stored events after `after_seq`,
    then live events. Raises `NotFoundError` for a thread the user does not own."""
    subscription = gateway.attach(connection, thread_id)
    try:
        async with services.engine.connect() as conn:
            await services.threads.get(conn, ctx, thread_id)
            active = await services.runs.active_for_thread(conn, ctx, thread_id)
            stored = await services.events.after(conn, ctx, thread_id, after_seq=after_seq)
    except BaseException:
        gateway.detach(subscription)
        raise
    running = next((run for run in active if run.status.value == "running"), None)
    current = running or (active[0] if active else None)
    connection.offer(
        {
            "type": "snapshot",
            "thread_id": thread_id,
            "last_seq": stored.last_seq,
            "active_run": run_wire(current) if current else None,
            "queued_runs": [run.id for run in active if run is not current],
        }
    )
    replayed_to = after_seq if after_seq is not None else stored.last_seq
    for event in stored.events:
        connection.offer(event.to_wire())
        replayed_to = max(replayed_to, event.seq)
    subscription.go_live(after_seq=replayed_to)
    return Subscribed(subscription=subscription, last_seq=stored.last_seq)
