"""The terminal chat's flow: sign in (or register), pick or start a thread, then talk.

It drives the sync client (`threadline.client.Threadline`) from the main thread. During a
run the main thread iterates the thread's event stream and a `rich.live.Live` redraws the
`RunView`. Ctrl-C is handled by a SIGINT handler installed only while a run is on screen:
the first press asks the server to cancel the run (from a short-lived thread, so the
handler never waits on the network) and the stream goes on until `run_cancelled`; a second
press raises `KeyboardInterrupt`, which ends the chat. At a prompt, Ctrl-C ends it at once.
"""

from __future__ import annotations

import re
import signal
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import FrameType

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.prompt import Confirm, Prompt
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from threadline.chat._view import RunView, history, safe
from threadline.client import APIConnectionError, APIError, Threadline, ThreadOut, UserOut

_HELP = (
    "Type a message. /new starts a thread, /threads picks another, /agent [NAME] changes "
    "the agent, /quit leaves."
)
_HISTORY_SHOWN = 30
_THREADS_SHOWN = 10
_SIGN_IN_ATTEMPTS = 3


class _Quit(Exception):
    """The user left the chat."""


class _Stop(Exception):
    """The chat cannot go on (the reason is on screen): exit with status 1."""


def run_chat(
    url: str,
    *,
    email: str | None = None,
    password: str | None = None,
    token: str | None = None,
    agent: str | None = None,
    thread_id: str | None = None,
    console: Console | None = None,
) -> int:
    """The chat from sign-in to goodbye; the process exit code."""
    console = console or Console()
    try:
        with Threadline(url) as client:
            _connect(console, client, url)
            user = _sign_in(console, client, email=email, password=password, token=token)
            console.print(f"Signed in as [bold]{escape(safe(user.email))}[/bold] on {escape(url)}")
            agent_name = _pick_agent(console, client, agent)
            thread = client.get_thread(thread_id) if thread_id else _pick_thread(console, client)
            _converse(console, client, thread, agent_name)
    except (KeyboardInterrupt, EOFError, _Quit):
        console.print("\nBye.")
        return 0
    except _Stop:
        return 1
    except APIConnectionError as exc:
        console.print(Text.assemble(("Lost the server: ", "red"), safe(str(exc))))
        return 1
    except APIError as exc:
        console.print(Text.assemble((safe(exc.message), "red"), f" ({safe(exc.code)})"))
        return 1
    return 0


def _connect(console: Console, client: Threadline, url: str) -> None:
    try:
        client.health()
    except APIConnectionError as exc:
        console.print(Text.assemble((f"Cannot reach Threadline at {url}: ", "red"), safe(str(exc))))
        console.print("Start one with [bold]threadline serve[/bold], or pass its URL.")
        raise _Stop from exc


def _sign_in(
    console: Console,
    client: Threadline,
    *,
    email: str | None,
    password: str | None,
    token: str | None,
) -> UserOut:
    if token:
        client.token = token
        return client.me()
    email = email or Prompt.ask("Email", console=console)
    password = password or Prompt.ask("Password", password=True, console=console)
    for _ in range(_SIGN_IN_ATTEMPTS):
        try:
            client.login(email, password)
            return client.me()
        except APIError as exc:
            if exc.code == "unknown_user":
                if not Confirm.ask(f"No account for {escape(email)}. Create it?", console=console):
                    email = Prompt.ask("Email", console=console)
                    continue
                while not _register(console, client, email, password):
                    password = Prompt.ask("Password", password=True, console=console)
            elif exc.code == "wrong_password":
                console.print("[red]Wrong password.[/red]")
                password = Prompt.ask("Password", password=True, console=console)
            else:
                raise
    console.print("[red]Could not sign in.[/red]")
    raise _Stop


def _register(console: Console, client: Threadline, email: str, password: str) -> bool:
    """Create the account; False if the server refused the password (say why)."""
    try:
        client.register(email, password)
    except APIError as exc:
        if exc.code != "invalid_password":
            raise
        console.print(Text(safe(exc.message) + ".", style="red"))
        return False
    console.print(f"Created the account [bold]{escape(safe(email))}[/bold].")
    return True


def _pick_agent(
    console: Console, client: Threadline, wanted: str | None, *, current: str | None = None
) -> str:
    agents = client.agents()
    names = [a.name for a in agents]
    if wanted is not None and wanted not in names:
        offered = ", ".join(names)
        console.print(Text(f"No agent {wanted!r} on this server (it has: {offered})", style="red"))
        raise _Stop
    if not names:
        console.print("[red]This server has no agents.[/red]")
        raise _Stop
    name = wanted or (names[0] if len(names) == 1 else _choose_agent(console, names, current))
    chosen = next(a for a in agents if a.name == name)
    tools = ", ".join(t.name for t in chosen.tools) or "no tools"
    console.print(f"Agent: [bold magenta]{name}[/bold magenta] ({tools})")
    return name


