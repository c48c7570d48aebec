"""Threads: every query is scoped by the context's user; another user's thread is not found."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import ConflictError, InvalidInputError, NotFoundError
from threadline.ids import IdPrefix, is_valid_id, new_id
from threadline.statuses import ThreadStatus as ThreadStatus  # re-exported
from threadline.store.pagination import (
    Page,
    check_limit,
    parse_time_id_cursor,
    time_id_cursor,
)
from threadline.store.tables import events, messages, runs, threads
from threadline.store.validation import INT64_MAX, check_text, json_size

JSONObject = dict[str, object]
_FILTER_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# Retries of an optimistic update that lost a race, when the client did not pin a version.
_UPDATE_ATTEMPTS = 8


# Archived threads come back through `active` only: completing one nobody can see is meaningless.
_TRANSITIONS: Mapping[ThreadStatus, frozenset[ThreadStatus]] = {
    ThreadStatus.ACTIVE: frozenset({ThreadStatus.COMPLETED, ThreadStatus.ARCHIVED}),
    ThreadStatus.COMPLETED: frozenset({ThreadStatus.ACTIVE, ThreadStatus.ARCHIVED}),
    ThreadStatus.ARCHIVED: frozenset({ThreadStatus.ACTIVE}),
}


@dataclass(frozen=True, slots=True)
class Thread:
    id: str
    user_id: str
    title: str | None
    status: ThreadStatus
    metadata: JSONObject
    version: int
    message_count: int
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime


class _Unset:
    """Marks a field a PATCH did not mention (distinct from an explicit null)."""


UNSET = _Unset()


@dataclass(frozen=True, slots=True)
class ThreadChanges:
    title: str | None | _Unset = UNSET
    metadata_patch: JSONObject | _Unset = UNSET
    status: ThreadStatus | _Unset = UNSET


@dataclass(frozen=True, slots=True)
class ThreadFilter:
    status: ThreadStatus | None = None
    metadata: JSONObject | None = None
    query: str | None = None


def _thread(row: sa.Row[tuple[object, ...]]) -> Thread:
    m = row._mapping
    return Thread(
        id=m["id"],
        user_id=m["user_id"],
        title=m["title"],
        status=ThreadStatus(m["status"]),
        metadata=dict(m["metadata"]),
        version=m["version"],
        message_count=m["message_count"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        last_activity_at=m["last_activity_at"],
    )


def merge_metadata(current: JSONObject, patch: JSONObject) -> JSONObject:
    """JSON merge patch (RFC 7396) on the top level: a null value removes the key."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# Hot-path statements, built once; each call binds its values.
_INSERT = threads.insert()
_GET = sa.select(threads).where(
    threads.c.id == sa.bindparam("w_id"), threads.c.user_id == sa.bindparam("w_user_id")
)
_GET_FOR_UPDATE = _GET.with_for_update()
_PAGE = (
    sa.select(threads)
    .where(threads.c.user_id == sa.bindparam("w_user_id"))
    .order_by(threads.c.last_activity_at.desc(), threads.c.id.desc())
    .limit(sa.bindparam("w_limit", type_=sa.Integer()))
)


