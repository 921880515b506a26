"""The agent on uvloop: its local HTTP client and the whole agent path, run on a uvloop loop.

uvloop is in the test extra (not a dependency of comzy): these tests skip without it, except
under CI=true, where they must run. They guard a real bug:
the local client's protocol asserted ``isinstance(transport, asyncio.Transport)`` in
``connection_made``; uvloop's transports have asyncio's methods without subclassing its ABCs,
so the assertion failed inside the loop's callback, the transport was never kept, and every
request through an agent on uvloop became a 502 ("connection lost while sending (closed)")
while the connection itself leaked.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from comzy.agent.local_http import READ_HIGH_WATER, LocalClient
from comzy.core.server import ServerContext
from tests.conftest import start_agent, visitor
from tests.helpers import IN_CI, serve_tcp, wait_until
from tests.test_local_http import ScriptedServer, always
from tests.test_websocket import exchange, open_ws
from tests.upstream import Upstream, pattern_block

try:
    import uvloop
except ImportError:
    if IN_CI:  # the test extra installs it: CI must run these, not skip them
        raise
    pytest.skip("uvloop is not installed (it is in the test extra: pip install -e '.[test]')", allow_module_level=True)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Every test here, its fixtures included (server, upstream, agent), runs on a uvloop loop."""
    return "asyncio", {"use_uvloop": True}


def assert_on_uvloop() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop), f"expected a uvloop loop, got {type(loop)}"


def expected_bytes(total: int) -> bytes:
    """What the upstream's /bytes/N and /chunked/N routes send."""
    block = pattern_block()
    return (block * (total // len(block) + 1))[:total]


async def test_local_client_keeps_its_connection_and_reuses_it_on_uvloop() -> None:
    assert_on_uvloop()
    server = ScriptedServer(always(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    async with serve_tcp(server.handle) as port:
        client = LocalClient("127.0.0.1", port)
        try:
            for _ in range(3):
                response = await client.request("GET", b"/", [(b"host", b"local")], None)
                # The protocol kept the loop's transport (it stayed None on uvloop before the fix).
                assert type(response.connection.transport).__module__.startswith("uvloop")
                body = b"".join([piece async for piece in response.body()])
                assert (response.status, body) == (200, b"hello")
                await client.release(response.connection)
        finally:
            await client.aclose()
    assert server.connections == 1


async def test_local_client_pauses_and_resumes_reading_on_uvloop(upstream: Upstream) -> None:
    """A body read slowly, several times READ_HIGH_WATER long: reading pauses and resumes, bytes intact."""
    assert_on_uvloop()
    total = 4 * READ_HIGH_WATER + 12345
    client = LocalClient("127.0.0.1", upstream.port)
    paused = False
    try:
        response = await client.request("GET", f"/bytes/{total}".encode(), [(b"host", b"local")], None)
        conn = response.connection
        digest = hashlib.sha256()
        size = 0
        async for piece in response.body():
            digest.update(piece)
            size += len(piece)
            if not paused:
                # Let the local app fill the buffer past the high-water mark before reading on.
                await wait_until(lambda: conn._reading_paused, timeout=30)
                paused = True
        assert size == total
        assert digest.hexdigest() == hashlib.sha256(expected_bytes(total)).hexdigest()
        assert not conn._reading_paused  # resumed: the rest of the body arrived
        await client.release(conn)
    finally:
        await client.aclose()


async def test_requests_and_websocket_through_an_agent_on_uvloop(server: ServerContext, upstream: Upstream) -> None:
    """Server, agent and local app all on uvloop: plain, large, chunked and WebSocket traffic get through."""
    assert_on_uvloop()
    async with start_agent(server, upstream.port) as tunnel, visitor(server, tunnel.alias) as client:
        for _ in range(5):
            response = await client.get("/status/200")
            assert (response.status_code, response.text) == (200, "status 200\n")
        large = 3 * READ_HIGH_WATER + 7
        response = await client.get(f"/bytes/{large}")
        assert response.status_code == 200
        assert response.content == expected_bytes(large)
        response = await client.get("/chunked/100000")
        assert response.status_code == 200
        assert response.content == expected_bytes(100000)
        upload = bytes(range(256)) * 1000  # a request body, sent by the agent to the local app
        response = await client.post("/upload", content=upload)
        assert response.status_code == 200
        assert (response.json()["body_size"], response.json()["body_sha256"]) == (
            len(upload), hashlib.sha256(upload).hexdigest())
        async with open_ws(server, tunnel.alias) as (ws, _):
            assert await exchange(ws, "hello") == "echo:hello"
        errors = [served for served in tunnel.reporter.served if served.error or served.status >= 500]
        assert errors == []
        assert len(tunnel.reporter.served) >= 7
