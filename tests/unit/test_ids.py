"""Ids: format, validation, order by creation time, and uniqueness across tasks, threads and
processes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from threadline import ids
from threadline.ids import IdPrefix, id_timestamp_ms, is_valid_id, new_id

pytestmark = pytest.mark.unit

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# The documented format, written out independently of the module's own regex.
ID_FORMAT = {
    prefix: re.compile(rf"{prefix.value}_[0-7][0-9A-HJKMNP-TV-Z]{{25}}") for prefix in IdPrefix
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh generator reading a clock the test moves, so the process-wide generator's state
    (its last millisecond) is neither used nor disturbed."""
    clock = SimpleNamespace(ms=now_ms())
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: clock.ms * 1_000_000))
    monkeypatch.setattr(ids, "_generator", ids._MonotonicULID())
    return clock


# --- Format ------------------------------------------------------------------------------------


def test_prefixes() -> None:
    assert {p.name: p.value for p in IdPrefix} == {
        "USER": "usr",
        "THREAD": "thr",
        "MESSAGE": "msg",
        "RUN": "run",
        "EVENT": "evt",
        "SERVICE_KEY": "key",
        "WEBHOOK": "whk",
        "WEBHOOK_DELIVERY": "dlv",
    }


@pytest.mark.parametrize("prefix", list(IdPrefix))
def test_format_is_prefix_underscore_and_26_crockford_characters(prefix: IdPrefix) -> None:
    value = new_id(prefix)

    assert ID_FORMAT[prefix].fullmatch(value), value
    assert len(value) == len(prefix.value) + 1 + 26
    assert is_valid_id(value, prefix)


@pytest.mark.parametrize("prefix", list(IdPrefix))
def test_an_id_is_valid_only_for_its_own_prefix(prefix: IdPrefix) -> None:
    value = new_id(prefix)

    assert [p for p in IdPrefix if is_valid_id(value, p)] == [prefix]


# --- Validation --------------------------------------------------------------------------------

VALID_THREAD = "thr_01JD3X5Q0B7W4W3M9R8P2V6KZN"


def test_the_reference_id_is_valid() -> None:
    assert is_valid_id(VALID_THREAD, IdPrefix.THREAD)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("usr_01JD3X5Q0B7W4W3M9R8P2V6KZN", id="other-prefix"),
        pytest.param("THR_01JD3X5Q0B7W4W3M9R8P2V6KZN", id="uppercase-prefix"),
        pytest.param("thr-01JD3X5Q0B7W4W3M9R8P2V6KZN", id="dash-separator"),
        pytest.param("thr01JD3X5Q0B7W4W3M9R8P2V6KZNX", id="no-separator"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZ", id="too-short"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZNN", id="too-long"),
        pytest.param("thr_01jd3x5q0b7w4w3m9r8p2v6kzn", id="lowercase"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZI", id="letter-I"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZL", id="letter-L"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZO", id="letter-O"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZU", id="letter-U"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZ-", id="punctuation"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZ\n", id="newline"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZÑ", id="non-ascii"),
        pytest.param("thr_81JD3X5Q0B7W4W3M9R8P2V6KZN", id="timestamp-overflow"),
        pytest.param(" thr_01JD3X5Q0B7W4W3M9R8P2V6KZN", id="leading-space"),
        pytest.param("thr_01JD3X5Q0B7W4W3M9R8P2V6KZN ", id="trailing-space"),
        pytest.param("", id="empty"),
        pytest.param("thr_", id="prefix-only"),
    ],
)
def test_malformed_ids_are_rejected(value: str) -> None:
    assert not is_valid_id(value, IdPrefix.THREAD)


@pytest.mark.parametrize(
    "value",
    [None, 42, b"thr_01JD3X5Q0B7W4W3M9R8P2V6KZN", ["thr_01JD3X5Q0B7W4W3M9R8P2V6KZN"], object()],
)
def test_non_strings_are_rejected(value: object) -> None:
    assert not is_valid_id(value, IdPrefix.THREAD)


def _mutated_ids() -> st.SearchStrategy[str]:
    """Strings near a well-formed id: one character replaced, inserted or removed."""

    def mutate(draw: st.DrawFn) -> str:
        prefix = draw(st.sampled_from(list(IdPrefix)))
        head = draw(st.sampled_from("01234567"))
        body = draw(st.text(alphabet=CROCKFORD, min_size=25, max_size=25))
        value = f"{prefix.value}_{head}{body}"
        index = draw(st.integers(0, len(value)))
        char = draw(st.one_of(st.sampled_from(CROCKFORD + "ILOU_-abz\n "), st.characters()))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "insert":
            return value[:index] + char + value[index:]
        if kind == "delete":
            return value[:index] + value[index + 1 :]
        return value[:index] + char + value[index + 1 :]

    return st.composite(mutate)()


