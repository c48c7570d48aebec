"""Control messages: small typed requests from one process to the others, carried by the bus.

Unlike events they belong to no thread and are not stored: a control message that no process
hears changes nothing durable (a cancel is also recorded in the run's row, which the worker's
heartbeat reads; a revoked token is refused by every later request anyway). Each kind is a
frozen model with a `kind` tag, so the Redis bus can carry them as JSON and the receiver gets
the same type back.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class CancelRun(BaseModel):
    """Stop `run_id` wherever it executes. `reason` is a `runs.engine.CancelReason` value."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["cancel_run"] = "cancel_run"
    run_id: str
    reason: str


class SessionEnded(BaseModel):
    """The token `token_id` (its `jti`) was revoked: close the connections opened with it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["session_ended"] = "session_ended"
    token_id: str
    user_id: str


ControlMessage = Annotated[CancelRun | SessionEnded, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[CancelRun | SessionEnded] = TypeAdapter(ControlMessage)


def encode_control(message: CancelRun | SessionEnded) -> bytes:
    return message.model_dump_json().encode()


def decode_control(raw: bytes | str) -> CancelRun | SessionEnded:
    """Raises `pydantic.ValidationError` for an unknown kind or a malformed message."""
    return _ADAPTER.validate_json(raw)
