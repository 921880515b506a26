"""WebSocket passthrough: a real wsproto visitor, through server and agent, to the upstream's /ws routes.

Every test runs on role ``all`` and through an edge of a cluster (tests/stack.py)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest
from wsproto.events import AcceptConnection

from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, client_handshake, server_handshake
from tests.conftest import RunningAgent
from tests.helpers import serve_tcp
from tests.stack import Stack, stack_fixture, stacks_fixture, tunnel_fixture  # noqa: F401 (both kinds)
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

MAX_MESSAGE = 4 * 1024 * 1024
MIB = 1024 * 1024


@asynccontextmanager
async def open_ws(server: ServerContext, alias: str, target: str = "/ws",
                  subprotocols: list[str] | None = None) -> AsyncIterator[tuple[WebSocket, AcceptConnection]]:
    """A visitor WebSocket to ``alias`` through the server's public listener."""
    stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
    try:
        ws, accept = await client_handshake(stream, f"{alias}.{server.settings.base_domain}", target,
                                            MAX_MESSAGE, subprotocols=subprotocols)
    except BaseException:
        await stream.aclose()
        raise
    try:
        yield ws, accept
    finally:
        await ws.aclose()


async def exchange(ws: WebSocket, message: bytes | str) -> bytes | str | Closed:
    """Send one message and return the next one received (bounded in time)."""
    await ws.send(message)
    with anyio.fail_after(10):
        return await ws.receive()


async def test_text_and_binary_messages_both_ways(tunnel: RunningAgent) -> None:
    async with open_ws(tunnel.public, tunnel.alias) as (ws, _):
        assert await exchange(ws, "hello") == "echo:hello"
        assert await exchange(ws, "héllo ✓ 雪") == "echo:héllo ✓ 雪"
        assert await exchange(ws, b"\x00\x01\xfe\xff") == b"echo:\x00\x01\xfe\xff"
        # An empty message is still a message: the upstream sees it and answers it.
        assert await exchange(ws, b"") == b"echo:"
        assert await exchange(ws, "") == "echo:"
        # Binary stays binary and text stays text, in order.
        await ws.send(b"one")
        await ws.send("two")
        with anyio.fail_after(10):
            assert await ws.receive() == b"echo:one"
            assert await ws.receive() == "echo:two"


