"""The benchmark's own local app: an upload sink, an SSE endpoint and a WebSocket echo on one port.

A raw asyncio TCP server that parses just enough HTTP/1.1 for the benchmark, so it costs far
less per byte and per request than the tunnel it is measured through (the direct figures in
every run show that):

- ``POST``/``PUT`` any path: reads a Content-Length or chunked body, discards it, answers 200
  with the number of body bytes as the response body;
- ``GET /sse``: answers a ``text/event-stream`` and writes the first event in the same write as
  the response head, then keeps the stream open until the client goes (at most ``SSE_HOLD`` s);
- ``GET /ws`` with ``Upgrade: websocket``: echoes every message back (wsproto framing);
- anything else: 404.

Run it as ``python -m bench.localapp [--port N]``; it prints ``listening on 127.0.0.1:<port>``
once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage
from wsproto.utilities import RemoteProtocolError

READ_SIZE = 1024 * 1024
SSE_HOLD = 60.0
FIRST_EVENT = b"data: ready\n\n"


class BadRequest(Exception):
    """The client sent something this small parser does not accept."""


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and lower-cased headers (last value wins) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest(f"bad request line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def discard_exactly(reader: asyncio.StreamReader, size: int) -> int:
    """Read and drop ``size`` bytes; returns how many arrived before EOF."""
    left = size
    while left:
        data = await reader.read(min(left, READ_SIZE))
        if not data:
            break
        left -= len(data)
    return size - left


async def discard_chunked(reader: asyncio.StreamReader) -> int:
    """Read and drop a chunked body (trailers included); returns the body size."""
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return total
        if await discard_exactly(reader, size) != size:
            raise BadRequest("body ended inside a chunk")
        total += size
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("missing CRLF after a chunk")


def response(status: str, body: bytes, keep_alive: bool, content_type: str = "text/plain") -> bytes:
    """A complete HTTP/1.1 response with a Content-Length."""
    connection = "keep-alive" if keep_alive else "close"
    head = (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"connection: {connection}\r\n\r\n")
    return head.encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests on one connection until it closes."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            method, target, headers = parse_head(head[:-4])
            keep_alive = headers.get("connection", "").lower() != "close"
            path = target.split("?", 1)[0]
            if "websocket" in headers.get("upgrade", "").lower():
                await websocket_echo(head, reader, writer)
                return
            if "chunked" in headers.get("transfer-encoding", "").lower():
                received = await discard_chunked(reader)
            else:
                length = int(headers.get("content-length", "0") or 0)
                received = await discard_exactly(reader, length)
                if received != length:
                    return
            if method in ("POST", "PUT"):
                writer.write(response("200 OK", str(received).encode(), keep_alive))
            elif method == "GET" and path == "/sse":
                await server_sent_events(reader, writer)
                return
            else:
                writer.write(response("404 Not Found", b"not found\n", keep_alive))
            await writer.drain()
            if not keep_alive:
                return
    except (BadRequest, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
        with contextlib.suppress(ConnectionError):
            writer.write(response("400 Bad Request", b"bad request\n", False))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def server_sent_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send the head and the first event at once, then hold the stream until the client leaves."""
    chunk = f"{len(FIRST_EVENT):x}\r\n".encode() + FIRST_EVENT + b"\r\n"
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                 b"transfer-encoding: chunked\r\n\r\n" + chunk)
    await writer.drain()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(SSE_HOLD):
            while await reader.read(READ_SIZE):
                pass
    with contextlib.suppress(ConnectionError):
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def websocket_echo(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept the upgrade whose head was already read and echo messages until close."""
    conn = WSConnection(ConnectionType.SERVER)
    conn.receive_data(head)
    parts: list[bytes | str] = []
    while True:
        try:
            for event in conn.events():
                if isinstance(event, Request):
                    writer.write(conn.send(AcceptConnection()))
                elif isinstance(event, (TextMessage, BytesMessage)):
                    parts.append(event.data)
                    if event.message_finished:
                        if isinstance(event, TextMessage):
                            message: TextMessage | BytesMessage = TextMessage("".join(parts))  # type: ignore[arg-type]
                        else:
                            message = BytesMessage(b"".join(parts))  # type: ignore[arg-type]
                        parts = []
                        writer.write(conn.send(message))
                elif isinstance(event, Ping):
                    writer.write(conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    writer.write(conn.send(event.response()))
                    await writer.drain()
                    return
        except RemoteProtocolError:
            return
        await writer.drain()
        data = await reader.read(READ_SIZE)
        if not data:
            return
        conn.receive_data(data)


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` (0: any free port) until SIGTERM or SIGINT."""
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=READ_SIZE, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    """``python -m bench.localapp [--port N]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.localapp", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
