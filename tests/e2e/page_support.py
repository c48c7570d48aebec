"""A real `threadline serve` and the system Chromium for the chat page's browser tests.

The browser is the machine's Chromium (`/usr/bin/chromium`, the Debian package that `.ci/run`
installs), driven by Playwright, headless, with flags that keep it off the network; Playwright
never downloads a browser. axe-core comes from `web/node_modules` (`npm ci --prefix web`).
Anything missing fails the test with the command that provides it: nothing is skipped.

`PageServer` can stop and start again on the same port and database, so a test can drop every
connection and watch the page come back. Each page records CSP violations and script errors;
`PageWatch.check()` fails the test on any.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page

from tests.e2e.conftest import clean_environment, free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = REPO / "test-artifacts"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0
PASSWORD = "correct horse battery"
# Recorded in every page before its own scripts run (init scripts are not subject to CSP).
WATCH_SCRIPT = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


def require_chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"The browser tests need the system Chromium at {CHROMIUM}: "
            "`apt-get install -y chromium` (.ci/run does this). Playwright must not download one."
        )
    return CHROMIUM


def require_axe() -> Path:
    if not AXE.exists():
        pytest.fail(f"axe-core is missing at {AXE}: run `npm ci --prefix web` (.ci/run does this).")
    return AXE


@dataclass
class PageServer:
    """`threadline serve` on SQLite in `workdir`, restartable on the same port and data."""

    workdir: Path
    settings: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> None:
        env = clean_environment(
            THREADLINE_ENVIRONMENT="test",
            THREADLINE_SECRET_KEY=self.secret,
            THREADLINE_DATABASE_URL=f"sqlite:///{self.workdir / 'threadline.db'}",
            THREADLINE_AGENTS="tests.e2e.page_agents",
            THREADLINE_LOG_LEVEL="WARNING",
            # Minimal argon2 cost: every test registers users; behaviour is the same.
            THREADLINE_PASSWORD_TIME_COST="1",
            THREADLINE_PASSWORD_MEMORY_KIB="64",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **{f"THREADLINE_{key.upper()}": value for key, value in self.settings.items()},
        )
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "threadline", "serve", "--port", str(self.port)],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"threadline serve exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a process we do not control, bounded by the deadline
        raise AssertionError(f"no /healthz within {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"the server ignored SIGTERM:\n{self.log_tail()}") from None


def api_token(server: PageServer, email: str) -> str:
    response = httpx.post(
        f"{server.base_url}/v1/auth/token", json={"email": email, "password": PASSWORD}, timeout=10
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def unique_email(label: str) -> str:
    return f"{label}-{secrets.token_hex(4)}@example.com"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


@dataclass
class PageWatch:
    """What went wrong in a page: script errors and CSP violations. Checked at teardown."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.page.is_closed():
            violations: list[str] = []
        else:
            violations = self.page.evaluate("window.__cspViolations || []")
        assert not self.errors, f"script errors in the page: {self.errors}"
        assert not violations, f"Content-Security-Policy violations: {violations}"


class Browsing:
    """Opens browser contexts (each a separate browser profile: its own storage, its own user)
    and pages that are checked for script errors and CSP violations when the test ends."""

    def __init__(self, browser: Browser, server: PageServer) -> None:
        self.browser = browser
        self.server = server
        self.contexts: list[BrowserContext] = []
        self.watches: list[PageWatch] = []

    def context(self, **options: object) -> BrowserContext:
        options = {"viewport": {"width": 1280, "height": 820}, **options}
        context = self.browser.new_context(base_url=self.server.base_url, **options)  # type: ignore[arg-type]
        context.set_default_timeout(20_000)
        context.add_init_script(WATCH_SCRIPT)
        self.contexts.append(context)
        return context

    def page(self, context: BrowserContext | None = None) -> Page:
        page = (context or self.context()).new_page()
        watch = PageWatch(page)
        page.on("pageerror", lambda error: watch.errors.append(str(error)))
        self.watches.append(watch)
        return page

    def close(self) -> None:
        try:
            for watch in self.watches:
                watch.check()
        finally:
            for context in self.contexts:
                context.close()


def message_box(page: Page) -> Locator:
    return page.get_by_role("textbox", name="Message", exact=True)


def sign_up(page: Page, email: str) -> None:
    page.goto("/")
    page.get_by_role("button", name="Create an account").click()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    message_box(page).wait_for()


def send(page: Page, text: str, *, agent: str = "demo") -> None:
    page.get_by_label("Agent", exact=True).select_option(agent)
    box = message_box(page)
    box.fill(text)
    box.press("Enter")


def current_thread_id(page: Page) -> str:
    page.wait_for_url("**/#/t/*")
    return page.url.rsplit("/", 1)[-1]