class ThreadStore:
    def __init__(self, *, max_metadata_bytes: int) -> None:
        self._max_metadata_bytes = max_metadata_bytes

    def check_metadata(self, metadata: JSONObject) -> JSONObject:
        size = json_size(metadata, field="metadata")
        if size > self._max_metadata_bytes:
            raise InvalidInputError(
                f"metadata is {size} bytes; the limit is {self._max_metadata_bytes}",
                code="metadata_too_large",
                field="metadata",
            )
        return metadata

    async def create(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        *,
        title: str | None = None,
        metadata: JSONObject | None = None,
    ) -> Thread:
        if title is not None:
            check_text(title, field="title")
        now = datetime.now(UTC)
        values = {
            "id": new_id(IdPrefix.THREAD),
            "user_id": ctx.user_id,
            "title": title,
            "status": ThreadStatus.ACTIVE.value,
            "metadata": self.check_metadata(metadata or {}),
            "version": 1,
            "message_count": 0,
            "created_at": now,
            "updated_at": now,
            "last_activity_at": now,
        }
        await conn.execute(_INSERT, values)
        return Thread(
            id=str(values["id"]),
            user_id=ctx.user_id,
            title=title,
            status=ThreadStatus.ACTIVE,
            metadata=dict(metadata or {}),
            version=1,
            message_count=0,
            created_at=now,
            updated_at=now,
            last_activity_at=now,
        )

    async def get(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, *, for_update: bool = False
    ) -> Thread:
        if not is_valid_id(thread_id, IdPrefix.THREAD):
            raise NotFoundError("thread", thread_id)
        statement = _GET_FOR_UPDATE if for_update else _GET
        row = (await conn.execute(statement, {"w_id": thread_id, "w_user_id": ctx.user_id})).first()
        if row is None:
            raise NotFoundError("thread", thread_id)
        return _thread(row)

    async def page(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        *,
        filters: ThreadFilter = ThreadFilter(),
        limit: int = 20,
        cursor: str | None = None,
    ) -> Page[Thread]:
        """Newest activity first; the cursor is the (last_activity_at, id) of the last item."""
        params = {"w_user_id": ctx.user_id, "w_limit": check_limit(limit) + 1}
        conditions = self._filter_conditions(conn, ctx, filters)
        query = _PAGE.where(*conditions) if conditions else _PAGE
        if cursor is not None:
            after, last_id = parse_time_id_cursor(cursor, IdPrefix.THREAD)
            query = query.where(
                sa.or_(
                    threads.c.last_activity_at < after,
                    sa.and_(threads.c.last_activity_at == after, threads.c.id < str(last_id)),
                )
            )
        rows = (await conn.execute(query, params)).all()
        items = [_thread(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = time_id_cursor(last.last_activity_at, last.id)
        return Page(items=items, next_cursor=next_cursor)

    def _filter_conditions(
        self, conn: AsyncConnection, ctx: UserContext, filters: ThreadFilter
    ) -> list[sa.ColumnElement[bool]]:
        conditions: list[sa.ColumnElement[bool]] = []
        if filters.status is not None:
            conditions.append(threads.c.status == filters.status.value)
        if filters.metadata:
            conditions.extend(_metadata_conditions(conn.dialect.name, filters.metadata))
        if filters.query:
            pattern = _like_pattern(check_text(filters.query, field="q"))
            in_messages = (
                sa.select(messages.c.id)
                .where(
                    messages.c.thread_id == threads.c.id,
                    messages.c.user_id == ctx.user_id,
                    messages.c.content.ilike(pattern, escape="\\"),
                )
                .exists()
            )
            conditions.append(sa.or_(threads.c.title.ilike(pattern, escape="\\"), in_messages))
        return conditions

    async def update(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        changes: ThreadChanges,
        *,
        expected_version: int | None = None,
    ) -> Thread:
        """Apply `changes` without losing a concurrent write.

        With `expected_version` (an `If-Match`), a stale version is a 409. Without it, an update
        that lost the race re-reads and re-applies, so both writers' changes land.
        """
        for _ in range(_UPDATE_ATTEMPTS):
            current = await self.get(conn, ctx, thread_id)
            if expected_version is not None and current.version != expected_version:
                raise _version_conflict(current.version)
            values = self._changed_values(current, changes)
            if not values:
                return current
            values |= {"version": current.version + 1, "updated_at": datetime.now(UTC)}
            row = (
                await conn.execute(
                    threads.update()
                    .where(
                        threads.c.id == thread_id,
                        threads.c.user_id == ctx.user_id,
                        threads.c.version == current.version,
                    )
                    .values(**values)
                    .returning(*threads.c)
                )
            ).first()
            if row is not None:
                return _thread(row)
            if expected_version is not None:
                raise _version_conflict(None)
        raise ConflictError("The thread is being updated too often; retry", code="thread_busy")

    def _changed_values(self, current: Thread, changes: ThreadChanges) -> dict[str, object]:
        values: dict[str, object] = {}
        if not isinstance(changes.title, _Unset) and changes.title != current.title:
            values["title"] = changes.title and check_text(changes.title, field="title")
        if not isinstance(changes.metadata_patch, _Unset):
            merged = merge_metadata(current.metadata, changes.metadata_patch)
            if merged != current.metadata:
                values["metadata"] = self.check_metadata(merged)
        if not isinstance(changes.status, _Unset) and changes.status != current.status:
            if changes.status not in _TRANSITIONS[current.status]:
                raise ConflictError(
                    f"A thread cannot go from {current.status} to {changes.status}",
                    code="invalid_status_transition",
                )
            values["status"] = changes.status.value
        return values

    async def archive(self, conn: AsyncConnection, ctx: UserContext, thread_id: str) -> Thread:
        return await self.update(conn, ctx, thread_id, ThreadChanges(status=ThreadStatus.ARCHIVED))

    async def delete(self, conn: AsyncConnection, ctx: UserContext, thread_id: str) -> None:
        """Remove the thread for good; its messages (and runs and events) go with it."""
        if not is_valid_id(thread_id, IdPrefix.THREAD):
            raise NotFoundError("thread", thread_id)
        # Children first, explicitly: the cascade must not depend on SQLite's foreign_keys pragma.
        for child in (events, runs, messages):
            await conn.execute(
                child.delete().where(child.c.thread_id == thread_id, child.c.user_id == ctx.user_id)
            )
        result = await conn.execute(
            threads.delete().where(threads.c.id == thread_id, threads.c.user_id == ctx.user_id)
        )
        if result.rowcount == 0:
            raise NotFoundError("thread", thread_id)


def _version_conflict(current_version: int | None) -> ConflictError:
    detail = f" (it is now at version {current_version})" if current_version else ""
    return ConflictError(
        f"The thread was changed by another request{detail}; reload and retry",
        code="thread_version_conflict",
    )


def _metadata_conditions(dialect: str, wanted: JSONObject) -> list[sa.ColumnElement[bool]]:
    for key, value in wanted.items():
        if not _FILTER_KEY.fullmatch(key):
            raise InvalidInputError(
                f"metadata filter key {key!r} must match [A-Za-z0-9_-]{{1,64}}",
                code="invalid_metadata_filter",
            )
        if not isinstance(value, str | int | float | bool) or (
            isinstance(value, int) and abs(value) > INT64_MAX
        ):
            raise InvalidInputError(
                "metadata filter values must be strings, numbers (64-bit) or booleans",
                code="invalid_metadata_filter",
            )
        if isinstance(value, str):
            check_text(value, field="metadata")
    if dialect == "postgresql":
        # JSONB containment (@>, served by the column's type) matches numbers and booleans
        # exactly. The column is JSON-with-a-JSONB-variant, so say which comparator to use.
        return [sa.type_coerce(threads.c.metadata, JSONB).contains(wanted)]
    conditions: list[sa.ColumnElement[bool]] = []
    for key, value in wanted.items():
        extracted = sa.func.json_extract(threads.c.metadata, f'$."{key}"')
        kind = sa.func.json_type(threads.c.metadata, f'$."{key}"')
        if isinstance(value, bool):
            conditions.append(kind == ("true" if value else "false"))
        elif isinstance(value, str):
            conditions.append(sa.and_(kind == "text", extracted == value))
        else:
            conditions.append(sa.and_(kind.in_(["integer", "real"]), extracted == value))
    return conditions
