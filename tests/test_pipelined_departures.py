"""A visitor who pipelines a request behind a long response, then leaves, is noticed.

While a pipelined request waits for the response before it, the HTTP servers stop parsing that
connection (uvicorn pauses reading; hypercorn's h11 is PAUSED), and used to stop reading it too:
a visitor who then left (FIN or RST) went unnoticed, the stream to the agent stayed open, the
local app kept its request, and a stream slot of the tunnel stayed pinned until the local app
next wrote (never, for a quiet event stream): a cheap way to use up a tunnel's stream limit. The
servers now read on while a pipelined request waits, holding at most a bounded number of bytes
(then they pause for real), to notice the departure. A visitor who pipelines and stays still gets
every response, in order, byte for byte.

Each test runs on every public listener server; the local app is a real HTTP server on port 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import socket
import struct
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from comzy.core.server import ServerContext
from tests.conftest import RunningAgent, start_agent, start_server
from tests.helpers import wait_until
from tests.test_http_servers import SERVERS
from tests.upstream import serve_asgi

pytestmark = pytest.mark.anyio


class LocalApp:
    """The local service: ``/long/<name>`` answers an event stream's head and first event at once,
    then waits for the test (``release``) or for its client to leave (``left``); anything else is
    answered with the method, the target and its body's length and digest."""

    def __init__(self) -> None:
        self.arrived: dict[str, anyio.Event] = {}
        self.released: dict[str, anyio.Event] = {}
        self.left: dict[str, anyio.Event] = {}

    def event(self, table: dict[str, anyio.Event], name: str) -> anyio.Event:
        return table.setdefault(name, anyio.Event())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if not path.startswith("/long/"):
            answer = f"{scope['method']} {path} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"%d" % len(answer))]})
            await send({"type": "http.response.body", "body": answer})
            return
        name = path.rsplit("/", 1)[1]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: open\n\n", "more_body": True})
        self.event(self.arrived, name).set()
        async with anyio.create_task_group() as tg:
            async def finish() -> None:
                await self.event(self.released, name).wait()
                await send({"type": "http.response.body", "body": b"data: end\n\n"})
                tg.cancel_scope.cancel()

            tg.start_soon(finish)
            # hypercorn (the local server here) reports the agent's closed connection as http.disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.event(self.left, name).set()
            tg.cancel_scope.cancel()


@asynccontextmanager
async def tunnel_to(tmp_path: Path, kind: str, app: LocalApp,
                    **settings: Any) -> AsyncIterator[tuple[ServerContext, RunningAgent]]:
    """A server on ``kind`` and an agent for ``app``."""
    async with serve_asgi(app) as port, start_server(tmp_path / kind, http_server=kind, **settings) as server, \
            start_agent(server, port) as tunnel:
        yield server, tunnel


def request(tunnel: RunningAgent, method: str, target: str, body: bytes = b"") -> bytes:
    host = f"{tunnel.alias}.{tunnel.server.settings.base_domain}".encode()
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target.encode(), host)
    if body or method == "POST":
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


async def receive_until(stream: anyio.abc.SocketStream, marker: bytes, seen: bytes = b"") -> bytes:
    with anyio.fail_after(10):
        while marker not in seen:
            seen += await stream.receive()
    return seen


def streams_open(server: ServerContext, tunnel: RunningAgent) -> int:
    entry = server.registry.get(tunnel.alias)
    assert entry is not None
    return len(entry.session.streams) + entry.tunnel.streams_open


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize(("method", "leave"), [("GET", "fin"), ("GET", "rst"), ("POST", "fin")])
async def test_a_visitor_who_pipelines_and_leaves_frees_the_stream(tmp_path: Path, kind: str, method: str,
                                                                    leave: str) -> None:
    app = LocalApp()
    async with tunnel_to(tmp_path, kind, app) as (server, tunnel):
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        async with stream:
            first = request(tunnel, method, "/long/sse", b"x" * 100 if method == "POST" else b"")
            await stream.send(first + request(tunnel, "GET", "/after"))
            await receive_until(stream, b"data: open")
            assert streams_open(server, tunnel) == 2  # the session's stream and the tunnel's count
            if leave == "rst":
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The local app sees its client (the agent) go, and nothing stays open on the server.
        with anyio.fail_after(5):
            await app.event(app.left, "sse").wait()
        await wait_until(lambda: streams_open(server, tunnel) == 0, timeout=5)
        assert "after" not in app.arrived  # the pipelined request was never served
        # The tunnel still serves, on the same link.
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        async with stream:
            await stream.send(request(tunnel, "GET", "/again"))
            assert b"GET /again 0" in await receive_until(stream, b"\n", await receive_until(stream, b"\r\n\r\n"))


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """The responses in ``data``, parsed by h11, as (status, body)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    found: list[tuple[int, bytes]] = []
    while True:
        # A request per response, so that h11 knows what each answers.
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                return found
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        found.append((status, body))
        client.start_next_cycle()


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_visitor_who_pipelines_and_stays_gets_every_response_in_order(tmp_path: Path, kind: str) -> None:
    app = LocalApp()
    body = bytes(range(256)) * 1000  # 256000 bytes, more than one read
    # A small bound on held bytes (twice the head limit): the server pauses and resumes its reads.
    async with tunnel_to(tmp_path, kind, app, max_request_head=4096) as (server, tunnel):
        pipelined = (request(tunnel, "GET", "/a") + request(tunnel, "POST", "/b", body)
                     + request(tunnel, "GET", "/c?q=1"))
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        async with stream:
            await stream.send(request(tunnel, "GET", "/long/sse") + pipelined[:10])
            seen = await receive_until(stream, b"data: open")
            # The rest arrives while the pipelined requests wait, in pieces.
            for start in range(10, len(pipelined), 50000):
                await stream.send(pipelined[start:start + 50000])
            app.event(app.released, "sse").set()
            while len(responses(seen)) < 4:
                with anyio.fail_after(10):
                    seen += await stream.receive()
    assert responses(seen) == [
        (200, b"data: open\n\ndata: end\n\n"),
        (200, b"GET /a 0 " + hashlib.sha256(b"").hexdigest().encode() + b"\n"),
        (200, b"POST /b 256000 " + hashlib.sha256(body).hexdigest().encode() + b"\n"),
        (200, b"GET /c 0 " + hashlib.sha256(b"").hexdigest().encode() + b"\n"),
    ]


def server_transport(peer: tuple[str, int]) -> asyncio.Transport:
    """The server's transport of the connection whose client end is ``peer``."""
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Transport) and not obj.is_closing() and obj.get_extra_info("peername") == peer:
            return obj
    raise AssertionError(f"no transport for {peer}")


