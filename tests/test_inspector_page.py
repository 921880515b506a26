"""The inspector's web page at / (issue 15): its assets and their policy, the live stream, the checks
that keep other web pages and rebound DNS names out, and the page itself in Debian's Chromium
(a real server, agent and upstream; requests made through the public URL).

The browser test needs /usr/bin/chromium and playwright, as tests/test_dashboard_browser.py does
(skips without them locally, fails under CI=true). Its screenshots land in test-artifacts/ and, with
COMZY_SCREENSHOTS=1, in docs/img/ (the ones docs/agent.md shows).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tomllib
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.agent import inspector, inspector_page
from comzy.agent.capture import Capture
from comzy.core.server import ServerContext
from tests.conftest import ROOT, cli_env
from tests.helpers import unavailable, wait_until
from tests.test_dashboard_browser import ARTIFACTS, chromium_page, require_browser
from tests.test_inspector import agent_command, agent_process, free_port, inspected, lines_until, requests
from tests.test_websocket import exchange, open_ws
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

HOSTILE_PATH = "/x/<script>alert(1)</script>?q=\"'><img/src=x/onerror=alert(2)>"  # no spaces in a target


def state_class(name: str) -> re.Pattern[str]:
    """The live-state badge's class list holds ``name`` (a whole class: "live-state" is not "live")."""
    return re.compile(rf"(^|\s){name}(\s|$)")


LIVE = state_class("live")
HOOK_BODY = b'{"event": "paid", "amount": 12, "note": "<img src=x onerror=alert(5)> it\'s $HOME `id`"}'
HOSTILE_HEADER = "<img src=x onerror=alert(3)><script>alert(4)</script>"


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(server: ServerContext,
                                                                       upstream: Upstream) -> None:
    async with inspected(server, upstream.port) as (_, api):
        page = await api.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        # No inline script or handler: every <script> has a src and is empty; no on* attributes.
        html = page.text
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="/assets/' in attrs and not body.strip() for attrs, body in scripts)
        assert not re.search(r"\son[a-z]+\s*=", html)
        for path, kind in [("/assets/app.js", "text/javascript"), ("/assets/style.css", "text/css"),
                           ("/assets/base.css", "text/css"), ("/assets/favicon.svg", "image/svg+xml")]:
            answer = await api.get(path)
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind), path
            assert path in html
        # Only the files of the table: nothing else on disk is reachable.
        for path in ["/assets/../inspector.py", "/assets/%2e%2e/inspector.py", "/assets/missing.js", "/index.html",
                     "/assets/inspector_page.py"]:
            assert (await api.get(path)).status_code == 404, path
        # The API's answers are never cached or sniffed either (they hold captured traffic).
        listed = await api.get("/api/requests/http")
        assert listed.headers["cache-control"] == "no-store"
        assert listed.headers["x-content-type-options"] == "nosniff"


