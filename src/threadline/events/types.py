"""Event types and the envelope every live event travels in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

JSONObject = dict[str, object]


class EventType(StrEnum):
    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    MESSAGE_DELTA = "message_delta"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    AGENT_COMPLETED = "agent_completed"
    AGENT_FAILED = "agent_failed"
    RUN_CANCELLED = "run_cancelled"
    RUN_QUEUED = "run_queued"
    THREAD_CREATED = "thread_created"
    THREAD_UPDATED = "thread_updated"
    THREAD_DELETED = "thread_deleted"
    MESSAGE_CREATED = "message_created"
    # A queued run's message moved after the runs before it (see MessageStore).
    MESSAGE_MOVED = "message_moved"


# Streamed text is only worth something live: the finished message is stored and announced by
# `message_created`, so deltas are published but neither numbered nor stored: they cost no
# database work at all (`EventPublisher.publish_ephemeral`).
EPHEMERAL = frozenset({EventType.MESSAGE_DELTA})
TERMINAL = frozenset({EventType.AGENT_COMPLETED, EventType.AGENT_FAILED, EventType.RUN_CANCELLED})


@dataclass(frozen=True, slots=True)
class Event:
    """One event on a thread.

    A durable event's `seq` is its own number, +1 per durable event within the thread. An
    ephemeral event has no number of its own: its `seq` is that of the thread's last durable
    event before it (it "belongs after seq k"), set by the bus that carries it, so several
    ephemeral events share one `seq` and a listener can place them between durable ones.
    """

    type: EventType
    thread_id: str
    user_id: str
    seq: int
    data: JSONObject
    run_id: str | None = None
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def durable(self) -> bool:
        return self.type not in EPHEMERAL

    def to_wire(self) -> JSONObject:
        """The client-facing form. The owner's user id stays server-side. An ephemeral event
        says so (`"ephemeral": true`): its `seq` is a position, not a number to deduplicate on."""
        wire: JSONObject = {
            "type": self.type.value,
            "seq": self.seq,
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "ts": self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": self.data,
        }
        if not self.durable:
            wire["ephemeral"] = True
        return wire
