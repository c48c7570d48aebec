"""What a live stream of wire events must look like: durable events in `seq` order, each once,
and each ephemeral one (a text delta) right after the durable event whose `seq` it carries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

EPHEMERAL_TYPES = frozenset({"message_delta"})


def is_ephemeral(message: Mapping[str, object]) -> bool:
    """A delta, which must say so on the wire (and only a delta does)."""
    ephemeral = message["type"] in EPHEMERAL_TYPES
    assert bool(message.get("ephemeral")) is ephemeral, message
    return ephemeral


def assert_ordered(
    messages: Sequence[Mapping[str, object]], *, after_seq: int | None = None
) -> None:
    """Durable seqs only go up (no duplicate, no reorder) and start after `after_seq`; every
    ephemeral event carries the seq of the last durable event before it (`after_seq` before
    any; without `after_seq`, a leading delta fixes where the stream started)."""
    position = after_seq
    for index, message in enumerate(messages):
        seq = message["seq"]
        assert isinstance(seq, int), message
        if is_ephemeral(message):
            if position is None:
                position = seq
            assert seq == position, f"delta {index} placed after {seq}, follows {position}"
        else:
            assert position is None or seq > position, f"event {index}: seq {seq} after {position}"
            position = seq


def assert_in_place(messages: Sequence[Mapping[str, object]], *, after_seq: int) -> None:
    """`messages` (events only) continue a thread after `after_seq`: as `assert_ordered`, and
    the durable seqs are `after_seq + 1, + 2, ...` with no gap."""
    assert_ordered(messages, after_seq=after_seq)
    numbers = [m["seq"] for m in messages if not is_ephemeral(m)]
    assert numbers == list(range(after_seq + 1, after_seq + 1 + len(numbers))), numbers
