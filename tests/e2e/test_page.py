"""The chat page at `/`, in the system Chromium, against a real `threadline serve` process.

One server (SQLite, the demo agent plus the slow and failing agents of
`tests.e2e.page_agents`, a little demo-model latency so streaming can be seen) serves the
module; every test signs up its own users in their own browser contexts. Each page fails its
test on any script error or Content-Security-Policy violation (see `page_support`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.e2e.page_support import (
    CHROMIUM_ARGS,
    PASSWORD,
    Browsing,
    PageServer,
    api_token,
    current_thread_id,
    message_box,
    require_axe,
    require_chromium,
    screenshot,
    send,
    sign_up,
    unique_email,
)

pytestmark = pytest.mark.e2e
# A loaded two-core machine runs several suites at once: waits are generous, never fixed.
expect.set_options(timeout=20_000)
QUESTION, ANSWER = "what is 12*7?", "12*7 = 84."
# Records every text the streaming answer and the thinking indicator show, as they change.
STREAM_RECORDER = """
window.__streamed = [];
window.__thinking = [];
const record = (selector, seen) => {
  const element = document.querySelector(selector);
  const text = element ? element.textContent.trim() : '';
  if (text && seen[seen.length - 1] !== text) seen.push(text);
};
new MutationObserver(() => {
  record('.bubble.streaming', window.__streamed);
  record('.thinking-text', window.__thinking);
}).observe(document.body, { subtree: true, childList: true, characterData: true });
"""


MESSAGES_PER_MINUTE = 70


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageServer]:
    server = PageServer(
        tmp_path_factory.mktemp("page-server"),
        {"demo_delay_seconds": "0.25", "messages_per_minute": str(MESSAGES_PER_MINUTE)},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    require_chromium()
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    chromium = require_chromium()
    launched = playwright_driver.chromium.launch(
        executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture
def browsing(browser: Browser, page_server: PageServer) -> Iterator[Browsing]:
    session = Browsing(browser, page_server)
    try:
        yield session
    finally:
        session.close()


def tool_card(page: Page, name: str = "calculator") -> object:
    return page.get_by_role("article", name=re.compile(f"^Tool call {name}"))


def answers(page: Page) -> list[str]:
    return [text.strip() for text in page.locator(".row-assistant .markdown").all_inner_texts()]


def test_page_is_served_with_a_strict_content_security_policy(page_server: PageServer) -> None:
    response = httpx.get(f"{page_server.base_url}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert "unsafe-inline" not in policy and "http" not in policy
    html = response.text
    assert re.search(r"<script[^>]*>\s*[^<\s]", html) is None, "the page has an inline script"
    bundle = httpx.get(f"{page_server.base_url}/assets/app.js", timeout=10)
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
    missing = httpx.get(f"{page_server.base_url}/assets/..%2Fpyproject.toml", timeout=10)
    assert missing.status_code == 404


def test_first_conversation_live_then_after_reload(
    browsing: Browsing, page_server: PageServer
) -> None:
    page = browsing.page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    email = unique_email("ada")
    sign_up(page, email)
    screenshot(page, "01-empty-conversation")
    page.evaluate(STREAM_RECORDER)

    send(page, QUESTION)
    card = tool_card(page)
    expect(card).to_be_visible()
    expect(card).to_contain_text('"expression": "12*7"')
    expect(card).to_have_attribute("aria-label", "Tool call calculator: Done")
    expect(card.locator(".tool-result")).to_have_text("84")
    expect(card.locator(".tool-duration")).to_have_text(re.compile(r"\d|<1 ms"))
    expect(page.locator(".row-assistant .markdown").last).to_have_text(ANSWER)
    streamed = page.evaluate("window.__streamed")
    assert any(ANSWER.startswith(text) and text != ANSWER for text in streamed), (
        f"the answer did not stream in (texts seen while streaming: {streamed})"
    )
    thinking = page.evaluate("window.__thinking")
    assert "Looking at the question… this is arithmetic." in thinking, thinking
    thread_id = current_thread_id(page)
    expect(page.get_by_role("button", name=QUESTION)).to_be_visible()  # titled, in the list
    screenshot(page, "02-conversation")

    page.reload()
    expect(page.locator(".bubble.user")).to_have_text([QUESTION])
    expect(tool_card(page)).to_have_attribute("aria-label", "Tool call calculator: Done")
    expect(page.locator(".row-assistant .markdown")).to_have_text([ANSWER])
    assert current_thread_id(page) == thread_id

    foreign = [url for url in requested if not url.startswith(page_server.base_url)]
    assert not foreign, f"the page loaded something from elsewhere: {foreign}"
    token = page.evaluate("localStorage.getItem('threadline.token')")
    assert token, "the token is not kept across a reload"
    assert sockets and all(token not in url for url in sockets + requested), (
        "the token travelled in a URL"
    )


def test_second_tab_and_device_watch_the_same_run_live(browsing: Browsing) -> None:
    context = browsing.context(color_scheme="dark")
    first = browsing.page(context)
    email = unique_email("grace")
    sign_up(first, email)
    device = browsing.page(browsing.context())  # another browser: its own storage, signs in
    device.goto("/")
    device.get_by_label("Email").fill(email)
    device.get_by_label("Password").fill(PASSWORD)
    device.get_by_role("button", name="Sign in").click()
    expect(message_box(device)).to_be_visible()

    send(first, "what is 6*7?", agent="slow")
    expect(tool_card(first)).to_have_attribute("aria-label", "Tool call calculator: Running")
    thread_id = current_thread_id(first)
    # A second tab of the same browser and the other device open the thread while the tool
    # runs: the snapshot on subscribe tells them a run is active; they follow the rest live.
    tab = browsing.page(context)
    for page in (tab, device):
        page.goto(f"/#/t/{thread_id}")
    pages = (first, tab, device)
    for page in pages:
        expect(tool_card(page)).to_have_attribute("aria-label", "Tool call calculator: Running")
        expect(page.locator(".thinking-text")).to_have_text("Using calculator…")
        expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    screenshot(tab, "03-second-tab-live")
    for page in pages:
        expect(tool_card(page)).to_have_attribute(
            "aria-label", "Tool call calculator: Done", timeout=30_000
        )
        expect(page.locator(".row-assistant .markdown")).to_have_text(["6*7 = 42."])
        expect(page.get_by_role("button", name="Cancel")).to_have_count(0)


def test_message_sent_during_a_run_waits_its_turn(browsing: Browsing) -> None:
    page = browsing.page()
    sign_up(page, unique_email("hedy"))
    send(page, "what is 6*6?", agent="slow")
    expect(tool_card(page)).to_have_attribute("aria-label", "Tool call calculator: Running")
    send(page, "what is 7*7?")  # enqueued behind the running run (the default strategy)
    expect(page.locator(".row-assistant .markdown")).to_have_text(["6*6 = 36.", "7*7 = 49."])
    rows = [".bubble.user", ".tool-card", ".row-assistant .markdown"]
    order = page.locator(", ".join(rows)).all_inner_texts()
    expected = ["what is 6*6?", "36", "6*6 = 36.", "what is 7*7?", "49", "7*7 = 49."]
    assert len(order) == len(expected), order
    assert all(want in text for want, text in zip(expected, order, strict=True)), order
    page.reload()
    expect(page.locator(".row-assistant .markdown")).to_have_text(["6*6 = 36.", "7*7 = 49."])
    assert page.locator(", ".join(rows)).all_inner_texts() == order


def test_reconnects_and_resumes_without_duplicates(
    browsing: Browsing, page_server: PageServer
) -> None:
    page = browsing.page()
    email = unique_email("edsger")
    sign_up(page, email)
    send(page, "what is 9*9?", agent="slow")
    expect(tool_card(page)).to_have_attribute("aria-label", "Tool call calculator: Running")
    thread_id = current_thread_id(page)

    # The server goes away mid-run (its graceful shutdown lets the run finish meanwhile)...
    page_server.stop()
    expect(page.get_by_text("Reconnecting")).to_be_visible()
    screenshot(page, "04-reconnecting")
    page_server.start()
    # ...and the page resumes from its last sequence number: what it missed, once.
    expect(page.get_by_text("Reconnecting")).to_have_count(0, timeout=30_000)
    expect(page.locator(".row-assistant .markdown")).to_have_text(["9*9 = 81."], timeout=30_000)
    expect(page.locator(".bubble.user")).to_have_text(["what is 9*9?"])
    expect(page.locator(".tool-card")).to_have_count(1)

    # The browser goes offline; a message posted meanwhile (from elsewhere) arrives on return.
    browsing.contexts[-1].set_offline(True)
    expect(page.get_by_text("Reconnecting")).to_be_visible()
    token = api_token(page_server, email)
    posted = httpx.post(
        f"{page_server.base_url}/v1/threads/{thread_id}/messages",
        headers={"Authorization": f"Bearer {token}"},
        json={"content": "what is 5*5?", "run": {"agent": "demo"}},
        timeout=10,
    )
    assert posted.status_code == 201, posted.text
    browsing.contexts[-1].set_offline(False)
    expect(page.get_by_text("Reconnecting")).to_have_count(0)
    expect(page.locator(".row-assistant .markdown")).to_have_text(["9*9 = 81.", "5*5 = 25."])
    expect(page.locator(".bubble.user")).to_have_text(["what is 9*9?", "what is 5*5?"])
    expect(page.locator(".tool-card")).to_have_count(2)


def test_cancel_a_slow_run_and_see_failed_runs(browsing: Browsing) -> None:
    page = browsing.page()
    sign_up(page, unique_email("barbara"))
    send(page, "what is 2*3?", agent="sleeper")
    expect(tool_card(page)).to_have_attribute("aria-label", "Tool call calculator: Running")
    page.get_by_role("button", name="Cancel").click()
    outcome = page.get_by_role("note").filter(has_text="Run cancelled")
    expect(outcome).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(tool_card(page)).not_to_have_attribute("aria-label", "Tool call calculator: Running")

    send(page, "what is 3*3?", agent="crasher")  # a tool error goes back to the model
    errored = tool_card(page).filter(has_text="3*3")
    expect(errored).to_have_attribute("aria-label", "Tool call calculator: Error")
    expect(errored.locator(".tool-result")).to_contain_text("calculator exploded on 3*3")

    send(page, "what is 4*4?", agent="one-step")
    failed = page.get_by_role("note").filter(has_text="Run failed")
    expect(failed).to_be_visible()
    screenshot(page, "05-cancelled-and-failed")
    page.reload()  # outcomes come back with the history
    expect(page.get_by_role("note").filter(has_text="Run cancelled")).to_be_visible()
    expect(page.get_by_role("note").filter(has_text="Run failed")).to_be_visible()


def test_hostile_markdown_renders_as_inert_text(browsing: Browsing) -> None:
    page = browsing.page()
    sign_up(page, unique_email("mallory"))
    hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    send(page, hostile, agent="echo")
    expect(page.locator(".row-assistant .markdown")).to_contain_text(["You said"])
    send(page, "**bold** [link](javascript:window.__pwned=3)", agent="echo")
    expect(page.locator(".row-assistant .markdown")).to_have_count(2)

    messages = page.get_by_role("log", name="Messages")
    expect(page.locator(".bubble.user").first).to_have_text(hostile)  # shown as typed
    expect(page.locator(".row-assistant .markdown").first).to_contain_text("<script>")
    assert messages.locator("script, img, iframe, [onerror]").count() == 0
    assert messages.locator("a[href^='javascript']").count() == 0
    expect(messages.locator(".markdown strong")).to_have_text(["bold"])  # Markdown still works
    assert page.evaluate("window.__pwned") is None


def test_history_pages_back_as_you_scroll_up(browsing: Browsing, page_server: PageServer) -> None:
    page = browsing.page()
    email = unique_email("ada-history")
    sign_up(page, email)
    headers = {"Authorization": f"Bearer {api_token(page_server, email)}"}
    with httpx.Client(base_url=page_server.base_url, headers=headers, timeout=10) as http:
        thread_id = http.post("/v1/threads", json={"title": "Long one"}).json()["id"]
        for number in range(60):
            http.post(
                f"/v1/threads/{thread_id}/messages", json={"content": f"note {number:02d}"}
            ).raise_for_status()
    page.goto(f"/#/t/{thread_id}")
    bubbles = page.locator(".bubble.user")
    expect(bubbles).to_have_count(40)  # the latest page, newest at the bottom
    expect(bubbles.last).to_have_text("note 59")
    page.locator(".messages").evaluate("el => { el.scrollTop = 0; }")
    expect(bubbles).to_have_count(60)
    expect(bubbles).to_have_text([f"note {number:02d}" for number in range(60)])
    expect(page.get_by_role("button", name="Load earlier messages")).to_have_count(0)


def test_thread_list_actions(browsing: Browsing, page_server: PageServer) -> None:
    page = browsing.page()
    email = unique_email("frances")
    sign_up(page, email)
    token = api_token(page_server, email)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=page_server.base_url, headers=headers, timeout=10) as http:
        for number in range(44):
            created = http.post("/v1/threads", json={"title": f"Older thread {number:02d}"})
            created.raise_for_status()
        target = http.post("/v1/threads", json={"title": "Quarterly numbers"}).json()["id"]
    page.reload()
    items = page.locator(".thread-item")
    expect(items.first).to_have_text(re.compile("Quarterly numbers"))  # newest activity first
    expect(items).to_have_count(30)
    items.last.scroll_into_view_if_needed()  # infinite scroll: the next page loads
    expect(items).to_have_count(45)

    page.get_by_label("Search conversations").fill("quarterly")
    expect(items).to_have_count(1)
    items.first.click()
    page.get_by_role("button", name="Rename").click()
    page.get_by_label("Title").fill("Q3 review")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("heading", name="Q3 review")).to_be_visible()
    page.get_by_label("Search conversations").fill("")
    try:
        expect(items).to_have_count(30)
    except AssertionError as exc:
        # Seen once in a full run (0 threads after clearing the search), never alone: say
        # what the sidebar showed (an error?) and what the server logged.
        sidebar = page.locator(".sidebar").inner_text()
        message = f"{exc}\nsidebar:\n{sidebar}\nserver:\n{page_server.log_tail()}"
        raise AssertionError(message) from exc

    page.get_by_role("button", name="Archive").click()
    expect(page.locator(f"[data-thread-id='{target}']")).to_have_count(0)
    page.get_by_label("Show conversations").select_option("archived")
    expect(items).to_have_text([re.compile("Q3 review")])
    page.get_by_role("button", name="Restore").click()
    page.get_by_label("Show conversations").select_option("active")
    expect(page.locator(f"[data-thread-id='{target}']")).to_have_count(1)

    page.get_by_role("button", name="Delete").click()
    dialog = page.get_by_role("dialog", name="Delete this conversation?")
    expect(dialog).to_be_visible()
    screenshot(page, "06-delete-confirmation")
    dialog.get_by_role("button", name="Keep it").click()
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Delete").click()
    page.get_by_role("button", name="Delete forever").click()
    expect(page.get_by_text("The conversation was deleted.")).to_be_visible()
    expect(page.locator(f"[data-thread-id='{target}']")).to_have_count(0)
    gone = httpx.get(f"{page_server.base_url}/v1/threads/{target}", headers=headers, timeout=10)
    assert gone.status_code == 404


def test_archive_and_another_user_sees_none_of_it(browsing: Browsing) -> None:
    page = browsing.page()
    sign_up(page, unique_email("alan"))
    send(page, QUESTION)
    expect(page.locator(".row-assistant .markdown")).to_have_text([ANSWER])
    thread_id = current_thread_id(page)
    page.get_by_role("button", name="Archive").click()
    expect(page.locator(".conversation-head .badge")).to_have_text("archived")
    expect(page.locator(f"[data-thread-id='{thread_id}']")).to_have_count(0)

    intruder = browsing.page(browsing.context())
    sign_up(intruder, unique_email("eve"))
    for status in ("active", "archived", ""):
        intruder.get_by_label("Show conversations").select_option(status)
        expect(
            intruder.get_by_text("No conversations yet.").or_(
                intruder.get_by_text("Nothing archived.")
            )
        ).to_be_visible()
        expect(intruder.locator(".thread-item")).to_have_count(0)
    intruder.goto(f"/#/t/{thread_id}")  # the thread's address, as the owner's page shows it
    expect(intruder.get_by_text("does not exist, or it is not yours")).to_be_visible()
    expect(intruder.locator(".messages .row")).to_have_count(0)
    expect(intruder.get_by_role("heading", name=QUESTION)).to_have_count(0)

    # The owner signs out: the token is forgotten, and another tab of the same browser signs
    # out with it.
    other_tab = browsing.page(page.context)
    other_tab.goto("/")
    expect(message_box(other_tab)).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("localStorage.getItem('threadline.token')") is None
    expect(other_tab.get_by_role("heading", name="Sign in")).to_be_visible()


def test_composer_keys_and_rate_limit(browsing: Browsing, page_server: PageServer) -> None:
    page = browsing.page()
    email = unique_email("ken")
    sign_up(page, email)
    box = message_box(page)
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"  # Shift+Enter: a new line, not sent
    box.press("Enter")
    expect(page.locator(".bubble.user")).to_have_text(["first line\nsecond line"])
    expect(box).to_have_value("")

    token = api_token(page_server, email)
    thread_id = current_thread_id(page)
    with httpx.Client(base_url=page_server.base_url, timeout=10) as http:
        # The limit counts in fixed one-minute windows: two windows' worth of posts, in case a
        # minute turns while they are sent.
        for _ in range(2 * MESSAGES_PER_MINUTE + 10):
            response = http.post(
                f"/v1/threads/{thread_id}/messages",
                headers={"Authorization": f"Bearer {token}"},
                json={"content": "filler"},
            )
            if response.status_code == 429:
                break
        assert response.status_code == 429
    box.fill("one more")
    box.press("Enter")
    reason = page.get_by_role("status").filter(has_text="sending messages too fast")
    expect(reason).to_contain_text(re.compile(r"send again in \d+ s"))
    expect(box).to_be_disabled()
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    screenshot(page, "07-rate-limited")


def test_phone_width_dark_theme_and_keyboard_focus(browsing: Browsing) -> None:
    phone = browsing.page(
        browsing.context(
            viewport={"width": 390, "height": 844}, color_scheme="dark", reduced_motion="reduce"
        )
    )
    sign_up(phone, unique_email("radia"))
    send(phone, QUESTION)
    expect(phone.locator(".row-assistant .markdown")).to_have_text([ANSWER])
    overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
    expect(phone.get_by_role("navigation", name="Conversations")).not_to_be_in_viewport()
    screenshot(phone, "08-phone-dark")
    phone.get_by_role("button", name="Open the conversation list").click()
    expect(phone.get_by_role("button", name="New chat")).to_be_in_viewport()
    screenshot(phone, "09-phone-dark-drawer")
    expect(phone.get_by_role("button", name="New chat")).to_be_focused()
    phone.keyboard.press("Escape")
    expect(phone.get_by_role("navigation", name="Conversations")).not_to_be_in_viewport()

    light = browsing.page(browsing.context(color_scheme="light"))
    light.goto("/")
    background = "getComputedStyle(document.body).backgroundColor"
    assert light.evaluate(background) != phone.evaluate(background)
    light.keyboard.press("Tab")
    focused = light.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement);"
        " return [document.activeElement.tagName, s.outlineStyle, s.outlineWidth]; })()"
    )
    assert focused[0] == "INPUT" and focused[1] != "none" and focused[2] != "0px", focused


def test_inline_script_is_refused_by_the_policy(browsing: Browsing) -> None:
    page = browsing.page()
    page.goto("/")
    page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__inline = 1'; document.body.append(s); }"
    )
    page.wait_for_function("window.__cspViolations.length > 0")
    assert page.evaluate("window.__inline") is None
    assert "script-src" in page.evaluate("window.__cspViolations[0]")
    page.evaluate("window.__cspViolations = []")  # expected: not a failure of this test


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessibility_of_sign_in_and_conversation(browsing: Browsing, scheme: str) -> None:
    axe: Path = require_axe()
    # axe is injected as a script tag, which the page's own policy would (rightly) refuse.
    page = browsing.page(browsing.context(bypass_csp=True, color_scheme=scheme))

    def serious_violations() -> list[str]:
        page.add_script_tag(path=str(axe))
        result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
        return [
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]

    page.goto("/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    screenshot(page, f"00-sign-in-{scheme}")
    assert serious_violations() == []
    page.get_by_role("button", name="Create an account").click()
    assert serious_violations() == []

    page.get_by_label("Email").fill(unique_email("axe"))
    page.get_by_label("Password").fill("correct horse battery")
    page.get_by_role("button", name="Create account").click()
    send(page, QUESTION)
    expect(page.locator(".row-assistant .markdown")).to_have_text([ANSWER])
    assert serious_violations() == []
