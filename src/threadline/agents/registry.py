"""The agent registry: which agents a server offers, and a fresh instance of one per run.

An ordinary object built by the entry point and passed down; there is no process-wide
registry, so two apps (or two tests) in one process never see each other's agents.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import cast

from threadline.agents.agent import Agent
from threadline.agents.errors import AgentDefinitionError, UnknownAgentError
from threadline.errors import ConfigurationError
from threadline.llm.types import ToolSpec

__all__ = ["AgentFactory", "AgentInfo", "AgentRegistry", "UnknownAgentError"]

AgentFactory = Callable[[], Agent]


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What `GET /v1/agents` shows of an agent."""

    name: str
    description: str
    model: str
    tools: tuple[ToolSpec, ...]


@dataclass(frozen=True, slots=True)
class _Entry:
    source: Agent | AgentFactory
    info: AgentInfo


class AgentRegistry:
    """Agents by name. `build` gives every run its own instance."""

    def __init__(self, agents: Iterable[Agent | AgentFactory] = ()) -> None:
        self._entries: dict[str, _Entry] = {}
        for agent in agents:
            self.register(agent)

    def register(self, agent: Agent | AgentFactory, *, replace: bool = False) -> Agent:
        """Add an agent, or a factory that returns one; return the agent as registered.

        A factory is called once here, to learn the agent's name and to fail at start-up
        rather than on the first run; after that it is called again for every run.
        Registering a second agent under a taken name raises unless `replace` is true.
        """
        sample = agent if isinstance(agent, Agent) else _call_factory(agent)
        if sample.name in self._entries and not replace:
            raise AgentDefinitionError(
                "an agent of that name is already registered", agent=sample.name
            )
        info = AgentInfo(sample.name, sample.description, sample.model, sample.tool_specs)
        self._entries[sample.name] = _Entry(agent, info)
        return sample

    def get(self, name: str) -> Agent:
        """The agent as registered (a new one for factories); raise `UnknownAgentError`."""
        return self.build(name)

    def build(self, name: str) -> Agent:
        """A fresh instance of agent `name` for one run; raise `UnknownAgentError`."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAgentError(name)
        if isinstance(entry.source, Agent):
            # Agents are frozen and their tools immutable, so a shallow copy shares nothing
            # a run can change; per-run state comes from `Agent.new_deps()`.
            return dataclasses.replace(entry.source)
        built = _call_factory(entry.source)
        if built.name != name:
            raise AgentDefinitionError(
                f"factory registered as {name!r} now returns {built.name!r}", agent=name
            )
        return built

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[AgentInfo]:
        return [self._entries[name].info for name in self.names()]

    def load_module(self, dotted_path: str) -> list[str]:
        """Import a module and register the agents it exposes; return their names.

        The module either lists them in an `agents` attribute (agents or factories), or
        defines them as module-level `Agent` instances. Backs `threadline serve --agents`.
        """
        module = _import(dotted_path)
        found = _agents_in(module)
        if not found:
            raise ConfigurationError(
                "agents", f"module {dotted_path!r} defines no Agent (nor an `agents` list)"
            )
        return [self.register(agent).name for agent in found]


def _import(dotted_path: str) -> ModuleType:
    try:
        return importlib.import_module(dotted_path)
    except ImportError as exc:
        raise ConfigurationError("agents", f"cannot import {dotted_path!r}: {exc}") from exc


def _agents_in(module: ModuleType) -> list[Agent | AgentFactory]:
    declared = getattr(module, "agents", None)
    if declared is None or isinstance(declared, ModuleType):  # a package's `agents` submodule
        return [value for value in vars(module).values() if isinstance(value, Agent)]
    if isinstance(declared, Agent) or callable(declared) or not isinstance(declared, Iterable):
        raise ConfigurationError("agents", f"{module.__name__}.agents must be a list of agents")
    items: list[Agent | AgentFactory] = []
    for item in declared:
        if not isinstance(item, Agent) and not callable(item):
            raise ConfigurationError(
                "agents", f"{module.__name__}.agents holds {item!r}, not an Agent or factory"
            )
        # A callable's return type cannot be checked before calling it; `register` does.
        items.append(cast(Agent | AgentFactory, item))
    return items


def _call_factory(factory: AgentFactory) -> Agent:
    if not callable(factory):
        raise AgentDefinitionError(f"{factory!r} is neither an Agent nor a factory of one")
    agent = factory()
    if not isinstance(agent, Agent):
        raise AgentDefinitionError(f"factory {factory!r} returned {agent!r}, not an Agent")
    return agent
