"""A loopback webhook receiver for tests: verifies every delivery's Standard Webhooks signature
with the `standardwebhooks` library, can fail its first N requests or hold requests until
released, and counts deliveries by their idempotency key (`webhook-id`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Receiver:
    url: str = ""
    secret: str = ""
    fail_first: int = 0
    always_fail: bool = False
    hold: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    bad_signatures: int = 0
    by_id: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.hold.set()  # not holding

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        self.hold.wait(timeout=60)
        with self.lock:
            self.requests += 1
            if self.always_fail or self.requests <= self.fail_first:
                return 500
            try:
                payload = Webhook(self.secret).verify(body, headers)
            except Exception:
                self.bad_signatures += 1
                return 400
            self.by_id.setdefault(headers["webhook-id"], []).append(payload)
            return 204

    def events(self) -> list[dict[str, Any]]:
        """One payload per idempotency key (what a deduplicating receiver keeps)."""
        with self.lock:
            return [copies[0] for copies in self.by_id.values()]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
