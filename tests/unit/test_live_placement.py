"""Where an ephemeral event (a text delta) goes: the memory bus gives it the seq of the
thread's last durable event, and a subscription sends it only right after that event, never
deduplicating it by seq nor taking it for a gap (`api/live/gateway.py`). The client does the
same on its side."""

from __future__ import annotations

import pytest

from threadline.api.live.gateway import Connection, ThreadSubscription, WireMessage, in_place
from threadline.client._streams import EventStream
from threadline.events.bus import MemoryBus
from threadline.events.positions import ThreadPositions
from threadline.events.types import Event, EventType
from threadline.metrics import Metrics

USER = "usr_1"
THREAD = "thr_1"


def durable(seq: int) -> Event:
    return Event(EventType.TOOL_COMPLETED, THREAD, USER, seq, {"n": seq}, run_id="run_1")


def delta(seq: int, text: str = "x") -> Event:
    return Event(EventType.MESSAGE_DELTA, THREAD, USER, seq, {"text": text}, run_id="run_1")


def sent(connection: Connection) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    while not connection._queue.empty():
        message: WireMessage = connection._queue.get_nowait()
        out.append((int(str(message["seq"])), str(message["type"])))
    return out


def subscription(*, last_seq: int) -> tuple[ThreadSubscription, list[ThreadSubscription]]:
    gaps: list[ThreadSubscription] = []
    connection = Connection(user_id=USER, connection_id="c", queue_size=100, metrics=Metrics())
    sub = ThreadSubscription(connection, THREAD, on_gap=gaps.append)
    sub.go_live(after_seq=last_seq)
    return sub, gaps


def test_a_live_subscription_sends_a_delta_only_right_after_its_durable_event() -> None:
    sub, gaps = subscription(last_seq=4)
    for event in (delta(4), delta(4), durable(5), delta(5), delta(3), delta(7), durable(6)):
        sub.offer(event)
    assert sent(sub.connection) == [
        (4, "message_delta"),
        (4, "message_delta"),  # deltas share a seq: not duplicates
        (5, "tool_completed"),
        (5, "message_delta"),
        # delta(3) is stale (5 was sent after it belongs), delta(7) follows an event not yet
        # sent: both dropped, neither counted as a gap
        (6, "tool_completed"),
    ]
    assert gaps == []
    assert sub.last_seq == 6  # deltas never move it
    assert sub.connection._metrics.deltas_out_of_place._value.get() == 2


def test_deltas_buffered_during_a_replay_are_sent_in_place_after_it() -> None:
    connection = Connection(user_id=USER, connection_id="c", queue_size=100, metrics=Metrics())
    sub = ThreadSubscription(connection, THREAD)
    # Arrived live while the replay read the store up to 5.
    for event in (delta(4), durable(5), delta(5), delta(5), durable(6), delta(6)):
        sub.offer(event)
    assert sent(connection) == []
    sub.go_live(after_seq=5)
    assert sent(connection) == [
        (5, "message_delta"),
        (5, "message_delta"),
        (6, "tool_completed"),
        (6, "message_delta"),
    ]


def test_in_place_keeps_durable_events_after_the_cursor_and_the_deltas_that_fit() -> None:
    held = [delta(2), durable(3), delta(3), durable(4), delta(3), delta(4)]
    assert [(e.seq, e.type.value) for e in in_place(held, after_seq=2)] == [
        (2, "message_delta"),
        (3, "tool_completed"),
        (3, "message_delta"),
        (4, "tool_completed"),
        (4, "message_delta"),
    ]
    assert [e.seq for e in in_place(held, after_seq=3)] == [3, 4, 4]


async def test_the_memory_bus_places_a_delta_after_the_last_durable_event() -> None:
    bus = MemoryBus()
    got: list[tuple[int, str]] = []
    await bus.publish_ephemeral(delta(0))  # nobody listens: nothing to do
    bus.subscribe(THREAD, lambda e: got.append((e.seq, e.type.value)))
    await bus.publish_ephemeral(delta(0))  # no durable event of the thread yet: no place
    await bus.publish(durable(7))
    await bus.publish_ephemeral(delta(0))
    await bus.publish(durable(8))
    await bus.publish_ephemeral(delta(0))
    assert got == [(7, "tool_completed"), (7, "message_delta"), (8, "tool_completed"),
                   (8, "message_delta")]  # fmt: skip


def test_positions_are_bounded_and_never_move_back() -> None:
    positions = ThreadPositions(capacity=2)
    positions.advance("a", 5)
    positions.advance("a", 3)
    positions.advance("b", 1)
    positions.advance("c", 1)  # "a" is the least recently published: it goes
    assert (positions.get("a"), positions.get("b"), positions.get("c")) == (None, 1, 1)
    positions.advance("b", 2)
    positions.forget("c")
    assert (len(positions), positions.get("b")) == (1, 2)
    with pytest.raises(ValueError):
        ThreadPositions(capacity=0)


class _Accepting(EventStream):
    async def _connect(self) -> None: ...

    async def _receive(self) -> list[dict[str, object]]:
        return []

    async def _disconnect(self) -> None: ...


def test_the_client_hands_on_deltas_in_place_and_never_resumes_from_one() -> None:
    stream = _Accepting(open_timeout=1, reconnect_timeout=1)
    stream._threads.add(THREAD)
    stream.last_seq[THREAD] = 4
    taken = [
        stream._accept(event.to_wire())
        for event in (delta(4), delta(4), durable(4), durable(5), delta(4), delta(5), delta(9))
    ]
    assert [(e.seq, e.type, e.ephemeral) if e else None for e in taken] == [
        (4, "message_delta", True),
        (4, "message_delta", True),
        None,  # a durable event already seen
        (5, "tool_completed", False),
        None,  # out of place: before the last durable event handed on
        (5, "message_delta", True),
        None,  # out of place: after an event not handed on
    ]
    assert stream.last_seq[THREAD] == 5
