"""Counting a run's tokens as its model reports them, and stopping it at its token budget.

`MeteredProvider` wraps the run's provider. Each model call is one step of the agent loop; the
check happens when the next step asks the model, so a step that crosses the budget completes
(its tool calls run and are answered) and the run then fails with `token_budget_exceeded`
before spending more: the history stays valid for every provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from threadline.errors import ThreadlineError
from threadline.llm.types import ModelEvent, ModelProvider, ModelRequest, ResponseCompleted, Usage


class TokenBudgetExceededError(ThreadlineError):
    """Ends the run: the user's plan allows no more tokens today."""

    code = "token_budget_exceeded"

    def __init__(self, *, budget: int, used: int) -> None:
        super().__init__(
            f"The run stopped: today's token allowance is spent ({used} of {budget} tokens "
            "left at its start were used)"
        )
        self.budget = budget
        self.used = used


class UsageMeter:
    """This attempt's usage, summed over its model calls."""

    def __init__(self, *, budget: int | None = None) -> None:
        self.budget = budget
        self.usage = Usage()

    @property
    def total(self) -> int:
        return self.usage.input_tokens + self.usage.output_tokens

    def wrap(self, provider: ModelProvider) -> ModelProvider:
        return MeteredProvider(provider, self)


class MeteredProvider:
    def __init__(self, inner: ModelProvider, meter: UsageMeter) -> None:
        self._inner = inner
        self._meter = meter
        self.name = inner.name

    def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        return self._stream(request, model)

    async def _stream(self, request: ModelRequest, model: str) -> AsyncIterator[ModelEvent]:
        meter = self._meter
        if meter.budget is not None and meter.total >= meter.budget:
            raise TokenBudgetExceededError(budget=meter.budget, used=meter.total)
        stream = self._inner.stream(request, model=model)
        try:
            async for event in stream:
                if isinstance(event, ResponseCompleted):
                    meter.usage += event.usage
                yield event
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
