"""Everything a Threadline process holds below HTTP, built once from the settings and closed in
reverse: the database engine, Redis, the event bus, the stores, auth, the rate limiter, the
providers, the agent registry, the run service, the execution engine and the worker.

`threadline serve` opens it and adds the HTTP parts (the gateway, sockets) in the app's
lifespan; `threadline worker` opens it with the worker on and builds nothing of HTTP. Two
runtimes (two apps in one test process) share no object.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.agents.agent import Agent
from threadline.agents.context import DepsFactory
from threadline.agents.demo import demo_agent
from threadline.agents.registry import AgentFactory, AgentRegistry
from threadline.auth.oidc import ExternalIdentity
from threadline.auth.passwords import Passwords
from threadline.auth.revocation import (
    DatabaseRevocationList,
    RedisRevocationList,
    RevocationList,
)
from threadline.auth.service import AuthService
from threadline.auth.service_keys import ServiceKeyAuth, ServiceKeyStore
from threadline.auth.tokens import TokenCodec
from threadline.errors import ConfigurationError
from threadline.events.bus import EventBus, MemoryBus
from threadline.events.publisher import EventPublisher
from threadline.events.redis_bus import RedisBus, RedisBusConfig
from threadline.llm.demo import DemoProvider
from threadline.llm.providers import ANTHROPIC, DEMO, OPENAI, ProviderSet, build_providers
from threadline.metrics import Metrics
from threadline.plans import PlanBook, PlanLimits
from threadline.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from threadline.runs.engine import EngineConfig, ExecutionEngine
from threadline.runs.outcomes import RunFinisher
from threadline.runs.service import RunService
from threadline.runs.worker import Worker, WorkerConfig
from threadline.settings import Settings
from threadline.store.accounts import AccountStore
from threadline.store.counting import count_statements
from threadline.store.db import create_engine
from threadline.store.events import EventStore
from threadline.store.messages import MessageStore
from threadline.store.migrate import ensure_schema_current, upgrade_to_head
from threadline.store.queue import RunQueue
from threadline.store.runs import RunStore
from threadline.store.threads import ThreadStore
from threadline.store.users import UserStore
from threadline.store.wakeup import PostgresRunWaker
from threadline.threads_service import ThreadService
from threadline.usage.quotas import Quotas
from threadline.usage.store import UsageStore
from threadline.webhooks.deliverer import DelivererConfig, WebhookDeliverer
from threadline.webhooks.store import WebhookStore

logger = logging.getLogger(__name__)
_REDIS_TIMEOUT_SECONDS = 5.0

AgentsArg = AgentRegistry | Iterable[Agent | AgentFactory] | None
"""What an application may hand in: a ready registry (used as is), or agents added to the
built-in demo agent and the modules of `settings.agents`."""


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    redis: Redis | None
    users: UserStore
    threads: ThreadStore
    messages: MessageStore
    runs: RunStore
    queue: RunQueue
    events: EventStore
    auth: AuthService
    limiter: RateLimiter
    metrics: Metrics
    bus: EventBus
    publisher: EventPublisher
    registry: AgentRegistry
    providers: ProviderSet
    thread_service: ThreadService
    run_service: RunService
    execution: ExecutionEngine
    worker: Worker | None
    accounts: AccountStore
    usage: UsageStore
    quotas: Quotas
    service_keys: ServiceKeyStore
    external: ExternalIdentity | None
    webhooks: WebhookStore
    deliverer: WebhookDeliverer | None


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    agents: AgentsArg = None,
    deps: DepsFactory | None = None,
    worker: bool | None = None,
) -> AsyncIterator[Runtime]:
    """Build everything, run the worker if enabled (`worker`, by default
    `settings.embedded_worker`), and close it all in reverse."""
    registry = check_agents(settings, agents)
    async with AsyncExitStack() as stack:
        engine = create_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
            statement_timeout_seconds=settings.database_statement_timeout_seconds,
            pool_timeout_seconds=settings.database_pool_timeout_seconds,
        )
        stack.push_async_callback(engine.dispose)
        if settings.is_sqlite:
            await upgrade_to_head(engine)
        else:
            await ensure_schema_current(engine)
        redis = await _connect_redis(settings.redis_url) if settings.redis_url else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        bus = _build_bus(settings, redis)
        stack.push_async_callback(bus.aclose)
        with_worker = settings.embedded_worker if worker is None else worker
        runtime = _assemble(
            settings, engine, redis, bus, registry=registry, deps=deps, with_worker=with_worker
        )
        stack.push_async_callback(runtime.providers.aclose)
        if runtime.external is not None:
            stack.push_async_callback(runtime.external.aclose)
        if runtime.worker is None and runtime.deliverer is None:
            yield runtime
            return
        async with asyncio.TaskGroup() as group:
            for task in (runtime.worker, runtime.deliverer):
                if task is not None:
                    group.create_task(task.run())
            try:
                yield runtime
            finally:
                if runtime.deliverer is not None:
                    await runtime.deliverer.stop()
                if runtime.worker is not None:
                    await runtime.worker.stop()


def _build_bus(settings: Settings, redis: Redis | None) -> EventBus:
    """The one place that chooses the event bus. Every process of a deployment must choose the
    same one: with several processes that is Redis, so a run executed by one worker reaches
    sockets held by any API process. The Redis bus (whenever `THREADLINE_REDIS_URL` is set)
    keeps its own connections: a bounded pool and one per reader, see `events/redis_bus.py`."""
    if settings.redis_url is None:
        return MemoryBus()
    bus = RedisBus(
        settings.redis_url,
        config=RedisBusConfig(
            prefix=settings.redis_prefix,
            max_len=settings.redis_stream_max_len,
            ttl_seconds=settings.redis_stream_ttl_seconds,
            readers=settings.redis_readers,
            keys_per_read=settings.redis_keys_per_read,
            timeout_seconds=settings.redis_timeout_seconds,
        ),
    )
    bus.start()
    return bus


def resolve_secret(settings: Settings) -> str:
    """The token-signing key: configured, or (outside production) kept in `data_dir` so tokens
    survive a restart of the embedded server."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    if settings.environment == "production":  # settings already refuse this; belt and braces
        raise ConfigurationError("THREADLINE_SECRET_KEY", "is required in production")
    path = Path(settings.data_dir) / "secret_key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    logger.info("Generated a token-signing key in %s", path)
    return secret


