from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status

from threadline.api.deps import (
    DbConn,
    DbUser,
    OwnedThread,
    ServicesDep,
    Transaction,
    TransactionMessageRateLimit,
)
from threadline.api.schemas import (
    ErrorOut,
    ListOut,
    MessageCreate,
    MessageOut,
    MessagePosted,
    RunOut,
)
from threadline.runs.service import RunRequest
from threadline.store.messages import MessageRole, NewMessage
from threadline.store.pagination import MAX_PAGE_SIZE, POSITION_CURSOR

router = APIRouter(prefix="/v1/threads/{thread_id}/messages", tags=["messages"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[TransactionMessageRateLimit],
    responses={
        **_ERRORS,
        409: {"model": ErrorOut},
        413: {"model": ErrorOut},
        429: {"model": ErrorOut},
    },
)
async def post_message(
    thread_id: str, body: MessageCreate, tx: Transaction, services: ServicesDep
) -> MessagePosted:
    """Append a user message; with `run`, also queue an agent run in the same transaction
    (the request's one, which also checked the account and read the plan)."""
    run = (
        RunRequest(agent=body.run.agent, multitask_strategy=body.run.multitask_strategy)
        if body.run
        else None
    )
    run_service = services.run_service
    posted = await run_service.post_in(
        tx.conn,
        tx.user,
        thread_id,
        message=NewMessage(
            role=MessageRole.USER, content=body.content, metadata=dict(body.metadata)
        ),
        run=run,
        standing=tx.standing,
    )
    tx.after_commit(lambda: run_service.settle(posted))
    if posted.message is None:  # pragma: no cover - a message was given
        raise RuntimeError("message not stored")
    out = MessageOut.of(posted.message).model_dump()
    return MessagePosted(**out, run=RunOut.of(posted.run) if posted.run else None)


@router.get("", responses=_ERRORS)
async def list_messages(
    thread: OwnedThread,
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    cursor: Annotated[str | None, Query(max_length=16, pattern=POSITION_CURSOR)] = None,
    order: Literal["asc", "desc"] = "asc",
) -> ListOut[MessageOut]:
    page = await services.messages.page(
        conn, user, thread.id, limit=limit, cursor=cursor, order=order
    )
    return ListOut(data=[MessageOut.of(m) for m in page.items], next_cursor=page.next_cursor)
