"""Streamed text costs no database work: a run's transactions do not grow with its deltas, the
deltas arrive live in their place, and a subscriber resuming after the run gets the stored
log (no delta, no gap, no duplicate), on both backends.

The model here streams one word per chunk, `_PAUSE` apart: longer than the sink's coalescing
interval (20 ms), so every chunk becomes a delta of its own. Background database work is
pushed out of the measured window (worker and webhook polls of a minute); the engine's idle
state is read from memory, not from the database. `THREADLINE_DEBUG_COUNT_STATEMENTS`
(`store/counting.py`) counts the transactions.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from tests.integration.test_runs_support import (
    Harness,
    metric_samples,
    run_settings,
    running_app,
)
from tests.live_order import assert_in_place
from threadline.api.live.gateway import ThreadSubscription
from threadline.llm.providers import ProviderSet
from threadline.llm.types import ModelEvent, ModelRequest, ResponseCompleted, TextDelta, Usage

pytestmark = pytest.mark.integration
_PAUSE = 0.03


class WordStreamingModel:
    """Answers "stream N" with N one-word chunks, `_PAUSE` apart (a model streaming fast
    enough to matter, slow enough that each chunk is published on its own)."""

    name = "word-streaming"

    async def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        found = re.search(r"stream (\d+)", request.messages[-1].content)
        words = int(found.group(1)) if found else 1
        for n in range(words):
            if n:
                await asyncio.sleep(_PAUSE)  # the model's own pace, not a wait of the test
            yield TextDelta(f"w{n} ")
        yield ResponseCompleted(Usage(3, words), "stop")


def _stream_words(h: Harness) -> None:
    original = h.services.execution.providers
    providers = {name: original.resolve(f"{name}:model")[0] for name in original.names}
    providers["demo"] = WordStreamingModel()
    h.services.execution.providers = ProviderSet(providers)


async def _transactions(h: Harness) -> float:
    samples = await metric_samples(h.client)
    return sum(
        value
        for (name, _labels), value in samples.items()
        if name == "threadline_db_transactions_total"
    )


def _record_catch_ups(h: Harness) -> list[ThreadSubscription]:
    """Every subscription the gateway starts catching up from the store (a gap or a reset),
    from now on (attached after this call)."""
    caught_up: list[ThreadSubscription] = []
    catch_up_soon = h.gateway._catch_up_soon

    def recording(subscription: ThreadSubscription) -> None:
        caught_up.append(subscription)
        catch_up_soon(subscription)

    h.gateway._catch_up_soon = recording  # type: ignore[method-assign]
    return caught_up


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    settings = run_settings(
        settings_factory,
        debug_count_statements=True,
        worker_poll_seconds=60,
        webhook_poll_seconds=60,
    )
    async with running_app(settings) as h:
        _stream_words(h)
        yield h


async def test_a_runs_transactions_do_not_grow_with_its_deltas(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    gaps = _record_catch_ups(h)
    cost: dict[int, tuple[float, int]] = {}  # words -> (transactions, deltas)
    async with h.watch(user, thread) as watcher:
        start = (await watcher.next())["last_seq"]
        live: list[dict[str, object]] = []
        for words in (2, 60):
            before = await _transactions(h)
            run = await h.start(user, thread, f"stream {words}", agent="echo")
            events = await watcher.until_terminal(run["id"])
            await h.wait_idle(user)
            spent = await _transactions(h) - before
            cost[words] = (spent, sum(e["type"] == "message_delta" for e in events))
            live += events
    (few, few_deltas), (many, many_deltas) = cost[2], cost[60]
    assert few_deltas <= 2 and many_deltas >= 30, cost
    # Equal but for the worker's wake-ups: on PostgreSQL a run's NOTIFY and the in-process
    # signal may each start a claim, the second finding nothing (one transaction, either
    # size). Publishing deltas through the database cost one transaction each: 58 more here.
    assert abs(many - few) <= 2, f"transactions per run grew with its deltas: {cost}"
    # Live, each delta came right after the durable event it follows (after `agent_started`,
    # before its message's `message_created`), and nothing looked like a gap.
    assert_in_place(live, after_seq=start)
    assert gaps == []
    assert h.services.metrics.deltas_out_of_place._value.get() == 0  # none was left out
    # Resuming after the runs: the stored log, no delta in it, numbered without a gap.
    async with h.watch(user, thread, after_seq=start) as resumed:
        assert (await resumed.next())["type"] == "snapshot"
        replayed = [await resumed.next() for _ in range(len(live) - few_deltas - many_deltas)]
    assert_in_place(replayed, after_seq=start)
    assert [m["type"] for m in replayed] == [
        m["type"] for m in live if m["type"] != "message_delta"
    ]