#: Linux's ioctl for the bytes a socket has not sent yet (TIOCOUTQ counts those sent and not acknowledged too).
SIOCOUTQNSD = 0x894B


def queued(sock: socket.socket, request: int) -> int:
    """Bytes in a socket's kernel queue: FIONREAD (received, unread) or SIOCOUTQNSD (unsent)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_pipelining_visitor_cannot_make_the_server_hold_more_than_the_bound(tmp_path: Path,
                                                                                    kind: str) -> None:
    app = LocalApp()
    bound = 2 * 4096  # the servers' head limit, h11_max_incomplete_size: twice COMZY_MAX_REQUEST_HEAD
    async with tunnel_to(tmp_path, kind, app, max_request_head=4096) as (server, tunnel):
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.ports.http))
            # A request body far larger than anything the server may hold, pipelined behind a long response.
            await loop.sock_sendall(sock, request(tunnel, "GET", "/long/sse") + b"POST /big HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 100000000\r\n\r\n")
            seen = b""
            with anyio.fail_after(10):
                while b"data: open" not in seen:
                    seen += await loop.sock_recv(sock, 65536)
            transport = server_transport(sock.getsockname())
            block = b"b" * 65536
            pushed = 0

            def push() -> bool:
                nonlocal pushed
                try:
                    while pushed < 50_000_000:
                        pushed += sock.send(block)
                except BlockingIOError:
                    pass
                return not transport.is_reading()

            # Sent until the server stops reading (the kernel's buffers then fill), and then some.
            await wait_until(push)
            push()
            server_sock = transport.get_extra_info("socket")
            held = pushed - queued(server_sock, termios.FIONREAD) - queued(sock, SIOCOUTQNSD)
            # What the server read and holds: the bound plus a read, and below it what the servers
            # buffered before (uvicorn: a request body up to 64 KiB plus a read; hypercorn: its
            # reader's 128 KiB plus a read, and h11's read of 64 KiB). A read is at most 256 KiB.
            assert 0 < held <= bound + 256 * 1024 + (64 + 256 + 64) * 1024, held
            app.event(app.released, "sse").set()


async def test_reads_resume_when_the_bound_is_passed_after_uvicorn_let_go() -> None:
    """A read that lands between uvicorn letting go (its resume_reading) and the held bytes being
    parsed can take them past the bound and pause the socket; parsing them must resume it, or an
    upload that then stays under uvicorn's own body buffer never reads again (it hung until the
    response timeout). Driven step by step on a real socket transport: the order of the loop's
    callbacks decides it, which an end-to-end upload hits only by chance."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from comzy.core.http_servers import _bounded_head_protocol

    release_app = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await release_app.wait()  # reads nothing: the test plays the app's receive() itself

    limit = 16 * 1024
    protocol_class = _bounded_head_protocol(limit)
    config = Config(app=app, loop="asyncio", http="httptools", lifespan="off", log_level="critical")
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, protocol = await loop.connect_accepted_socket(
        lambda: protocol_class(config, ServerState(), {}, _loop=loop), sock=ours)
    try:
        head = b"POST /up HTTP/1.1\r\nHost: a.localhost\r\nContent-Length: 1048576\r\n\r\n"
        protocol.data_received(head + b"x" * (70 * 1024))  # past uvicorn's 64 KiB: it pauses
        assert protocol.flow.read_paused
        protocol.data_received(b"y" * (10 * 1024))  # held, under the bound
        assert transport.is_reading()
        protocol.cycle.body = b""  # what the app's receive() does before resuming
        protocol.flow.resume_reading()  # uvicorn lets go; the held bytes are parsed next turn
        protocol.data_received(b"z" * (10 * 1024))  # this turn's read: 20 KiB held, past the bound
        assert not transport.is_reading()
        await asyncio.sleep(0)  # parse_held runs: 20 KiB of body, under uvicorn's 64 KiB
        assert not protocol.flow.read_paused and protocol.cycle.body == b"y" * (10 * 1024) + b"z" * (10 * 1024)
        assert transport.is_reading()  # reads go on: the rest of the upload can come
    finally:
        release_app.set()
        transport.close()
        theirs.close()
        await asyncio.sleep(0)