async def check_redis(settings: Settings) -> None:
    """Raise `ConfigurationError` (one line) if `THREADLINE_REDIS_URL` does not answer."""
    if settings.redis_url is not None:
        await (await _connect_redis(settings.redis_url)).aclose()


async def _connect_redis(url: str) -> Redis:
    # `socket_timeout=None` (redis-py's default is 5 s): every user of this client bounds its
    # own calls with `asyncio.timeout` (the rate limiter, the revocation list, /readyz), and a
    # socket timeout would add a task per command (`events/redis_bus.py` says more).
    redis = Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_SECONDS):
            await redis.ping()
    except (OSError, TimeoutError, Exception) as exc:
        await redis.aclose()
        raise ConfigurationError("THREADLINE_REDIS_URL", f"cannot reach Redis: {exc}") from exc
    return redis


def build_registry(settings: Settings, agents: AgentsArg = None) -> AgentRegistry:
    """The built-in demo agent (on `default_model`), every agent of `settings.agents`, and
    `agents`; or `agents` itself when it is a registry."""
    if isinstance(agents, AgentRegistry):
        return agents
    registry = AgentRegistry([replace(demo_agent(), model=settings.default_model)])
    for module in settings.agents:
        registry.load_module(module)
    for agent in agents or ():
        registry.register(agent)
    return registry


def build_provider_set(settings: Settings) -> ProviderSet:
    anthropic_key = settings.anthropic_api_key
    return build_providers(
        openai_api_key=_openai_key(settings),
        openai_base_url=settings.openai_base_url,
        anthropic_api_key=anthropic_key.get_secret_value() if anthropic_key else None,
        anthropic_base_url=settings.anthropic_base_url,
        demo=DemoProvider(delay_seconds=settings.demo_delay_seconds),
    )


def check_agents(settings: Settings, agents: AgentsArg = None) -> AgentRegistry:
    """Load the agents and check each one's model has a configured provider: a missing key is
    a start-up error naming the variable, not a failed run later."""
    registry = build_registry(settings, agents)
    # Stand-ins named like the configured providers: resolving needs only the names, and real
    # SDK clients would need closing.
    configured = {DEMO: True, OPENAI: _openai_key(settings) is not None}
    configured[ANTHROPIC] = settings.anthropic_api_key is not None
    stand_ins = ProviderSet({name: DemoProvider() for name, on in configured.items() if on})
    for info in registry.describe():
        stand_ins.resolve(info.model)
    return registry


def _openai_key(settings: Settings) -> str | None:
    if settings.openai_api_key is not None:
        return settings.openai_api_key.get_secret_value()
    # Local OpenAI-compatible servers (vLLM, Ollama, llama.cpp) take any key.
    return "not-needed" if settings.openai_base_url else None


