"""The offline demo model: deterministic answers that exercise the whole agent flow.

It needs no key and no network, yet behaves like a tool-using model: it streams reasoning,
asks for the `calculator` tool when the user asks for arithmetic and for the `clock` (or
`current_time`) tool when they ask for the time, then answers from the tool results in
several text chunks. The same request always yields the same events, call ids included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from threadline.llm.types import (
    ChatMessage,
    JSONObject,
    ModelEvent,
    ModelProviderError,
    ModelRequest,
    ReasoningDelta,
    ResponseCompleted,
    Role,
    TextDelta,
    ToolCall,
    ToolCallRequested,
    ToolSpec,
    Usage,
)

__all__ = ["DemoProvider", "find_arithmetic"]

_CLOCK_TOOLS = ("clock", "current_time")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
# Arithmetic said in words, mapped to an expression template over the captured numbers.
_WORDED = (
    (rf"\badd\s+{_NUMBER}\s+(?:and|to)\s+{_NUMBER}", "{0}+{1}"),
    (rf"\bsum of\s+{_NUMBER}\s+and\s+{_NUMBER}", "{0}+{1}"),
    (rf"\bsubtract\s+{_NUMBER}\s+from\s+{_NUMBER}", "{1}-{0}"),
    (rf"\bmultiply\s+{_NUMBER}\s+(?:and|by|with)\s+{_NUMBER}", "{0}*{1}"),
    (rf"\bdivide\s+{_NUMBER}\s+by\s+{_NUMBER}", "{0}/{1}"),
    (rf"{_NUMBER}\s+plus\s+{_NUMBER}", "{0}+{1}"),
    (rf"{_NUMBER}\s+minus\s+{_NUMBER}", "{0}-{1}"),
    (rf"{_NUMBER}\s+(?:times|multiplied by)\s+{_NUMBER}", "{0}*{1}"),
    (rf"{_NUMBER}\s+divided by\s+{_NUMBER}", "{0}/{1}"),
)
_SYMBOLIC_RUN = re.compile(r"[\d\s.+\-*/%()]+")
_BINARY_OP = re.compile(r"[\d.)]\s*(?:\*\*|//|[-+*/%])\s*[-+(]*\s*[\d.(]")
_ASKS_TIME = re.compile(r"\b(time|date|today|clock|what day)\b", re.IGNORECASE)
_TIMEZONE = re.compile(r"\b(UTC|GMT|[A-Z][A-Za-z_]+(?:/[A-Za-z_\-]+)+)\b")


@dataclass(frozen=True, slots=True)
class _Plan:
    reasoning: str
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class DemoProvider:
    """A `ModelProvider` that answers offline and deterministically.

    Args:
        delay_seconds: Pause before each streamed event, to make runs observably slow
            (tests of cancellation and timeouts). Sleeps with `asyncio.sleep`, so it is
            cancellable.
        fail_with: If set, every response fails with this `ModelProviderError` message
            after the first reasoning event.
    """

    name: str = "demo"

    def __init__(self, *, delay_seconds: float = 0.0, fail_with: str | None = None) -> None:
        if delay_seconds < 0:
            raise ValueError("delay_seconds must not be negative")
        self._delay = delay_seconds
        self._fail_with = fail_with

    async def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        plan = plan_response(request)
        yield ReasoningDelta(plan.reasoning)
        if self._fail_with is not None:
            raise ModelProviderError(self._fail_with, provider=self.name)
        for chunk in _chunks(plan.text):
            await self._pause()
            yield TextDelta(chunk)
        for call in plan.tool_calls:
            await self._pause()
            yield ToolCallRequested(call)
        await self._pause()
        usage = Usage(_input_tokens(request), _output_tokens(plan))
        yield ResponseCompleted(usage, "tool_calls" if plan.tool_calls else "stop")

    async def _pause(self) -> None:
        if self._delay:
            await asyncio.sleep(self._delay)


def plan_response(request: ModelRequest) -> _Plan:
    """Decide the whole response up front; streaming only paces it."""
    messages = request.messages
    if messages and messages[-1].role is Role.TOOL:
        return _Plan("Reading the tool results…", _answer_from_results(messages))
    question = messages[-1].content if messages and messages[-1].role is Role.USER else ""
    tools = {spec.name: spec for spec in request.tools}
    expression = find_arithmetic(question) if "calculator" in tools else None
    if expression is not None:
        call = _call(messages, "calculator", {"expression": expression})
        return _Plan("Looking at the question… this is arithmetic.", tool_calls=(call,))
    clock = next((tools[name] for name in _CLOCK_TOOLS if name in tools), None)
    if clock is not None and _ASKS_TIME.search(question):
        call = _call(messages, clock.name, _clock_arguments(clock, question))
        return _Plan("Looking at the question… I need the current time.", tool_calls=(call,))
    return _Plan("Looking at the question…", _acknowledge(question, request.tools))


def find_arithmetic(text: str) -> str | None:
    """The arithmetic expression `text` asks about, if any (`what is 12*7?` -> `12*7`)."""
    for pattern, template in _WORDED:
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            return template.format(*match.groups())
    normalized = text.replace("×", "*").replace("÷", "/").replace("^", "**")
    runs = [run.strip() for run in _SYMBOLIC_RUN.findall(normalized)]
    candidates = [_balance(run) for run in runs if _BINARY_OP.search(run)]
    return max(candidates, key=len) if candidates else None


def _balance(expression: str) -> str:
    """Drop the stray parentheses a sentence leaves around an expression."""
    while expression.count("(") > expression.count(")") and expression.startswith("("):
        expression = expression[1:].strip()
    while expression.count(")") > expression.count("(") and expression.endswith(")"):
        expression = expression[:-1].strip()
    return expression


def _clock_arguments(spec: ToolSpec, question: str) -> JSONObject:
    properties = spec.parameters.get("properties")
    match = _TIMEZONE.search(question)
    if match and isinstance(properties, dict) and "timezone" in properties:
        return {"timezone": match.group(1)}
    return {}


def _call(messages: Sequence[ChatMessage], tool: str, arguments: JSONObject) -> ToolCall:
    # Derived from the conversation, so a replayed request asks with the same id and a
    # different turn of the same thread with a different one.
    digest = hashlib.sha256()
    for message in messages:
        digest.update(f"{message.role}\0{message.tool_call_id}\0{message.content}\0".encode())
    digest.update(f"{tool}\0{json.dumps(arguments, sort_keys=True)}".encode())
    return ToolCall(f"call_{digest.hexdigest()[:24]}", tool, arguments)


def _answer_from_results(messages: Sequence[ChatMessage]) -> str:
    start = len(messages)
    while start > 0 and messages[start - 1].role is Role.TOOL:
        start -= 1
    calls: dict[str, ToolCall] = {}
    if start > 0:
        calls = {call.call_id: call for call in messages[start - 1].tool_calls}
    sentences = [
        _describe_result(msg, calls.get(msg.tool_call_id or "")) for msg in messages[start:]
    ]
    return " ".join(sentences)


def _describe_result(result: ChatMessage, call: ToolCall | None) -> str:
    name = result.tool_name or (call.name if call else "tool")
    if result.is_error:
        return f"The {name} tool reported an error: {result.content}"
    arguments = call.arguments if call else {}
    if name == "calculator" and "expression" in arguments:
        return f"{arguments['expression']} = {result.content}."
    if name in _CLOCK_TOOLS:
        where = f" in {arguments['timezone']}" if "timezone" in arguments else ""
        return f"The current time{where} is {result.content}."
    return f"The {name} tool returned: {result.content}"


def _acknowledge(question: str, tools: Sequence[ToolSpec]) -> str:
    offer = (
        f"Tools I can use here: {', '.join(spec.name for spec in tools)}."
        if tools
        else "I have no tools in this conversation."
    )
    if not question.strip():
        return f"Hello! I am the offline demo model. {offer}"
    excerpt = " ".join(question.split())
    excerpt = excerpt if len(excerpt) <= 80 else excerpt[:79] + "…"
    return (
        f'You said: "{excerpt}". I am the offline demo model, so I only echo messages, '
        f"do arithmetic and tell the time. {offer}"
    )


def _chunks(text: str) -> list[str]:
    """Word-sized pieces, each with its trailing whitespace, that join back to `text`."""
    return re.findall(r"\s*\S+\s*", text) if text.strip() else []


def _words(text: str) -> int:
    return len(text.split())


def _input_tokens(request: ModelRequest) -> int:
    # Roughly what a real tokenizer would count: words plus a few tokens of framing each.
    total = _words(request.instructions) + sum(4 + _words(m.content) for m in request.messages)
    return total + sum(_words(spec.description) + 10 for spec in request.tools)


def _output_tokens(plan: _Plan) -> int:
    calls = sum(5 + _words(json.dumps(call.arguments)) for call in plan.tool_calls)
    return _words(plan.reasoning) + _words(plan.text) + calls
