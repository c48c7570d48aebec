from __future__ import annotations

import json
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from threadline.api.deps import DbConn, DbUser, OwnedThread, ServicesDep, Transaction
from threadline.api.schemas import ErrorOut, ListOut, ThreadCreate, ThreadOut, ThreadUpdate
from threadline.errors import InvalidInputError
from threadline.ids import IdPrefix
from threadline.store.pagination import MAX_PAGE_SIZE, time_id_cursor_pattern
from threadline.store.threads import UNSET, JSONObject, ThreadChanges, ThreadFilter, ThreadStatus

router = APIRouter(prefix="/v1/threads", tags=["threads"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


def _etag(version: int) -> str:
    return f'"{version}"'


# What the OpenAPI document promises for If-Match: `*`, or a version as ETag gives it.
IF_MATCH_PATTERN = r'^ *(\*|(W/)?"?[0-9]{1,9}"?) *$'


def _parse_if_match(value: str | None) -> int | None:
    if value is None or value.strip() == "*":
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    if re.fullmatch("[0-9]{1,9}", raw) is None:
        raise InvalidInputError(
            'If-Match must be a thread version as returned in ETag, e.g. "3"',
            code="invalid_if_match",
        )
    return int(raw)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_metadata_filter(value: str | None) -> JSONObject | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidInputError(
            'metadata must be a JSON object, e.g. {"project":"apollo"}',
            code="invalid_metadata_filter",
        ) from exc
    if not isinstance(parsed, dict):
        raise InvalidInputError("metadata must be a JSON object", code="invalid_metadata_filter")
    return parsed


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def create_thread(
    body: ThreadCreate, tx: Transaction, services: ServicesDep, response: Response
) -> ThreadOut:
    thread = await services.thread_service.create(
        tx.conn, tx.user, title=body.title, metadata=dict(body.metadata), standing=tx.standing
    )
    response.headers["ETag"] = _etag(thread.version)
    return ThreadOut.of(thread)


@router.get("", responses=_ERRORS)
async def list_threads(
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    status_filter: Annotated[ThreadStatus | None, Query(alias="status")] = None,
    metadata: Annotated[
        str | None, Query(description="JSON object the metadata must contain")
    ] = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200, description="Text search")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    cursor: Annotated[
        str | None,
        Query(max_length=64, pattern=time_id_cursor_pattern(IdPrefix.THREAD)),
    ] = None,
) -> ListOut[ThreadOut]:
    filters = ThreadFilter(status=status_filter, metadata=_parse_metadata_filter(metadata), query=q)
    page = await services.threads.page(conn, user, filters=filters, limit=limit, cursor=cursor)
    return ListOut(data=[ThreadOut.of(t) for t in page.items], next_cursor=page.next_cursor)


@router.get("/{thread_id}", responses=_ERRORS)
async def get_thread(thread: OwnedThread, response: Response) -> ThreadOut:
    response.headers["ETag"] = _etag(thread.version)
    return ThreadOut.of(thread)


@router.patch("/{thread_id}", responses={**_ERRORS, 409: {"model": ErrorOut}})
async def update_thread(
    thread_id: str,
    body: ThreadUpdate,
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    response: Response,
    if_match: Annotated[str | None, Header(max_length=64, pattern=IF_MATCH_PATTERN)] = None,
) -> ThreadOut:
    given = body.model_fields_set
    changes = ThreadChanges(
        title=body.title if "title" in given else UNSET,
        metadata_patch=dict(body.metadata) if body.metadata is not None else UNSET,
        status=body.status if body.status is not None else UNSET,
    )
    thread = await services.thread_service.update(
        conn, user, thread_id, changes, expected_version=_parse_if_match(if_match)
    )
    response.headers["ETag"] = _etag(thread.version)
    return ThreadOut.of(thread)


@router.delete(
    "/{thread_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ERRORS,
    summary="Archive a thread, or delete it for good with ?permanent=true",
)
async def delete_thread(
    thread_id: str,
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    permanent: Annotated[
        bool,
        Query(
            description="`false` (the default): archive, a soft delete. `true`: remove the "
            "thread with its messages, runs and events, for good."
        ),
    ] = False,
) -> Response:
    """Two deletes, both answered 204:

    - **Archive** (the default, a soft delete): the thread stays, with `status: "archived"`
      and all its history; `GET` still finds it, `?status=archived` lists it, and
      `PATCH {"status": "active"}` restores it. Subscribers get `thread_updated`.
    - **Permanent** (`?permanent=true`): the thread, its messages, runs and events are
      removed; every later request for it is a 404. Subscribers get `thread_deleted`, and
      an SSE stream of the thread ends after it.

    Either way, a queued or running run of the thread is cancelled first, with its
    `run_cancelled` event (reason `thread_archived` or `thread_deleted`).
    """
    if permanent:
        await services.thread_service.delete(conn, user, thread_id)
    else:
        await services.thread_service.archive(conn, user, thread_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
