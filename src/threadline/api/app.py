"""The application factory. `create_app(settings)` is all a deployment needs; an application
may hand in its own agents and per-run deps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from threadline.agents.context import DepsFactory
from threadline.api.errors import install_error_handlers
from threadline.api.live import sse, ws
from threadline.api.live.gateway import Gateway, settled_reader
from threadline.api.middleware import (
    BodySizeLimitMiddleware,
    LoneSurrogateMiddleware,
    RequestIdMiddleware,
)
from threadline.api.openapi import OptionsMiddleware, install_docs
from threadline.api.routes import agents as agent_routes
from threadline.api.routes import (
    agui,
    aisdk,
    auth,
    health,
    messages,
    page,
    runs,
    threads,
    usage,
)
from threadline.runtime import AgentsArg, open_runtime
from threadline.settings import Settings


def create_app(
    settings: Settings, *, agents: AgentsArg = None, deps: DepsFactory | None = None
) -> FastAPI:
    """The ASGI app. Its lifespan opens the runtime (`threadline.runtime`) and adds what is
    HTTP: the gateway that fans events out to this process's sockets.

    Args:
        settings: The configuration, built once by the caller.
        agents: Agents (or factories) offered besides the demo agent and `settings.agents`,
            or a ready `AgentRegistry` used as is.
        deps: Builds each run's `RunContext.deps` (for agents without a `deps_factory`), so
            the application can hand its own resources to its tools.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, agents=agents, deps=deps) as runtime:
            app.state.runtime = runtime
            gateway = Gateway(
                runtime.bus, runtime.metrics, reader=settled_reader(runtime.engine, runtime.events)
            )
            app.state.gateway = gateway
            try:
                yield
            finally:
                await gateway.aclose()

    app = FastAPI(
        title="Threadline",
        version="0.1.0",
        summary="Multi-user AI agent chat: threads, messages, runs and live events.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by install_docs
        redoc_url=None,  # ReDoc would load from a CDN
    )
    install_error_handlers(app)
    routers = (auth, threads, messages, runs, sse, agent_routes, health, ws, page, agui, aisdk)
    for module in (*routers, usage):
        app.include_router(module.router)
    install_docs(app)
    # Outermost first in the stack: CORS must answer preflights before OPTIONS and the size
    # check run; the size check bounds what the surrogate check reads.
    app.add_middleware(LoneSurrogateMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(OptionsMiddleware, routes=app.router.routes)
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
        expose_headers=["ETag", "Retry-After", "X-Request-ID", "x-vercel-ai-ui-message-stream"],
        max_age=600,
    )
    app.add_middleware(RequestIdMiddleware)
    return app
