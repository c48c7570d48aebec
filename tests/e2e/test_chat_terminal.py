"""`threadline chat` in a pseudo-terminal (pexpect), against a real server: what a person
sees. The terminal's output is fed to a terminal emulator (pyte), so the assertions are on
the screen as drawn (after rich's live redraws), not on the raw byte stream."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator

import pexpect
import pyte
import pytest

from tests.e2e.client_support import (
    PASSWORD,
    RestartableServer,
    new_email,
    running_server,
    threaded_proxy,
)
from tests.e2e.sockets_support import free_port
from threadline.client import Threadline

pytestmark = pytest.mark.e2e
COLUMNS, LINES = 110, 60
WAIT = 30.0
DELAY = 0.04


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    with running_server(tmp_path_factory.mktemp("chat"), demo_delay_seconds=DELAY) as started:
        yield started


class Terminal:
    """A `threadline chat` process on a pty, and the screen it has drawn."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS)}
        env.pop("NO_COLOR", None)
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "threadline", "chat", *args],
            dimensions=(LINES, COLUMNS),
            env=env,
            encoding="utf-8",
            codec_errors="replace",
        )
        self.screen = pyte.Screen(COLUMNS, LINES)
        self._stream = pyte.Stream(self.screen)

    @property
    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, pattern: str, *, within: float = WAIT) -> re.Match[str]:
        """Read output until the screen shows `pattern` (a regex); fail with the screen."""
        deadline = time.monotonic() + within
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {pattern!r}:\n{self.text}")
            try:
                self._stream.feed(self.child.read_nonblocking(65536, timeout=0.2))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                if not re.search(pattern, self.text):
                    raise AssertionError(f"chat exited before {pattern!r}:\n{self.text}") from None

    def send(self, line: str) -> None:
        self.child.sendline(line)

    def interrupt(self) -> None:
        self.child.sendintr()

    def exit_code(self) -> int:
        self.child.expect(pexpect.EOF, timeout=WAIT)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def test_one_exchange_with_the_demo_agent(server: RestartableServer) -> None:
    email = new_email("chat")
    terminal = Terminal(server.base_url)
    try:
        terminal.wait_for(r"Email")
        terminal.send(email)
        terminal.wait_for(r"Password")
        terminal.send("short")
        terminal.wait_for(r"No account for .*Create it\?")
        terminal.send("y")
        terminal.wait_for(r"The password must be \d+ to \d+ characters\.\s+Password")
        terminal.send(PASSWORD)
        terminal.wait_for(r"Created the account")
        terminal.wait_for(r"Agent \[demo/gated\] \(demo\)")  # this server has two
        terminal.send("")
        terminal.wait_for(r"Agent: demo \(calculator, clock\)")
        terminal.wait_for(r"you › $|you ›\s*$")
        terminal.send("what is 12*7?")
        terminal.wait_for(r"12\*7 = 84\.")
        screen = terminal.text
        assert "tool calculator" in screen, screen  # the tool card's title
        assert "expression: 12*7" in screen, screen  # its arguments
        assert "→ 84" in screen, screen  # its result
        assert re.search(r"\d+ ms", screen), screen  # its duration
        assert screen.index("tool calculator") < screen.index("12*7 = 84."), screen
        terminal.wait_for(r"12\*7 = 84\.[\s\S]*you ›")  # ready for the next message

        # Ctrl-C during a run cancels it; the chat goes on. (The gated agent's calculator
        # waits until the test lets it go on, which it never does here.)
        terminal.send("/agent gated")
        terminal.wait_for(r"Agent: gated \(calculator\)")
        terminal.send("what is 6*7?")
        terminal.wait_for(r"expression: 6\*7[\s\S]*running…")  # the tool card, in progress
        terminal.interrupt()
        terminal.wait_for(r"Run cancelled \(user\)[\s\S]*you ›")
        terminal.send("/quit")
        terminal.wait_for(r"Bye\.")
        assert terminal.exit_code() == 0
    finally:
        terminal.kill()

    # Signed in again, the thread and its history are there.
    again = Terminal(server.base_url, "--email", email, "--password", PASSWORD, "--agent", "demo")
    try:
        again.wait_for(r"Your threads[\s\S]*1\s+what is 12\*7\?")
        again.wait_for(r"Thread number")
        again.send("1")
        again.wait_for(r"you › what is 12\*7\?[\s\S]*tool calculator[\s\S]*12\*7 = 84\.")
        again.wait_for(r"Ctrl-C during a run cancels it\.\s*you ›")
        again.interrupt()  # at a prompt: quit at once
        again.wait_for(r"Bye\.")
        assert again.exit_code() == 0
    finally:
        again.kill()


def test_what_stops_the_chat_is_said_plainly(server: RestartableServer) -> None:
    nowhere = Terminal(f"http://127.0.0.1:{free_port()}")
    try:
        nowhere.wait_for(r"Cannot reach Threadline at http://127\.0\.0\.1:\d+")
        nowhere.wait_for(r"Start one with threadline serve")
        assert nowhere.exit_code() == 1
    finally:
        nowhere.kill()

    email = new_email("chat-stop")
    unknown = Terminal(server.base_url, "--email", email, "--password", PASSWORD, "--agent", "x")
    try:
        unknown.wait_for(r"Create it\?")
        unknown.send("y")
        unknown.wait_for(r"No agent 'x' on this server \(it has: demo, gated\)")
        assert unknown.exit_code() == 1
    finally:
        unknown.kill()


def test_a_dropped_connection_shows_and_the_run_goes_on(server: RestartableServer) -> None:
    email = new_email("chat-drop")
    with threaded_proxy(server.port) as proxy:
        terminal = Terminal(proxy.url, "--email", email, "--password", PASSWORD, "--agent", "gated")
        try:
            terminal.wait_for(r"Create it\?")
            terminal.send("y")
            terminal.wait_for(r"you ›")
            terminal.send("what is 6*7?")
            terminal.wait_for(r"expression: 6\*7[\s\S]*running…")
            proxy.down()  # the connection drops and cannot come back yet
            terminal.wait_for(r"Connection lost, reconnecting…")
            proxy.refused_one()
            proxy.up()
            thread_id = _only_thread(server, email)
            server.open_gate(thread_id)
            terminal.wait_for(r"→ 42[\s\S]*6\*7 = 42\.[\s\S]*you ›")
            assert "reconnecting" not in terminal.text
        finally:
            terminal.kill()


def _only_thread(server: RestartableServer, email: str) -> str:
    with Threadline(server.base_url) as client:
        client.login(email, PASSWORD)
        [thread] = client.list_threads().data
        return thread.id
