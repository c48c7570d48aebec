"""Users. Lookup by email is unscoped by nature (it is how a user is found at sign-in)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import ConflictError, NotFoundError
from threadline.ids import IdPrefix, new_id
from threadline.store.tables import users


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UserCredentials:
    user: User
    password_hash: str


def _user(row: Any) -> User:  # a Row of any arity (SQLAlchemy 2.1 rows are variadic)
    return User(id=row.id, email=row.email, created_at=row.created_at)


class UserStore:
    async def create(self, conn: AsyncConnection, *, email: str, password_hash: str) -> User:
        user = User(id=new_id(IdPrefix.USER), email=email, created_at=datetime.now(UTC))
        try:
            # A savepoint keeps the caller's transaction usable after a duplicate.
            async with conn.begin_nested():
                await conn.execute(
                    users.insert().values(
                        id=user.id,
                        email=user.email,
                        password_hash=password_hash,
                        created_at=user.created_at,
                    )
                )
        except IntegrityError as exc:
            raise ConflictError(
                "An account with this email already exists", code="email_taken"
            ) from exc
        return user

    async def find_credentials(
        self, conn: AsyncConnection, *, email: str
    ) -> UserCredentials | None:
        row = (
            await conn.execute(
                sa.select(
                    users.c.id, users.c.email, users.c.created_at, users.c.password_hash
                ).where(users.c.email == email)
            )
        ).first()
        if row is None:
            return None
        return UserCredentials(user=_user(row), password_hash=row.password_hash)

    async def get(
        self, conn: AsyncConnection, ctx: UserContext, *, for_update: bool = False
    ) -> User:
        """The user; `for_update` locks the row until the transaction ends (serializes the
        user's own writes that must not race, such as creating a thread for a client id)."""
        query = sa.select(users.c.id, users.c.email, users.c.created_at).where(
            users.c.id == ctx.user_id
        )
        row = (await conn.execute(query.with_for_update() if for_update else query)).first()
        if row is None:
            raise NotFoundError("user", ctx.user_id)
        return _user(row)

    async def exists(self, conn: AsyncConnection, user_id: str) -> bool:
        """Whether the account exists (a signed token may outlive it: a database reset while
        the signing key stayed)."""
        found = await conn.scalar(sa.select(users.c.id).where(users.c.id == user_id))
        return found is not None

    async def count(self, conn: AsyncConnection) -> int:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(users))).scalar_one())