def _choose_agent(console: Console, names: list[str], current: str | None) -> str:
    default = current if current in names else "demo" if "demo" in names else names[0]
    return Prompt.ask("Agent", choices=names, default=default, console=console)


def _pick_thread(console: Console, client: Threadline) -> ThreadOut:
    threads = client.list_threads(limit=_THREADS_SHOWN).data
    if not threads:
        return client.create_thread()
    table = Table(title="Your threads", title_justify="left", box=None, pad_edge=False)
    table.add_column("#", justify="right", style="bold")
    table.add_column("Title")
    table.add_column("Status", style="dim")
    table.add_column("Last activity", style="dim")
    for number, thread in enumerate(threads, start=1):
        title = Text(safe(thread.title)) if thread.title else Text("(untitled)", style="dim")
        table.add_row(str(number), title, thread.status, _ago(thread))
    console.print(table)
    while True:
        choice = Prompt.ask(
            "Thread number, or Enter for a new thread",
            default="",
            show_default=False,
            console=console,
        ).strip()
        if not choice:
            return client.create_thread()
        if choice.isdigit() and 1 <= int(choice) <= len(threads):
            return threads[int(choice) - 1]
        console.print(f"[red]Pick 1 to {len(threads)}, or press Enter.[/red]")


def _converse(console: Console, client: Threadline, thread: ThreadOut, agent: str) -> None:
    while True:
        _show_thread(console, client, thread, agent)
        while True:
            text = console.input("[bold cyan]you[/bold cyan] › ").strip()
            if text in ("/quit", "/exit", "/q"):
                raise _Quit
            if text == "/help" or not text:
                console.print(Text(_HELP, style="dim"))
                continue
            if text in ("/new", "/threads"):
                thread = client.create_thread() if text == "/new" else _pick_thread(console, client)
                break
            if text == "/agent" or text.startswith("/agent "):
                agent = _switch_agent(console, client, text.removeprefix("/agent").strip(), agent)
                continue
            if re.fullmatch(r"/[a-z]+", text):
                console.print(Text(f"Unknown command {text}. {_HELP}", style="dim"))
                continue
            _turn(console, client, thread.id, text, agent)


def _switch_agent(console: Console, client: Threadline, wanted: str, current: str) -> str:
    try:
        return _pick_agent(console, client, wanted or None, current=current)
    except _Stop:
        return current  # it said why; the conversation goes on with the same agent


def _show_thread(console: Console, client: Threadline, thread: ThreadOut, agent: str) -> None:
    console.print(Rule(Text(safe(thread.title or "New thread")), style="dim"))
    if thread.message_count:
        page = client.list_messages(thread.id, limit=_HISTORY_SHOWN, order="desc")
        for renderable in history(reversed(page.data), agent=agent):
            console.print(renderable)
    console.print(Text(_HELP + " Ctrl-C during a run cancels it.", style="dim"))


def _turn(console: Console, client: Threadline, thread_id: str, text: str, agent: str) -> None:
    """Send one message and show its run live until it ends."""
    view = RunView(agent)
    with client.events(thread_id) as stream:
        view.reconnecting = lambda: stream.reconnecting
        try:
            posted = client.post_message(thread_id, text, agent=agent)
        except APIError as exc:
            wait = f" Try again in {exc.retry_after:.0f} s." if exc.retry_after else ""
            console.print(Text.assemble((safe(exc.message), "red"), f" ({safe(exc.code)}).{wait}"))
            return
        if posted.run is None:  # pragma: no cover - a run was asked for
            return
        run_id = posted.run.id

        def cancel() -> None:
            view.cancelling = True
            threading.Thread(
                target=_cancel, args=(console, client, thread_id, run_id), daemon=True
            ).start()

        with Live(view, console=console, refresh_per_second=12) as live, _interrupts(cancel):
            for event in stream:
                if event.run_id != run_id:
                    continue
                view.apply(event)
                live.refresh()
                if event.terminal:
                    break


def _cancel(console: Console, client: Threadline, thread_id: str, run_id: str) -> None:
    try:
        client.cancel_run(thread_id, run_id)
    except (APIError, APIConnectionError) as exc:
        console.print(Text.assemble(("Could not cancel the run: ", "red"), safe(str(exc))))


@contextmanager
def _interrupts(first: Callable[[], None]) -> Iterator[None]:
    """While the block runs, the first SIGINT calls `first()`, the next one quits."""
    presses = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with _quiet_control_keys():
            yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _quiet_control_keys() -> Iterator[None]:
    """While the live display draws, the terminal echoes nothing (an echoed `^C` or keystroke
    would shift the display by a line) and keeps its pending output when Ctrl-C is pressed
    (by default it discards it, and the redraw would lose a line)."""
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _ago(thread: ThreadOut) -> str:
    seconds = (datetime.now(UTC) - thread.last_activity_at).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"
