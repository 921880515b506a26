"""Idle tunnels stay cheap: per-tunnel tasks on the server, and the agent link's upgrade parser.

bench/idle_agents.py measures the memory and registration rate of thousands of idle tunnels;
these tests pin the mechanisms behind the figures so a change cannot quietly undo them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, BytesMessage, Request

from comzy.core import protocol as p
from comzy.core.server import ServerContext
from comzy.core.websocket import WebSocket, WebSocketError, connect, parse_upgrade_request
from tests.conftest import start_server

FT = p.FrameType
HELLO = p.encode(FT.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "test/1", "port": 1})


def upgrade_head(**overrides: bytes | None) -> bytes:
    """An upgrade request head (no blank line); a header given as None is left out."""
    headers = {b"Host": b"127.0.0.1:9", b"Upgrade": b"websocket", b"Connection": b"Upgrade",
               b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version": b"13"}
    request_line = overrides.pop("request_line", None) or b"GET /path?q=1 HTTP/1.1"
    for name, value in overrides.items():
        headers[name.replace("_", "-").encode()] = value  # type: ignore[assignment]
    lines = [request_line] + [name + b": " + value for name, value in headers.items() if value is not None]
    return b"\r\n".join(lines)


async def register(server: ServerContext) -> WebSocket:
    """A minimal agent: HELLO -> WELCOME, then a PING answered (so the session's writer runs)."""
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 1024 * 1024)
    await ws.send(HELLO)
    welcome = await ws.receive()
    assert isinstance(welcome, bytes)
    assert next(p.decode_message(welcome)).type == FT.WELCOME
    await ws.send(p.encode(FT.PING, 0, b"12345678"))
    pong = await ws.receive()
    assert isinstance(pong, bytes)
    assert next(p.decode_message(pong)).type == FT.PONG
    return ws


@pytest.mark.anyio
async def test_an_idle_tunnel_costs_the_server_one_task(tmp_path: Path) -> None:
    """The connection's own task (running the session): the session reads and writes from the
    loop's callbacks (Session.attached), heartbeats come from one shared task."""
    async with start_server(tmp_path / "data") as server:
        links = [await register(server)]  # the first tunnel also starts the shared heartbeat task
        try:
            before = len(asyncio.all_tasks())
            for _ in range(20):
                links.append(await register(server))
            assert len(server.registry) == 21
            assert len(asyncio.all_tasks()) - before == 1 * 20
        finally:
            for ws in links:
                await ws.aclose()


@pytest.mark.anyio
async def test_frames_sent_right_after_the_upgrade_head_are_kept(tmp_path: Path) -> None:
    """A client that sends HELLO without waiting for the 101 still gets its WELCOME."""
    async with start_server(tmp_path / "data") as server:
        client = WSConnection(ConnectionType.CLIENT)
        upgrade = client.send(Request(host=f"127.0.0.1:{server.ports.ws}", target="/"))
        framer = Connection(ConnectionType.CLIENT)
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
        async with stream:
            await stream.send(upgrade + framer.send(BytesMessage(HELLO)))
            events = []
            with anyio.fail_after(5):
                while not any(isinstance(e, BytesMessage) for e in events):
                    client.receive_data(await stream.receive())
                    events.extend(client.events())
        assert isinstance(events[0], AcceptConnection)
        message = next(e for e in events if isinstance(e, BytesMessage))
        assert next(p.decode_message(bytes(message.data))).type == FT.WELCOME


def test_the_upgrade_parser_reads_what_wsproto_clients_send() -> None:
    raw = WSConnection(ConnectionType.CLIENT).send(Request(
        host="example.com:8191", target="/agents?x=1", subprotocols=["a", "b"], extra_headers=[(b"X-Agent", b"1")]))
    request = parse_upgrade_request(raw[: raw.index(b"\r\n\r\n")])
    assert request.host == "example.com:8191"
    assert request.target == "/agents?x=1"
    assert request.subprotocols == ["a", "b"]
    assert (b"x-agent", b"1") in request.extra_headers
    assert request.extensions == []


@pytest.mark.parametrize("head", [
    upgrade_head(request_line=b"POST / HTTP/1.1"),
    upgrade_head(request_line=b"GET / HTTP/1.0"),
    upgrade_head(request_line=b"GET /"),
    upgrade_head(Connection=b"keep-alive"),
    upgrade_head(Connection=None),
    upgrade_head(Upgrade=b"h2c"),
    upgrade_head(Sec_WebSocket_Version=b"8"),
    upgrade_head(Sec_WebSocket_Key=None),
    upgrade_head(Sec_WebSocket_Key=b""),
    upgrade_head(Host=None),
    upgrade_head() + b"\r\nHost: again",
    upgrade_head() + b"\r\nno colon here",
    upgrade_head() + b"\r\nBad Name: x",
    upgrade_head() + b"\r\nX-Control: a\x01b",
    upgrade_head() + b"\r\n folded continuation",
])
def test_the_upgrade_parser_refuses_what_is_not_a_websocket_upgrade(head: bytes) -> None:
    with pytest.raises(WebSocketError):
        parse_upgrade_request(head)


def test_the_upgrade_parser_accepts_token_lists_in_any_case() -> None:
    request = parse_upgrade_request(upgrade_head(Connection=b"keep-alive, UPGRADE", Upgrade=b"WebSocket"))
    assert request.target == "/path?q=1"
