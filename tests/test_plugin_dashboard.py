"""dashboard: the /feed WebSocket (snapshot, tunnel and request events, lag), the JSON API, and
/api/requests from the request log; all behind the admin token."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.core.admin import COOKIE
from comzy.core.hooks import builtin_names
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, connect
from comzy.plugins.dashboard import Dashboard, DashboardSettings
from comzy.plugins.mysql_logging import MysqlLogging, MysqlLoggingSettings
from tests.conftest import ROOT, admin_client, start_agent, start_server
from tests.test_websocket import open_ws
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

WAIT = 20.0


async def open_feed(server: ServerContext) -> WebSocket:
    assert server.admin_token is not None
    return await connect(f"ws://127.0.0.1:{server.ports.admin}/feed?token={server.admin_token.value}", 1 << 22)


async def next_event(ws: WebSocket, kind: str | None = None) -> dict[str, Any]:
    """The next event (of ``kind``, skipping others)."""
    with anyio.fail_after(WAIT):
        while True:
            message = await ws.receive()
            assert isinstance(message, str), message
            event: dict[str, Any] = json.loads(message)
            if kind is None or event["type"] == kind:
                return event


async def test_the_feed_shows_tunnels_and_requests_live(tmp_path: Path, upstream: Upstream) -> None:
    dashboard = Dashboard(DashboardSettings(_env_file=None))
    async with start_server(tmp_path, plugins=[("dashboard", dashboard)]) as server:
        feed = await open_feed(server)
        try:
            snapshot = await next_event(feed)
            assert snapshot["type"] == "snapshot" and snapshot["tunnels"] == [] and snapshot["recent"] == []
            assert snapshot["server"]["base_domain"] == server.settings.base_domain
            async with start_agent(server, upstream.port) as agent:
                registered = await next_event(feed, "tunnel_registered")
                tunnel = registered["tunnel"]
                assert tunnel["alias"] == agent.alias and tunnel["port"] == upstream.port
                assert tunnel["user"] is None and tunnel["url"] == agent.url
                async with agent.visitor() as client:
                    await client.get("/status/201")
                    await client.post("/echo/x?secret=1", content=b"12345")
                first = await next_event(feed, "request")
                second = await next_event(feed, "request")
                assert (first["method"], first["path"], first["status"]) == ("GET", "/status/201", 201)
                assert (second["method"], second["path"], second["bytes_in"]) == ("POST", "/echo/x", 5)
                assert second["alias"] == agent.alias and second["duration_ms"] > 0 and second["bytes_out"] > 0
                async with admin_client(server) as admin:
                    listed = (await admin.get("/api/tunnels")).json()["tunnels"]
                    assert [(t["alias"], t["requests"], t["streams_open"]) for t in listed] == [(agent.alias, 2, 0)]
                    recent = (await admin.get("/api/requests", params={"alias": agent.alias, "limit": 1})).json()
                    assert recent["source"] == "memory" and [r["path"] for r in recent["requests"]] == ["/echo/x"]
                    assert (await admin.get("/api/requests?limit=x")).status_code == 400
                    # A new feed client starts from a snapshot holding what happened so far.
                    late = await open_feed(server)
                    try:
                        again = await next_event(late)
                        assert [t["alias"] for t in again["tunnels"]] == [agent.alias]
                        assert [r["path"] for r in again["recent"]] == ["/status/201", "/echo/x"]
                        assert sum(b["requests"] for b in again["series"]) == 2
                    finally:
                        await late.aclose()
                    closed = await admin.delete(f"/api/tunnels/{agent.alias}")
                    assert closed.status_code == 200 and closed.json() == {"closed": agent.alias}
                    ended = await next_event(feed, "tunnel_closed")
                    assert ended["alias"] == agent.alias and "admin dashboard" in ended["reason"]
                    assert ended["tunnel"]["requests"] == 2
                    assert (await admin.delete(f"/api/tunnels/{agent.alias}")).status_code == 404
        finally:
            await feed.aclose()


async def test_the_api_shows_what_is_in_flight(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server, \
            start_agent(server, upstream.port) as agent, admin_client(server) as admin, \
            open_ws(server, agent.alias) as (ws, _):
        await ws.send("hi")
        assert await ws.receive() == "echo:hi"
        [live] = (await admin.get("/api/tunnels")).json()["tunnels"]
        assert (live["streams_open"], live["websockets_open"], live["requests"]) == (1, 1, 0)


async def test_the_page_and_api_need_the_admin_token(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.admin}") as anonymous:
            for path in ("/", "/api/tunnels", "/api/requests", "/static/app.js"):
                assert (await anonymous.get(path)).status_code == 401, path
        async with admin_client(server) as admin:
            page = await admin.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert (await admin.get("/static/app.js")).status_code == 200
            # Encoded, so that the client does not resolve the dots itself: the server sees "../plugin.py".
            for escape in ("/static/..%2Fplugin.py", "/static/%2e%2e/plugin.py", "/static/..%5Cplugin.py"):
                assert (await admin.get(escape)).status_code == 404, escape
            assert (await admin.get("/nothing-here")).status_code == 404


async def test_a_cross_origin_feed_is_a_clean_403_and_the_page_s_own_feed_works(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard(DashboardSettings(_env_file=None)))]) as server:
        assert server.admin_token is not None
        page = f"http://127.0.0.1:{server.ports.admin}"
        async with httpx.AsyncClient(base_url=page) as browser:  # logged in as the page is
            await browser.post("/login", data={"token": server.admin_token.value, "next": "/"})
            cookie = (b"cookie", f"{COOKIE}={browser.cookies[COOKIE]}".encode())
        feed_url = f"ws://127.0.0.1:{server.ports.admin}/feed"
        # Another site's page open in the same browser: the browser sends the cookie and its Origin.
        with caplog.at_level(logging.INFO, logger="comzy"), pytest.raises(HandshakeRejected) as refused:
            await connect(feed_url, 1 << 16, headers=[cookie, (b"origin", b"http://evil.example")])
        assert refused.value.status == 403
        assert "cross-origin request refused" in json.loads(refused.value.body)["error"]
        lines = [r for r in caplog.records if "cross-origin" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None and "http://evil.example" in lines[0].getMessage()
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == [], caplog.text
        # The page's own feed: same cookie, its own origin.
        feed = await connect(feed_url, 1 << 22, headers=[cookie, (b"origin", page.encode())])
        try:
            assert (await next_event(feed))["type"] == "snapshot"
        finally:
            await feed.aclose()


async def test_a_slow_feed_client_lags_and_never_slows_traffic(tmp_path: Path, upstream: Upstream) -> None:
    dashboard = Dashboard(DashboardSettings(_env_file=None, feed_queue=10))
    async with start_server(tmp_path, plugins=[("dashboard", dashboard)]) as server, \
            start_agent(server, upstream.port) as agent:
        assert server.admin_token is not None
        # A client that reads nothing, with the smallest receive buffer the kernel allows.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.ports.admin))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /feed?token={server.admin_token.value} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        try:
            with anyio.fail_after(WAIT):
                while len(dashboard.hub.subscribers) != 1:  # noqa: ASYNC110 (no event to wait on)
                    await anyio.sleep(0.01)
            subscriber = next(iter(dashboard.hub.subscribers))
            # Events far beyond what the socket buffers hold: the subscriber's queue fills, then drops.
            padding = "x" * 4096
            for i in range(5000):
                dashboard.hub.publish({"type": "request", "alias": agent.alias, "path": f"/{i}", "pad": padding})
            assert len(subscriber.queue) <= 10 and subscriber.dropped > 0
            # Traffic goes on while the client is stuck.
            async with agent.visitor() as client:
                with anyio.fail_after(5):
                    assert (await client.get("/status/200")).status_code == 200
            # Once it reads again, it is told how much it missed.
            sock.setblocking(False)
            received = b""
            with anyio.fail_after(WAIT):
                while b'"lagged"' not in received:
                    await anyio.wait_readable(sock)
                    received += sock.recv(1 << 20)
            assert b'"dropped": ' in received
        finally:
            sock.close()


async def test_requests_come_from_the_request_log_when_it_is_on(tmp_path: Path, upstream: Upstream) -> None:
    logging_plugin = MysqlLogging(MysqlLoggingSettings(_env_file=None, flush_seconds=0.05))
    plugins = [("mysql_logging", logging_plugin), ("dashboard", Dashboard())]
    async with start_server(tmp_path, plugins=plugins) as server, start_agent(server, upstream.port) as agent:
        async with agent.visitor() as client:
            for path in ("/status/200", "/status/404", "/status/500"):
                await client.get(path)
        async with admin_client(server) as admin:
            with anyio.fail_after(WAIT):
                while True:  # rows land in batches; poll the API as a user would
                    logged = (await admin.get("/api/requests", params={"alias": agent.alias})).json()
                    if len(logged["requests"]) >= 3:
                        break
                    await anyio.sleep(0.05)
            assert logged["source"] == "log"
            assert [(r["path"], r["status"]) for r in logged["requests"]] == [
                ("/status/500", 500), ("/status/404", 404), ("/status/200", 200)]
            assert (await admin.get("/api/requests", params={"alias": "nobody"})).json()["requests"] == []


def test_it_is_a_builtin_plugin_and_documents_its_settings() -> None:
    assert {"dashboard", "metrics"} <= set(builtin_names())
    text = (ROOT / "comzy" / "plugins" / "dashboard" / "README.md").read_text()
    for name in ("FEED_QUEUE", "RECENT_REQUESTS", "HISTORY_SECONDS"):
        assert f"`COMZY_DASHBOARD_{name}`" in text, name


async def test_websocket_requests_are_events_too(tmp_path: Path, upstream: Upstream) -> None:
    dashboard = Dashboard()
    async with start_server(tmp_path, plugins=[("dashboard", dashboard)]) as server, \
            start_agent(server, upstream.port) as agent:
        feed = await open_feed(server)
        try:
            await next_event(feed, "snapshot")
            async with open_ws(server, agent.alias, "/ws/mirror") as (ws, _):
                await ws.send("hi")
                await ws.receive()
            event = await next_event(feed, "request")
            assert event["websocket"] is True and event["path"] == "/ws/mirror"
        finally:
            await feed.aclose()


def documented_fields(name: str) -> set[str]:
    """The keys of the JSON example that follows "`NAME` is:" in docs/admin.md."""
    text = (ROOT / "docs" / "admin.md").read_text()
    block = text.split(f"`{name}` is:", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return set(json.loads(block))


async def test_the_documented_event_shapes_are_the_real_ones(tmp_path: Path, upstream: Upstream) -> None:
    dashboard = Dashboard()
    async with start_server(tmp_path, plugins=[("dashboard", dashboard)]) as server:
        feed = await open_feed(server)
        try:
            await next_event(feed, "snapshot")
            async with start_agent(server, upstream.port) as agent, agent.visitor() as client:
                tunnel = (await next_event(feed, "tunnel_registered"))["tunnel"]
                await client.get("/status/200")
                request = await next_event(feed, "request")
        finally:
            await feed.aclose()
    assert set(tunnel) == documented_fields("TUNNEL")
    assert set(request) == documented_fields("REQUEST")


async def test_an_open_feed_ends_at_shutdown_without_holding_it(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server:
        feed = await open_feed(server)
        await next_event(feed, "snapshot")
        stopping = time.monotonic()
    try:
        # The default shutdown grace in tests is 5 s: an open feed must not make the server wait it out.
        assert time.monotonic() - stopping < 3
        with anyio.fail_after(WAIT):
            closed = await feed.receive()
        assert isinstance(closed, Closed) and closed.code == 1001
    finally:
        await feed.aclose()


def test_the_dashboard_names_no_other_plugin_and_reaches_no_internals() -> None:
    """The request history comes through the recent_requests hook: no plugin's name, table, model or
    database layer; and only the public API (``comzy``), never ``comzy.core``."""
    source = "\n".join(path.read_text() for path in (ROOT / "comzy" / "plugins" / "dashboard").glob("*.py"))
    for word in ("mysql_logging", "api_requests", "ApiRequest", "sqlalchemy", "comzy.core", "registry", "counters"):
        assert word not in source, word


@pytest.mark.parametrize("public_agent_url", [None, "wss://tunnel.example.com"])
async def test_the_page_tells_how_agents_connect(tmp_path: Path, public_agent_url: str | None) -> None:
    """Behind a proxy the internal ws://HOST:PORT is no use to agents: the public agent URL is shown."""
    overrides = {"public_agent_url": public_agent_url} if public_agent_url else {}
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())], **overrides) as server:
        feed = await open_feed(server)
        try:
            snapshot = await next_event(feed, "snapshot")
        finally:
            await feed.aclose()
    assert snapshot["server"]["agent_url"] == (public_agent_url or f"ws://127.0.0.1:{server.ports.ws}")


def test_the_agent_url_names_a_host_an_agent_can_reach() -> None:
    from comzy.plugins.dashboard.app import agent_url

    assert agent_url("wss://tunnel.example.com", False, "127.0.0.1", 8191, "admin") == "wss://tunnel.example.com"
    assert agent_url(None, False, "127.0.0.1", 8191, "admin") == "ws://127.0.0.1:8191"
    assert agent_url(None, True, "::1", 8191, "admin") == "wss://[::1]:8191"
    # Listening on every address: the name the operator reached the admin listener by.
    assert agent_url(None, False, "0.0.0.0", 8191, "tunnel.example.com") == "ws://tunnel.example.com:8191"
    assert agent_url(None, False, "::", 8191, "[2001:db8::1]") == "ws://[2001:db8::1]:8191"
    assert agent_url(None, False, "0.0.0.0", 8191, "a b<script>") == "ws://HOST:8191"
    # A cluster edge has no agent listener.
    assert agent_url(None, False, "127.0.0.1", 0, "admin") is None
