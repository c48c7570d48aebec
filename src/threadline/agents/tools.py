"""Tools: Python functions an agent's model may call.

`@tool` reads a function's type hints and docstring once, at declaration, into a JSON schema
(what the model is shown) and a pydantic model (what checks the model's arguments). Misuse
fails there with `ToolDefinitionError`; at run time nothing a tool does raises out of
`Tool.invoke` except cancellation: bad arguments, exceptions and timeouts all come back as
an error `ToolResult` the model can read and react to.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import overload

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from threadline.agents._schema import ToolSignature, build_signature
from threadline.agents.context import RunContext
from threadline.agents.errors import ToolDefinitionError
from threadline.llm.types import JSONObject, ToolSpec

__all__ = ["DEFAULT_TOOL_TIMEOUT_SECONDS", "Tool", "ToolDefinitionError", "ToolResult", "tool"]

logger = logging.getLogger(__name__)

DEFAULT_TOOL_TIMEOUT_SECONDS = 30.0
# What OpenAI and Anthropic both accept as a function name.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ToolFunction = Callable[..., object]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one tool call, as the model will read it."""

    content: str
    """The return value as text (JSON for structured values), or the error description."""
    is_error: bool = False
    duration_ms: float = 0.0


@dataclass(frozen=True, eq=False)
class Tool:
    """A callable the model may use. Build one with `@tool` or `Tool.from_function`."""

    name: str
    description: str
    parameters: JSONObject
    """JSON schema of the arguments object."""
    function: ToolFunction
    timeout_seconds: float | None
    """Own deadline; `None` uses the agent's `tool_timeout_seconds`."""
    signature: ToolSignature

    @classmethod
    def from_function(
        cls,
        function: ToolFunction,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Tool:
        """Build a tool from a typed function; raise `ToolDefinitionError` if it cannot be."""
        tool_name = name if name is not None else getattr(function, "__name__", "")
        if not _TOOL_NAME.match(tool_name):
            raise ToolDefinitionError(
                "name must be 1-64 characters of [A-Za-z0-9_-]; pass name=...",
                tool_name=tool_name or repr(function),
            )
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ToolDefinitionError("timeout_seconds must be positive", tool_name=tool_name)
        signature = build_signature(function, tool_name=tool_name, description=description)
        return cls(
            name=tool_name,
            description=signature.description,
            parameters=signature.parameters,
            function=function,
            timeout_seconds=timeout_seconds,
            signature=signature,
        )

    @property
    def spec(self) -> ToolSpec:
        # A copy, so a provider that decorates the schema cannot change it for other runs.
        return ToolSpec(self.name, self.description, copy.deepcopy(self.parameters))

    async def invoke(
        self,
        arguments: Mapping[str, object],
        ctx: RunContext[object],
        *,
        default_timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS,
    ) -> ToolResult:
        """Validate `arguments`, run the function under its deadline, and report the outcome.

        Only cancellation propagates; every other failure is an error result.
        """
        started = time.perf_counter()
        try:
            args, kwargs = self.signature.bind(arguments, ctx)
        except ValidationError as exc:
            return _result(_describe_invalid(self.name, exc), started, is_error=True)
        timeout = self.timeout_seconds or default_timeout_seconds
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                value = await self._call(args, kwargs)
            return _result(serialize_result(value), started)
        except TimeoutError as exc:
            # A TimeoutError the tool raised itself (say, from an HTTP client) is a plain error.
            if not deadline.expired():
                return _result(_describe_exception(exc), started, is_error=True)
            message = f"Tool {self.name!r} timed out after {timeout:g} seconds"
            return _result(message, started, is_error=True)
        except Exception as exc:  # CancelledError is a BaseException, so it propagates
            logger.info("tool %s raised %s", self.name, type(exc).__name__, exc_info=True)
            return _result(_describe_exception(exc), started, is_error=True)

    async def _call(self, args: list[object], kwargs: dict[str, object]) -> object:
        if inspect.iscoroutinefunction(self.function):
            result: object = await self.function(*args, **kwargs)
            return result
        # A sync tool runs in a worker thread so it cannot block the event loop. A thread
        # cannot be killed: on timeout or cancellation we stop waiting and the run moves on,
        # but the function keeps running to its end and holds one default-executor thread
        # meanwhile. Sync tools that may hang should carry their own I/O timeouts.
        return await asyncio.to_thread(self.function, *args, **kwargs)


@overload
def tool(function: ToolFunction, /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_seconds: float | None = None,
) -> Callable[[ToolFunction], Tool]: ...


def tool(
    function: ToolFunction | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_seconds: float | None = None,
) -> Tool | Callable[[ToolFunction], Tool]:
    """Declare a function as a tool, bare (`@tool`) or with options (`@tool(name=...)`).

    Args:
        function: The function, when used bare.
        name: Tool name shown to the model; defaults to the function's name.
        description: Overrides the docstring's description.
        timeout_seconds: Deadline for one call; defaults to the agent's `tool_timeout_seconds`.
    """

    def decorate(fn: ToolFunction) -> Tool:
        return Tool.from_function(
            fn, name=name, description=description, timeout_seconds=timeout_seconds
        )

    return decorate if function is None else decorate(function)


def serialize_result(value: object) -> str:
    """Text for the model: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return to_json(value, fallback=str).decode()


def _result(content: str, started: float, *, is_error: bool = False) -> ToolResult:
    return ToolResult(content, is_error, (time.perf_counter() - started) * 1000)


def _describe_exception(exc: BaseException) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _describe_invalid(tool_name: str, exc: ValidationError) -> str:
    lines = [f"Invalid arguments for tool {tool_name!r}:"]
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "(arguments)"
        lines.append(f"- {location}: {error['msg']}")
    lines.append("Correct the arguments and call the tool again.")
    return "\n".join(lines)