def _assemble(
    settings: Settings,
    engine: AsyncEngine,
    redis: Redis | None,
    bus: EventBus,
    *,
    registry: AgentRegistry,
    deps: DepsFactory | None,
    with_worker: bool,
) -> Runtime:
    revocations: RevocationList = (
        RedisRevocationList(
            redis, prefix=settings.redis_prefix, timeout_seconds=settings.redis_timeout_seconds
        )
        if redis is not None
        else DatabaseRevocationList(engine)
    )
    limiter: RateLimiter = (
        RedisRateLimiter(
            redis, prefix=settings.redis_prefix, timeout_seconds=settings.redis_timeout_seconds
        )
        if redis is not None
        else MemoryRateLimiter()
    )
    users = UserStore()
    threads = ThreadStore(max_metadata_bytes=settings.max_metadata_bytes)
    messages = MessageStore(
        max_message_chars=settings.max_message_chars,
        max_metadata_bytes=settings.max_metadata_bytes,
    )
    plans = build_plans(settings)
    runs, events, metrics = RunStore(), EventStore(), Metrics()
    if settings.debug_count_statements:
        count_statements(engine, metrics.registry)
    queue = RunQueue(
        plan_limits={name: p.concurrent_runs for name, p in settings.plans.items()},
        # Users on no plan and no default plan: the claim's own (deployment-wide) limit.
        default_limit=(
            settings.plans[settings.default_plan].concurrent_runs if settings.default_plan else None
        ),
    )
    accounts, usage, service_keys = AccountStore(), UsageStore(), ServiceKeyStore()
    webhooks = WebhookStore()
    quotas = Quotas(
        engine=engine, plans=plans, accounts=accounts, usage=usage, runs=runs, limiter=limiter
    )
    publisher = EventPublisher(bus=bus, store=events, engine=engine)
    finisher = RunFinisher(
        queue=queue,
        messages=messages,
        publisher=publisher,
        metrics=metrics,
        usage=usage,
        webhooks=webhooks,
    )
    providers = build_provider_set(settings)
    execution = ExecutionEngine(
        db=engine,
        registry=registry,
        providers=providers,
        publisher=publisher,
        messages=messages,
        queue=queue,
        finisher=finisher,
        metrics=metrics,
        deps=deps,
        config=EngineConfig(
            run_timeout_seconds=settings.run_timeout_seconds,
            per_user_concurrency=settings.max_concurrent_runs_per_user,
        ),
        quotas=quotas,
    )
    worker = (
        Worker(
            execution,
            db=engine,
            queue=queue,
            finisher=finisher,
            bus=bus,
            config=WorkerConfig(
                concurrency=settings.worker_concurrency,
                poll_seconds=settings.worker_poll_seconds,
                heartbeat_seconds=max(settings.run_lease_seconds / 4, 0.5),
                grace_seconds=settings.shutdown_grace_seconds,
                lease_seconds=settings.run_lease_seconds,
                per_user_limit=settings.max_concurrent_runs_per_user,
            ),
            # Embedded SQLite: one process, woken by `notify()` alone.
            waker=None
            if settings.is_sqlite
            else PostgresRunWaker(
                settings.database_url,
                connect_timeout_seconds=settings.database_connect_timeout_seconds,
            ),
        )
        if with_worker
        else None
    )
    run_service = RunService(
        db=engine,
        threads=threads,
        messages=messages,
        runs=runs,
        registry=registry,
        publisher=publisher,
        bus=bus,
        max_attempts=settings.run_max_attempts,
        max_active_per_user=settings.max_active_runs_per_user,
        finisher=finisher,
        worker=worker,
        quotas=quotas,
    )
    external = (
        ExternalIdentity(settings.oidc_issuers, engine=engine, accounts=accounts, plans=plans)
        if settings.oidc_issuers
        else None
    )
    auth = AuthService(
        engine=engine,
        users=users,
        passwords=Passwords(
            time_cost=settings.password_time_cost, memory_kib=settings.password_memory_kib
        ),
        tokens=TokenCodec(resolve_secret(settings), ttl_seconds=settings.token_ttl_seconds),
        revocations=revocations,
        external=external,
        service_keys=ServiceKeyAuth(engine=engine, keys=service_keys, accounts=accounts),
        password_auth=settings.password_auth,
    )
    return Runtime(
        settings=settings,
        engine=engine,
        redis=redis,
        users=users,
        threads=threads,
        messages=messages,
        runs=runs,
        queue=queue,
        events=events,
        auth=auth,
        limiter=limiter,
        metrics=metrics,
        bus=bus,
        publisher=publisher,
        registry=registry,
        providers=providers,
        thread_service=ThreadService(
            threads=threads,
            events=events,
            publisher=publisher,
            runs=run_service,
            quotas=quotas,
            webhooks=webhooks,
        ),
        run_service=run_service,
        execution=execution,
        worker=worker,
        accounts=accounts,
        usage=usage,
        quotas=quotas,
        service_keys=service_keys,
        external=external,
        webhooks=webhooks,
        deliverer=_deliverer(settings, engine, webhooks),
    )


def _deliverer(
    settings: Settings, engine: AsyncEngine, webhooks: WebhookStore
) -> WebhookDeliverer | None:
    if not settings.webhook_delivery:
        return None
    config = DelivererConfig(
        poll_seconds=settings.webhook_poll_seconds,
        timeout_seconds=settings.webhook_timeout_seconds,
        max_attempts=settings.webhook_max_attempts,
        retry_base_seconds=settings.webhook_retry_base_seconds,
    )
    return WebhookDeliverer(engine=engine, store=webhooks, config=config)


def build_plans(settings: Settings) -> PlanBook:
    """The configured plans; users on none keep the deployment-wide limits."""
    fallback = PlanLimits(
        messages_per_minute=settings.messages_per_minute,
        concurrent_runs=settings.max_concurrent_runs_per_user,
        active_runs=settings.max_active_runs_per_user,
    )
    return PlanBook(settings.plans, default_plan=settings.default_plan, fallback=fallback)
