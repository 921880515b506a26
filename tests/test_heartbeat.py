"""Heartbeats both ways: a silent peer is noticed dead within the heartbeat timeout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from comzy.core import protocol as p
from comzy.core.websocket import WebSocket, connect, server_handshake
from tests.conftest import RecordingReporter, start_agent, start_server
from tests.helpers import DisconnectWatcher, receive_until_closed
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

FT = p.FrameType
INTERVAL = 0.4  # short for a quick test, long enough that a loaded machine does not drop the healthy agent
TIMEOUT = 2.0


class ReconnectReporter(RecordingReporter):
    """A recording reporter that also signals the first "reconnecting"."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = anyio.Event()

    def reconnecting(self, reason: str, delay: float) -> None:
        super().reconnecting(reason, delay)
        self.lost.set()


async def test_server_drops_an_agent_that_goes_silent(tmp_path: Path, upstream: Upstream) -> None:
    watcher = DisconnectWatcher()
    async with (
        start_server(tmp_path / "data", [("watcher", watcher)], heartbeat_interval=INTERVAL,
                     heartbeat_timeout=TIMEOUT) as server,
        start_agent(server, upstream.port) as healthy,
    ):
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 * 1024 * 1024)
        try:
            await ws.send(p.encode(FT.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "silent/1", "port": 1}))
            welcome = await ws.receive()
            assert isinstance(welcome, bytes)
            [frame] = p.decode_message(welcome)
            assert frame.type == FT.WELCOME
            assert frame.payload["heartbeat"] == INTERVAL  # the agent learns the interval from WELCOME
            alias = frame.payload["alias"]
            assert server.tunnel(alias) is not None
            started = anyio.current_time()
            # From here on this agent neither reads nor writes: it answers no PING.
            with anyio.fail_after(TIMEOUT + 3):
                (reason,) = await watcher.wait_for(alias)
            elapsed = anyio.current_time() - started
            closed, frames = await receive_until_closed(ws)
        finally:
            await ws.aclose()
        assert "heartbeat timeout" in reason
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2 * INTERVAL + 1.0
        assert server.tunnel(alias) is None
        # The server asked while we were silent: one PING per interval, then it hung up.
        assert sum(f.type == FT.PING for f in frames) >= 3
        assert closed.code == 1006
        # The real agent answers PINGs (and sends its own): it outlived the silent one, still serving.
        assert server.tunnel(healthy.alias) is not None
        assert healthy.alias not in watcher.ended
        assert healthy.reporter.reconnects == []
        async with healthy.visitor(timeout=10) as client:
            response = await client.get("/alive")
        assert response.status_code == 200
        assert response.json()["raw_path"] == "/alive"


async def test_agent_notices_a_server_that_goes_silent(upstream: Upstream) -> None:
    """A fake server WELCOMEs the agent and then never answers: the agent reports reconnecting."""
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener = multi.listeners[0]
    assert isinstance(listener, anyio.abc.SocketListener)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    links: list[WebSocket] = []
    hellos: list[dict[str, Any]] = []

    async def silent_server() -> None:
        stream = await listener.accept()
        ws, _ = await server_handshake(stream, 4 * 1024 * 1024)
        links.append(ws)
        message = await ws.receive()
        assert isinstance(message, bytes)
        [frame] = p.decode_message(message)
        assert frame.type == FT.HELLO
        hellos.append(frame.payload)
        await ws.send(p.encode(FT.WELCOME, 0, {
            "v": p.PROTOCOL_VERSION, "server": "fake/1", "alias": "quiet", "url": "http://quiet.localhost",
            "resume_secret": "r" * 32, "heartbeat": INTERVAL, "window": p.DEFAULT_WINDOW,
        }))
        # ...and silence: no PONG, no PING, nothing read.

    reporter = ReconnectReporter()
    forwarder = LocalForwarder("127.0.0.1", upstream.port)
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}"], port=upstream.port), forwarder, reporter)
    try:
        async with multi, anyio.create_task_group() as tg:
            tg.start_soon(silent_server)
            tg.start_soon(agent.run)
            with anyio.fail_after(5):
                welcome = await reporter.wait_connected()
            started = anyio.current_time()
            assert welcome["alias"] == "quiet"
            with anyio.fail_after(5):
                await reporter.lost.wait()
            elapsed = anyio.current_time() - started
            tg.cancel_scope.cancel()
        assert hellos[0]["v"] == p.PROTOCOL_VERSION
        # The agent's timeout is three heartbeat intervals from WELCOME.
        assert "heartbeat timeout" in reporter.reconnects[0]
        assert 3 * INTERVAL * 0.9 <= elapsed < 3 * INTERVAL + 2.0
        closed, frames = await receive_until_closed(links[0])
        assert sum(f.type == FT.PING for f in frames) >= 2  # it asked before giving up
        assert closed.code == 1006
    finally:
        for ws in links:
            await ws.aclose()
        await forwarder.aclose()
