from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from threadline.api.deps import CurrentUser, DbConn, DbUser, OwnedThread, ServicesDep, Transaction
from threadline.api.schemas import ErrorOut, ListOut, RunCreate, RunOut
from threadline.errors import NotFoundError
from threadline.ids import IdPrefix
from threadline.runs.service import RunRequest
from threadline.store.pagination import MAX_PAGE_SIZE, id_cursor_pattern

router = APIRouter(prefix="/v1/threads/{thread_id}/runs", tags=["runs"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses={**_ERRORS, 409: {"model": ErrorOut}}
)
async def create_run(
    thread_id: str, body: RunCreate, tx: Transaction, services: ServicesDep
) -> RunOut:
    """Queue an agent run on the thread's current history."""
    request = RunRequest(agent=body.agent, multitask_strategy=body.multitask_strategy)
    run_service = services.run_service
    posted = await run_service.post_in(
        tx.conn, tx.user, thread_id, message=None, run=request, standing=tx.standing
    )
    tx.after_commit(lambda: run_service.settle(posted))
    if posted.run is None:  # pragma: no cover - a run was requested
        raise RuntimeError("run not created")
    return RunOut.of(posted.run)


@router.get("", responses=_ERRORS)
async def list_runs(
    thread: OwnedThread,
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=64, pattern=id_cursor_pattern(IdPrefix.RUN))
    ] = None,
) -> ListOut[RunOut]:
    page = await services.runs.page(conn, user, thread.id, limit=limit, cursor=cursor)
    return ListOut(data=[RunOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{run_id}", responses=_ERRORS)
async def get_run(
    thread_id: str, run_id: str, user: DbUser, conn: DbConn, services: ServicesDep
) -> RunOut:
    run = await services.runs.get(conn, user, run_id)
    if run.thread_id != thread_id:
        raise NotFoundError("run", run_id)
    return RunOut.of(run)


@router.post("/{run_id}/cancel", responses=_ERRORS)
async def cancel_run(
    thread_id: str, run_id: str, user: CurrentUser, services: ServicesDep
) -> RunOut:
    """Cancel a queued run at once, or stop a running one promptly (`run_cancelled` follows).
    A finished run is returned unchanged."""
    return RunOut.of(await services.run_service.cancel(user, thread_id, run_id))
