"""Threadline: a self-hosted backend for multi-user AI agent chat.

The names applications use. They load lazily, so importing an agent module (`threadline.agents`)
does not drag in the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from threadline.agents import Agent, RunContext, tool
    from threadline.api.app import create_app
    from threadline.settings import Settings

__all__ = ["Agent", "RunContext", "Settings", "create_app", "tool"]

_WHERE = {
    "Agent": "threadline.agents",
    "RunContext": "threadline.agents",
    "tool": "threadline.agents",
    "create_app": "threadline.api.app",
    "Settings": "threadline.settings",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'threadline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