@given(
    value=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"\A(usr|thr|msg|run|evt)_[0-9A-Z]{26}\Z"),
        _mutated_ids(),
    ),
    prefix=st.sampled_from(list(IdPrefix)),
)
@example(value="thr_7ZZZZZZZZZZZZZZZZZZZZZZZZZ", prefix=IdPrefix.THREAD)
@example(value="thr_00000000000000000000000000", prefix=IdPrefix.THREAD)
@example(value="thr_00000000000000000000000000\n", prefix=IdPrefix.THREAD)
def test_only_strings_in_the_id_format_are_accepted(value: str, prefix: IdPrefix) -> None:
    assert is_valid_id(value, prefix) == (ID_FORMAT[prefix].fullmatch(value) is not None)


# --- Order -------------------------------------------------------------------------------------


def test_ids_created_back_to_back_strictly_increase() -> None:
    values = [new_id(IdPrefix.MESSAGE) for _ in range(10_000)]

    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_ids_sort_by_creation_time_across_milliseconds(frozen_clock: SimpleNamespace) -> None:
    earlier = [new_id(IdPrefix.THREAD) for _ in range(3)]
    frozen_clock.ms += 1
    later = [new_id(IdPrefix.THREAD) for _ in range(3)]

    assert sorted(later + earlier) == earlier + later
    assert id_timestamp_ms(later[0]) == id_timestamp_ms(earlier[0]) + 1


def test_ids_within_one_millisecond_still_increase(frozen_clock: SimpleNamespace) -> None:
    values = [new_id(IdPrefix.EVENT) for _ in range(1_000)]

    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert {id_timestamp_ms(v) for v in values} == {frozen_clock.ms}


def test_ids_keep_increasing_when_the_clock_steps_back(frozen_clock: SimpleNamespace) -> None:
    before = new_id(IdPrefix.RUN)
    frozen_clock.ms -= 5_000  # an NTP correction
    after = [new_id(IdPrefix.RUN) for _ in range(10)]

    assert all(a < b for a, b in zip([before, *after], after, strict=False))


def test_id_timestamp_is_the_creation_time() -> None:
    before = now_ms()
    value = new_id(IdPrefix.USER)
    after = now_ms()

    assert before <= id_timestamp_ms(value) <= after


# --- Uniqueness --------------------------------------------------------------------------------


async def test_unique_across_many_concurrent_tasks() -> None:
    async def make(count: int) -> list[str]:
        made = []
        for _ in range(count):
            made.append(new_id(IdPrefix.MESSAGE))
            await asyncio.sleep(0)  # interleave with the other tasks
        return made

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(make(1_000)) for _ in range(50)]

    values = [v for task in tasks for v in task.result()]
    assert len(values) == 50_000
    assert len(set(values)) == len(values)
    for task in tasks:
        made = task.result()
        assert made == sorted(made)


def test_unique_and_ordered_across_threads() -> None:
    def make(count: int) -> list[str]:
        return [new_id(IdPrefix.MESSAGE) for _ in range(count)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(make, [5_000] * 8))

    values = [v for batch in batches for v in batch]
    assert len(set(values)) == len(values) == 40_000
    for batch in batches:
        assert all(a < b for a, b in zip(batch, batch[1:], strict=False))


_CHILD = (
    "import sys\n"
    "from threadline.ids import IdPrefix, new_id\n"
    "sys.stdin.readline()\n"  # start together, so the processes share milliseconds
    "print('\\n'.join(new_id(IdPrefix.MESSAGE) for _ in range({count})))\n"
)


def test_unique_across_processes() -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(count=5_000)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=60)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    assert [p.returncode for p in processes] == [0, 0, 0, 0]
    values = [line for output in outputs for line in output.split()]
    assert len(values) == 20_000
    assert all(is_valid_id(v, IdPrefix.MESSAGE) for v in values)
    assert len(set(values)) == len(values)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_continue_the_parents_sequence(
    frozen_clock: SimpleNamespace,
) -> None:
    """With the clock frozen, a child continuing the parent's random part would produce exactly
    the parent's next id."""
    new_id(IdPrefix.MESSAGE)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a multi-threaded process may deadlock the child;
        # this child only computes one id and writes it to a pipe before `_exit`.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: write one id and leave without running pytest's teardown
        try:
            os.write(write_end, new_id(IdPrefix.MESSAGE).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            child_id = pipe.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    parent_id = new_id(IdPrefix.MESSAGE)

    assert os.waitstatus_to_exitcode(status) == 0
    assert is_valid_id(child_id, IdPrefix.MESSAGE)
    assert child_id != parent_id
