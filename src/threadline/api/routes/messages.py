from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status

from threadline.api.deps import CurrentUser, DbConn, MessageRateLimit, OwnedThread, ServicesDep
from threadline.api.schemas import ErrorOut, ListOut, MessageCreate, MessageOut
from threadline.store.messages import MessageRole, NewMessage
from threadline.store.pagination import MAX_PAGE_SIZE

router = APIRouter(prefix="/v1/threads/{thread_id}/messages", tags=["messages"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[MessageRateLimit],
    responses={**_ERRORS, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 429: {"model": ErrorOut}},
)
async def post_message(
    thread: OwnedThread,
    body: MessageCreate,
    user: CurrentUser,
    conn: DbConn,
    services: ServicesDep,
) -> MessageOut:
    message = await services.messages.append(
        conn,
        user,
        thread.id,
        NewMessage(role=MessageRole.USER, content=body.content, metadata=dict(body.metadata)),
    )
    return MessageOut.of(message)


@router.get("", responses=_ERRORS)
async def list_messages(
    thread: OwnedThread,
    user: CurrentUser,
    conn: DbConn,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    order: Literal["asc", "desc"] = "asc",
) -> ListOut[MessageOut]:
    page = await services.messages.list(
        conn, user, thread.id, limit=limit, cursor=cursor, order=order
    )
    return ListOut(data=[MessageOut.of(m) for m in page.items], next_cursor=page.next_cursor)
