"""The `data` of each webhook event (docs/identity.md documents them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from threadline.llm.types import Usage
from threadline.store.runs import Run, RunStatus
from threadline.webhooks.store import JSONObject, WebhookEvent

if TYPE_CHECKING:
    from threadline.runs.outcomes import Outcome

_EVENT_BY_STATUS = {
    RunStatus.COMPLETED: WebhookEvent.RUN_COMPLETED,
    RunStatus.FAILED: WebhookEvent.RUN_FAILED,
    RunStatus.TIMED_OUT: WebhookEvent.RUN_FAILED,
    RunStatus.CANCELLED: WebhookEvent.RUN_CANCELLED,
}


def run_event(status: RunStatus) -> WebhookEvent | None:
    return _EVENT_BY_STATUS.get(status)


def run_finished(run: Run, outcome: Outcome, *, usage: Usage) -> JSONObject:
    """`run.completed` (outcome: the terminal event's data, the final answer), `run.failed`
    (code and message; timed-out runs too) and `run.cancelled` (the reason)."""
    return {
        "run_id": run.id,
        "thread_id": run.thread_id,
        "user_id": run.user_id,
        "agent": run.agent,
        "status": outcome.status.value,
        "outcome": outcome.data,
        "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens},
    }


def thread_deleted(*, thread_id: str, user_id: str) -> JSONObject:
    return {"thread_id": thread_id, "user_id": user_id}
