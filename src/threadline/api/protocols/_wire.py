"""Typed reads of Threadline's wire events (`Event.to_wire()`), shared by the adapters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

WireMessage = dict[str, object]


@dataclass(frozen=True, slots=True)
class WireEvent:
    """The fields of one wire event that the adapters read."""

    type: str
    seq: int | None
    run_id: str | None
    timestamp_ms: int | None
    data: dict[str, object]

    @classmethod
    def of(cls, message: WireMessage) -> WireEvent:
        seq = message.get("seq")
        run_id = message.get("run_id")
        data = message.get("data")
        return cls(
            type=str(message.get("type")),
            seq=seq if isinstance(seq, int) else None,
            run_id=run_id if isinstance(run_id, str) else None,
            timestamp_ms=_timestamp_ms(message.get("ts")),
            data=dict(data) if isinstance(data, dict) else {},
        )

    def text(self, key: str) -> str:
        value = self.data.get(key)
        return value if isinstance(value, str) else ""

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        return value if isinstance(value, str) else None

    def tool_calls(self) -> list[tuple[str, str, object]]:
        """(call id, tool name, arguments) of a `message_created`."""
        calls = self.data.get("tool_calls")
        out: list[tuple[str, str, object]] = []
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                out.append((str(call.get("id")), str(call.get("name")), call.get("arguments")))
        return out


def _timestamp_ms(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None
