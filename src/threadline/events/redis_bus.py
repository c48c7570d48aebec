"""The Redis event bus: live events between processes, one Redis stream per thread.

Model:
- Publishing queues the event; one sender task per process takes the queue in order and
  appends each batch in one pipelined round trip: `XADD <prefix>:events:<thread_id> <seq>-0`.
  Consecutive numbers of one thread (a step's events, numbered in one transaction) are one
  entry, at the last one's id, carrying the group in order: one append and one entry for a
  reader to parse instead of one per event.
  `publish` (called inside the recording transaction, `events/publisher.py`) waits for its
  append, so that the thread's row lock orders appends across processes as it orders numbers,
  but at most `_PUBLISH_WAIT_SECONDS`, and not at all while Redis is failing: a slow or hung
  Redis cannot hold database transactions for long. The entry id is the event's sequence
  number (a group's last), so Redis itself refuses an append that is out of order or a
  duplicate (a retry, or another process's later event that got there first after a wait ran
  out): each stream is in `seq` order whatever the publishers do, and a refused durable event
  reaches listeners from the database (below). A group is only ever consecutive numbers: a
  number inside it is this process's, so an accepted group starts after every entry before it
  (or repeats events a lost reply's first attempt appended: readers skip those).
- Ephemeral events (text deltas) have no number: the sender appends each with a small script
  (`_APPEND_EPHEMERAL`) at `<k>-<n>`, where `k` is the later of the last durable seq this
  process published on the thread (`events/positions.py`) and the `seq` of the stream's last
  entry, and `n` counts the deltas after it (`k-1`, `k-2`, ...: the `-0` ids are the durable
  events'), so the stream stays one total order and a delta's entry says which durable event
  it follows (readers set its `seq` to `k`). If another process appended durable `k+1` first
  (another run, or a user's message, on the same thread), the delta goes after it, at
  `(k+1)-1`, rather than being dropped: dropping would leave a hole in the text a user is
  watching, while appending after the top keeps every promise (it is still after its run's
  earlier durable events, which are at or below the top, and before its run's next one,
  which this process's sender appends after it; the script is atomic, so nothing lands
  between reading the top and appending). A delta is appended once: a batch retried after a
  dead connection carries only its durable events (the script chose the delta's id, so a
  second append would deliver it twice).
  Each append trims the stream to about `max_len` entries (`MAXLEN ~`). A process re-arms a
  stream's expiry (`ttl_seconds`) with an append when it has not armed that stream for a
  quarter of it (`_Expiries`), so a thread's stream disappears between three quarters of
  `ttl_seconds` and `ttl_seconds` after its last event, whichever processes appended it (the
  ids are sequence numbers, not times, so age cannot trim by `MINID`). An append that does not
  arm may not create the stream (`NOMKSTREAM`): a stream gone meanwhile (Redis restarted empty,
  say) is created again by an append that arms it, so no stream is ever left without an
  expiry. (A durable event that came after a delta the script placed in the new stream is then
  refused as out of order; readers reset after a restart and catch up from the database.)
  A failed append is logged and dropped, as is an event that finds the queue full: a durable
  event is already in the database, and readers notice the hole and catch up from there.
- Reading: a process reads only the streams of threads its own subscribers watch, over a fixed
  number of reader connections (`readers`) whatever the number of threads. A thread belongs to
  one shard by hash; each shard's task runs `XREAD BLOCK` over all its streams (at most
  `keys_per_read` per call, taking turns when there are more) plus a wake stream of its own,
  appended to when a thread is added, so a new thread is read at once rather than after the
  current block. A new thread is read from the last entry its stream had at `ready()`: what
  came before is in the database, which the subscriber reads after `ready()` returns.
- Loss: when a reader's connection fails, the shard reconnects with back-off and then calls
  `on_reset` of every subscription it carries (events may have been published while it could
  not read, or Redis restarted empty). A reader that fell behind the trim point sees the next
  durable entry's `seq` jump; the gateway treats that as a reset too (`api/live/gateway.py`).
  Positions are whole entry ids (`<seq>-<n>`), so a reader resumes after the last delta it
  delivered, never repeating one.
- Control messages (`events/control.py`) travel by pub/sub on one more connection: a few
  milliseconds to every process. If Redis cannot take one, it is delivered in this process only
  (the run's row records a cancel for the worker's heartbeat either way).
- Every Redis await has a deadline (an `asyncio.timeout` around the call: see `__init__`).
  The bus owns its tasks: `start()` starts them and `aclose()` stops them, from the lifespan
  that built the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from threadline.events.bus import ControlListener, EventListener, ResetListener, Unsubscribe
from threadline.events.control import CancelRun, SessionEnded, decode_control, encode_control
from threadline.events.positions import ThreadPositions
from threadline.events.types import Event, EventType

logger = logging.getLogger(__name__)
_TRANSPORT_ERRORS = (RedisError, OSError, TimeoutError)
_BACKOFF_MIN_SECONDS = 0.05
_BACKOFF_MAX_SECONDS = 2.0
# Entries per stream per XREAD: a burst larger than this is read in several calls.
_READ_COUNT = 500
# With more threads than one XREAD carries, each call blocks this long before the next turn.
_TURN_BLOCK_MS = 10
_CONTROL_POLL_SECONDS = 1.0
# Events waiting for the sender; beyond this (Redis far behind or away) new ones are dropped.
_OUTBOX_SIZE = 10_000
# Events appended per round trip at most.
_SEND_BATCH = 256
# How long `publish` waits for its append (inside the recording transaction) before letting
# the transaction go on; normally the append takes a round trip, well under this.
_PUBLISH_WAIT_SECONDS = 0.1
# Appends an ephemeral event after the thread's last durable one (see the module docstring).
# KEYS[1]: the stream; ARGV: the last durable seq this process published (0: none known), the
# entry, the stream's max length, its expiry in seconds. The id is computed here rather than
# with `XADD <k>-*`, which Redis 6.2 lacks. EVAL (not EVALSHA) so that a Redis restarted empty
# needs no reload in the middle of a pipeline.
_APPEND_EPHEMERAL = """
local after, n = tonumber(ARGV[1]), 1
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  local top_seq, top_n = string.match(top[1][1], '^(%d+)-(%d+)$')
  top_seq, top_n = tonumber(top_seq), tonumber(top_n)
  if top_seq >= after then
    after, n = top_seq, top_n + 1
  end
