"""The dashboard page in a real headless Chromium (Debian's, never a downloaded one), driven by
Playwright: log in, watch a tunnel and its requests arrive live over the feed, close the tunnel;
the feed says when it lagged and reconnects by itself.

Needs /usr/bin/chromium (``apt-get install chromium``) and the ``playwright`` package (the ``test``
extra); skips without them locally, fails without them under CI=true. The screenshot lands in
``test-artifacts/dashboard.png`` (git-ignored).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from comzy import __version__
from comzy.core.server import ServerContext
from comzy.plugins.dashboard import Dashboard, DashboardSettings
from tests.conftest import ROOT, start_agent, start_server
from tests.helpers import DisconnectWatcher, unavailable
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
ARTIFACTS = ROOT / "test-artifacts"
#: Playwright's auto-waiting limit for each expectation (the feed is live: things show up at once).
EXPECT_TIMEOUT_MS = 5000
#: The feed badge's class list holds "live" (a whole class: its "live-state" class is not "live").
LIVE = re.compile(r"(^|\s)live(\s|$)")


def require_browser() -> None:
    """Skip (fail under CI=true) without playwright or Debian's chromium; call it before starting anything."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not HAVE_CHROMIUM:
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium); the browser test never downloads one")


@asynccontextmanager
async def chromium_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A page in headless Debian chromium, and the list collecting its script errors (and, once
    :func:`log_in` returned, its console errors)."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1100})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
            yield page, problems
        finally:
            await browser.close()


async def log_in(page: Any, server: ServerContext, problems: list[str]) -> None:
    """Log in with the form already on ``page``. From then on the console must stay clean: a
    Content-Security-Policy violation or a failed request is a problem."""
    from playwright.async_api import expect

    assert server.admin_token is not None
    await page.fill("#token", server.admin_token.value)
    await page.click("button[type=submit]")
    await expect(page.locator("#feed-state")).to_have_class(LIVE)
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)


async def test_the_dashboard_shows_tunnels_and_requests_live(tmp_path: Path, upstream: Upstream) -> None:
    require_browser()
    watcher = DisconnectWatcher()
    plugins = [("dashboard", Dashboard()), ("watcher", watcher)]
    with anyio.fail_after(60):
        async with start_server(tmp_path / "data", plugins=plugins) as server, chromium_page() as (page, problems):
            from playwright.async_api import expect

            # Not logged in: the login form; a wrong token is refused with a message.
            await page.goto(f"http://127.0.0.1:{server.ports.admin}/")
            await expect(page.locator("form[action='/login']")).to_be_visible()
            await page.fill("#token", "not-the-token")
            await page.click("button[type=submit]")
            await expect(page.locator(".error")).to_have_text("That token is not right.")
            await expect(page.locator("#feed-state")).to_have_count(0)

            # The right token: the dashboard, its feed live.
            await log_in(page, server, problems)
            await expect(page.locator("#server-version")).to_have_text(__version__)
            await expect(page.locator("#server-domain")).to_have_text(server.settings.base_domain)
            await expect(page.locator("#server-plugins .chip")).to_have_text(["dashboard", "watcher"])
            await expect(page.locator("#tunnels-empty")).to_be_visible()
            agents = f"ws://127.0.0.1:{server.ports.ws}"  # no COMZY_PUBLIC_AGENT_URL: the agent listener
            await expect(page.locator("#server-agent-url")).to_have_text(agents)
            await expect(page.locator("#start-command")).to_have_text(f"comzy 3000 --server {agents}")

            async with start_agent(server, upstream.port) as running:
                row = page.locator(f'#tunnel-rows tr[data-alias="{running.alias}"]')
                await expect(row).to_be_visible()
                await expect(page.locator("#tunnels-empty")).to_be_hidden()
                await expect(row.locator("td.alias a")).to_have_attribute("href", running.url)
                await expect(row.locator("td.owner")).to_have_text("anonymous")
                await expect(row.locator("td").nth(2)).to_have_text(str(upstream.port))
                await expect(row.locator("td.expires")).to_have_text("never")
                await expect(row.locator("td.requests")).to_have_text("0")

                async with running.visitor() as visitor:
                    assert (await visitor.get("/bytes/150000")).status_code == 200
                    assert (await visitor.get("/status/404")).status_code == 404
                    assert (await visitor.post("/status/503", content=b"x" * 2000)).status_code == 503

                # Each request shows up live, newest first, coloured by status class, and the
                # tunnel's counters follow.
                requests = page.locator("#request-rows tr")
                await expect(requests).to_have_count(3)
                await expect(requests.locator("td.path")).to_have_text(["/status/503", "/status/404",
                                                                        "/bytes/150000"])
                await expect(requests.nth(0).locator(".status-badge")).to_have_class(re.compile(r"status-5xx"))
                await expect(requests.nth(1).locator(".status-badge")).to_have_class(re.compile(r"status-4xx"))
                await expect(requests.nth(2).locator(".status-badge")).to_have_class(re.compile(r"status-2xx"))
                await expect(requests.nth(0).locator(".method-badge")).to_have_text("POST")
                await expect(row.locator("td.requests")).to_have_text("3")
                await expect(row.locator("td.bytes-out")).to_have_text(re.compile(r"^15\d kB$"))
                # The charts' window ends at the last complete second; the summary sums that window.
                await expect(page.locator("#stat-requests")).to_have_text("3")

                # The filter box narrows the stream by alias or path.
                await page.fill("#request-filter", "status/")
                await expect(page.locator("#request-rows tr:visible")).to_have_count(2)
                await expect(page.locator("#request-shown")).to_have_text("2 of 3")
                await page.fill("#request-filter", running.alias)
                await expect(page.locator("#request-rows tr:visible")).to_have_count(3)
                await page.fill("#request-filter", "")

                # A reload starts from the feed's snapshot: same tunnel, same requests and totals.
                await page.reload()
                await expect(page.locator("#feed-state")).to_have_class(LIVE)
                await expect(requests).to_have_count(3)
                await expect(row.locator("td.requests")).to_have_text("3")
                await expect(page.locator("#stat-requests")).to_have_text("3")
                await _check_chart_has_data(page)

                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # Close: a confirmation, then the row goes when the feed says the tunnel closed.
                questions: list[str] = []

                async def accept(dialog: Any) -> None:
                    questions.append(dialog.message)
                    await dialog.accept()

                page.once("dialog", accept)
                await row.locator("button", has_text="Close").click()
                await expect(row).to_have_count(0)
                await expect(page.locator("#tunnels-empty")).to_be_visible()
                assert questions and running.alias in questions[0]
                with anyio.fail_after(5):
                    (reason,) = await watcher.wait_for(running.alias)
                assert "admin dashboard" in reason
                assert running.alias not in {tunnel.alias for tunnel in server.tunnels()}
                async with running.visitor() as visitor:
                    assert (await visitor.get("/")).status_code == 404
            assert problems == []

            # Log out: back to the login form, and the page is out of reach again.
            await page.click("a.logout")
            await expect(page.locator("form[action='/login']")).to_be_visible()
            await page.goto(f"http://127.0.0.1:{server.ports.admin}/")
            await expect(page.locator("form[action='/login']")).to_be_visible()


