"""System-scoped account administration: external identities, plans, disabling and deleting
users. Used by sign-in (which runs before any user context exists) and by the admin CLI;
nothing here is reachable with a user's token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.errors import NotFoundError
from threadline.ids import IdPrefix, new_id
from threadline.store.tables import external_identities, threads, users

# Passwords never match this (not an argon2 hash): an external user cannot sign in with one.
NO_PASSWORD = "!external"


class AccountState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    email: str
    plan: str | None
    disabled: bool
    created_at: datetime
    issuer: str | None = None
    subject: str | None = None
    threads: int = 0


@dataclass(frozen=True, slots=True)
class Standing:
    """An account's state and plan as one transaction read them, in one statement. `locked`:
    read with the user's row lock, held until that transaction ends, which is what makes the
    quota checks that follow in it exact (`usage/quotas.py`)."""

    state: AccountState
    plan: str | None
    locked: bool


_MISSING = Standing(AccountState.MISSING, None, locked=False)
_STANDING = sa.select(users.c.disabled_at, users.c.plan).where(
    users.c.id == sa.bindparam("user_id")
)
# FOR NO KEY UPDATE, not FOR UPDATE: it serializes the user's quota checks and plan changes,
# yet does not block the rows that only reference the user (their foreign-key check takes
# FOR KEY SHARE), such as a worker's message, event and usage inserts for that user. With FOR
# UPDATE, a run's transaction that updated the thread's row and then inserted an event waited
# for a request that held the user and waited for the thread's row: a deadlock.
_STANDING_LOCKED = _STANDING.with_for_update(key_share=True)


class AccountStore:
    async def state(self, conn: AsyncConnection, user_id: str) -> AccountState:
        return (await self.standing(conn, user_id)).state

    async def standing(
        self, conn: AsyncConnection, user_id: str, *, lock: bool = False
    ) -> Standing:
        """The account's state and plan; `lock` takes the user's row lock (see `Standing`)."""
        statement = _STANDING_LOCKED if lock else _STANDING
        row = (await conn.execute(statement, {"user_id": user_id})).first()
        if row is None:
            return _MISSING
        state = AccountState.ACTIVE if row.disabled_at is None else AccountState.DISABLED
        return Standing(state, row.plan, locked=lock)

    async def find_external(
        self, conn: AsyncConnection, *, issuer: str, subject: str
    ) -> tuple[str, str | None] | None:
        """The user id and plan of an external identity, if it has signed in before."""
        row = (
            await conn.execute(
                sa.select(users.c.id, users.c.plan)
                .join(external_identities, external_identities.c.user_id == users.c.id)
                .where(
                    external_identities.c.issuer == issuer,
                    external_identities.c.subject == subject,
                )
            )
        ).first()
        return None if row is None else (row.id, row.plan)

    async def provision_external(
        self,
        conn: AsyncConnection,
        *,
        issuer: str,
        subject: str,
        email: str | None,
        plan: str | None,
    ) -> str:
        """Create the user of a new external identity. Raises `IntegrityError` when another
        transaction provisioned the same identity first: the caller rolls back and reads it."""
        user_id = new_id(IdPrefix.USER)
        now = datetime.now(UTC)
        values = {"id": user_id, "password_hash": NO_PASSWORD, "created_at": now, "plan": plan}
        try:
            # The claimed email when no account has it; else a placeholder, since an email
            # alone (unverified, from another issuer) must never join two identities.
            async with conn.begin_nested():
                claimed = email or _placeholder(user_id)
                await conn.execute(users.insert().values(email=claimed, **values))
        except IntegrityError:
            await conn.execute(users.insert().values(email=_placeholder(user_id), **values))
        await conn.execute(
            external_identities.insert().values(
                issuer=issuer, subject=subject, user_id=user_id, created_at=now
            )
        )
        return user_id

    async def set_plan(self, conn: AsyncConnection, user_id: str, plan: str | None) -> None:
        updated = await conn.execute(users.update().where(users.c.id == user_id).values(plan=plan))
        if updated.rowcount == 0:
            raise NotFoundError("user", user_id)

    async def plan_of(
        self, conn: AsyncConnection, user_id: str, *, lock: bool = False
    ) -> str | None:
        """The user's stored plan; `lock` takes the user's row lock until the transaction
        ends, which serializes the quota checks of one user (SQLite serializes all writers).
        The lock is `FOR NO KEY UPDATE` (see `_STANDING_LOCKED`)."""
        standing = await self.standing(conn, user_id, lock=lock)
        if standing.state is AccountState.MISSING:
            raise NotFoundError("user", user_id)
        return standing.plan

    async def set_disabled(self, conn: AsyncConnection, user_id: str, disabled: bool) -> None:
        updated = await conn.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(disabled_at=datetime.now(UTC) if disabled else None)
        )
        if updated.rowcount == 0:
            raise NotFoundError("user", user_id)

    async def delete(self, conn: AsyncConnection, user_id: str) -> None:
        """The user and everything they own: every table's foreign key to users cascades."""
        deleted = await conn.execute(users.delete().where(users.c.id == user_id))
        if deleted.rowcount == 0:
            raise NotFoundError("user", user_id)

    async def list(
        self, conn: AsyncConnection, *, limit: int = 100, user_id: str | None = None
    ) -> list[Account]:
        thread_count = (
            sa.select(sa.func.count())
            .select_from(threads)
            .where(threads.c.user_id == users.c.id)
            .scalar_subquery()
        )
        query = (
            sa.select(
                users.c.id,
                users.c.email,
                users.c.plan,
                users.c.disabled_at,
                users.c.created_at,
                external_identities.c.issuer,
                external_identities.c.subject,
                thread_count.label("threads"),
            )
            .outerjoin(external_identities, external_identities.c.user_id == users.c.id)
            .order_by(users.c.created_at, users.c.id)
            .limit(limit)
        )
        if user_id is not None:
            query = query.where(users.c.id == user_id)
        return [_account(row) for row in (await conn.execute(query)).all()]

    async def get(self, conn: AsyncConnection, user_ref: str) -> Account:
        """A user by id or by email."""
        if user_ref.startswith(f"{IdPrefix.USER}_"):
            condition = users.c.id == user_ref
        else:
            condition = users.c.email == user_ref.strip().lower()
        found = await conn.scalar(sa.select(users.c.id).where(condition))
        accounts = await self.list(conn, user_id=found) if found is not None else []
        if not accounts:
            raise NotFoundError("user", user_ref)
        return accounts[0]

    async def issuer_of(self, conn: AsyncConnection, user_id: str) -> str | None:
        issuer: str | None = await conn.scalar(
            sa.select(external_identities.c.issuer).where(external_identities.c.user_id == user_id)
        )
        return issuer


def _placeholder(user_id: str) -> str:
    return f"{user_id.lower()}@external.invalid"


def _account(row: Any) -> Account:  # a Row of any arity
    return Account(
        id=str(row.id),
        email=str(row.email),
        plan=row.plan,
        disabled=row.disabled_at is not None,
        created_at=row.created_at,
        issuer=row.issuer,
        subject=row.subject,
        threads=int(row.threads),
    )
