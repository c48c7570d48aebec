"""Events numbered and written in batches (issue 11): one transaction per step of a run, not
per event, with every guarantee of the per-event scheme kept.

- A run costs a bounded number of transactions, counted by the counting hook: its start, the
  end of its tool step, the tool result, and its end; plus one for each reasoning event whose
  hold runs out before the next write (none when a write carries it; text deltas cost none).
  A reintroduced transaction per event fails it.
- Reasoning is held briefly and rides at the head of the next write's batch, or is stored by
  its timer; the text streamed behind it goes out right after it, in the same batch; it never
  goes out after a later event of its run.
- A batch is numbered with consecutive numbers, in order, under the thread's row lock, even
  against a writer in another process hammering the same thread with batches of its own.
- A subscriber that resumes from a `seq` inside a batch gets exactly the rest of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_runs_support import Harness, run_settings, running_app
from threadline.context import UserContext
from threadline.events.types import EventType
from threadline.llm.types import ChatMessage, Role, ToolCall
from threadline.runs.sink import RunEventSink
from threadline.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The start (agent_started, the history read, the first model call announced), the end of the
# tool step (its message, tool_executing), the tool result (with the next model call), and the
# end of the run (the answer, agent_completed, status, usage): one transaction each.
STEP_TRANSACTIONS = 4


def _counted(metrics: str) -> float:
    total = 0.0
    for outcome in ("commit", "rollback"):
        name = f'threadline_db_transactions_total{{outcome="{outcome}"}}'
        found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
        assert found, f"{name} not in /metrics"
        total += float(found.group(1))
    return total


async def _transactions(client: httpx.AsyncClient) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return _counted(response.text)


async def _claim(h: Harness, run_id: str) -> Any:
    async with h.services.engine.begin() as conn:
        run = await h.services.queue.claim_next(
            conn, worker_id="test-worker", lease_seconds=30, per_user_limit=4
        )
    assert run is not None and run.id == run_id, run
    return run


async def test_a_run_takes_one_transaction_per_step_not_per_event(settings_factory) -> None:
    # No embedded worker (the test executes the run itself, so nothing else runs meanwhile)
    # and no webhook poller: what is counted is the run's own work.
    settings = run_settings(
        settings_factory,
        debug_count_statements=True,
        embedded_worker=False,
        webhook_delivery=False,
    )
    async with running_app(settings) as h:
        user = await h.user()
        thread = await h.thread(user)
        for _ in range(2):  # the second run also reads a history with a whole earlier run
            queued = await h.start(user, thread, "what is 12*7?", agent="demo")
            run = await _claim(h, queued["id"])
            async with h.watch(user, thread, after_seq=None) as watcher:
                # A scrape of /metrics reads the database too: measure it, and take it off.
                before = await _transactions(h.client)
                scrape = await _transactions(h.client) - before
                before += scrape
                status = await asyncio.wait_for(h.services.execution.execute(run), 30)
                spent = await _transactions(h.client) - before - scrape
                received = await watcher.until_terminal(run.id)
            assert status is not None and status.value == "completed"
            types = [m["type"] for m in received]
            # Reasoning is held for the next write: the step that asks for a tool carries it
            # in its message's batch, the final answer's rides in the run's last batch with
            # the text streamed behind it (as a delta in its place). The demo model streams
            # without pausing (delay 0), so no hold runs out first. Text deltas cost none;
            # every other event rides with a step's write.
            thinking = [m["data"]["text"] for m in received if m["type"] == "agent_thinking"]
            reasoning = [text for text in thinking if text != "Thinking…"]
            assert len(thinking) - len(reasoning) == 2  # each step announced
            assert len(reasoning) == 2
            assert types.count("tool_executing") == 1
            assert spent == STEP_TRANSACTIONS, (spent, types)
            last = received[-4:]
            assert [m["type"] for m in last] == [
                "agent_thinking",
                "message_delta",
                "message_created",
                "agent_completed",
            ]
            thought, delta, answer, completed = last
            assert delta["seq"] == thought["seq"] and delta["ephemeral"] is True
            assert [answer["seq"], completed["seq"]] == [thought["seq"] + 1, thought["seq"] + 2]
            assert delta["data"]["message_id"] == answer["data"]["message_id"]
            assert delta["data"]["text"] == answer["data"]["content"]
            assert len(received) >= 10


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory)) as harness:
        yield harness


async def test_a_subscriber_resuming_inside_a_batch_gets_exactly_the_rest(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread)
    await h.wait_run(user, thread, run["id"])
    stored = await h.events(user, thread)
    seqs = [e.seq for e in stored]
    assert seqs == sorted(set(seqs))
    # The run's tool step: message_created and tool_executing, one batch.
    created = next(
        e for e in stored if e.type is EventType.MESSAGE_CREATED and e.data.get("tool_calls")
    )
    executing = next(e for e in stored if e.type is EventType.TOOL_EXECUTING)
    assert executing.seq == created.seq + 1
    async with h.watch(user, thread, after_seq=created.seq) as watcher:
        replayed = await watcher.until_terminal(run["id"])
    events = [m for m in replayed if "seq" in m]
    assert [m["seq"] for m in events] == [e.seq for e in stored if e.seq > created.seq]
    assert events[0]["type"] == "tool_executing"


# --- two processes writing batches on one thread --------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    import sqlalchemy as sa
    from threadline.context import UserContext
    from threadline.events.publisher import EventPublisher
    from threadline.events.redis_bus import RedisBus, RedisBusConfig
    from threadline.events.types import EventType
    from threadline.settings import Settings
    from threadline.store.db import create_engine
    from threadline.store.events import EventStore

    async def run_event_after(engine, thread_id, seq):
        query = sa.text(
            "SELECT count(*) FROM events WHERE thread_id = :t AND run_id IS NOT NULL AND seq > :s"
        )
        async with asyncio.timeout(60):
            while True:
                async with engine.connect() as conn:
                    if await conn.scalar(query, {"t": thread_id, "s": seq}):
                        return
                await asyncio.sleep(0.01)  # a poll of the condition, bounded above

    async def main(user_id, thread_id, batches, size):
        settings = Settings()
        engine = create_engine(settings.database_url)
        bus = RedisBus(settings.redis_url, config=RedisBusConfig(prefix=settings.redis_prefix))
        bus.start()
        publisher = EventPublisher(bus=bus, store=EventStore(), engine=engine)
        ctx = UserContext.create(user_id, thread_id=thread_id)
        try:
            for batch in range(batches):
                specs = [
                    (EventType.THREAD_UPDATED, {"writer": "other", "batch": batch, "n": n})
                    for n in range(size)
                ]
                async with engine.begin() as conn:
                    written = await publisher.emit_many(conn, ctx, thread_id, specs)
                if batch == batches // 2:
                    # Halfway, let a run's step land after this batch (the test keeps runs
                    # going until this process exits), so the two writers really interleave
                    # however fast this one is.
                    await run_event_after(engine, thread_id, written[-1].seq)
        finally:
            await bus.aclose()
            await engine.dispose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    """
)


