"""Declare agents and their tools: what applications import to build on Threadline."""

from threadline.agents.agent import Agent
from threadline.agents.context import DepsFactory, RunContext, RunInfo
from threadline.agents.registry import AgentRegistry
from threadline.agents.tools import Tool, ToolResult, tool

__all__ = [
    "Agent",
    "AgentRegistry",
    "DepsFactory",
    "RunContext",
    "RunInfo",
    "Tool",
    "ToolResult",
    "tool",
]
