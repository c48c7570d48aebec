"""Messages: appended under the thread's row lock, so positions are unique and in order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import ConflictError, InvalidInputError, NotFoundError
from threadline.ids import IdPrefix, is_valid_id, new_id
from threadline.statuses import MessageRole as MessageRole  # re-exported
from threadline.store.pagination import (
    Page,
    check_limit,
    parse_position_cursor,
    position_cursor,
)
from threadline.store.tables import messages, threads
from threadline.store.threads import JSONObject, ThreadStatus
from threadline.store.validation import check_text, json_size

_TITLE_CHARS = 60


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    thread_id: str
    position: int
    role: MessageRole
    content: str
    metadata: JSONObject
    created_at: datetime
    run_id: str | None = None
    tool_calls: list[JSONObject] | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    role: MessageRole
    content: str
    metadata: JSONObject = field(default_factory=dict)
    run_id: str | None = None
    tool_calls: list[JSONObject] | None = None
    tool_call_id: str | None = None
    id: str | None = None
    """Given when the id was announced before the message was stored (streamed text)."""


def title_from(content: str) -> str:
    """A thread title from its first message: the first words, cut at a word boundary."""
    text = re.sub(r"\s+", " ", content).strip()
    if len(text) <= _TITLE_CHARS:
        return text or "New thread"
    cut = text[:_TITLE_CHARS].rsplit(" ", 1)[0] or text[:_TITLE_CHARS]
    return cut.rstrip(" ,.;:") + "…"


def _message(row: sa.Row[tuple[object, ...]]) -> Message:
    m = row._mapping
    return Message(
        id=m["id"],
        thread_id=m["thread_id"],
        position=m["position"],
        role=MessageRole(m["role"]),
        content=m["content"],
        metadata=dict(m["metadata"]),
        created_at=m["created_at"],
        run_id=m["run_id"],
        tool_calls=m["tool_calls"],
        tool_call_id=m["tool_call_id"],
    )


# Hot-path statements, built once (building one costs more than sending it); each call binds
# its values. Bind names differ from column names, which SQLAlchemy reserves in UPDATE.
_INSERT = messages.insert()
_TAKE_POSITION = (
    threads.update()
    .where(threads.c.id == sa.bindparam("w_id"), threads.c.user_id == sa.bindparam("w_user_id"))
    .values(message_count=threads.c.message_count + 1, last_activity_at=sa.bindparam("w_now"))
    .returning(threads.c.message_count)
)
# A user's message also titles an untitled thread, and cannot go to an archived one.
_TAKE_USER_POSITION = _TAKE_POSITION.where(threads.c.status != ThreadStatus.ARCHIVED.value).values(
    title=sa.func.coalesce(threads.c.title, sa.bindparam("w_title"))
)
# The same, also reserving the numbers of the events that will announce the message (as
# `EventStore.reserve` does): one update of the thread's row for both.
_TAKE_USER_POSITION_AND_SEQS = (
    threads.update()
    .where(
        threads.c.id == sa.bindparam("w_id"),
        threads.c.user_id == sa.bindparam("w_user_id"),
        threads.c.status != ThreadStatus.ARCHIVED.value,
    )
    .values(
        message_count=threads.c.message_count + 1,
        last_activity_at=sa.bindparam("w_now"),
        title=sa.func.coalesce(threads.c.title, sa.bindparam("w_title")),
        event_seq=threads.c.event_seq + sa.bindparam("w_events", type_=sa.Integer()),
    )
    .returning(threads.c.message_count, threads.c.event_seq)
)
# A run's own message (assistant or tool) with its events' numbers: no archived check (a run
# started before the archive may still finish) and no title.
_TAKE_POSITION_AND_SEQS = (
    threads.update()
    .where(threads.c.id == sa.bindparam("w_id"), threads.c.user_id == sa.bindparam("w_user_id"))
    .values(
        message_count=threads.c.message_count + 1,
        last_activity_at=sa.bindparam("w_now"),
        event_seq=threads.c.event_seq + sa.bindparam("w_events", type_=sa.Integer()),
    )
    .returning(threads.c.message_count, threads.c.event_seq)
)
_THREAD_EXISTS = sa.select(threads.c.id).where(
    threads.c.id == sa.bindparam("w_id"), threads.c.user_id == sa.bindparam("w_user_id")
)
_RECENT = (
    sa.select(messages)
    .where(
        messages.c.thread_id == sa.bindparam("w_thread_id"),
        messages.c.user_id == sa.bindparam("w_user_id"),
    )
    .order_by(messages.c.position.desc())
    .limit(sa.bindparam("w_limit", type_=sa.Integer()))
)
_later = messages.alias("later")
# A message's position and how many messages of other runs' output came after it: one read.
_PLACEMENT = sa.select(
    messages.c.position,
    sa.select(sa.func.count())
    .select_from(_later)
    .where(
        _later.c.thread_id == messages.c.thread_id,
        _later.c.user_id == messages.c.user_id,
        _later.c.position > messages.c.position,
        _later.c.run_id.is_not(None),
        _later.c.run_id != sa.bindparam("w_run_id"),
    )
    .scalar_subquery()
    .label("overtaken"),
).where(
    messages.c.id == sa.bindparam("w_id"),
    messages.c.thread_id == sa.bindparam("w_thread_id"),
    messages.c.user_id == sa.bindparam("w_user_id"),
)


class MessageStore:
    def __init__(self, *, max_message_chars: int, max_metadata_bytes: int) -> None:
        self._max_chars = max_message_chars
        self._max_metadata_bytes = max_metadata_bytes

    def check(self, new: NewMessage) -> None:
        """Refuse `new` as `append` would, without writing anything."""
        if len(new.content) > self._max_chars:
            raise InvalidInputError(
                f"content is {len(new.content)} characters; the limit is {self._max_chars}",
                code="message_too_long",
                field="content",
            )
        if new.role is MessageRole.USER and not new.content.strip():
            raise InvalidInputError("content is empty", code="message_empty", field="content")
        check_text(new.content, field="content")
        size = json_size(new.metadata, field="metadata")
        if size > self._max_metadata_bytes:
            raise InvalidInputError(
                f"metadata is {size} bytes; the limit is {self._max_metadata_bytes}",
                code="metadata_too_large",
                field="metadata",
            )

    async def append(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, new: NewMessage
    ) -> Message:
        """Append one message, move the thread's activity, and title an untitled thread."""
        self.check(new)
        now = datetime.now(UTC)
        row = await self._claim_position(conn, ctx, thread_id, new, now)
        return await self._store(conn, ctx, thread_id, new, now, position=int(row[0]))

    async def append_announced(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        new: NewMessage,
        *,
        events: int,
    ) -> tuple[Message, int]:
        """`append` for a message that `events` events will announce (a user's message:
        `message_created`, and `run_queued` when it starts a run; a run's own message: its
        `message_created` and what the step announces): the one update of the thread's row
        that gives the message its position (for a user's message refusing an archived thread
        and titling an untitled one) also reserves the events' numbers, as
        `EventStore.reserve` does. Returns the message and the last reserved sequence number
        (`EventPublisher.emit_many(reserved=…)`)."""
        if events < 1:
            raise ValueError("append_announced reserves the numbers of at least one event")
        self.check(new)
        now = datetime.now(UTC)
        row = await self._claim_position(conn, ctx, thread_id, new, now, events=events)
        message = await self._store(conn, ctx, thread_id, new, now, position=int(row[0]))
        return message, int(row[1])

    async def _store(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        new: NewMessage,
        now: datetime,
        *,
        position: int,
    ) -> Message:
        message = Message(
            id=new.id or new_id(IdPrefix.MESSAGE),
            thread_id=thread_id,
            position=position,
            role=new.role,
            content=new.content,
            metadata=dict(new.metadata),
            created_at=now,
            run_id=new.run_id,
            tool_calls=new.tool_calls,
            tool_call_id=new.tool_call_id,
        )
        await conn.execute(
            _INSERT,
            {
                "id": message.id,
                "thread_id": thread_id,
                "user_id": ctx.user_id,
                "position": position,
                "role": new.role.value,
                "content": new.content,
                "metadata": message.metadata,
                "tool_calls": new.tool_calls,
                "tool_call_id": new.tool_call_id,
                "run_id": new.run_id,
                "created_at": now,
            },
        )
        return message

    async def _claim_position(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        new: NewMessage,
        now: datetime,
        *,
        events: int = 0,
    ) -> Any:  # a Row of one or two columns (SQLAlchemy 2.1 rows are variadic)
        """The thread's row after the update: (message_count, and event_seq when `events`)."""
        if not is_valid_id(thread_id, IdPrefix.THREAD):
            raise NotFoundError("thread", thread_id)
        params: dict[str, object] = {"w_id": thread_id, "w_user_id": ctx.user_id, "w_now": now}
        statement: sa.Executable
        if new.role is MessageRole.USER:
            # Users cannot write to an archived thread; a run started before it was archived
            # may still finish (and its tool calls must still get their results).
            statement = _TAKE_USER_POSITION_AND_SEQS if events else _TAKE_USER_POSITION
            params["w_title"] = title_from(new.content)
        else:
            statement = _TAKE_POSITION_AND_SEQS if events else _TAKE_POSITION
        if events:
            params["w_events"] = events
        row = (await conn.execute(statement, params)).first()
        if row is not None:
            return row
        exists = await conn.scalar(_THREAD_EXISTS, {"w_id": thread_id, "w_user_id": ctx.user_id})
        if exists is None:
            raise NotFoundError("thread", thread_id)
        raise ConflictError(
            "The thread is archived; restore it (status: active) to continue",
            code="thread_archived",
        )

    async def page(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> Page[Message]:
        """Oldest first by default; `order="desc"` pages back from the newest."""
        check_limit(limit)
        column = messages.c.position
        query = (
            sa.select(messages)
            .where(messages.c.thread_id == thread_id, messages.c.user_id == ctx.user_id)
            .order_by(column.asc() if order == "asc" else column.desc())
            .limit(limit + 1)
        )
        if cursor is not None:
            after = parse_position_cursor(cursor)
            query = query.where(column > after if order == "asc" else column < after)
        rows = (await conn.execute(query)).all()
        items = [_message(row) for row in rows[:limit]]
        next_cursor = position_cursor(items[-1].position) if len(rows) > limit else None
        return Page(items=items, next_cursor=next_cursor)

    async def place_after_agent_output(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        message_id: str,
        *,
        run_id: str,
    ) -> tuple[int, bool] | None:
        """Move a queued run's user message after the output of the runs that went before it.

        A message posted while another run was active was stored at once, so that run's later
        output (tool results, its answer) landed after it. When the queued run `run_id` starts,
        its message moves to the end, so the stored conversation reads in the order it happened.
        Returns (position, moved), or None if the message is gone.
        """
        params = {
            "w_id": message_id,
            "w_thread_id": thread_id,
            "w_user_id": ctx.user_id,
            "w_run_id": run_id,
        }
        row = (await conn.execute(_PLACEMENT, params)).first()
        if row is None:
            return None
        position, overtaken = row
        if not overtaken:
            return int(position), False
        new_position = await conn.scalar(
            threads.update()
            .where(threads.c.id == thread_id, threads.c.user_id == ctx.user_id)
            .values(message_count=threads.c.message_count + 1)
            .returning(threads.c.message_count)
        )
        await conn.execute(
            messages.update().where(messages.c.id == message_id).values(position=new_position)
        )
        return int(new_position), True

    async def recent(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, *, window: int
    ) -> list[Message]:
        """The last `window` messages in conversation order (an agent run's context)."""
        params = {"w_thread_id": thread_id, "w_user_id": ctx.user_id, "w_limit": window}
        rows = (await conn.execute(_RECENT, params)).all()
        return [_message(row) for row in reversed(rows)]
