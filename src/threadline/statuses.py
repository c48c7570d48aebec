"""The status enums that the store, the services, the API schemas and the Python client share.

They live here, below everything else, so that `threadline.api.schemas` (and so
`threadline.client`) can use them without importing SQLAlchemy or the run machinery.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MessageRole", "MultitaskStrategy", "RunStatus", "ThreadStatus"]


class ThreadStatus(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    ARCHIVED = "archived"


class MessageRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    SYSTEM = "system"


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class MultitaskStrategy(StrEnum):
    """What a new run does when its thread already has an active one."""

    REJECT = "reject"
    ENQUEUE = "enqueue"
    INTERRUPT = "interrupt"
