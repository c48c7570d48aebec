"""Where each thread's log stands for this process: the seq of the last durable event the
process put on its bus, per thread. A bus places an ephemeral event (a text delta) after it
(`Event.seq`), which is how a delta gets a position without a number from the database.

Why it is right: a run's deltas are published by the process executing the run, after the
durable events that precede them in the run (its `agent_started`, its tool results, ...), which
that same process published; so the position it remembers for the thread is at or after the
last of those. (The Redis bus also looks at the stream's last entry, which covers durable
events other processes appended since: `events/redis_bus.py`.)

Bounded: only the `capacity` threads published most recently are remembered. A thread that
fell out has published nothing while that many others did; a delta for it has no known place
(the memory bus does not carry it; the Redis bus places it after the stream's last entry).
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CAPACITY = 10_000


class ThreadPositions:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self._capacity = capacity
        self._seqs: OrderedDict[str, int] = OrderedDict()

    def advance(self, thread_id: str, seq: int) -> None:
        """A durable event `seq` of the thread was published (never moves back)."""
        known = self._seqs.pop(thread_id, None)
        self._seqs[thread_id] = seq if known is None else max(known, seq)
        if len(self._seqs) > self._capacity:
            self._seqs.popitem(last=False)

    def get(self, thread_id: str) -> int | None:
        return self._seqs.get(thread_id)

    def forget(self, thread_id: str) -> None:
        self._seqs.pop(thread_id, None)

    def __len__(self) -> int:
        return len(self._seqs)
