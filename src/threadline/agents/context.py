"""The typed context a tool receives: who is acting, where, and the run's own dependencies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from threadline.context import UserContext

# Covariant so a `RunContext[MyDeps]` can be passed where a `RunContext[object]` is expected
# (the loop does not know an agent's deps type); safe because the dataclass is frozen.
DepsT = TypeVar("DepsT", covariant=True)


@dataclass(frozen=True)
class RunContext(Generic[DepsT]):
    """What a tool sees of the run it serves.

    A tool receives it as its first parameter if it declares one annotated `RunContext` or
    `RunContext[X]`; it is never part of the tool's JSON schema, so the model cannot forge it.
    """

    user: UserContext
    """The user the run acts for; scope every read and write by it."""
    thread_id: str
    run_id: str
    agent_name: str
    deps: DepsT
    """Built by the agent's `deps_factory` once per run, so no state leaks between runs."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What an application's deps factory knows of the run it builds dependencies for."""

    user: UserContext
    thread_id: str
    run_id: str
    agent_name: str


DepsFactory = Callable[[RunInfo], object]
"""Builds a run's `RunContext.deps` from the run, once per run. An application passes one to
`create_app(deps=...)` (or the worker) to hand its own resources (a client, a pool) to its
tools; an agent that declares its own `deps_factory` keeps it."""
