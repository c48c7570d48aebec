"""Several copies of one process on one machine: `threadline serve --workers N` and
`threadline worker --processes N`.

The model:
- The entry point checks everything once, before any child exists (settings, the port, the
  database, Redis), and binds the one listening socket itself. Then `Supervisor` starts N
  children, each a fresh interpreter (`sys.executable`, not `fork`: no thread, event loop or
  connection of the parent is copied into them) running the same target: a whole `serve`
  (uvicorn accepting on the inherited listening socket) or a whole worker. The kernel gives
  each new connection to whichever child accepts it first.
- Each child is in a process group of its own, so a signal reaches it only through the
  supervisor, once: SIGINT or SIGTERM to the supervisor (or Ctrl-C at its terminal) is
  forwarded as the same signal to every child (by the supervisor's main loop, never from the
  handler, so a child started while the signal arrived is not missed), which then shuts down
  exactly as a lone process does on that signal; a second signal is forwarded again (uvicorn's
  "second Ctrl-C forces the exit" keeps working). The supervisor waits for every child and
  then ends as a lone process would have (`Outcome.signal`: the entry point re-raises it).
- A child that exits while no stop was asked for is reported in one line; the supervisor then
  stops the others and reports a failure (`Outcome.failed`). It does not restart the child: a
  crash is a fault for the process manager (systemd, Kubernetes) to see and act on, and the
  crashed child's runs come back to the queue when their leases expire.
- On Linux a child whose supervisor dies without stopping it (SIGKILL) receives SIGTERM from
  the kernel (`PR_SET_PDEATHSIG`) and shuts down as usual: no orphan keeps the port.
- Children that do not exit within `stop_timeout_seconds` of the stop are killed and reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Exit statuses of a child that stopped because it was asked to: uvicorn re-raises the signal
# it shut down on (killed by SIGTERM; SIGINT becomes KeyboardInterrupt, status 130 as for any
# interrupted Python program), a worker returns 0.
_CLEAN_STOP = frozenset({0, 130, -signal.SIGINT, -signal.SIGTERM})
_CHILD_CODE = (
    "import sys; from threadline.supervisor import child_main; child_main(int(sys.argv[1]))"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    signal: int | None
    """The signal that stopped the supervisor, if one did."""
    failed: bool
    """A child exited on its own, failed to stop cleanly, or had to be killed."""


class Supervisor:
    """Runs `count` children, each calling `target(*args, *sockets)` (`sockets` are inherited
    by every child). `target` and `args` must pickle; `report` gets one-line reports."""

    def __init__(
        self,
        *,
        name: str,
        count: int,
        target: Callable[..., object],
        args: tuple[object, ...],
        sockets: Sequence[socket.socket] = (),
        stop_timeout_seconds: float,
        report: Callable[[str], None],
    ) -> None:
        self._name = name
        self._count = count
        self._payload = (os.getpid(), target, args)
        self._sockets = sockets
        self._stop_timeout = stop_timeout_seconds
        self._report = report
        self._children: list[subprocess.Popen[bytes]] = []
        # What `_watch` acts on, in order: ("signal", signum) from the handler (SimpleQueue's
        # `put` may be called from a signal handler), ("exit", index, status) from the waiters.
        self._events: queue.SimpleQueue[tuple[str, int, int]] = queue.SimpleQueue()
        self._signal: int | None = None
        self._deadline: float | None = None

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self._children]

    def run(self) -> Outcome:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            for index in range(self._count):
                if self._events.empty():  # no signal yet: a stop starts no more children
                    self._start(index)
            failed = self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return Outcome(self._signal, failed)

    def _start(self, index: int) -> None:
        reader, writer = os.pipe()
        fds = (reader, *(sock.fileno() for sock in self._sockets))
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(reader)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            process_group=0,  # signals reach it through the supervisor only, once each
        )
        self._children.append(child)
        os.close(reader)
        with os.fdopen(writer, "wb") as pipe:
            # The import path first: unpickling the target imports its module.
            pickle.dump(sys.path, pipe)
            pickle.dump((*self._payload, [sock.fileno() for sock in self._sockets]), pipe)
        threading.Thread(target=self._wait_for, args=(index, child), daemon=True).start()

    def _wait_for(self, index: int, child: subprocess.Popen[bytes]) -> None:
        self._events.put(("exit", index, child.wait()))

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        # Forwarded by `_watch`, not here: there the list of children is complete.
        self._events.put(("signal", sig, 0))

    def _stop(self, sig: int) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self._stop_timeout
        for child in self._children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, sig)

    def _watch(self) -> bool:
        """Wait until every child has exited; True if anything went wrong."""
        running, failed = len(self._children), False
        while running:
            timeout = None if self._deadline is None else self._deadline - time.monotonic()
            try:
                kind, number, code = self._events.get(
                    timeout=None if timeout is None else max(timeout, 0)
                )
            except queue.Empty:
                self._kill_the_rest()
                return True
            if kind == "signal":
                self._signal = self._signal or number
                self._stop(number)
                continue
            running -= 1
            pid = self._children[number].pid
            if self._deadline is None:
                self._report(
                    f"{self._name} {number + 1} of {self._count} (pid {pid}) exited with "
                    f"status {code}; stopping the others"
                )
                failed = True
                self._stop(signal.SIGTERM)
            elif code not in _CLEAN_STOP:
                self._report(f"{self._name} {number + 1} (pid {pid}) stopped with status {code}")
                failed = True
        return failed

    def _kill_the_rest(self) -> None:
        for child in self._children:
            if child.poll() is None:
                self._report(
                    f"{self._name} (pid {child.pid}) did not stop within "
                    f"{self._stop_timeout:.0f} s; killed"
                )
                child.kill()
                child.wait()


def child_main(payload_fd: int) -> None:
    """A child's entry: read what to run from the supervisor's pipe, then run it."""
    with os.fdopen(payload_fd, "rb") as pipe:
        sys.path[:] = pickle.load(pipe)
        parent, target, args, fds = pickle.load(pipe)
    _stop_with(parent)
    try:
        target(*args, *(socket.socket(fileno=fd) for fd in fds))
    except KeyboardInterrupt:  # SIGINT before the target installed its handler, or re-raised
        sys.exit(130)


def _stop_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it died before the request: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)
