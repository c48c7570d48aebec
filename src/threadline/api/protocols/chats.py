"""A protocol client's conversation on a Threadline thread: which thread, which messages are
new, and the run that answers.

- Thread: a client's thread or chat id is either a Threadline thread id (`thr_…`, which must be
  the user's own: anything else is the usual 404) or the client's own id, looked up among the
  user's threads by the `client_thread_id` metadata key and created on first use. Client ids
  live in each user's own namespace: the same id used by two users names two threads.
- Messages: the clients send the whole conversation every time. Only user messages are taken
  from it (the agent's messages are Threadline's own output), and only those the thread does
  not have yet: a message is known by its Threadline id or by the client's id, kept in its
  metadata as `client_message_id`.
- Run: the last new user message starts the run; with none new (a retry, or the AI SDK's
  `regenerate-message`) the run answers the thread as it stands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.agents.errors import UnknownAgentError
from threadline.context import UserContext
from threadline.errors import InvalidInputError, NotFoundError
from threadline.ids import IdPrefix, is_valid_id
from threadline.runs.service import MultitaskStrategy, RunRequest
from threadline.runtime import Runtime
from threadline.store.db import read_transaction
from threadline.store.messages import MessageRole, NewMessage
from threadline.store.runs import Run
from threadline.store.threads import Thread, ThreadFilter

THREAD_KEY = "client_thread_id"
MESSAGE_KEY = "client_message_id"
_MAX_CLIENT_ID = 200
# A protocol client's own id for a thread or a message: 1 to 200 characters, none a control
# character (C0, DEL or C1: they would corrupt logs and terminals). A pattern, not
# `str.isprintable`, so that the OpenAPI document can state exactly the same rule.
CLIENT_ID_PATTERN = rf"^[^\x00-\x1f\x7f-\x9f]{{1,{_MAX_CLIENT_ID}}}$"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
# How far back a resent message is looked for; older ones are not resent by the clients.
_KNOWN_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """A user message as a protocol client sent it."""

    id: str | None
    content: str


def check_agent(services: Runtime, name: str) -> None:
    """An agent named in a protocol URL or body that is not registered is a resource that does
    not exist: 404, like an unknown thread (the request itself is well-formed)."""
    try:
        services.registry.get(name)
    except UnknownAgentError as exc:
        raise NotFoundError("agent", name) from exc


def check_client_id(value: str, *, field: str) -> str:
    if _CLIENT_ID.fullmatch(value) is None:
        raise InvalidInputError(
            f"{field} must be 1 to {_MAX_CLIENT_ID} characters, none a control character",
            code="invalid_client_id",
            field=field,
        )
    return value


def check_messages(services: Runtime, messages: list[ClientMessage]) -> None:
    """Refuse the request's user messages as storing them would (empty, too long, a NUL, a bad
    client id), before anything is written, the thread included. Every one is checked, also
    those the thread already has: whether a request is valid does not depend on the thread."""
    for message in messages:
        if message.id is not None:
            check_client_id(message.id, field="messages.id")
        services.messages.check(NewMessage(role=MessageRole.USER, content=message.content))


async def find_thread(services: Runtime, ctx: UserContext, client_id: str) -> Thread | None:
    """The user's thread that `client_id` names, or None. Another user's `thr_` id raises
    `NotFoundError`, as everywhere."""
    async with read_transaction(services.engine) as conn:
        return await _lookup(services, conn, ctx, client_id)


async def _lookup(
    services: Runtime, conn: AsyncConnection, ctx: UserContext, client_id: str
) -> Thread | None:
    if is_valid_id(client_id, IdPrefix.THREAD):
        return await services.threads.get(conn, ctx, client_id)
    page = await services.threads.page(
        conn, ctx, filters=ThreadFilter(metadata={THREAD_KEY: client_id}), limit=1
    )
    return page.items[0] if page.items else None


async def open_thread(services: Runtime, ctx: UserContext, client_id: str) -> Thread:
    """The user's thread for `client_id`, created on first use."""
    thread = await find_thread(services, ctx, client_id)
    if thread is not None:
        return thread
    async with services.engine.begin() as conn:
        # Two first requests with the same new id at once (a double submit, two tabs) must
        # make one thread: the user's row lock serializes them (on SQLite the write lock does),
        # and the second finds the first's thread.
        await services.users.get(conn, ctx, for_update=True)
        thread = await _lookup(services, conn, ctx, client_id)
        if thread is not None:
            return thread
        return await services.thread_service.create(
            conn, ctx, title=None, metadata={THREAD_KEY: client_id}
        )


async def require_thread(services: Runtime, ctx: UserContext, client_id: str) -> Thread:
    thread = await find_thread(services, ctx, client_id)
    if thread is None:
        raise NotFoundError("thread", client_id)
    return thread


async def start_run(
    services: Runtime,
    ctx: UserContext,
    thread: Thread,
    messages: list[ClientMessage],
    *,
    agent: str,
    strategy: MultitaskStrategy = MultitaskStrategy.ENQUEUE,
) -> Run:
    """Store the user messages the thread does not have yet, then queue a run of `agent`
    that answers the last of them (or the thread as it stands, when none is new)."""
    check_agent(services, agent)  # an unknown agent fails before anything is written
    fresh, last_user = await _new_messages(services, ctx, thread.id, messages)
    for message in fresh[:-1]:
        await services.run_service.post(ctx, thread.id, message=message, run=None)
    posted = await services.run_service.post(
        ctx,
        thread.id,
        message=fresh[-1] if fresh else None,
        run=RunRequest(agent=agent, multitask_strategy=strategy, answers=last_user),
    )
    if posted.run is None:  # pragma: no cover - a run was requested
        raise RuntimeError("run not created")
    return posted.run


async def _new_messages(
    services: Runtime, ctx: UserContext, thread_id: str, messages: list[ClientMessage]
) -> tuple[list[NewMessage], str | None]:
    """The messages to store, and the id of the thread's last stored user message."""
    async with read_transaction(services.engine) as conn:
        stored = await services.messages.recent(conn, ctx, thread_id, window=_KNOWN_WINDOW)
    users = [m.id for m in stored if m.role is MessageRole.USER]
    known = {m.id for m in stored} | {
        str(m.metadata[MESSAGE_KEY]) for m in stored if MESSAGE_KEY in m.metadata
    }
    fresh: list[NewMessage] = []
    for message in messages:
        if message.id is not None and message.id in known:
            continue
        metadata: dict[str, object] = {}
        if message.id is not None:
            metadata[MESSAGE_KEY] = check_client_id(message.id, field="messages.id")
            known.add(message.id)
        fresh.append(NewMessage(role=MessageRole.USER, content=message.content, metadata=metadata))
    return fresh, users[-1] if users else None


async def active_run(services: Runtime, ctx: UserContext, thread_id: str) -> Run | None:
    async with read_transaction(services.engine) as conn:
        active = await services.runs.active_for_thread(conn, ctx, thread_id)
    running = [run for run in active if run.status.value == "running"]
    candidates = running or active
    return candidates[0] if candidates else None


async def run_start_seq(services: Runtime, ctx: UserContext, thread_id: str, run_id: str) -> int:
    """The seq just before the run's first event: a replay after it shows the whole run."""
    async with read_transaction(services.engine) as conn:
        first = await services.events.first_seq_of_run(conn, ctx, thread_id, run_id)
    return max(0, (first or 1) - 1)