def test_the_assets_ship_in_the_package() -> None:
    """An installed wheel has the page: each of its own files is package data of comzy.agent (the look it
    shares with the dashboard is comzy.assets': tests/test_shared_assets.py)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "inspector_assets/*" in config["tool"]["setuptools"]["package-data"]["comzy.agent"]
    folder = resources.files("comzy.agent").joinpath("inspector_assets")
    shipped = sorted(item.name for item in folder.iterdir())
    assert shipped == sorted(name for name, _ in inspector_page.ASSETS.values())


async def test_rebound_names_and_other_pages_are_refused(server: ServerContext, upstream: Upstream) -> None:
    async with inspected(server, upstream.port) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/kept")).status_code == 200
        (kept,) = await requests(api)
        own = str(api.base_url).rstrip("/")
        port = int(api.base_url.port or 0)

        # DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 is its own origin,
        # so the browser lets it read: the Host check refuses everything, the page included.
        for path in ["/", "/assets/app.js", "/api/stream", "/api/requests/http", "/api/tunnels"]:
            answer = await api.get(path, headers={"host": f"evil.example:{port}"})
            assert answer.status_code == 403, path
            assert "Host" in answer.json()["msg"]

        # A page elsewhere (another site, another app on localhost, a sandboxed frame) that makes the
        # browser send a request here: refused, whatever the content type.
        replay = {"id": kept["id"]}
        for origin in ["http://evil.example", f"http://localhost:{port + 1}", "http://127.0.0.1:3000", "null",
                       f"https://127.0.0.1:{port}"]:
            headers = {"origin": origin}
            posted = await api.post("/api/requests/http", json=replay, headers=headers)
            assert posted.status_code == 403, origin
            assert "other web pages" in posted.json()["msg"]
            assert (await api.delete("/api/requests/http", headers=headers)).status_code == 403
            assert (await api.get("/api/requests/http", headers=headers)).status_code == 403
        assert (await api.delete("/api/requests/http", headers={"sec-fetch-site": "cross-site"})).status_code == 403
        assert (await api.delete("/api/requests/http", headers={"sec-fetch-site": "same-site"})).status_code == 403
        # A form posted from elsewhere has no JSON content type: refused before anything runs.
        form = await api.post("/api/requests/http", content=b"id=" + kept["id"].encode(),
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415
        assert [e["id"] for e in await requests(api)] == [kept["id"]]  # nothing was replayed or cleared
        assert len([scope for scope in upstream.requests if scope["path"] == "/kept"]) == 1

        # The page itself (its own Origin, as browsers send with every POST and DELETE) and scripts
        # (no Origin, as curl) are served.
        mine = {"origin": own, "sec-fetch-site": "same-origin"}
        assert (await api.post("/api/requests/http", json=replay, headers=mine)).status_code == 204
        assert len([scope for scope in upstream.requests if scope["path"] == "/kept"]) == 2
        assert (await api.get("/", headers={"sec-fetch-site": "none"})).status_code == 200  # typed in the address bar
        assert (await api.delete("/api/requests/http", headers=mine)).status_code == 204
        assert await requests(api) == []
        assert (await api.delete("/api/requests/http")).status_code == 204


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """Server-Sent Events as (event, JSON data); comments and ``retry`` skipped."""
    name = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])
            name = ""


async def test_the_stream_sends_a_snapshot_then_what_changes_and_is_bounded(
        server: ServerContext, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspector_page, "MAX_STREAMS", 2)
    async with inspected(server, upstream.port) as (tunnel, api), tunnel.visitor() as visitor:
        assert (await visitor.get("/first")).status_code == 200
        with anyio.fail_after(30):
            async with api.stream("GET", "/api/stream") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
                events = sse_events(stream)
                addr = f"127.0.0.1:{upstream.port}"
                assert await anext(events) == ("tunnel", {
                    "public_url": tunnel.url, "addr": addr,
                    "tunnels": [{"name": "command_line", "public_url": tunnel.url, "addr": addr}]})
                name, snapshot = await anext(events)
                assert name == "snapshot"
                assert [(s["method"], s["uri"], s["status"], s["done"]) for s in snapshot] == \
                    [("GET", "/first", 200, True)]
                assert "raw" not in snapshot[0]  # summaries only: bodies are read one exchange at a time

                # A control character in a path cannot end an event early (JSON escapes it).
                answer = await visitor.post("/second%0D%0Aevent:%20remove", content=b"x" * 10)
                assert answer.status_code == 200
                changes: list[dict[str, Any]] = []
                while not (changes and changes[-1]["done"]):
                    name, data = await anext(events)
                    assert name == "upsert"
                    changes += data
                assert {c["uri"] for c in changes} == {"/second%0D%0Aevent:%20remove"}
                assert changes[-1]["request_size"] == 10 and changes[-1]["status"] == 200
                assert changes[-1]["duration"] > 0

                # Bounded: a third page waits for a slot (503 with what to do), the second gets one.
                async with api.stream("GET", "/api/stream") as second:
                    assert second.status_code == 200
                    third = await api.get("/api/stream")
                    assert third.status_code == 503
                    assert "close one" in third.json()["msg"]

                assert (await api.delete("/api/requests/http")).status_code == 204
                name, gone = await anext(events)
                assert name == "remove" and len(gone) == 2

        async def slot_free() -> bool:
            async with api.stream("GET", "/api/stream") as again:
                return again.status_code == 200

        # The slots are given back when pages go (each page's stream sees its end within a tick).
        await wait_until(slot_free)


async def test_a_page_that_stops_reading_is_dropped_and_its_slot_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream holds one look's changes at most: a reader that never reads fills the socket's
    buffers, then its writes wait, and past the write timeout it is closed."""
    monkeypatch.setattr(inspector_page, "MAX_STREAMS", 1)
    monkeypatch.setattr(inspector_page, "STREAM_WRITE_TIMEOUT", 0.5)
    capture = Capture(max_requests=500)
    exchanges = [capture.begin("GET", b"/" + b"x" * 2000 + b"/%d" % i, [], "127.0.0.1") for i in range(500)]
    api = inspector.InspectorAPI(capture, inspector.TunnelInfo("127.0.0.1:1"), lambda _name: None)  # type: ignore[arg-type,return-value]
    sock = inspector.bind("127.0.0.1", [0])
    port = sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(api.serve, sock)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the agent's side fills
        stuck.setblocking(False)
        with stuck:
            await asyncio.get_running_loop().sock_connect(stuck, ("127.0.0.1", port))
            stuck.send(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await wait_until(lambda: api.streams.open == 1)
            with anyio.fail_after(60):
                while api.streams.open:
                    # Every exchange changes between two looks: each look sends them all again (~1 MB).
                    for exchange in exchanges:
                        exchange.response_data(b"y")
                    await anyio.sleep(inspector_page.STREAM_TICK)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, \
                client.stream("GET", "/api/stream") as again:
            assert again.status_code == 200
        tg.cancel_scope.cancel()


async def run_copied_curl(page: Any) -> dict[str, Any]:
    """Click "Copy as curl", run the command it shows with bash, return the upstream's echo."""
    from playwright.async_api import expect

    if shutil.which("curl") is None or shutil.which("bash") is None:
        unavailable("curl and bash run the copied command (apt-get install curl)")
    await page.click("#copy-curl")
    await expect(page.locator("#curl-box")).to_be_visible()
    command = await page.locator("#curl").text_content()
    assert command and command.startswith("curl -i -X ")
    done = await anyio.run_process(["bash", "-c", command + " -s --max-time 30"], check=False)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return dict(json.loads(body))


# -- The page in Chromium -------------------------------------------------------------------------
async def send_raw(server: ServerContext, host: str, request: bytes) -> bytes:
    """One request written as bytes to the public listener (httpx would percent-encode the path)."""
    async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as sock:
        await sock.send(request.replace(b"HOST", host.encode()))
        received = b""
        with anyio.fail_after(30):
            while True:
                try:
                    received += await sock.receive()
                except anyio.EndOfStream:
                    return received


async def test_the_page_lists_live_filters_shows_details_and_replays(server: ServerContext,
                                                                     upstream: Upstream) -> None:
    require_browser()
    from playwright.async_api import expect

    for i in range(3):
        upstream.gate(f"sse{i}").set()
    upstream.gate("running-arrived")  # /hold/running: answered when the test lets it
    async with inspected(server, upstream.port, max_body=4096) as (tunnel, api), \
            chromium_page() as (page, problems):
        dialogs: list[str] = []

        async def refuse(dialog: Any) -> None:
            dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", refuse)
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        await page.set_viewport_size({"width": 1280, "height": 800})
        await page.goto(str(api.base_url))
        await expect(page.locator("#live-state")).to_have_class(LIVE)
        await expect(page.locator("#public-url")).to_have_text(tunnel.url)
        await expect(page.locator("#list-empty")).to_be_visible()

        # A request still running counts its time up on screen, then shows its duration; Clear
        # empties the list.
        rows = page.locator("#request-list li.request")
        async with tunnel.visitor() as visitor, anyio.create_task_group() as held:
            held.start_soon(visitor.get, "/hold/running")
            await upstream.gate("running-arrived").wait()
            running = rows.filter(has_text="/hold/running").locator(".duration")
            await expect(running).to_have_text(re.compile(r"^running \d"))
            first = await running.text_content()
            await expect(running).not_to_have_text(first or "")
            upstream.gate("running").set()
        await expect(running).to_have_text(re.compile(r"^[\d.]+ (µs|ms|s)$"))
        await page.click("#clear")
        await expect(rows).to_have_count(0)

        # Requests through the public URL show up live, newest first.
        host = f"{tunnel.alias}.{server.settings.base_domain}"
        async with tunnel.visitor() as visitor:
            hook = await visitor.post("/hooks/stripe?attempt=1", content=HOOK_BODY,
                                      headers={"content-type": "application/json", "x-signature": "t=1,v1=abc"})
            assert hook.status_code == 200
            assert (await visitor.get("/status/404")).status_code == 404
            assert (await visitor.get("/bytes/300")).status_code == 200
            assert (await visitor.post("/form", data={"name": "Ada Lovelace", "lang": "en&fr"})).status_code == 200
            assert (await visitor.get("/sse")).status_code == 200
            assert (await visitor.put("/upload", content=bytes(range(256)) * 40)).status_code == 200
        answer = await send_raw(server, host, f"GET {HOSTILE_PATH} HTTP/1.1\r\nHost: HOST\r\n"
                                              f"X-Evil: {HOSTILE_HEADER}\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200")
        rows = page.locator("#request-list li.request")
        paths = [HOSTILE_PATH, "/upload", "/sse", "/form",
                 "/bytes/300", "/status/404", "/hooks/stripe?attempt=1"]
        await expect(rows.locator(".path")).to_have_text(paths)
        await expect(page.locator("#request-count")).to_have_text("7")
        await expect(rows.nth(5).locator(".status-badge")).to_have_class(re.compile(r"status-4xx"))
        await expect(rows.nth(5).locator(".status-badge")).to_have_text("404")
        await expect(rows.nth(2).locator(".chip.stream")).to_contain_text("SSE · 3")

        # Filters: by status class, by method, by path.
        await page.select_option("#filter-status", "4")
        await expect(page.locator("#request-list li.request:visible .path")).to_have_text(["/status/404"])
        await expect(page.locator("#shown")).to_have_text("1 of 7")
        await page.select_option("#filter-status", "")
        await page.select_option("#filter-method", "POST")
        await expect(page.locator("#request-list li.request:visible .path")).to_have_text(["/form",
                                                                                          "/hooks/stripe?attempt=1"])
        await page.select_option("#filter-method", "")
        await page.fill("#filter-path", "hooks")
        await expect(page.locator("#request-list li.request:visible")).to_have_count(1)
        await page.fill("#filter-path", "")
        await expect(page.locator("#request-list li.request:visible")).to_have_count(7)

        # The detail: headers as sent, the JSON body pretty (a hostile string in it is text), timing.
        await rows.nth(6).click()
        await expect(page.locator("#detail-path")).to_have_text("/hooks/stripe?attempt=1")
        await expect(page.locator("#detail-method")).to_have_text("POST")
        request_headers = page.locator("#request-headers tr")
        await expect(request_headers.filter(has_text="x-signature")).to_contain_text("t=1,v1=abc")
        await expect(page.locator("#request-body .json-key").first).to_have_text('"event"')
        await expect(page.locator("#request-body pre.json")).to_contain_text('"amount": 12')
        await expect(page.locator("#request-body .json-string").last).to_have_text(
            '"<img src=x onerror=alert(5)> it\'s $HOME `id`"')
        # Copy as curl: the command, run by a shell, sends the same request to the local service.
        echoed = await run_copied_curl(page)
        assert echoed["method"] == "POST" and echoed["raw_path"] == "/hooks/stripe"
        assert echoed["query_string"] == "attempt=1"
        assert echoed["body_sha256"] == hashlib.sha256(HOOK_BODY).hexdigest()
        assert ["x-signature", "t=1,v1=abc"] in echoed["headers"]
        await expect(page.locator("#response-headers tr").filter(has_text="content-type")).to_contain_text(
            "application/json")
        await expect(page.locator("#response-body .json-key").first).to_have_text('"method"')
        await expect(page.locator("#detail-facts")).to_contain_text(re.compile(r"Duration\s*[\d.]+ (µs|ms|s)"))
        await page.screenshot(path=str(screenshot_dir() / "inspector.png"), animations="disabled")

        # A form body as a table; a binary body as hex.
        await rows.nth(3).click()
        await expect(page.locator("#request-body table.form tr").filter(has_text="lang")).to_contain_text("en&fr")
        await rows.nth(4).click()
        await expect(page.locator("#detail-path")).to_have_text("/bytes/300")
        await expect(page.locator("#response-body pre.hex")).to_contain_text("00000000  03 0a 11 18")
        await expect(page.locator("#response-body .body-bar")).to_contain_text("application/octet-stream")

        # A body longer than --inspect-max-body: what was kept, marked cut.
        await rows.nth(1).click()
        await expect(page.locator("#request-body .truncated")).to_contain_text("only the first 4.1 kB were kept")
        await expect(page.locator("#request-body pre.hex")).to_contain_text("00000000  00 01 02 03")

        # An event stream: its events, parsed.
        await rows.nth(2).click()
        await expect(page.locator("#stream-title")).to_have_text("Events")
        await expect(page.locator("#stream-rows tr")).to_have_count(3)
        await expect(page.locator("#stream-rows tr").nth(2)).to_contain_text("event 2")

        # Hostile path and header: text on the page, nothing runs, no element made of them.
        await rows.nth(0).click()
        await expect(page.locator("#detail-path")).to_have_text(paths[0])
        await expect(page.locator("#request-headers tr").filter(has_text="x-evil")).to_contain_text(HOSTILE_HEADER)
        assert await page.locator("img[src=x], #request-list script, #detail script").count() == 0
        echoed = await run_copied_curl(page)  # quotes, <, > and backquotes stay inert in the shell too
        assert echoed["raw_path"] == HOSTILE_PATH.split("?")[0]
        assert echoed["query_string"] == HOSTILE_PATH.split("?")[1]
        assert ["x-evil", HOSTILE_HEADER] in echoed["headers"]

        # Replay: the upstream gets it again, and the new row is marked a replay and selected.
        before = len([s for s in upstream.requests if s["path"] == "/hooks/stripe"])
        await rows.locator(".path", has_text="/hooks/stripe").click()
        await page.click("#replay")
        await expect(rows).to_have_count(8)
        await expect(rows.nth(0).locator(".chip.replay")).to_be_visible()
        await expect(rows.nth(0).locator(".path")).to_have_text("/hooks/stripe?attempt=1")
        await expect(rows.nth(0)).to_have_class(re.compile(r"\bselected\b"))
        await expect(page.locator("#detail-chips .chip.replay")).to_contain_text("replay of")
        replays = [s for s in upstream.requests if s["path"] == "/hooks/stripe"]
        assert len(replays) == before + 1
        assert (b"x-signature", b"t=1,v1=abc") in replays[-1]["headers"]

        # Replay with changes: method, path, a header and the body edited, sent as edited.
        await page.click("#replay-edit")
        await expect(page.locator("#edit-form")).to_be_visible()
        await expect(page.locator("#edit-method")).to_have_value("POST")
        await page.fill("#edit-method", "NOT A TOKEN")
        await page.click("#edit-form button[type=submit]")
        await expect(page.locator("#edit-error")).to_contain_text("method")  # the agent's reason, in the form
        await expect(page.locator("#edit-form")).to_be_visible()
        # Chromium logs the refused call (as the console event may come a little later, waited for).
        await wait_until(lambda: any("status of 400" in problem for problem in problems))
        refused = [problem for problem in problems if "status of 400" in problem]
        assert len(refused) == 1
        problems.remove(refused[0])
        await page.fill("#edit-method", "PUT")
        await page.fill("#edit-uri", "/hooks/edited?attempt=2")
        headers = await page.input_value("#edit-headers")
        await page.fill("#edit-headers", headers + "\nX-Edited: yes")
        await page.fill("#edit-body", '{"event": "refunded"}')
        await page.click("#edit-form button[type=submit]")
        await expect(page.locator("#edit-form")).to_be_hidden()
        await expect(rows).to_have_count(9)
        await expect(rows.nth(0).locator(".path")).to_have_text("/hooks/edited?attempt=2")
        await expect(rows.nth(0).locator(".chip.edited")).to_be_visible()
        await expect(page.locator("#detail-method")).to_have_text("PUT")
        edited = [s for s in upstream.requests if s["path"] == "/hooks/edited"]
        assert len(edited) == 1 and edited[0]["method"] == "PUT" and edited[0]["query_string"] == b"attempt=2"
        assert (b"x-edited", b"yes") in edited[0]["headers"]
        await expect(page.locator("#response-body pre.json")).to_contain_text('"body_size": 21')

        # A WebSocket shows as a stream with its messages, when the capture lists them.
        async with open_ws(tunnel.public, tunnel.alias, "/ws/mirror") as (ws, _):
            assert await exchange(ws, "hello <b>there</b>") == "hello <b>there</b>"
            await ws.close()
        await expect(rows).to_have_count(10)
        await expect(rows.nth(0).locator(".chip.stream")).to_contain_text("WebSocket")
        await rows.nth(0).click()
        await expect(page.locator("#replay")).to_be_disabled()
        await expect(page.locator("#stream-title")).to_have_text("WebSocket messages")
        messages = page.locator("#stream-rows tr")
        await expect(messages).to_have_count(2)
        await expect(messages.nth(0)).to_contain_text("→ to local")
        await expect(messages.nth(0)).to_contain_text("hello <b>there</b>")
        await expect(messages.nth(1)).to_contain_text("← from local")
        await expect(page.locator("#stream-facts")).to_contain_text("closed by the visitor with code 1000")
        await expect(page.locator("#request-body")).to_have_text("18 B in messages, listed below.")
        await page.screenshot(path=str(screenshot_dir() / "inspector-websocket.png"), animations="disabled")

        # A compressed body, decompressed for display (and still there as sent).
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/gzip")).text.startswith("compressed body")
        await expect(rows).to_have_count(11)
        await rows.nth(0).click()
        await expect(page.locator("#detail-path")).to_have_text("/gzip")
        await expect(page.locator("#response-body .body-bar")).to_contain_text("decompressed from gzip for display")
        await expect(page.locator("#response-body pre.text")).to_contain_text("compressed body compressed body")
        await page.click("#response-body .views button:text-is('As sent')")
        await expect(page.locator("#response-body pre.hex")).to_contain_text("00000000  1f 8b")

        # A narrow window: the list, then the detail in its place with a way back.
        await page.set_viewport_size({"width": 420, "height": 800})
        await expect(page.locator("#back")).to_be_visible()
        await expect(page.locator(".list-panel")).to_be_hidden()
        await page.click("#back")
        await expect(page.locator(".list-panel")).to_be_visible()
        await rows.nth(10).click()
        await expect(page.locator("#detail-path")).to_have_text("/hooks/stripe?attempt=1")
        await page.screenshot(path=str(screenshot_dir() / "inspector-narrow.png"), animations="disabled")

        # Clear empties the list everywhere.
        await page.click("#back")
        await page.click("#clear")
        await expect(rows).to_have_count(0)
        await expect(page.locator("#list-empty")).to_be_visible()
        assert dialogs == []
        assert problems == []


def screenshot_dir() -> Path:
    """Where screenshots go: test-artifacts/, or docs/img/ with COMZY_SCREENSHOTS=1."""
    folder = ROOT / "docs" / "img" if os.environ.get("COMZY_SCREENSHOTS") == "1" else ARTIFACTS
    folder.mkdir(exist_ok=True)
    return folder


async def test_the_page_reconnects_when_the_inspector_comes_back_and_says_when_it_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_browser()
    from playwright.async_api import expect

    capture = Capture()
    capture.begin("GET", b"/kept", [], "127.0.0.1").finish()
    sock = inspector.bind("127.0.0.1", [0])
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"

    # As an agent serving two tunnels (comzy 3000 8080) describes them.
    tunnels = inspector.TunnelInfo("127.0.0.1:3000", "http://web.example", "web",
                                   [inspector.TunnelInfo("127.0.0.1:8080", "http://api.example", "api")])

    def api() -> inspector.InspectorAPI:
        return inspector.InspectorAPI(capture, tunnels, lambda _name: None)  # type: ignore[arg-type,return-value]

    with anyio.fail_after(60):
        async with chromium_page() as (page, problems):
            async with anyio.create_task_group() as tg:
                tg.start_soon(api().serve, sock)
                await page.goto(url)
                await expect(page.locator("#live-state")).to_have_class(LIVE)
                await expect(page.locator("#request-list .path")).to_have_text(["/kept"])
                await expect(page.locator("#public-url")).to_have_text("http://web.example")
                await expect(page.locator("#more-tunnels .more-tunnel")).to_have_text(
                    ["apihttp://api.example → 127.0.0.1:8080"])
                tg.cancel_scope.cancel()
            # The agent stopped: the page says so and keeps trying.
            await expect(page.locator("#live-state")).to_have_class(state_class("reconnecting"))
            problems.clear()  # the browser logs each refused reconnection
            # It comes back on the same port with one more request: the page follows by itself.
            capture.begin("POST", b"/while-away", [], "127.0.0.1").finish()
            monkeypatch.setattr(inspector_page, "MAX_STREAMS", 1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(api().serve, inspector.bind("127.0.0.1", [port]))
                await expect(page.locator("#live-state")).to_have_class(LIVE, timeout=20_000)
                await expect(page.locator("#request-list .path")).to_have_text(["/while-away", "/kept"])
                # A second page when only one stream is allowed: refused, and it says so.
                second = await page.context.browser.new_page()
                await second.goto(url)
                await expect(second.locator("#live-state")).to_have_class(state_class("stopped"))
                await expect(second.locator("#notice-text")).to_contain_text("too many inspector pages")
                tg.cancel_scope.cancel()
            assert problems == []  # no script error on the way (refused connections are not script errors)


async def test_json_nested_too_deep_for_the_pretty_view_is_shown_as_text_and_failures_are_marked() -> None:
    """Chromium parses JSON 50,000 deep, but a recursive walk of it overflows the stack: such a
    body (a visitor's to send) gets the text view, and the page keeps working. An exchange the local
    service never answered is marked failed, with why, and the "Failed" filter finds it."""
    require_browser()
    from playwright.async_api import expect

    capture = Capture()
    for depth in (50_000, 3):
        exchange = capture.begin("POST", b"/deep/%d" % depth, [(b"content-type", b"application/json")], "127.0.0.1")
        exchange.request_data(b"[" * depth + b"]" * depth)
        exchange.request_complete = True
        exchange.response(200, [(b"content-length", b"0")])
        exchange.finish()
    refused = capture.begin("GET", b"/refused", [], "127.0.0.1")
    refused.finish("the local service refused the connection (is it running on 127.0.0.1:1?)")
    sock = inspector.bind("127.0.0.1", [0])
    api = inspector.InspectorAPI(capture, inspector.TunnelInfo("127.0.0.1:1"), lambda _name: None)  # type: ignore[arg-type,return-value]
    with anyio.fail_after(60):
        async with chromium_page() as (page, problems), anyio.create_task_group() as tg:
            tg.start_soon(api.serve, sock)
            await page.goto(inspector.url_of(sock) + "/")
            rows = page.locator("#request-list li.request")
            await expect(rows.nth(0).locator(".status-badge")).to_have_text("failed")
            await page.select_option("#filter-status", "failed")
            await expect(page.locator("#request-list li.request:visible .path")).to_have_text(["/refused"])
            await page.select_option("#filter-status", "")
            await rows.nth(0).click()
            await expect(page.locator("#detail-error")).to_have_text(refused.error or "")
            await expect(page.locator("#response-none")).to_have_text("No response: the local service did not answer.")
            await rows.nth(2).click()
            await expect(page.locator("#detail-path")).to_have_text("/deep/50000")
            await expect(page.locator("#request-body .views button")).to_have_text(["Text", "Hex"])
            await expect(page.locator("#request-body pre.text")).to_contain_text("[[[[")
            await rows.nth(1).click()
            await expect(page.locator("#request-body .views button")).to_have_text(["JSON", "Text", "Hex"])
            assert problems == []
            tg.cancel_scope.cancel()


async def test_the_comzy_command_serves_the_page_for_each_of_its_tunnels(server: ServerContext, upstream: Upstream,
                                                                         tmp_path: Path) -> None:
    """The real command (its package data found, its wiring) serves the page, and the stream names
    every tunnel of ``comzy PORT PORT``."""
    command = agent_command(upstream.port, server, "--inspect", "127.0.0.1:0")
    command.insert(command.index(str(upstream.port)) + 1, str(free_port()))  # a second tunnel (nothing there: 502s)
    with agent_process(command, tmp_path) as proc:
        lines = await lines_until(proc, r"^Press Ctrl-C")
        inspector_url = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("Inspector: "))
        public = [line.split()[2] for line in lines if line.startswith("Public URL: ")]
        assert len(public) == 2
        async with httpx.AsyncClient(base_url=inspector_url, timeout=30) as api:
            page = await api.get("/")
            assert page.status_code == 200 and "Comzy inspector" in page.text
            assert "content-security-policy" in page.headers
            with anyio.fail_after(30):
                async with api.stream("GET", "/api/stream") as stream:
                    name, tunnel = await anext(sse_events(stream))
            assert name == "tunnel"
            assert [t["public_url"] for t in tunnel["tunnels"]] == public


async def test_ctrl_c_with_a_page_open_ends_quietly(server: ServerContext, upstream: Upstream, tmp_path: Path) -> None:
    """The agent stops while a page follows its stream: no traceback on the way out (Python 3.11's
    start_server printed the cancelled connection's CancelledError)."""
    command = agent_command(upstream.port, server, "--inspect", "127.0.0.1:0")
    proc = start_process(command, tmp_path)
    try:
        lines = await lines_until(proc, r"^Press Ctrl-C")
        inspector_url = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("Inspector: "))
        async with httpx.AsyncClient(base_url=inspector_url, timeout=30) as api:
            with anyio.fail_after(30):
                async with api.stream("GET", "/api/stream") as stream:
                    events = sse_events(stream)
                    assert (await anext(events))[0] == "tunnel"
                    proc.send_signal(signal.SIGINT)
                    _, errors = await anyio.to_thread.run_sync(proc.communicate)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "Traceback" not in errors and "CancelledError" not in errors, errors


def start_process(command: list[str], home: Path) -> subprocess.Popen[str]:
    """The command started with its stdout and stderr apart (read in a thread: the test's loop stays free)."""
    return subprocess.Popen(command, env=cli_env(HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
