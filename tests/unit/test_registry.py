"""Agents and the registry: validation, fresh instances per run, loading from a module."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from threadline.agents import Agent, AgentRegistry, tool
from threadline.agents.demo import demo_agent
from threadline.agents.errors import AgentDefinitionError, ToolDefinitionError, UnknownAgentError
from threadline.errors import ConfigurationError, ThreadlineError

pytestmark = pytest.mark.unit


@tool
def ping() -> str:
    """Answer pong."""
    return "pong"


def helper(name: str = "helper", **options: object) -> Agent:
    return Agent.create(name, instructions="Help.", model="demo", tools=[ping], **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "has space", "x" * 65, "dot.ted"])
def test_agent_names_are_validated(name: str) -> None:
    with pytest.raises(AgentDefinitionError):
        helper(name)


@pytest.mark.parametrize(
    "options", [{"max_steps": 0}, {"history_window": -1}, {"tool_timeout_seconds": 0}]
)
def test_agent_limits_are_validated(options: dict[str, object]) -> None:
    with pytest.raises(AgentDefinitionError):
        helper(**options)


def test_duplicate_tool_names_are_refused() -> None:
    other = tool(name="ping")(lambda: "again")
    with pytest.raises(ToolDefinitionError):
        Agent.create("dup", instructions="", model="demo", tools=[ping, other])


def test_create_accepts_plain_functions_and_any_iterable() -> None:
    def echo(text: str) -> str:
        """Say it back."""
        return text

    agent = Agent.create("echoer", instructions="", model="demo", tools=iter([echo, ping]))
    assert [t.name for t in agent.tools] == ["echo", "ping"]
    assert isinstance(agent.tools, tuple)
    assert agent.get_tool("echo") is not None and agent.get_tool("nope") is None


def test_deps_are_fresh_for_every_run() -> None:
    agent = helper(deps_factory=dict)
    first, second = agent.new_deps(), agent.new_deps()
    assert first == {} and first is not second
    assert helper().new_deps() is None


def test_registered_instances_are_copied_per_build() -> None:
    original = helper()
    registry = AgentRegistry([original])
    built, again = registry.build("helper"), registry.build("helper")
    assert built == original and built is not original and built is not again
    assert registry.get("helper") == original


def test_factories_are_called_for_every_build() -> None:
    calls = 0

    def factory() -> Agent:
        nonlocal calls
        calls += 1
        return helper()

    registry = AgentRegistry()
    registry.register(factory)
    assert calls == 1  # once at registration, to fail early and learn the name
    assert registry.build("helper") is not registry.build("helper")
    assert calls == 3


def test_a_factory_that_changes_its_agent_name_is_an_error() -> None:
    names = iter(["helper", "other"])
    registry = AgentRegistry([lambda: helper(next(names))])
    with pytest.raises(AgentDefinitionError):
        registry.build("helper")


def test_a_factory_must_return_an_agent() -> None:
    with pytest.raises(AgentDefinitionError):
        AgentRegistry().register(lambda: "not an agent")  # type: ignore[arg-type,return-value]


def test_unknown_agents_raise_a_coded_error() -> None:
    with pytest.raises(UnknownAgentError) as info:
        AgentRegistry().get("missing")
    assert isinstance(info.value, ThreadlineError)
    assert (info.value.code, info.value.agent) == ("agent_not_found", "missing")


def test_names_are_unique_unless_replaced() -> None:
    registry = AgentRegistry([helper()])
    with pytest.raises(AgentDefinitionError):
        registry.register(helper())
    registry.register(helper(description="newer"), replace=True)
    assert registry.build("helper").description == "newer"


def test_describe_lists_agents_by_name() -> None:
    registry = AgentRegistry([helper("zeta", description="Last."), demo_agent])
    assert registry.names() == ["demo", "zeta"]
    assert "demo" in registry and "nope" not in registry
    demo, zeta = registry.describe()
    assert (zeta.name, zeta.description, zeta.model) == ("zeta", "Last.", "demo")
    assert [spec.name for spec in zeta.tools] == ["ping"]
    assert [spec.name for spec in demo.tools] == ["calculator", "clock"]


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write_module(directory: Path, body: str) -> str:
    name = f"agents_{uuid.uuid4().hex}"
    (directory / f"{name}.py").write_text(
        "from threadline.agents import Agent\n"
        "from threadline.agents.demo import calculator, demo_agent\n\n" + body
    )
    return name


def test_load_module_reads_an_agents_list(module_dir: Path) -> None:
    name = write_module(
        module_dir,
        "def maths() -> Agent:\n"
        "    return Agent('maths', 'Count.', 'demo', (calculator,))\n\n"
        "agents = [maths, demo_agent()]\n"
        "ignored = Agent('ignored', 'x', 'demo')\n",
    )
    registry = AgentRegistry()
    assert registry.load_module(name) == ["maths", "demo"]
    assert registry.names() == ["demo", "maths"]


def test_load_module_finds_module_level_agents(module_dir: Path) -> None:
    name = write_module(
        module_dir, "first = Agent('first', 'x', 'demo')\nsecond = Agent('second', 'y', 'demo')\n"
    )
    registry = AgentRegistry()
    assert sorted(registry.load_module(name)) == ["first", "second"]


def test_load_module_errors_name_the_setting(module_dir: Path) -> None:
    empty = write_module(module_dir, "value = 1\n")
    bad_list = write_module(module_dir, "agents = ['not an agent']\n")
    for path in (empty, bad_list, "no_such_module_for_threadline"):
        with pytest.raises(ConfigurationError) as info:
            AgentRegistry().load_module(path)
        assert info.value.setting == "agents"
