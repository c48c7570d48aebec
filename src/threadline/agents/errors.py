"""Errors of the agent layer, by family (see `threadline.errors`).

Developer misuse (`ToolDefinitionError`, `AgentDefinitionError`) fails at declaration or
start-up. Run-ending errors (`MaxStepsExceededError`) end one run. Tool failures are neither:
they become tool results the model reads, so they have no class here.
"""

from __future__ import annotations

from threadline.errors import ThreadlineError


class ToolDefinitionError(ThreadlineError):
    """A tool cannot be built from this function (untyped parameter, `*args`, bad name...)."""

    code = "tool_definition_error"

    def __init__(self, message: str, *, tool_name: str | None = None) -> None:
        super().__init__(f"Tool {tool_name!r}: {message}" if tool_name else message)
        self.tool_name = tool_name


class AgentDefinitionError(ThreadlineError):
    """An agent declaration or registration that cannot work (bad name, duplicate...)."""

    code = "agent_definition_error"

    def __init__(self, message: str, *, agent: str | None = None) -> None:
        super().__init__(f"Agent {agent!r}: {message}" if agent else message)
        self.agent = agent


class UnknownAgentError(ThreadlineError):
    """No agent of that name is registered."""

    code = "agent_not_found"

    def __init__(self, agent: str) -> None:
        super().__init__(f"Agent {agent!r} not found")
        self.agent = agent


class MaxStepsExceededError(ThreadlineError):
    """The model was still asking for tools after the agent's last allowed step. Ends the run."""

    code = "max_steps_exceeded"

    def __init__(self, *, agent: str, max_steps: int) -> None:
        super().__init__(f"Agent {agent!r} did not finish within {max_steps} model steps")
        self.agent = agent
        self.max_steps = max_steps