async def test_large_and_empty_messages_unchanged(tunnel: RunningAgent) -> None:
    big = os.urandom(MIB)
    async with open_ws(tunnel.public, tunnel.alias, "/ws/mirror") as (ws, _):
        # 1 MiB spans many DATA frames and windows both ways; it must arrive as one message.
        received = await exchange(ws, big)
        assert isinstance(received, bytes)
        assert len(received) == MIB
        assert received == big
        big_text = "ab✓" * (MIB // 5)
        assert await exchange(ws, big_text) == big_text
        assert await exchange(ws, b"") == b""
        assert await exchange(ws, "") == ""
        # Empty messages the upstream originates reach the visitor, with their type.
        assert await exchange(ws, "send-empty") == ""
        with anyio.fail_after(10):
            assert await ws.receive() == b""


async def test_upstream_close_code_and_reason_reach_visitor(tunnel: RunningAgent) -> None:
    async with open_ws(tunnel.public, tunnel.alias) as (ws, _):
        assert await exchange(ws, "before close") == "echo:before close"
        closed = await exchange(ws, "close:4001")
    assert isinstance(closed, Closed)
    assert (closed.code, closed.reason) == (4001, "asked")

    async with open_ws(tunnel.public, tunnel.alias, "/ws/close/4003") as (ws, _):
        with anyio.fail_after(10):
            closed = await ws.receive()
    assert isinstance(closed, Closed)
    assert (closed.code, closed.reason) == (4003, "upstream closes")


async def test_agent_lost_mid_websocket_closes_the_visitor_with_1011(tunnel: RunningAgent) -> None:
    session = tunnel.agent.session
    assert session is not None
    async with open_ws(tunnel.public, tunnel.alias) as (ws, _):
        assert await exchange(ws, "before") == "echo:before"
        await session.ws.aclose()  # the agent's link drops without a goodbye
        with anyio.fail_after(10):
            closed = await ws.receive()
    # Not a normal close: the visitor learns that the tunnel, not the app, ended it.
    assert isinstance(closed, Closed)
    assert (closed.code, closed.reason) == (1011, "tunnel lost")


class RecordingWsUpstream:
    """A bare wsproto WebSocket service that echoes and records how each client closed.

    Not hypercorn: hypercorn reports every client close to its app as 1006 (pgjones/hypercorn#127).
    """

    def __init__(self) -> None:
        self.port = 0
        self.closes: list[Closed] = []
        self.closed = anyio.Event()

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        """Serve one WebSocket connection."""
        ws, _ = await server_handshake(stream, MAX_MESSAGE)
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                self.closes.append(message)
                self.closed.set()
                return
            await ws.send(message)


@asynccontextmanager
async def serve_recording_upstream() -> AsyncIterator[RecordingWsUpstream]:
    """Run a RecordingWsUpstream on a free loopback port."""
    app = RecordingWsUpstream()
    async with serve_tcp(app.handle) as port:
        app.port = port
        yield app


async def test_visitor_close_code_and_reason_reach_upstream(stack: Stack) -> None:
    async with serve_recording_upstream() as recorder, stack.agent(recorder.port) as running:
        async with open_ws(stack.public, running.alias) as (ws, _):
            assert await exchange(ws, "hi") == "hi"
            await ws.close(4002, "visitor leaves")
        with anyio.fail_after(10):
            await recorder.closed.wait()
    assert [(c.code, c.reason) for c in recorder.closes] == [(4002, "visitor leaves")]


async def test_upstream_refusing_upgrade_answers_visitor(tunnel: RunningAgent) -> None:
    with pytest.raises(HandshakeRejected) as caught:
        async with open_ws(tunnel.public, tunnel.alias, "/ws/deny"):
            pass
    assert caught.value.status == 403
    assert caught.value.body == b"denied by upstream"
    assert (b"content-type", b"text/plain") in caught.value.headers


async def test_subprotocol_negotiation_passes_through(tunnel: RunningAgent, upstream: Upstream) -> None:
    async with open_ws(tunnel.public, tunnel.alias, subprotocols=["chat", "superchat"]) as (ws, accept):
        assert accept.subprotocol == "chat"
        assert await exchange(ws, "x") == "echo:x"
    ws_scopes = [s for s in upstream.requests if s["type"] == "websocket"]
    assert ws_scopes[-1]["subprotocols"] == ["chat", "superchat"]

    async with open_ws(tunnel.public, tunnel.alias) as (ws, accept):
        assert accept.subprotocol is None
    ws_scopes = [s for s in upstream.requests if s["type"] == "websocket"]
    assert ws_scopes[-1]["subprotocols"] == []


async def test_many_websockets_at_once(tunnel: RunningAgent, upstream: Upstream) -> None:
    count = 30
    opened = 0
    all_open = anyio.Event()
    results: dict[int, list[bytes | str | Closed]] = {}

    async def client(i: int) -> None:
        nonlocal opened
        async with open_ws(tunnel.public, tunnel.alias) as (ws, _):
            opened += 1
            if opened == count:
                all_open.set()
            await all_open.wait()  # every socket is open before any of them talks
            results[i] = [await exchange(ws, f"text {i}"), await exchange(ws, f"bin {i}".encode())]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(client, i)
    assert results == {i: [f"echo:text {i}", f"echo:bin {i}".encode()] for i in range(count)}
    assert sum(1 for s in upstream.requests if s["type"] == "websocket") == count


async def test_open_websockets_do_not_starve_plain_requests(tunnel: RunningAgent) -> None:
    count, streaming, requests = 30, 10, 50
    opened = 0
    all_open = anyio.Event()
    stop = anyio.Event()
    round_trips = [0] * count
    streaming_started = anyio.Event()
    payload = os.urandom(128 * 1024)

    async def websocket(i: int) -> None:
        nonlocal opened
        async with open_ws(tunnel.public, tunnel.alias) as (ws, _):
            opened += 1
            if opened == count:
                all_open.set()
            if i >= streaming:
                await stop.wait()  # idle but open
                assert await exchange(ws, "still here") == "echo:still here"
                return
            while not stop.is_set():
                assert await exchange(ws, payload) == b"echo:" + payload
                round_trips[i] += 1
                if all(round_trips[:streaming]):
                    streaming_started.set()

    async def get(client: httpx.AsyncClient, i: int, statuses: dict[int, tuple[int, str]]) -> None:
        response = await client.get(f"/plain/{i}?n={i}")
        statuses[i] = (response.status_code, response.json()["raw_path"])

    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(websocket, i)
            await all_open.wait()
            await streaming_started.wait()  # every streaming socket is busy before the GETs start
            statuses: dict[int, tuple[int, str]] = {}
            async with tunnel.visitor() as client:
                started = time.monotonic()
                async with anyio.create_task_group() as gets:
                    for i in range(requests):
                        gets.start_soon(get, client, i, statuses)
                elapsed = time.monotonic() - started
            stop.set()
    assert statuses == {i: (200, f"/plain/{i}") for i in range(requests)}
    assert elapsed < 10.0, f"{requests} plain GETs took {elapsed:.1f} s beside {count} open WebSockets"
    # The streaming sockets exchanged until the GETs were done, and none of them stalled.
    assert all(n > 0 for n in round_trips[:streaming])


async def test_unknown_host_refuses_upgrade_with_404(tunnel: RunningAgent) -> None:
    with pytest.raises(HandshakeRejected) as caught:
        async with open_ws(tunnel.public, "nobody-here"):
            pass
    assert caught.value.status == 404
    assert b"Tunnel Not Active" in caught.value.body
    assert b"nobody-here.localhost" in caught.value.body