async def test_the_page_says_when_it_lagged_and_reconnects_by_itself(tmp_path: Path, upstream: Upstream) -> None:
    require_browser()
    # The same admin port (and data directory, so the same token and login cookie) for a second
    # server: the page must find it again without a reload.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    dashboard = Dashboard(DashboardSettings(_env_file=None, feed_queue=10))
    with anyio.fail_after(60):
        async with chromium_page() as (page, problems):
            from playwright.async_api import expect

            # The page stays open while the servers stop: the feed ends at once (1001), so the
            # default shutdown grace is no wait.
            stopped_at = 0.0
            async with start_server(tmp_path / "data", plugins=[("dashboard", dashboard)],
                                    admin_port=admin_port) as server:
                await page.goto(f"http://127.0.0.1:{admin_port}/")
                await log_in(page, server, problems)
                await expect(page.locator("#notice")).to_be_hidden()
                # Published in one go, the feed cannot send in between: the page's queue holds
                # 10, the other 20 are dropped, and the page gets told; it starts over from a new
                # snapshot (a second feed connection).
                (first_feed,) = dashboard.hub.subscribers
                for number in range(30):
                    dashboard.hub.publish({"type": "test_filler", "number": number})
                await expect(page.locator("#notice")).to_be_visible()
                await expect(page.locator("#notice-text")).to_contain_text("missed 20 event(s)")
                with anyio.fail_after(5):
                    # The set of feed clients changes in the server's tasks: no event to wait on.
                    while first_feed in dashboard.hub.subscribers or not dashboard.hub.subscribers:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                await expect(page.locator("#feed-state")).to_have_class(LIVE)
                await page.click("#notice-dismiss")
                await expect(page.locator("#notice")).to_be_hidden()
                stopped_at = time.monotonic()
            assert time.monotonic() - stopped_at < 3  # not the 5 s shutdown grace

            await expect(page.locator("#feed-state")).to_have_class(re.compile(r"\breconnecting\b"))
            await expect(page.locator("#feed-state-text")).to_contain_text("reconnecting")
            problems.clear()  # the browser logs each refused reconnection attempt as an error

            async with start_server(tmp_path / "data", plugins=[("dashboard", Dashboard())],
                                    admin_port=admin_port) as server:
                await expect(page.locator("#feed-state")).to_have_class(LIVE, timeout=20_000)
                async with start_agent(server, upstream.port) as running:
                    await expect(page.locator(f'#tunnel-rows tr[data-alias="{running.alias}"]')).to_be_visible()
            assert [problem for problem in problems if "uncaught" in problem] == []


async def _check_chart_has_data(page: Any) -> None:
    """The requests/s line rises above the zero line (drawn from the snapshot's series)."""
    coloured = await page.evaluate("""() => {
        const canvas = document.getElementById("chart-requests");
        // Above the zero line: the plot's bottom is 24 CSS pixels up; stay clear of the line's width.
        const rows = canvas.height - Math.ceil(30 * (window.devicePixelRatio || 1));
        const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, rows).data;
        let count = 0;
        for (let i = 0; i < pixels.length; i += 4) {
            // The requests line is sky blue (#38bdf8): much more blue than red.
            if (pixels[i + 3] > 200 && pixels[i + 2] > 200 && pixels[i] < 120) count += 1;
        }
        return count;
    }""")
    assert coloured > 20, "the requests/s chart drew no line"
