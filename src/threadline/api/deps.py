"""Request dependencies: the runtime and the gateway, the signed-in user, the request's one
transaction, owned resources.

A signed-in request's database work is one transaction when its route takes `DbConn` (and
`DbUser`): the token's revocation (when the list is in the database) and its account are
checked as that transaction's first statements, and a writing request takes the user's row
lock there (`AccountStore.standing`), which the plan's quota checks need anyway. Routes whose
services own their transactions take `CurrentUser`, checked in a short read transaction of its
own. Either way the check runs while the dependencies resolve, before the body is validated:
a token of a missing account is a 401 on every endpoint, whatever the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.api.live.gateway import Gateway
from threadline.auth.service_keys import ACT_AS_HEADER
from threadline.auth.tokens import TokenClaims
from threadline.context import UserContext
from threadline.errors import AuthError
from threadline.logs import bind_context
from threadline.runtime import Runtime
from threadline.store.accounts import Standing
from threadline.store.db import read_transaction
from threadline.store.threads import Thread

_bearer = HTTPBearer(auto_error=False, description="A token from POST /v1/auth/token")
_READ_METHODS = ("GET", "HEAD")


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# The runtime's services (stores, auth, run service...): handlers call them `services`.
ServicesDep = Annotated[Runtime, Depends(get_runtime)]


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def _token_claims(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
) -> TokenClaims:
    """The token's own checks only; its revocation and account are checked by whichever of
    `CurrentClaims` or `DbConn` the route takes."""
    if credentials is None:
        raise AuthError("Send a bearer token in the Authorization header", code="not_authenticated")
    act_as = request.headers.get(ACT_AS_HEADER)  # only service keys may use it
    return await services.auth.verify(credentials.credentials, act_as=act_as)


_TokenClaims = Annotated[TokenClaims, Depends(_token_claims)]


async def _current_claims(services: ServicesDep, claims: _TokenClaims) -> TokenClaims:
    async with read_transaction(services.engine) as conn:
        await services.auth.check_account(conn, claims)
    return claims


CurrentClaims = Annotated[TokenClaims, Depends(_current_claims)]


def _user_context(claims: TokenClaims, request: Request) -> UserContext:
    ctx = UserContext.create(claims.user_id, request_id=getattr(request.state, "request_id", None))
    bind_context(ctx)
    return ctx


async def _current_user(claims: CurrentClaims, request: Request) -> UserContext:
    return _user_context(claims, request)


CurrentUser = Annotated[UserContext, Depends(_current_user)]
"""The signed-in user, the account checked in a transaction of its own."""


AfterCommit = Callable[[], Awaitable[None]]


@dataclass
class RequestTransaction:
    """The request's transaction, the signed-in account as it read it, and the work to do
    once it has committed (waking a worker, telling another process to cancel a run)."""

    conn: AsyncConnection
    user: UserContext
    standing: Standing
    _after_commit: list[AfterCommit] = field(default_factory=list)

    def after_commit(self, action: AfterCommit) -> None:
        self._after_commit.append(action)


async def _transaction(
    services: ServicesDep, claims: _TokenClaims, request: Request
) -> AsyncIterator[RequestTransaction]:
    user = _user_context(claims, request)
    if request.method in _READ_METHODS:
        async with read_transaction(services.engine) as conn:
            standing = await services.auth.check_account(conn, claims)
            yield RequestTransaction(conn, user, standing)
        return
    async with services.engine.begin() as conn:
        standing = await services.auth.check_account(conn, claims, lock=True)
        tx = RequestTransaction(conn, user, standing)
        yield tx
    for action in tx._after_commit:
        await action()


# scope="function": commit before the response is sent, so a client that got a 201 always
# finds its write on the next request.
Transaction = Annotated[RequestTransaction, Depends(_transaction, scope="function")]


async def _connection(tx: Transaction) -> AsyncConnection:
    return tx.conn


DbConn = Annotated[AsyncConnection, Depends(_connection)]
"""The request's one transaction (read-only for GET), its account checked first in it."""


async def _db_user(tx: Transaction) -> UserContext:
    return tx.user


DbUser = Annotated[UserContext, Depends(_db_user)]
"""The signed-in user, the account checked in the request's transaction (`DbConn`)."""


async def _owned_thread(
    thread_id: str, user: DbUser, conn: DbConn, services: ServicesDep
) -> Thread:
    return await services.threads.get(conn, user, thread_id)


OwnedThread = Annotated[Thread, Depends(_owned_thread)]


async def _message_rate_limit(user: CurrentUser, services: ServicesDep) -> None:
    await services.quotas.hit_message(user, legacy_limit=services.settings.messages_per_minute)


MessageRateLimit = Depends(_message_rate_limit)
"""Counts a message against the user's allowance, reading the plan in a transaction of its own
(for routes whose services own their transactions)."""


async def _message_rate_limit_in_transaction(tx: Transaction, services: ServicesDep) -> None:
    await services.quotas.hit_message(
        tx.user, legacy_limit=services.settings.messages_per_minute, standing=tx.standing
    )


TransactionMessageRateLimit = Depends(_message_rate_limit_in_transaction)
"""`MessageRateLimit` with the plan the request's transaction read with the account."""
