"""Service keys: credentials of the product's own backend, created by the admin CLI.

A key is `key_<ulid>.<secret>`, shown once; only the SHA-256 of the secret is stored (the secret
is 32 random bytes, so a slow password hash would add nothing). Every request looks the key up
in the database, so `threadline admin keys revoke` applies at once on every process. A key with
the `act_as` scope calls the API as the user named by the `X-Threadline-Act-As` header, with
exactly that user's isolation; a key with a tenant (an issuer) may only act for that issuer's
users.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.auth.tokens import TokenClaims
from threadline.errors import AuthError, ForbiddenError, InvalidInputError, NotFoundError
from threadline.ids import IdPrefix, is_valid_id, new_id
from threadline.store.accounts import AccountState, AccountStore
from threadline.store.db import read_transaction
from threadline.store.tables import service_keys

ACT_AS_HEADER = "X-Threadline-Act-As"
SCOPES = frozenset({"act_as"})
"""Known scopes. `act_as`: call the user API for one user (named by `X-Threadline-Act-As`)."""
# A service key's claims never expire by time; the row decides.
_NO_EXPIRY = timedelta(days=1)


def is_service_key(token: str) -> bool:
    return token.startswith(f"{IdPrefix.SERVICE_KEY.value}_")


@dataclass(frozen=True, slots=True)
class ServiceKey:
    id: str
    name: str
    scopes: list[str]
    tenant: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ServiceKey
    secret: str
    """The whole credential, `key_….secret`: shown once, never stored."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: Any) -> ServiceKey:  # a Row of any arity
    return ServiceKey(
        id=str(row.id),
        name=str(row.name),
        scopes=list(row.scopes),
        tenant=row.tenant,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class ServiceKeyStore:
    async def create(
        self, conn: AsyncConnection, *, name: str, scopes: list[str], tenant: str | None = None
    ) -> CreatedKey:
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise InvalidInputError(
                f"Unknown scopes {', '.join(unknown)}; known: {', '.join(sorted(SCOPES))}",
                code="unknown_scope",
                field="scopes",
            )
        key_id, secret = new_id(IdPrefix.SERVICE_KEY), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        await conn.execute(
            service_keys.insert().values(
                id=key_id,
                name=name,
                secret_hash=_digest(secret),
                scopes=sorted(set(scopes)),
                tenant=tenant,
                created_at=now,
            )
        )
        key = ServiceKey(key_id, name, sorted(set(scopes)), tenant, now, None)
        return CreatedKey(key=key, secret=f"{key_id}.{secret}")

    async def list(self, conn: AsyncConnection) -> list[ServiceKey]:
        query = sa.select(service_keys).order_by(service_keys.c.created_at, service_keys.c.id)
        return [_key(row) for row in (await conn.execute(query)).all()]

    async def revoke(self, conn: AsyncConnection, key_id: str) -> None:
        updated = await conn.execute(
            service_keys.update()
            .where(service_keys.c.id == key_id, service_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        if updated.rowcount == 0:
            found = await conn.scalar(
                sa.select(service_keys.c.id).where(service_keys.c.id == key_id)
            )
            if found is None:
                raise NotFoundError("service_key", key_id)

    async def find(self, conn: AsyncConnection, token: str) -> ServiceKey | None:
        """The key whose credential `token` is, revoked or not; None if there is none."""
        key_id, _, secret = token.partition(".")
        if not is_valid_id(key_id, IdPrefix.SERVICE_KEY) or not secret:
            return None
        row = (
            await conn.execute(sa.select(service_keys).where(service_keys.c.id == key_id))
        ).first()
        if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
            return None
        return _key(row)


class ServiceKeyAuth:
    def __init__(self, *, engine: AsyncEngine, keys: ServiceKeyStore, accounts: AccountStore):
        self._engine = engine
        self._keys = keys
        self._accounts = accounts

    async def validate(self, token: str, *, act_as: str | None) -> TokenClaims:
        async with read_transaction(self._engine) as conn:
            key = await self._keys.find(conn, token)
            if key is None:
                raise AuthError("The service key is invalid", code="service_key_invalid")
            if key.revoked_at is not None:
                raise AuthError("The service key was revoked", code="service_key_revoked")
            if "act_as" not in key.scopes:
                raise ForbiddenError(
                    "This service key lacks the act_as scope", code="scope_missing"
                )
            if not act_as:
                raise AuthError(
                    f"A service key must name the user it acts for in {ACT_AS_HEADER}",
                    code="act_as_missing",
                )
            await self._check_user(conn, key, act_as)
        return TokenClaims(
            user_id=act_as,
            jti=key.id,
            expires_at=datetime.now(UTC) + _NO_EXPIRY,
            service_key_id=key.id,
        )

    async def _check_user(self, conn: AsyncConnection, key: ServiceKey, user_id: str) -> None:
        state = AccountState.MISSING
        if is_valid_id(user_id, IdPrefix.USER):
            state = await self._accounts.state(conn, user_id)
        if state is AccountState.MISSING or (
            key.tenant is not None and await self._accounts.issuer_of(conn, user_id) != key.tenant
        ):
            # A user outside the key's tenant looks exactly like one that does not exist.
            raise AuthError(f"No user {user_id} for this key", code="act_as_user_not_found")
        if state is AccountState.DISABLED:
            raise ForbiddenError("The account is disabled", code="user_disabled")
