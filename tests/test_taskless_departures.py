"""Visitors that leave at any point of an exchange served without a task: the books still balance.

On uvicorn-direct a request without a body is served from callbacks at both ends (the edge's
``_Taskless``, the agent's ``_Call``): nothing like a task's ``finally`` closes what an exchange
opened. Many visitors, each sending one to four pipelined requests (small, empty, HEAD, chunked,
large, cut by the local app, never answered: the 504), some in two pieces, then leaving at once,
a little later, mid-response or after reading all, some with a RST: afterwards no stream is left
open at either end, every exchange was counted once and told to after_response once, and the
tunnel still serves on the same link.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from comzy.core import hookspecs
from comzy.core.types import Exchange
from tests.conftest import start_agent, start_server
from tests.helpers import wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:
    LOOPS = ["asyncio"]


@pytest.fixture(params=LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Each test, its server and agent included, on asyncio's loop and on uvloop's."""
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


#: /sse is a response that never ends (its gates stay closed): requests pipelined behind it wait,
#: and the server must still see the visitor leave (tests/test_pipelined_departures.py).
REQUESTS = [b"GET /status/200", b"HEAD /status/200", b"GET /status/204", b"GET /status/304", b"GET /cookies",
            b"GET /bytes/300000", b"GET /bytes/3000000", b"GET /chunked/3000", b"HEAD /chunked/100",
            b"GET /drop-mid", b"GET /drop-mid-chunked", b"GET /echo", b"GET /hold/never", b"GET /sse"]


async def visit(port: int, host: bytes, seed: int) -> None:
    """One visitor, its requests and its way of leaving drawn from ``seed``."""
    r = random.Random(seed)
    count = r.randint(1, 4)
    payload = b"".join(r.choice(REQUESTS) + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" for _ in range(count))
    pieces = [payload] if r.random() < 0.5 else [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
    leave_after = r.choice([0, 0.001, 0.005, 0.02, None])  # None: read until the server closes or 2 s pass
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        if r.random() < 0.3:  # leave with a RST rather than a FIN
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for piece in pieces:
            await stream.send(piece)
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            if leave_after is None:
                with anyio.move_on_after(2):
                    while True:
                        await stream.receive()
            else:
                await anyio.sleep(leave_after)
                if r.random() < 0.5:
                    await stream.receive()


async def test_visitors_leaving_anywhere_leave_nothing_open(tmp_path: Path, upstream: Upstream) -> None:
    seen: list[Exchange] = []

    class Recorder:
        @hookspecs.hookimpl
        def after_response(self, exchange: Exchange) -> None:
            seen.append(exchange)

    rng = random.Random(13)
    async with start_server(tmp_path / "d", plugins=[("recorder", Recorder())], http_server="uvicorn-direct",
                            response_timeout=0.3) as server, start_agent(server, upstream.port) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        for _ in range(4):
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(visit, server.ports.http, host, rng.randrange(1 << 30))
        entry = server.registry.get(tunnel.alias)
        agent_session = tunnel.agent.session
        assert entry is not None and agent_session is not None
        await wait_until(lambda: not entry.session.streams and entry.tunnel.streams_open == 0
                         and not agent_session.streams)
        assert entry.tunnel.requests == len(seen) > 0  # each exchange counted, and reported, once
        assert tunnel.agent.forwarder.answered_without_task > 0  # the agent's taskless path served some
        async with tunnel.visitor() as client:  # still serving, on the same link
            assert (await client.get("/status/200")).status_code == 200
        assert tunnel.agent.session is agent_session
        upstream.gate("never").set()
