"""What an application hands to `create_app` (issue 7 item 1): its own agents, and a deps
factory that builds each run's `RunContext.deps` from the run, so its tools reach its own
resources with no module-level state. An agent's own `deps_factory` keeps precedence."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.conftest import TestUser, register_user
from tests.integration.test_runs_support import wait_until
from threadline.agents import Agent, RunContext, RunInfo, tool
from threadline.api.app import create_app

pytestmark = pytest.mark.integration


@dataclass
class Inventory:
    """An application resource (think: a connection pool), one per app."""

    stock: dict[str, int]
    asked_by: list[RunInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ShopDeps:
    inventory: Inventory
    user_id: str


# Named `calculator` so that the offline demo model calls them for an arithmetic question.
@tool(name="calculator")
async def count_stock(ctx: RunContext[ShopDeps], expression: str) -> str:
    """How many apples are in stock.

    Args:
        expression: Ignored.
    """
    return f"{ctx.deps.inventory.stock['apples']} apples for {ctx.deps.user_id}"


@tool(name="calculator")
async def own_deps(ctx: RunContext[str], expression: str) -> str:
    """Report the agent's own deps.

    Args:
        expression: Ignored.
    """
    return ctx.deps


def _shop_agents() -> list[Agent]:
    instructions = "Answer from the tools."
    return [
        Agent(name="shop", instructions=instructions, model="demo", tools=(count_stock,)),
        Agent(
            name="own",
            instructions=instructions,
            model="demo",
            tools=(own_deps,),
            deps_factory=lambda: "the agent's own",
        ),
    ]


async def test_tools_reach_the_applications_resources_through_deps(settings_factory) -> None:
    inventory = Inventory({"apples": 7})

    def deps(run: RunInfo) -> ShopDeps:
        inventory.asked_by.append(run)
        return ShopDeps(inventory, run.user.user_id)

    app = create_app(settings_factory(), agents=_shop_agents(), deps=deps)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            user = await register_user(client)
            agents = await client.get("/v1/agents", headers=user.headers)
            assert {"demo", "shop", "own"} <= {a["name"] for a in agents.json()["data"]}
            shop = await _run(client, user, "shop")
            own = await _run(client, user, "own")
    assert shop == f"7 apples for {user.id}"
    assert own == "the agent's own"  # the agent's deps_factory wins over the app's
    (asked,) = inventory.asked_by  # and the app's factory was not called for it
    assert (asked.user.user_id, asked.agent_name) == (user.id, "shop")
    assert asked.thread_id.startswith("thr_") and asked.run_id.startswith("run_")


async def _run(client: httpx.AsyncClient, user: TestUser, agent: str) -> str:
    """Run `agent` on a new thread; the content of its tool result."""
    thread = (await client.post("/v1/threads", json={}, headers=user.headers)).json()["id"]
    posted = await client.post(
        f"/v1/threads/{thread}/messages",
        json={"content": "what is 1+1?", "run": {"agent": agent}},
        headers=user.headers,
    )
    assert posted.status_code == 201, posted.text
    run_id = posted.json()["run"]["id"]

    async def finished() -> dict[str, object] | None:
        got = await client.get(f"/v1/threads/{thread}/runs/{run_id}", headers=user.headers)
        body: dict[str, object] = got.json()
        return body if body["status"] not in ("queued", "running") else None

    done = await wait_until(finished, what="the run to end")
    assert done["status"] == "completed", done
    messages = (await client.get(f"/v1/threads/{thread}/messages", headers=user.headers)).json()
    (result,) = [m["content"] for m in messages["data"] if m["role"] == "tool"]
    return str(result)
