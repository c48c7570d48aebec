"""The built-in demo agent: arithmetic and the time, paired with the offline demo model."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from threadline.agents.agent import Agent
from threadline.agents.tools import tool

__all__ = ["calculator", "clock", "demo_agent", "evaluate_arithmetic"]

_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 1000
# Integers above this many bits are refused: 4096 bits is ~1,233 digits, enough for any sum a
# person asks for and far below what would take a worker thread noticeable time or memory.
_MAX_INT_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def evaluate_arithmetic(expression: str) -> int | float:
    """Evaluate numbers, + - * / // % **, unary signs and parentheses; nothing else.

    The expression is parsed with `ast` and walked node by node: no name, call, attribute or
    subscript can be reached, because only the node types above are accepted (never `eval`).

    Raises:
        ValueError: The expression is not plain arithmetic, or its result is out of bounds.
    """
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    return _evaluate(tree.body)


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"unsupported constant {value!r}")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError as exc:
            raise ValueError("division by zero") from exc
        except OverflowError as exc:
            raise ValueError("result too large") from exc
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _check_power(base: float, exponent: float) -> None:
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"exponent larger than {_MAX_EXPONENT}")
    # Check before computing: 9**999 is cheap, but (9**999)**999 would not be.
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if exact and abs(int(base)).bit_length() * int(exponent) > _MAX_INT_BITS:
        raise ValueError("result too large")


def _checked(value: object) -> int | float:
    if isinstance(value, complex):
        raise ValueError("result is not a real number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ValueError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result too large")
    if not isinstance(value, int | float):
        raise ValueError(f"unsupported result {value!r}")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g") if isinstance(value, float) else str(value)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: Arithmetic using numbers, + - * / // % ** and parentheses, e.g. "(3+4)*2".
    """
    return _format_number(evaluate_arithmetic(expression))


@tool
def clock(timezone: str = "UTC") -> str:
    """Return the current date and time in ISO 8601.

    Args:
        timezone: IANA time zone name such as "Europe/Paris"; defaults to UTC.
    """
    # A sync tool, so the time zone database read below runs in a worker thread.
    zone: tzinfo
    if timezone.strip().upper() in ("UTC", "Z", "GMT"):
        zone = UTC
    else:
        try:
            zone = ZoneInfo(timezone.strip())
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc
    return datetime.now(zone).isoformat(timespec="seconds")


def demo_agent() -> Agent:
    """The agent behind `threadline serve` with no configuration; pairs with the demo model."""
    return Agent(
        name="demo",
        instructions=(
            "You are Threadline's demo assistant. Use the calculator tool for any arithmetic "
            "and the clock tool for the current date or time. Answer briefly."
        ),
        model="demo",
        tools=(calculator, clock),
        description="Offline demo agent: arithmetic and the current time, no API key needed.",
    )