end
local id = string.format('%d-%d', after, n)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id, 'e', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return id
"""


@dataclass(frozen=True, slots=True)
class RedisBusConfig:
    prefix: str = "threadline"
    """Prefix of every key the bus writes."""
    max_len: int = 1000
    """Entries kept per thread stream (approximately)."""
    ttl_seconds: int = 3600
    """A thread's stream expires this long after its last event."""
    readers: int = 2
    """Reader connections (shards) per process."""
    keys_per_read: int = 256
    """Streams per XREAD call."""
    block_seconds: float = 5.0
    """How long one XREAD waits for entries."""
    timeout_seconds: float = 2.0
    """Deadline of every other Redis call."""
    max_connections: int = 16
    """Pooled connections for publishing, positioning and control (pub/sub holds one)."""


_EntryId = tuple[int, int]
"""A stream entry id `<seq>-<n>` as numbers: durable events are `(seq, 0)`, ephemeral ones
`(k, n)` with n >= 1 after durable `k`."""


@dataclass(eq=False)
class _Watch:
    thread_id: str
    key: bytes
    listeners: list[EventListener] = field(default_factory=list)
    resets: list[ResetListener] = field(default_factory=list)
    position: _EntryId | None = None
    """The id of the last entry read ((0, 0): from the start); None until positioned."""
    late: bool = False
    """`ready()` could not position it: reset its subscribers once the reader does."""

    def reset(self) -> None:
        for on_reset in tuple(self.resets):
            on_reset()


