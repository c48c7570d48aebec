"""The peer's side of the comparison: a LangGraph graph doing what Threadline's demo agent does.

Loaded by the peer's dev server (`langgraph dev`, see langgraph.json beside this file), never by
Threadline or its tests: it imports only the peer's packages, which live in their own
virtualenv (README.md here).

The model mirrors Threadline's offline demo model (src/threadline/llm/demo.py) on the
benchmark's question, so that both servers do the same work per run:
- asked for arithmetic ("what is 12*7?"), it answers at once with one `calculator` tool call;
- given the tool's result, it answers "12*7 = 84." streamed in word-sized chunks (three here,
  as Threadline's demo model splits it);
- anything else is echoed back, streamed the same way.
No network and no delay. The agent loop is the usual one: model, then the tool node while the
model asks for tools, then the end.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

# A run of digits, spaces and operators with at least one binary operator in it.
_SYMBOLIC_RUN = re.compile(r"[\d\s.+\-*/%()]+")
_BINARY_OP = re.compile(r"[\d.)]\s*(?:\*\*|//|[-+*/%])\s*[-+(]*\s*[\d.(]")
_MAX_EXPRESSION_CHARS = 200
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // %, signs and parentheses."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    return str(_evaluate(ast.parse(expression.strip(), mode="eval").body))


def _evaluate(node: ast.expr) -> Any:
    # Walked node by node, like Threadline's calculator: no name, call or attribute is reachable.
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def find_arithmetic(text: str) -> str | None:
    """The longest arithmetic expression in `text` (`what is 12*7?` -> `12*7`), if any."""
    candidates = [run.strip() for run in _SYMBOLIC_RUN.findall(text) if _BINARY_OP.search(run)]
    return max(candidates, key=len) if candidates else None


def _chunks(text: str) -> list[str]:
    """Word-sized pieces, each with its trailing whitespace, that join back to `text`."""
    return re.findall(r"\s*\S+\s*", text)


class DemoChatModel(BaseChatModel):
    """A chat model that answers like Threadline's demo model, offline and at once."""

    @property
    def _llm_type(self) -> str:
        return "threadline-demo-mirror"

    def _reply(self, messages: Sequence[BaseMessage]) -> AIMessage:
        last = messages[-1] if messages else None
        if isinstance(last, ToolMessage):
            return AIMessage(content=_answer_from_results(messages))
        question = last.text if isinstance(last, HumanMessage) else ""
        expression = find_arithmetic(question)
        if expression is None:
            return AIMessage(content=f'You said: "{question}".')
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        return AIMessage(
            content="",
            tool_calls=[
                {"name": "calculator", "args": {"expression": expression}, "id": call_id},
            ],
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from _as_chunks(self._reply(messages))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Native async, as Threadline's demo provider is: no hop to a thread per call.
        for chunk in _as_chunks(self._reply(messages)):
            yield chunk


def _as_chunks(reply: AIMessage) -> Iterator[ChatGenerationChunk]:
    """A tool call as one chunk; text in word-sized chunks (the base class reports each as a
    new token, which is what the server's `messages` stream mode sends)."""
    if reply.tool_calls:
        call = reply.tool_calls[0]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {
                        "name": call["name"],
                        "args": json.dumps(call["args"]),
                        "id": call["id"],
                        "index": 0,
                    },
                ],
            )
        )
        return
    for piece in _chunks(reply.text):
        yield ChatGenerationChunk(message=AIMessageChunk(content=piece))


def _answer_from_results(messages: Sequence[BaseMessage]) -> str:
    """'12*7 = 84.' for the calculator's result after the call that asked for it."""
    result = messages[-1]
    asked = next((m for m in reversed(messages) if isinstance(m, AIMessage) and m.tool_calls), None)
    call = (
        next(
            (c for c in asked.tool_calls if c["id"] == getattr(result, "tool_call_id", None)), None
        )
        if asked
        else None
    )
    if call is not None and call["name"] == "calculator":
        return f"{call['args']['expression']} = {result.text}."
    return f"The tool returned: {result.text}"


model = DemoChatModel()


async def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
    return {"messages": [await model.ainvoke(state["messages"])]}


def build_graph() -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("agent", call_model)
    builder.add_node("tools", ToolNode([calculator]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile()


graph = build_graph()
