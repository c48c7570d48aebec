"""The `Agent` declaration: a name, instructions, a model and tools.

An agent is immutable configuration. Everything a run may change lives elsewhere: the
conversation in the store, and per-run state in the `deps` that `deps_factory` builds fresh
for every run (a tool reaches them through `RunContext.deps`). That is what lets one declared
agent serve many users' runs at once without sharing state between them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from threadline.agents.errors import AgentDefinitionError, ToolDefinitionError
from threadline.agents.tools import DEFAULT_TOOL_TIMEOUT_SECONDS, Tool
from threadline.llm.types import ToolSpec

_AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Agent:
    """An LLM with instructions and tools. Declare once; the registry builds one per run."""

    name: str
    """Lower-case id used in the API (`^[a-z0-9][a-z0-9_-]{0,63}$`)."""
    instructions: str
    model: str
    """`provider:model` (`openai:gpt-4o-mini`, `anthropic:claude-sonnet-4-5`) or `demo`."""
    tools: tuple[Tool, ...] = ()
    description: str = ""
    max_steps: int = 8
    """Model calls allowed per run; a run still asking for tools after the last one fails."""
    tool_timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS
    """Deadline of one tool call, unless the tool declares its own."""
    history_window: int = 50
    """How many past thread messages a run sends to the model."""
    deps_factory: Callable[[], object] | None = field(default=None, compare=False)
    """Builds the run's `RunContext.deps`; called once per run so no run sees another's."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _AGENT_NAME.match(self.name):
            raise AgentDefinitionError(
                "name must match ^[a-z0-9][a-z0-9_-]{0,63}$", agent=str(self.name)
            )
        if not self.model.strip():
            raise AgentDefinitionError("model is required", agent=self.name)
        for setting in ("max_steps", "history_window"):
            value = getattr(self, setting)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AgentDefinitionError(f"{setting} must be a positive integer", agent=self.name)
        if not self.tool_timeout_seconds > 0:
            raise AgentDefinitionError("tool_timeout_seconds must be positive", agent=self.name)
        # Accept a list at run time too, but store a tuple so the agent stays immutable.
        object.__setattr__(self, "tools", tuple(self.tools))
        _check_tools(self.name, self.tools)

    @classmethod
    def create(
        cls,
        name: str,
        *,
        instructions: str,
        model: str,
        tools: Iterable[Tool | Callable[..., object]] = (),
        description: str = "",
        max_steps: int = 8,
        tool_timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS,
        history_window: int = 50,
        deps_factory: Callable[[], object] | None = None,
    ) -> Agent:
        """Build an agent from any iterable of tools; plain functions are wrapped as tools."""
        return cls(
            name=name,
            instructions=instructions,
            model=model,
            tools=tuple(t if isinstance(t, Tool) else Tool.from_function(t) for t in tools),
            description=description,
            max_steps=max_steps,
            tool_timeout_seconds=tool_timeout_seconds,
            history_window=history_window,
            deps_factory=deps_factory,
        )

    @property
    def tool_specs(self) -> tuple[ToolSpec, ...]:
        return tuple(t.spec for t in self.tools)

    def get_tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def new_deps(self) -> object:
        """Fresh dependencies for one run (`None` without a `deps_factory`)."""
        return None if self.deps_factory is None else self.deps_factory()


def _check_tools(agent: str, tools: tuple[object, ...]) -> None:
    seen: set[str] = set()
    for item in tools:
        if not isinstance(item, Tool):
            raise ToolDefinitionError(
                f"agent {agent!r}: {item!r} is not a Tool; decorate it with @tool "
                "or use Agent.create"
            )
        if item.name in seen:
            raise ToolDefinitionError(f"agent {agent!r} declares it twice", tool_name=item.name)
        seen.add(item.name)
