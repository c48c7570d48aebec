"""The webhook tables: endpoints, the outbox of deliveries, the attempt log.

Invariants:
- `enqueue` runs in the caller's transaction, the one that records the event: the event and its
  deliveries commit together or not at all (a crash after the commit loses nothing).
- A delivery is claimed with a lease (`lease_owner`, `lease_expires_at`), like a run: on
  PostgreSQL with `FOR UPDATE SKIP LOCKED` so processes claim different rows; SQLite serializes
  writers. A process that dies holding a claim loses it when the lease expires and another
  delivers: at least once, and the delivery id (the `webhook-id` header) stays the same, so the
  receiver deduplicates.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.errors import InvalidInputError, NotFoundError
from threadline.ids import IdPrefix, new_id
from threadline.store.tables import webhook_attempts, webhook_deliveries, webhook_endpoints

JSONObject = dict[str, object]


class WebhookEvent(StrEnum):
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    APPROVAL_REQUESTED = "approval.requested"
    """Reserved: no run asks for approval yet."""
    THREAD_DELETED = "thread.deleted"
    TEST = "webhook.test"
    """Sent by `threadline admin webhooks test` to one endpoint, whatever it subscribes to."""


SUBSCRIBABLE = tuple(e.value for e in WebhookEvent if e is not WebhookEvent.TEST)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    url: str
    secret: str
    event_types: list[str]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    endpoint_id: str
    event_type: str
    payload: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    url: str = ""
    secret: str = ""


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(row.id, row.url, row.secret, list(row.event_types), row.created_at)


def _delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_type=row.event_type,
        payload=row.payload,
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        url=getattr(row, "url", ""),
        secret=getattr(row, "secret", ""),
    )


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"{url!r} is not an http(s) URL", code="invalid_url", field="url")
    return url


class WebhookStore:
    # --- endpoints (admin) ---

    async def add(
        self, conn: AsyncConnection, *, url: str, event_types: list[str], secret: str | None
    ) -> Endpoint:
        unknown = sorted(set(event_types) - set(SUBSCRIBABLE))
        if unknown or not event_types:
            raise InvalidInputError(
                f"Unknown event types {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(SUBSCRIBABLE)}",
                code="unknown_event_type",
            )
        endpoint = Endpoint(
            id=new_id(IdPrefix.WEBHOOK),
            url=check_url(url),
            secret=secret or new_secret(),
            event_types=sorted(set(event_types)),
            created_at=datetime.now(UTC),
        )
        await conn.execute(
            webhook_endpoints.insert().values(
                id=endpoint.id,
                url=endpoint.url,
                secret=endpoint.secret,
                event_types=endpoint.event_types,
                created_at=endpoint.created_at,
            )
        )
        return endpoint

    async def endpoints(self, conn: AsyncConnection) -> list[Endpoint]:
        query = sa.select(webhook_endpoints).order_by(webhook_endpoints.c.created_at)
        return [_endpoint(row) for row in (await conn.execute(query)).all()]

    async def remove(self, conn: AsyncConnection, endpoint_id: str) -> None:
        deleted = await conn.execute(
            webhook_endpoints.delete().where(webhook_endpoints.c.id == endpoint_id)
        )
        if deleted.rowcount == 0:
            raise NotFoundError("webhook", endpoint_id)

    # --- the outbox ---

    async def enqueue(
        self,
        conn: AsyncConnection,
        event_type: WebhookEvent,
        data: JSONObject,
        *,
        endpoint_id: str | None = None,
    ) -> list[str]:
        """One delivery per endpoint subscribed to `event_type` (or to `endpoint_id` only), in
        the caller's transaction. Returns the delivery ids."""
        endpoints = await self.endpoints(conn)
        targets = [
            e
            for e in endpoints
            if (e.id == endpoint_id if endpoint_id else event_type.value in e.event_types)
        ]
        if endpoint_id and not targets:
            raise NotFoundError("webhook", endpoint_id)
        now = datetime.now(UTC)
        ids = []
        for endpoint in targets:
            delivery_id = new_id(IdPrefix.WEBHOOK_DELIVERY)
            body = {"type": event_type.value, "timestamp": now.isoformat(), "data": data}
            await conn.execute(
                webhook_deliveries.insert().values(
                    id=delivery_id,
                    endpoint_id=endpoint.id,
                    event_type=event_type.value,
                    payload=json.dumps(body, separators=(",", ":"), default=str),
                    status=DeliveryStatus.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
            ids.append(delivery_id)
        return ids

    async def claim(
        self, conn: AsyncConnection, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Delivery]:
        now = datetime.now(UTC)
        due = (
            sa.select(webhook_deliveries.c.id)
            .where(
                webhook_deliveries.c.status == DeliveryStatus.PENDING.value,
                webhook_deliveries.c.next_attempt_at <= now,
                sa.or_(
                    webhook_deliveries.c.lease_expires_at.is_(None),
                    webhook_deliveries.c.lease_expires_at < now,
                ),
            )
            .order_by(webhook_deliveries.c.next_attempt_at)
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        ids = list((await conn.execute(due)).scalars())
        if not ids:
            return []
        await conn.execute(
            webhook_deliveries.update()
            .where(webhook_deliveries.c.id.in_(ids))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
        )
        query = (
            sa.select(webhook_deliveries, webhook_endpoints.c.url, webhook_endpoints.c.secret)
            .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
            .where(webhook_deliveries.c.id.in_(ids))
        )
        return [_delivery(row) for row in (await conn.execute(query)).all()]

    async def record_attempt(
        self,
        conn: AsyncConnection,
        delivery: Delivery,
        *,
        owner: str,
        status_code: int | None,
        error: str | None,
        duration_ms: int,
        retry_at: datetime | None,
    ) -> DeliveryStatus:
        """Log the attempt and settle the delivery: delivered, retried at `retry_at`, or dead
        (`retry_at` None after a failure). Conditional on still holding the lease."""
        now = datetime.now(UTC)
        attempt = delivery.attempts + 1
        await conn.execute(
            webhook_attempts.insert().values(
                delivery_id=delivery.id,
                attempt=attempt,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
                created_at=now,
            )
        )
        values: dict[str, object] = {"last_error": error}
        if error is None:
            status, values["delivered_at"] = DeliveryStatus.DELIVERED, now
        elif retry_at is None:
            status = DeliveryStatus.DEAD
        else:
            status, values["next_attempt_at"] = DeliveryStatus.PENDING, retry_at
        await conn.execute(
            webhook_deliveries.update()
            .where(
                webhook_deliveries.c.id == delivery.id, webhook_deliveries.c.lease_owner == owner
            )
            .values(
                status=status.value,
                attempts=attempt,
                lease_owner=None,
                lease_expires_at=None,
                **values,
            )
        )
        return status

    async def deliveries(
        self, conn: AsyncConnection, *, endpoint_id: str | None = None, limit: int = 20
    ) -> list[Delivery]:
        query = (
            sa.select(webhook_deliveries)
            .order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id.desc())
            .limit(limit)
        )
        if endpoint_id is not None:
            query = query.where(webhook_deliveries.c.endpoint_id == endpoint_id)
        return [_delivery(row) for row in (await conn.execute(query)).all()]