def _writer_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_DATABASE_URL=settings.database_url,
        THREADLINE_REDIS_URL=str(settings.redis_url),
        THREADLINE_REDIS_PREFIX=settings.redis_prefix,
        THREADLINE_ENVIRONMENT="test",
        THREADLINE_SECRET_KEY="x" * 48,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    return env


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_batches_from_two_processes_on_one_thread_stay_whole_and_ordered(
    settings_factory,
) -> None:
    """This process executes runs on the thread (their steps are batches) while another
    process writes batches of three on the same thread as fast as it can."""
    batches, size = 100, 3
    async with running_app(run_settings(settings_factory)) as h:
        user = await h.user()
        thread = await h.thread(user)
        settings: Settings = h.services.settings
        async with h.watch(user, thread, after_seq=0) as watcher:
            writer = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _WRITER,
                user.id,
                thread,
                str(batches),
                str(size),
                env=_writer_env(settings),
                stderr=subprocess.PIPE,
            )
            runs: list[str] = []
            try:
                # Runs one after another (one active run per thread) for as long as the other
                # process writes, and at least three.
                while (len(runs) < 3 or writer.returncode is None) and len(runs) < 60:
                    run = await h.start(user, thread, "what is 12*7?", agent="demo")
                    await h.wait_run(user, thread, run["id"])
                    runs.append(run["id"])
            finally:
                _, stderr = await asyncio.wait_for(writer.communicate(), 60)
            assert writer.returncode == 0, stderr.decode()[-3000:]
            stored = await h.events(user, thread)
            last_seq = stored[-1].seq
            received = await watcher.until(lambda m: m.get("seq") == last_seq)

    seqs = [e.seq for e in stored]
    assert seqs == list(range(1, last_seq + 1)), "stored seqs are unique and gapless"
    # The other process's batches are whole: three consecutive numbers each, in order.
    others = [e for e in stored if e.data.get("writer") == "other"]
    assert len(others) == batches * size
    for start in range(0, len(others), size):
        batch = others[start : start + size]
        assert [e.seq for e in batch] == list(range(batch[0].seq, batch[0].seq + size))
        assert [e.data["n"] for e in batch] == list(range(size))
    # The subscriber saw every durable event once, in sequence order, and each delta in its
    # place (its seq is that of the durable event before it).
    durable = [m["seq"] for m in received if "seq" in m and m["type"] != "message_delta"]
    assert durable == seqs
    everything = [m["seq"] for m in received if "seq" in m]
    assert everything == sorted(everything)
    # And the runs' own steps stayed whole too: each tool step's message_created is followed
    # at once by its tool_executing.
    by_seq = {e.seq: e for e in stored}
    for e in stored:
        if e.type is EventType.MESSAGE_CREATED and e.data.get("tool_calls"):
            assert by_seq[e.seq + 1].type is EventType.TOOL_EXECUTING
    # The two writers really took turns on the thread's row.
    first, last = others[0].seq, others[-1].seq
    assert any(first < e.seq < last for e in stored if e.run_id is not None)


