from __future__ import annotations

from fastapi import APIRouter, Response, status

from threadline.api.deps import CurrentClaims, CurrentUser, ServicesDep
from threadline.api.schemas import Credentials, ErrorOut, Registration, TokenOut, UserOut
from threadline.events.control import SessionEnded

router = APIRouter(prefix="/v1/auth", tags=["auth"])
_AUTH_ERRORS: dict[int | str, dict[str, object]] = {401: {"model": ErrorOut}}


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def register(body: Registration, services: ServicesDep) -> UserOut:
    user = await services.auth.register(email=body.email, password=body.password)
    return UserOut.of(user)


@router.post("/token", responses=_AUTH_ERRORS)
async def token(body: Credentials, services: ServicesDep) -> TokenOut:
    issued = await services.auth.authenticate(email=body.email, password=body.password)
    return TokenOut(access_token=issued.token, expires_in=issued.expires_in)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses=_AUTH_ERRORS)
async def logout(claims: CurrentClaims, services: ServicesDep) -> Response:
    await services.auth.logout(claims)
    # Every process closes the sockets and streams opened with this token.
    await services.bus.publish_control(SessionEnded(token_id=claims.jti, user_id=claims.user_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me", responses=_AUTH_ERRORS)
async def me(user: CurrentUser, services: ServicesDep) -> UserOut:
    return UserOut.of(await services.auth.me(user))
