"""The background deliverer: claims due deliveries from the outbox, signs them (Standard
Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`), POSTs them, and settles each.

It runs as a task of the runtime, apart from runs: a slow or failing receiver only delays its own
deliveries (each POST has a deadline), never a run, whose transaction only inserted outbox rows.
A failed attempt is retried after `retry_base_seconds * 2**(attempt-1)` (capped at an hour);
after `max_attempts` the delivery is dead and stays in the log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from threadline.webhooks.store import Delivery, WebhookStore

logger = logging.getLogger(__name__)
_MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class DelivererConfig:
    poll_seconds: float = 1.0
    timeout_seconds: float = 10.0
    max_attempts: int = 8
    retry_base_seconds: float = 2.0
    batch_size: int = 32


class WebhookDeliverer:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        store: WebhookStore,
        config: DelivererConfig,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._config = config
        self._http = http or httpx.AsyncClient(follow_redirects=False)
        self._owner = f"webhooks-{secrets.token_hex(6)}"
        self._wake = asyncio.Event()
        self._stopping = False

    def notify(self) -> None:
        """Look for due deliveries now (after a commit that enqueued some)."""
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._stopping:
                try:
                    delivered = await self.deliver_due()
                except Exception:
                    logger.exception("Webhook delivery round failed")
                    delivered = 0
                if delivered:
                    continue  # a full batch may have more behind it
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._config.poll_seconds):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            await self._http.aclose()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def deliver_due(self) -> int:
        """Claim and attempt one batch; returns how many were attempted."""
        lease = self._config.timeout_seconds + 30
        async with self._engine.begin() as conn:
            batch = await self._store.claim(
                conn, owner=self._owner, lease_seconds=lease, limit=self._config.batch_size
            )
        async with asyncio.TaskGroup() as group:
            for delivery in batch:
                group.create_task(self._attempt(delivery))
        return len(batch)

    async def _attempt(self, delivery: Delivery) -> None:
        started = time.monotonic()
        status_code, error = await self._post(delivery)
        duration_ms = int((time.monotonic() - started) * 1000)
        retry_at = None
        if error is not None and delivery.attempts + 1 < self._config.max_attempts:
            delay = self._config.retry_base_seconds * 2**delivery.attempts
            retry_at = datetime.now(UTC) + timedelta(seconds=min(delay, _MAX_BACKOFF_SECONDS))
        async with self._engine.begin() as conn:
            status = await self._store.record_attempt(
                conn,
                delivery,
                owner=self._owner,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
                retry_at=retry_at,
            )
        if error is not None:
            logger.info(
                "Webhook %s to %s failed (attempt %d): %s; now %s",
                delivery.id,
                delivery.url,
                delivery.attempts + 1,
                error,
                status.value,
            )

    async def _post(self, delivery: Delivery) -> tuple[int | None, str | None]:
        timestamp = datetime.now(UTC)
        signature = Webhook(delivery.secret).sign(delivery.id, timestamp, delivery.payload)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signature,
        }
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                response = await self._http.post(
                    delivery.url, content=delivery.payload.encode(), headers=headers
                )
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"