async def test_reasoning_rides_with_the_next_write_or_its_timer(settings_factory) -> None:
    settings = run_settings(
        settings_factory,
        debug_count_statements=True,
        embedded_worker=False,
        webhook_delivery=False,
    )
    async with running_app(settings) as h:
        user = await h.user()
        thread = await h.thread(user)
        queued = await h.start(user, thread, "what is 12*7?", agent="demo")
        run = await _claim(h, queued["id"])
        ctx = UserContext.create(run.user_id, thread_id=run.thread_id, run_id=run.id)
        services = h.services

        def sink(hold_seconds: float) -> RunEventSink:
            return RunEventSink(
                db=services.engine,
                publisher=services.publisher,
                messages=services.messages,
                ctx=ctx,
                delta_flush_seconds=hold_seconds,
            )

        async with h.watch(user, thread, after_seq=None) as watcher:
            await watcher.until(lambda m: m["type"] == "snapshot")
            before = await _transactions(h.client)
            scrape = await _transactions(h.client) - before
            before += scrape
            # Held (an hour: only the write can take it), then carried by the message's batch.
            held = sink(3600)
            await held.thinking("Reading ")
            await held.thinking("the question…")
            call = ToolCall("call-1", "calculator", {"expression": "12*7"})
            await held.assistant_message(ChatMessage(Role.ASSISTANT, "", (call,)), final=False)
            batch = await watcher.until(lambda m: m["type"] == "tool_executing")
            assert await _transactions(h.client) - before - scrape == 1
            assert [m["type"] for m in batch] == [
                "agent_thinking",
                "message_created",
                "tool_executing",
            ]
            assert batch[0]["data"]["text"] == "Reading the question…"
            assert [m["seq"] for m in batch] == list(range(batch[0]["seq"], batch[0]["seq"] + 3))

            # Nothing follows: the timer stores it, in a transaction of its own.
            timed = sink(0.05)
            await timed.thinking("Still thinking…")
            (alone,) = await watcher.until(lambda m: m["type"] == "agent_thinking")
            assert alone["data"]["text"] == "Still thinking…"
            assert alone["seq"] == batch[-1]["seq"] + 1

            # Text streamed behind held reasoning waits for it: the timer stores the
            # reasoning and sends the text right after it, in one transaction.
            before = await _transactions(h.client)
            behind = sink(0.05)
            await behind.thinking("Weighing it…")
            await behind.text_delta("Eighty-")
            await behind.text_delta("four")
            thought, delta = await watcher.until(lambda m: m["type"] == "message_delta")
            assert thought["type"] == "agent_thinking" and thought["seq"] == alone["seq"] + 1
            assert delta["data"]["text"] == "Eighty-four" and delta["seq"] == thought["seq"]
            assert await _transactions(h.client) - before - scrape == 1

            # A final answer within the hold takes the reasoning and the text behind it along,
            # for the run's last batch (`RunFinisher.finish`): nothing goes out before it.
            final = sink(3600)
            await final.thinking("Reading the result…")
            await final.text_delta("84")
            await final.assistant_message(ChatMessage(Role.ASSISTANT, "84"), final=True)
            await final.flush()  # what the engine does next: nothing is left to send
            assert final.unsaved_answer is not None and final.unsaved_answer.content == "84"
            assert [event_type for event_type, _ in final.unsaved_held] == [
                EventType.AGENT_THINKING,
                EventType.MESSAGE_DELTA,
            ]
            assert final.unsaved_held[1][1] == {"message_id": final.unsaved_answer.id, "text": "84"}
            alone = thought

            # A run that ends without flushing drops what it held: nothing after its end.
            dropped = sink(0.05)
            await dropped.thinking("never stored")
            await dropped.discard()  # stops the timer and waits for it
            stored = await h.events(user, thread)
            assert stored[-1].seq == alone["seq"]
            assert all(e.data.get("text") != "never stored" for e in stored)
