"""The application factory. `create_app(settings)` is all a deployment needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from threadline.api import ws
from threadline.api.errors import install_error_handlers
from threadline.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from threadline.api.routes import agents, auth, events, health, messages, page, runs, threads
from threadline.api.services import open_services
from threadline.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings) as services:
            app.state.services = services
            yield

    app = FastAPI(
        title="Threadline",
        version="0.1.0",
        summary="Multi-user AI agent chat: threads, messages, runs and live events.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (auth, threads, messages, runs, events, agents, health, ws, page):
        app.include_router(module.router)
    # Outermost first in the stack: CORS must answer preflights before the size check runs.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=False,
        allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "If-Match",
            "Last-Event-ID",
            "X-Request-ID",
        ],
        expose_headers=["ETag", "Retry-After", "X-Request-ID"],
        max_age=600,
    )
    app.add_middleware(RequestIdMiddleware)
    return app