@dataclass(eq=False)
class _Shard:
    index: int
    wake_key: bytes
    watches: dict[bytes, _Watch] = field(default_factory=dict)
    wake_position: bytes = b"0-0"
    wake_pending: bool = False
    turn: int = 0


def _wire(event: Event) -> dict[str, object]:
    return {
        "type": event.type.value,
        "thread_id": event.thread_id,
        "user_id": event.user_id,
        "seq": event.seq,
        "run_id": event.run_id,
        "ts": event.ts.isoformat(),
        "data": event.data,
    }


def _encode(events: Sequence[Event]) -> tuple[bytes, bytes]:
    """An entry's one field, name and value: one event as `e`, a group (consecutive numbers,
    see `_groups`) as `g`, the list of them in order."""
    if len(events) == 1:
        wire: object = _wire(events[0])
        name = b"e"
    else:
        wire, name = [_wire(event) for event in events], b"g"
    return name, json.dumps(wire, separators=(",", ":"), default=str).encode()


def _from_wire(wire: dict[str, Any], *, seq: int) -> Event:
    return Event(
        type=EventType(wire["type"]),
        thread_id=wire["thread_id"],
        user_id=wire["user_id"],
        seq=seq,
        data=dict(wire["data"]),
        run_id=wire["run_id"],
        ts=datetime.fromisoformat(wire["ts"]),
    )


def _decode(fields: dict[bytes, bytes], *, seq: int) -> list[Event]:
    """The entry's events. A single event's `seq` comes from the entry's id (an ephemeral
    event's place may be later than the one its publisher knew: the script puts it after the
    stream's last entry); a group's events keep their own, consecutive, numbers."""
    if b"g" in fields:
        return [_from_wire(wire, seq=int(wire["seq"])) for wire in json.loads(fields[b"g"])]
    return [_from_wire(json.loads(fields[b"e"]), seq=seq)]


def _groups(batch: Sequence[Event]) -> list[list[Event]]:
    """`batch` cut into entries, in order: each run of durable events of one thread with
    consecutive numbers is one entry (a step's events, numbered in one transaction), each
    ephemeral event one of its own (the script places it). Only consecutive numbers: a group
    is appended at its last number's id, and a gap might hold another process's events, which
    must stay after the events before the gap (appended alone, those would be refused)."""
    groups: list[list[Event]] = []
    for event in batch:
        last = groups[-1][-1] if groups else None
        if (
            event.durable
            and last is not None
            and last.durable
            and last.thread_id == event.thread_id
            and event.seq == last.seq + 1
        ):
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups


_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class _Expiries:
    """When this process last armed each stream's expiry, so that it re-arms a stream at most
    once per quarter of the expiry rather than with every batch (an EXPIRE per batch was a
    quarter of the commands a run's events cost). Why a stream still lives at least three
    quarters of `ttl_seconds` after its last append, from any process: that process armed it
    with this append or less than a quarter before. Forgetting is always safe (the next append
    re-arms), so the table is bounded."""

    def __init__(self, ttl_seconds: int, capacity: int = 10_000) -> None:
        self._period = ttl_seconds / 4
        self._capacity = capacity
        self._armed: OrderedDict[bytes, float] = OrderedDict()

    def due(self, key: bytes, now: float) -> bool:
        armed = self._armed.get(key)
        return armed is None or now - armed >= self._period

    def armed(self, key: bytes, at: float) -> None:
        self._armed.pop(key, None)
        self._armed[key] = at
        if len(self._armed) > self._capacity:
            self._armed.popitem(last=False)


def _stream_id(position: _EntryId) -> str:
    return f"{position[0]}-{position[1]}"


def _id_of(entry_id: bytes) -> _EntryId:
    seq, _, n = entry_id.partition(b"-")
    return int(seq), int(n or 0)


def _top_id(entries: object) -> _EntryId:
    """The id of the last entry of an `XREVRANGE … COUNT 1` reply ((0, 0): an empty stream)."""
    top = cast(_Entries, entries)
    return _id_of(top[0][0]) if top else (0, 0)


