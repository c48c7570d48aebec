"""Shapes the client returns that are not request/response bodies of `threadline.api.schemas`:
live events, subscription snapshots and the outcome of `ask()`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from threadline.api.schemas import MessagePosted, RunOut
from threadline.events.types import EventType
from threadline.statuses import RunStatus

# A run ends with exactly one of these.
TERMINAL_EVENTS = frozenset(
    {EventType.AGENT_COMPLETED, EventType.AGENT_FAILED, EventType.RUN_CANCELLED}
)


class Event(BaseModel):
    """One live event on a thread, as the API sends it (WebSocket or SSE).

    `type` is a plain string so that an event type newer than this client still arrives;
    compare it with `EventType` members (a `StrEnum`).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    seq: int = Field(
        description="Per-thread sequence number of a durable event (resume after the last one "
        "seen); for an ephemeral one, that of the durable event it follows"
    )
    ephemeral: bool = Field(
        default=False,
        description="Not stored and not numbered (`message_delta`): not replayed on resume",
    )
    thread_id: str
    run_id: str | None = None
    ts: datetime
    data: dict[str, JsonValue] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """The run this event belongs to has ended (completed, failed or cancelled)."""
        return self.type in TERMINAL_EVENTS


class ActiveRun(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    thread_id: str
    agent: str
    status: RunStatus
    attempt: int = 1
    cancel_requested: bool = False
    created_at: datetime | None = None


class Snapshot(BaseModel):
    """What the server sends first on every (re)subscription: where the thread stands."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    thread_id: str
    last_seq: int
    active_run: ActiveRun | None = None
    queued_runs: list[str] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of `ask()`: the question as stored, the finished run, and its events."""

    message: MessagePosted
    run: RunOut
    events: tuple[Event, ...]

    @property
    def status(self) -> RunStatus:
        return self.run.status

    @property
    def ok(self) -> bool:
        return self.run.status is RunStatus.COMPLETED

    @property
    def text(self) -> str:
        """The agent's final answer ("" unless the run completed)."""
        text = (self.run.result or {}).get("text")
        return text if isinstance(text, str) else ""

    @property
    def tool_calls(self) -> list[Event]:
        """The run's `tool_completed` events: tool, call id, result or error, duration."""
        return [e for e in self.events if e.type == EventType.TOOL_COMPLETED]
