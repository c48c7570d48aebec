"""The Python client of the Threadline API: `AsyncThreadline` (asyncio) and `Threadline`.

    from threadline.client import Threadline

    with Threadline("http://localhost:8000") as tl:
        tl.register("ada@example.com", "correct horse battery")
        tl.login("ada@example.com", "correct horse battery")
        thread = tl.create_thread(title="Sums")
        print(tl.ask(thread.id, "what is 12*7?", agent="demo").text)  # 12*7 = 84.

Return values are the API's own schemas (`threadline.api.schemas`); importing the client
loads pydantic, httpx and websockets, not the server (no FastAPI, no SQLAlchemy).
"""

from threadline.api.schemas import (
    AgentOut,
    HealthOut,
    ListOut,
    MessageOut,
    MessagePosted,
    RunOut,
    ThreadOut,
    TokenOut,
    UserOut,
)
from threadline.client._async import UNSET, AsyncThreadline
from threadline.client._errors import APIConnectionError, APIError
from threadline.client._models import TERMINAL_EVENTS, ActiveRun, Event, RunResult, Snapshot
from threadline.client._sse import SSEEvents
from threadline.client._streams import EventStream
from threadline.client._sync import SyncEventStream, Threadline
from threadline.client._websocket import WebSocketEvents
from threadline.events.types import EventType
from threadline.statuses import MessageRole, MultitaskStrategy, RunStatus, ThreadStatus

__all__ = [
    "TERMINAL_EVENTS",
    "UNSET",
    "APIConnectionError",
    "APIError",
    "ActiveRun",
    "AgentOut",
    "AsyncThreadline",
    "Event",
    "EventStream",
    "EventType",
    "HealthOut",
    "ListOut",
    "MessageOut",
    "MessagePosted",
    "MessageRole",
    "MultitaskStrategy",
    "RunOut",
    "RunResult",
    "RunStatus",
    "SSEEvents",
    "Snapshot",
    "SyncEventStream",
    "ThreadOut",
    "ThreadStatus",
    "Threadline",
    "TokenOut",
    "UserOut",
    "WebSocketEvents",
]
