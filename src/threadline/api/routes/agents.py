from __future__ import annotations

from fastapi import APIRouter

from threadline.api.deps import CurrentUser, ServicesDep
from threadline.api.schemas import AgentOut, ListOut, ToolOut

router = APIRouter(prefix="/v1/agents", tags=["agents"])


@router.get("")
async def list_agents(_user: CurrentUser, services: ServicesDep) -> ListOut[AgentOut]:
    agents = [
        AgentOut(
            name=info.name,
            description=info.description,
            model=info.model,
            tools=[
                ToolOut(name=t.name, description=t.description, parameters=t.parameters)
                for t in info.tools
            ],
        )
        for info in services.registry.describe()
    ]
    return ListOut(data=agents, next_cursor=None)
