"""Fidelity through an edge that only a cluster has: one link carries many tunnels, and NATS's
max_payload bounds every link message (docs/design/cluster.md 1.3, 1.5; section 5, scenario 9).

The suites every role shares run through an edge via tests/stack.py; these add what role ``all``
has no counterpart for. Edge, control node, agents and upstreams are real, in the test's loop, on a
real nats-server of the test's own.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from comzy.core.cluster.link import LINK_HEADER
from comzy.core.session import Session
from comzy.core.stream import Stream
from comzy.core.websocket import client_handshake
from tests.cluster.conftest import NatsServer
from tests.helpers import serve_tcp, wait_until
from tests.stack import Stack, Stacks
from tests.upstream import Upstream, pattern_block, serve_upstream

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
#: nats-server's max_payload in the small-payload test: a quarter of the default 1 MiB.
SMALL_PAYLOAD = 256 * 1024


def pattern_digest(total: int) -> str:
    """sha256 of the first ``total`` bytes of the upstream's download pattern."""
    block, digest, left = pattern_block(), hashlib.sha256(), total
    while left:
        digest.update(block[:min(len(block), left)])
        left -= min(len(block), left)
    return digest.hexdigest()


async def download(client: httpx.AsyncClient, total: int) -> None:
    """GET ``total`` bytes of the pattern and check every one of them."""
    digest, received = hashlib.sha256(), 0
    async with client.stream("GET", f"/bytes/{total}") as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
    assert received == total and digest.hexdigest() == pattern_digest(total)


async def upload(client: httpx.AsyncClient, body: bytes) -> None:
    """POST ``body`` in pieces and check the upstream got it whole."""
    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), 100_000):
            yield body[offset:offset + 100_000]

    info = (await client.post("/upload", content=pieces())).json()
    assert info["body_size"] == len(body) and info["body_sha256"] == hashlib.sha256(body).hexdigest()


def stalled(link: Session) -> int:
    """How many streams on the edge's ``link`` hold a whole window nobody reads: the agent has no
    credit left for them and none is coming (their visitor stopped reading)."""
    return sum(1 for stream in link.streams.values()
               if isinstance(stream, Stream) and stream._buffered + stream._unacked >= stream._window)


@asynccontextmanager
async def slow_visitor(stack: Stack, alias: str, target: str) -> AsyncIterator[anyio.abc.SocketStream]:
    """A visitor that asks for ``target`` and, once the head is here, reads nothing more (a tiny
    receive buffer, so the edge's writes to it block at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window follows it
    sock.connect(("127.0.0.1", stack.public.ports.http))  # loopback with a listening server: immediate
    sock.setblocking(False)
    stream = await anyio.abc.SocketStream.from_socket(sock)
    try:
        host = f"{alias}.{stack.public.settings.base_domain}"
        await stream.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = b""
        with anyio.fail_after(20):
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        yield stream
    finally:
        await stream.aclose()


async def test_a_slow_visitor_does_not_stall_another_tunnel_on_the_same_link(tmp_path: Path) -> None:
    async with serve_upstream() as first, serve_upstream() as second:
        stacks = Stacks("cluster", tmp_path)
        try:
            async with (stacks.start() as stack, stack.agent(first.port) as slow, stack.agent(second.port) as fast,
                        slow_visitor(stack, slow.alias, f"/bytes/{512 * MIB}")):
                assert stack.control.cluster is not None and stack.public.cluster is not None
                link = stack.public.cluster.links.get(stack.control.node)
                # The slow visitor's stream has used up its credit end to end: the agent waits on it.
                await wait_until(lambda: stalled(link) == 1, 30)
                # The other tunnel's traffic crosses the same link, both ways, whole.
                async with fast.visitor() as client:
                    with anyio.fail_after(60):
                        await download(client, 16 * MIB)
                        await upload(client, os.urandom(4 * MIB + 5))
                        for i in range(20):
                            assert (await client.get(f"/small/{i}")).json()["raw_path"] == f"/small/{i}"
                    # Nothing of that was another link: one node pair, one link.
                    assert stack.public.cluster.links.get(stack.control.node) is link and link.closed is None
                    # The slow one is still held where its visitor left it, not failed, not finished.
                    held = stack.control.tunnel(slow.alias)
                    assert held is not None and held.streams_open == 1 and stalled(link) == 1
                    # And a visitor of the same tunnel gets its answer too.
                    async with slow.visitor() as again:
                        assert (await again.get("/status/200")).status_code == 200
            # The slow visitor left: its stream is released on the control node.
            await wait_until(lambda: held.streams_open == 0)
        finally:
            stacks.close()


@pytest.fixture
def small_payload_nats(tmp_path: Path, nats_server: NatsServer) -> NatsServer:
    """The test's nats-server, restarted with max_payload 256 KiB from a configuration file."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 256KB\n")
    nats_server.kill9()
    nats_server.extra = ("-c", str(conf))
    nats_server.start()
    return nats_server