class RedisBus:
    """The `EventBus` of a deployment with several processes. Call `start()` once the event
    loop runs, `aclose()` at shutdown."""

    def __init__(self, url: str, *, config: RedisBusConfig = RedisBusConfig()) -> None:
        if config.readers < 1 or config.keys_per_read < 1:
            raise ValueError("readers and keys_per_read must be positive")
        self._url = url
        self._config = config
        # `socket_timeout=None` (redis-py's default is 5 s), here and on the readers: every
        # call below has its own deadline (`asyncio.timeout`, which disconnects a connection
        # it interrupts), and with a socket timeout redis-py wraps each send in
        # `asyncio.wait_for` (a task per command) and each read in a timeout of its own:
        # 2 to 3 % of a server's CPU in a profile, for deadlines already there.
        self._redis: Redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                url,
                max_connections=config.max_connections,
                timeout=config.timeout_seconds,
                socket_timeout=None,
                socket_connect_timeout=config.timeout_seconds,
            )
        )
        bus_id = uuid.uuid4().hex[:12]
        self._shards = [
            _Shard(n, f"{config.prefix}:wake:{bus_id}:{n}".encode()) for n in range(config.readers)
        ]
        self._channel = f"{config.prefix}:control"
        self._watches: dict[str, _Watch] = {}
        self._control: list[ControlListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: asyncio.Queue[tuple[Event, asyncio.Future[None] | None]] = asyncio.Queue(
            maxsize=_OUTBOX_SIZE
        )
        self._positions = ThreadPositions()
        self._expiries = _Expiries(config.ttl_seconds)
        self._outbox_full = False
        self._publish_failing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._spawn(self._send_loop())
        for shard in self._shards:
            self._spawn(self._read_loop(shard))
        self._spawn(self._control_loop())

    async def aclose(self) -> None:
        if self._tasks:
            await self.flush()  # the last events of a shutting-down worker still go out
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._config.timeout_seconds)
        self._watches.clear()
        self._control.clear()
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            async with asyncio.timeout(self._config.timeout_seconds):
                await self._redis.aclose(close_connection_pool=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ events

    def _key(self, thread_id: str) -> bytes:
        return f"{self._config.prefix}:events:{thread_id}".encode()

    async def publish(self, event: Event) -> None:
        """Queue `event` for the sender and wait (briefly, see the module docstring) until it
        is appended: while the caller's transaction still holds the thread's row lock, so the
        next event of the thread, from any process, is appended after it."""
        await self.publish_many((event,))

    async def publish_many(self, events: Sequence[Event]) -> None:
        """`publish` for a batch: queued in order, one wait for the last (the sender appends
        them in order, so the last one appended means all are). An ephemeral event among
        them is queued as `publish_ephemeral` queues it, after the durable ones before it."""
        sent: asyncio.Future[None] | None = None
        for event in events:
            if not event.durable:
                await self.publish_ephemeral(event)  # queues at once: it never waits
                continue
            if event.type is EventType.THREAD_DELETED:
                self._positions.forget(event.thread_id)
            else:
                self._positions.advance(event.thread_id, event.seq)
            sent = asyncio.get_running_loop().create_future()
            if not self._queue(event, sent):
                return
        if sent is not None and not self._publish_failing:
            await asyncio.wait({sent}, timeout=_PUBLISH_WAIT_SECONDS)

    async def publish_ephemeral(self, event: Event) -> None:
        """Queue `event` for the sender, which places it after the thread's last durable
        event (see the module docstring); nothing waits for it: no transaction is held."""
        after = self._positions.get(event.thread_id) or 0
        self._queue(dataclasses.replace(event, seq=after), None)

    def _queue(self, event: Event, sent: asyncio.Future[None] | None) -> bool:
        try:
            self._outbox.put_nowait((event, sent))
        except asyncio.QueueFull:
            # Redis is far behind or away: drop it; listeners see the gap and catch up.
            if not self._outbox_full:
                logger.warning(
                    "Redis publish queue full (%d events); dropping live events", _OUTBOX_SIZE
                )
            self._outbox_full = True
            return False
        self._outbox_full = False
        return True

    async def flush(self) -> None:
        """Return once every event queued so far was sent (or given up on). Bounded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.timeout_seconds * 2):
                await self._outbox.join()

    async def _send_loop(self) -> None:
        """The one sender: takes what is queued, in order, and appends it in one round trip."""
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < _SEND_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                await self._send([event for event, _ in batch])
            finally:
                for _, sent in batch:
                    if sent is not None and not sent.done():
                        sent.set_result(None)
                    self._outbox.task_done()

    async def _send(self, batch: list[Event]) -> None:
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                try:
                    results = await self._append(batch)
                except RedisConnectionError:
                    # A pooled connection that a Redis restart left dead fails at first use;
                    # the pool drops it. Appending the durable events again is safe: their
                    # ids make it idempotent. Redis chose the ephemeral ones' ids, so those
                    # might be appended twice: they are left out.
                    batch = [event for event in batch if event.durable]
                    if not batch:
                        raise
                    results = await self._append(batch)
        except _TRANSPORT_ERRORS as exc:
            logger.debug("Publishing %d events failed: %s", len(batch), exc)
            if not self._publish_failing:
                logger.warning(
                    "Cannot publish to Redis (%s: %s); live listeners will catch up from the "
                    "database",
                    type(exc).__name__,
                    exc,
                )
            self._publish_failing = True
            return
        if self._publish_failing:
            logger.info("Publishing to Redis again")
            self._publish_failing = False
        for event, result in zip(batch, results, strict=True):
            if isinstance(result, ResponseError):
                # Redis refused the id: an event of this thread with this or a later seq is
                # already on the stream. The stream stays in order; this one is not carried
                # live (a durable one reaches listeners from the database).
                logger.warning(
                    "Event %d of %s not appended: %s", event.seq, event.thread_id, result
                )

    async def _append(self, batch: list[Event]) -> list[object]:
        """Each event's append, in order, on one connection; one result per event (its
        entry id, or the error). A durable event whose stream was gone is appended again, in
        a second round trip that creates the stream and arms it (see the module docstring)."""
        now = time.monotonic()
        results = await self._append_once(batch, now, arm_all=False)
        gone = [i for i, event in enumerate(batch) if event.durable and results[i] is None]
        if gone:
            again = await self._append_once([batch[i] for i in gone], now, arm_all=True)
            for index, result in zip(gone, again, strict=True):
                results[index] = result
        return results

    async def _append_once(self, batch: list[Event], now: float, *, arm_all: bool) -> list[object]:
        """One pipeline: each group's append (`_groups`), then an EXPIRE for each stream due
        (or for every stream, `arm_all`); one result per event, its group's. An append to a
        stream not due is `NOMKSTREAM`: None if the stream is gone."""
        config = self._config
        appends: list[int] = []  # the index of each event's append among the pipe's commands
        expiring: dict[bytes, None] = {}  # the streams to arm, once each, after the appends
        async with self._redis.pipeline(transaction=False) as pipe:
            for group in _groups(batch):
                last = group[-1]
                key = self._key(last.thread_id)
                appends.extend([len(pipe)] * len(group))
                if last.durable:
                    arming = arm_all or self._expiries.due(key, now)
                    name, value = _encode(group)
                    pipe.xadd(
                        key,
                        {name: value},
                        id=f"{last.seq}-0",
                        maxlen=config.max_len,
                        approximate=True,
                        nomkstream=not arming,
                    )
                    if arming:
                        expiring[key] = None
                else:  # the script expires the key itself
                    pipe.eval(
                        _APPEND_EPHEMERAL,
                        1,
                        key,
                        last.seq,
                        _encode(group)[1],
                        config.max_len,
                        config.ttl_seconds,
                    )
            first_expire = len(pipe)
            for key in expiring:
                pipe.expire(key, config.ttl_seconds)
            results = list(await pipe.execute(raise_on_error=False))
        for key, result in zip(expiring, results[first_expire:], strict=True):
            if not isinstance(result, Exception):
                self._expiries.armed(key, now)
        return [results[index] for index in appends]

    def subscribe(
        self, thread_id: str, listener: EventListener, *, on_reset: ResetListener | None = None
    ) -> Unsubscribe:
        watch = self._watches.get(thread_id)
        if watch is None:
            watch = _Watch(thread_id, self._key(thread_id))
            self._watches[thread_id] = watch
            self._shard(watch.key).watches[watch.key] = watch
        watch.listeners.append(listener)
        if on_reset is not None:
            watch.resets.append(on_reset)

        def unsubscribe() -> None:
            if listener in watch.listeners:
                watch.listeners.remove(listener)
            if on_reset is not None and on_reset in watch.resets:
                watch.resets.remove(on_reset)
            if not watch.listeners and self._watches.get(thread_id) is watch:
                del self._watches[thread_id]
                self._shard(watch.key).watches.pop(watch.key, None)

        return unsubscribe

    async def ready(self, thread_id: str) -> None:
        watch = self._watches.get(thread_id)
        if watch is None or watch.position is not None:
            return
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                top = await self._redis.xrevrange(watch.key, count=1)
        except _TRANSPORT_ERRORS as exc:
            logger.warning("Cannot read the end of thread %s's stream: %s", thread_id, exc)
            watch.late = True
            return
        if watch.position is None:
            watch.position = _top_id(top)
            self._wake(self._shard(watch.key))

    def _shard(self, key: bytes) -> _Shard:
        return self._shards[zlib.crc32(key) % len(self._shards)]

    def _wake(self, shard: _Shard) -> None:
        if shard.wake_pending:
            return
        shard.wake_pending = True
        self._spawn(self._send_wake(shard))

    async def _send_wake(self, shard: _Shard) -> None:
        shard.wake_pending = False
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(shard.wake_key, {b"w": b"1"}, maxlen=1, approximate=False)
                    pipe.expire(shard.wake_key, 60)
                    await pipe.execute()
        except _TRANSPORT_ERRORS:
            pass  # the reader's own block timeout picks the new thread up a little later

    async def _read_loop(self, shard: _Shard) -> None:
        config = self._config
        failing, delay = False, _BACKOFF_MIN_SECONDS
        while True:
            reader: Redis = Redis.from_url(
                self._url,
                single_connection_client=True,
                socket_timeout=None,  # the XREAD's own deadline bounds it (see `__init__`)
                socket_connect_timeout=config.timeout_seconds,
            )
            try:
                async with asyncio.timeout(config.timeout_seconds):
                    await reader.ping()
                if failing:
                    logger.info("Redis reader %d reconnected; subscribers catch up", shard.index)
                    failing, delay = False, _BACKOFF_MIN_SECONDS
                    for watch in tuple(shard.watches.values()):
                        watch.reset()
                while True:
                    await self._read_once(reader, shard)
            except _TRANSPORT_ERRORS as exc:
                if not failing:
                    logger.warning(
                        "Redis reader %d lost its connection (%s: %s); reconnecting",
                        shard.index,
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            finally:
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    async with asyncio.timeout(config.timeout_seconds):
                        await reader.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_SECONDS)

    async def _read_once(self, reader: Redis, shard: _Shard) -> None:
        config = self._config
        await self._position_unplaced(reader, shard)
        placed = [w for w in shard.watches.values() if w.position is not None]
        block_ms = int(config.block_seconds * 1000)
        if len(placed) > config.keys_per_read:
            start = shard.turn % len(placed)
            placed = (placed[start:] + placed[:start])[: config.keys_per_read]
            shard.turn = start + config.keys_per_read
            block_ms = _TURN_BLOCK_MS
        streams: dict[bytes | str | memoryview, int | bytes | str | memoryview] = {
            shard.wake_key: shard.wake_position
        }
        streams.update({w.key: _stream_id(w.position) for w in placed if w.position is not None})
        async with asyncio.timeout(config.block_seconds + config.timeout_seconds):
            reply = await reader.xread(streams, count=_READ_COUNT, block=block_ms)
        for key, entries in cast(list[tuple[bytes, _Entries]], reply or []):
            if key == shard.wake_key:
                shard.wake_position = entries[-1][0]
                continue
            watch = shard.watches.get(key)
            if watch is not None:
                self._deliver(watch, entries)

    def _deliver(self, watch: _Watch, entries: _Entries) -> None:
        for entry_id, fields in entries:
            position, before = _id_of(entry_id), watch.position
            if before is not None and position <= before:
                continue  # read for an earlier watch of the same thread
            watch.position = position
            try:
                events = _decode(fields, seq=position[0])
            except (KeyError, ValueError, TypeError) as exc:
                logger.warning("Skipping a malformed entry %r of %r: %s", entry_id, watch.key, exc)
                continue
            for event in events:
                if before is not None and event.durable and (event.seq, 0) <= before:
                    # Carried already: a group appended again after a lost reply, whose
                    # first attempt had appended these events as a group of their own.
                    continue
                for listener in tuple(watch.listeners):
                    try:
                        listener(event)
                    except Exception:  # one broken listener must not stop the shard's reader
                        logger.exception("Event listener of thread %s failed", watch.thread_id)

    async def _position_unplaced(self, reader: Redis, shard: _Shard) -> None:
        """Threads nobody positioned (a subscriber that did not await `ready()`, or whose
        `ready()` failed) start at their stream's end now; the failed ones are reset."""
        for watch in [w for w in shard.watches.values() if w.position is None]:
            async with asyncio.timeout(self._config.timeout_seconds):
                top = await reader.xrevrange(watch.key, count=1)
            if watch.position is None:
                watch.position = _top_id(top)
            if watch.late:
                watch.late = False
                watch.reset()

    # ------------------------------------------------------------------ control

    async def publish_control(self, message: CancelRun | SessionEnded) -> None:
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                try:
                    await self._redis.publish(self._channel, encode_control(message))
                except RedisConnectionError:  # a dead pooled connection (see `publish`);
                    # sending twice is harmless, every control message is idempotent
                    await self._redis.publish(self._channel, encode_control(message))
        except _TRANSPORT_ERRORS as exc:
            logger.warning(
                "Cannot publish a %s control message to Redis (%s); delivered in this process only",
                message.kind,
                exc,
            )
            self._deliver_control(message)

    def subscribe_control(self, listener: ControlListener) -> Unsubscribe:
        self._control.append(listener)
        return lambda: self._control.remove(listener) if listener in self._control else None

    def _deliver_control(self, message: CancelRun | SessionEnded) -> None:
        for listener in tuple(self._control):
            try:
                listener(message)
            except Exception:  # one broken listener must not stop the control channel
                logger.exception("Control listener failed on a %s message", message.kind)

    async def _control_loop(self) -> None:
        timeout = self._config.timeout_seconds
        failing, delay = False, _BACKOFF_MIN_SECONDS
        while True:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(timeout):
                    await pubsub.subscribe(self._channel)
                if failing:
                    logger.info("Control channel reconnected")
                    failing, delay = False, _BACKOFF_MIN_SECONDS
                while True:
                    async with asyncio.timeout(_CONTROL_POLL_SECONDS + timeout):
                        raw = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=_CONTROL_POLL_SECONDS
                        )
                    if raw is not None and raw.get("type") == "message":
                        self._receive_control(raw["data"])
            except _TRANSPORT_ERRORS as exc:
                if not failing:
                    logger.warning(
                        "Control channel lost (%s: %s); reconnecting", type(exc).__name__, exc
                    )
                failing = True
            finally:
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    async with asyncio.timeout(timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_SECONDS)

    def _receive_control(self, raw: bytes) -> None:
        try:
            message = decode_control(raw)
        except ValidationError as exc:
            logger.warning("Ignoring an unknown control message: %s", exc.errors()[:1])
            return
        self._deliver_control(message)
