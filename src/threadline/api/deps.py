"""Request dependencies: the runtime and the gateway, one transaction, the signed-in user,
owned resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from threadline.store.db import read_transaction
from threadline.store.threads import Thread

_bearer = HTTPBearer(auto_error=False, description="A token from POST /v1/auth/token")


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# The runtime's services (stores, auth, run service...): handlers call them `services`.
ServicesDep = Annotated[Runtime, Depends(get_runtime)]


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def _transaction(services: ServicesDep, request: Request) -> AsyncIterator[AsyncConnection]:
    if request.method in ("GET", "HEAD"):
        async with read_transaction(services.engine) as conn:
            yield conn
        return
    async with services.engine.begin() as conn:
        yield conn


# scope="function": commit before the response is sent, so a client that got a 201 always
# finds its write on the next request.
DbConn = Annotated[AsyncConnection, Depends(_transaction, scope="function")]


async def _current_claims(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
) -> TokenClaims:
    if credentials is None:
        raise AuthError("Send a bearer token in the Authorization header", code="not_authenticated")
    act_as = request.headers.get(ACT_AS_HEADER)  # only service keys may use it
    return await services.auth.validate(credentials.credentials, act_as=act_as)


CurrentClaims = Annotated[TokenClaims, Depends(_current_claims)]


async def _current_user(claims: CurrentClaims, request: Request) -> UserContext:
    ctx = UserContext.create(claims.user_id, request_id=getattr(request.state, "request_id", None))
    bind_context(ctx)
    return ctx


CurrentUser = Annotated[UserContext, Depends(_current_user)]


async def _owned_thread(
    thread_id: str, user: CurrentUser, conn: DbConn, services: ServicesDep
) -> Thread:
    return await services.threads.get(conn, user, thread_id)


OwnedThread = Annotated[Thread, Depends(_owned_thread)]


async def _message_rate_limit(user: CurrentUser, services: ServicesDep) -> None:
    await services.quotas.hit_message(user, legacy_limit=services.settings.messages_per_minute)


MessageRateLimit = Depends(_message_rate_limit)