def big_head_upstream(value_size: int) -> object:
    """A bare HTTP/1.1 service whose every answer carries one header of ``value_size`` bytes."""
    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client:
            request = b""
            while b"\r\n\r\n" not in request:
                try:
                    request += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
            big = b"v" * value_size
            await client.send(b"HTTP/1.1 200 OK\r\nx-big: " + big + b"\r\ncontent-length: 2\r\n\r\nok")
    return handle


async def test_a_small_nats_max_payload_streams_bodies_whole_and_refuses_a_too_large_head_with_502(
        tmp_path: Path, small_payload_nats: NatsServer, upstream: Upstream) -> None:
    # A head under the agent's 256 KiB response-head limit, but as a frame larger than the
    # largest link message (max_payload minus the link header and slack): the link cannot carry it.
    value_size = SMALL_PAYLOAD - 600
    stacks = Stacks("cluster", tmp_path, nats=small_payload_nats)
    async with (stacks.start() as stack, stack.agent(upstream.port) as running,
                serve_tcp(big_head_upstream(value_size)) as big_port,  # type: ignore[arg-type]
                stack.agent(big_port) as big):
        assert stack.public.cluster is not None and stack.control.cluster is not None
        for node in (stack.public.cluster, stack.control.cluster):
            assert node.nats.max_payload == SMALL_PAYLOAD  # the configuration file took
            assert node.links.coalesce_limit + LINK_HEADER.size <= SMALL_PAYLOAD
        async with running.visitor() as client:
            # Bodies many times max_payload, both ways, byte for byte (a link message over it
            # would fail its publish, and the link with it).
            with anyio.fail_after(60):
                await download(client, 24 * MIB)
                await upload(client, os.urandom(8 * MIB + 3))
            # A WebSocket message of 1 MiB crosses as many DATA frames.
            tcp = await anyio.connect_tcp("127.0.0.1", stack.public.ports.http)
            ws, _ = await client_handshake(tcp, client.headers["host"], "/ws/mirror", 4 * MIB)
            try:
                message = os.urandom(MIB)
                await ws.send(message)
                with anyio.fail_after(20):
                    assert await ws.receive() == message
            finally:
                await ws.aclose()
        async with big.visitor() as client:
            response = await client.get("/big-head")
        assert response.status_code == 502
        assert response.text == "The tunnel failed before a response: response head too large for the cluster link\n"
        # Only that exchange failed: the link, and both tunnels on it, keep serving.
        async with running.visitor() as client:
            assert (await client.get("/status/200")).status_code == 200
        async with big.visitor() as client:
            assert (await client.get("/again")).status_code == 502
        held = stack.control.tunnel(big.alias)
        assert held is not None
        await wait_until(lambda: held.streams_open == 0)


async def test_the_link_lost_mid_exchange_aborts_the_visitors_and_releases_the_agents_streams(
        tmp_path: Path, upstream: Upstream) -> None:
    stacks = Stacks("cluster", tmp_path)
    try:
        async with stacks.start() as stack, stack.agent(upstream.port) as running, running.visitor() as client:
            assert stack.public.cluster is not None
            held = stack.control.tunnel(running.alias)
            assert held is not None
            link = stack.public.cluster.links.get(stack.control.node)
            tcp = await anyio.connect_tcp("127.0.0.1", stack.public.ports.http)
            ws, _ = await client_handshake(tcp, client.headers["host"], "/ws", 4 * MIB)
            try:
                await ws.send("before")
                with anyio.fail_after(10):
                    assert await ws.receive() == "echo:before"
                async with client.stream("GET", f"/bytes/{512 * MIB}") as response:
                    assert response.status_code == 200
                    chunks = response.aiter_raw()
                    with anyio.fail_after(10):
                        await anext(chunks)
                    assert (held.streams_open, held.websockets_open) == (2, 1)
                    await link.close(1000, "test: the link goes")
                    # Never a clean end: the download is aborted, the WebSocket closed as lost.
                    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), anyio.fail_after(20):
                        async for _ in chunks:
                            pass
                with anyio.fail_after(10):
                    closed = await ws.receive()
                assert (getattr(closed, "code", None), getattr(closed, "reason", None)) == (1011, "tunnel lost")
            finally:
                await ws.aclose()
            # The control node learnt of it (BYE) and reset both streams towards the agent.
            await wait_until(lambda: (held.streams_open, held.websockets_open) == (0, 0))
            agent_session = running.agent.session
            assert agent_session is not None
            await wait_until(lambda: not agent_session.streams)
            # The next visitor gets a new link.
            assert (await client.get("/status/200")).status_code == 200
            assert stack.public.cluster.links.get(stack.control.node) is not link
    finally:
        stacks.close()
