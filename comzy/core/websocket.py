"""A small WebSocket endpoint on an anyio byte stream, driven by wsproto.

Used for the agent <-> server link (both ends) and by the agent to reach a local
WebSocket service. wsproto does the framing; this module only moves bytes and
assembles messages, with a bound on message size so a peer cannot make us buffer
without limit.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

from comzy.core import wsframe

READ_SIZE = 256 * 1024


class WebSocketError(Exception):
    """The WebSocket handshake or framing failed."""


@dataclass(slots=True)
class Closed:
    """The peer closed the WebSocket (or the connection dropped: code 1006)."""

    code: int
    reason: str = ""


class WebSocket:
    """One open WebSocket connection: send and receive whole messages.

    ``conn`` is wsproto's post-handshake ``Connection``: the handshake machinery (an h11
    connection and its buffers, ~3 KB) is not kept for the life of the link.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: Connection,
        max_message: int,
        pending: list[Event] | None = None,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._max_message = max_message
        self._events: list[Event] = pending or []
        self._parts: list[bytes | str] = []
        self._size = 0
        # One write at a time (the session's writer, and the reader answering a ping or a close).
        # Contention is rare, so this is a flag plus an event made only when someone must wait:
        # no lock object (and its waiter queue) per idle connection, no extra yield per send.
        self._writing = False
        self._write_done: anyio.Event | None = None
        self.closed: Closed | None = None

    async def send(self, message: bytes | str) -> None:
        """Send one message (bytes: binary, str: text)."""
        if self.closed is not None:
            raise WebSocketError(f"WebSocket is closed ({self.closed.code})")
        if isinstance(message, bytes) and self._conn.state is ConnectionState.OPEN:
            # Binary messages are the data path: framed and masked in C (see wsframe).
            await self._write(wsframe.encode_binary(message, masked=self._conn.client))
            return
        event = BytesMessage(message) if isinstance(message, bytes) else TextMessage(message)
        await self._write(self._conn.send(event))

    async def _write(self, data: bytes) -> None:
        while self._writing:
            if self._write_done is None:
                self._write_done = anyio.Event()
            await self._write_done.wait()
        self._writing = True
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.closed = self.closed or Closed(1006, "connection lost")
            raise WebSocketError("connection lost while sending") from exc
        finally:
            self._writing = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None

    async def receive(self) -> bytes | str | Closed:
        """The next whole message, or ``Closed`` once the peer has gone."""
        while True:
            while self._events:
                event = self._events.pop(0)
                result = await self._handle(event)
                if result is not None:
                    return result
            if self.closed is not None:
                return self.closed
            try:
                data = await self._stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.closed = Closed(1006, "connection lost")
                return self.closed
            try:
                self._conn.receive_data(data)
                self._events.extend(self._conn.events())
            except RemoteProtocolError as exc:
                self.closed = Closed(1002, f"WebSocket protocol error: {exc}")
                await self.aclose()
                return self.closed

    async def _handle(self, event: Event) -> bytes | str | Closed | None:
        if isinstance(event, (BytesMessage, TextMessage)):
            self._size += len(event.data)
            if self._size > self._max_message:
                self.closed = Closed(1009, f"message larger than {self._max_message} bytes")
                await self.close(1009, "message too big")
                return self.closed
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            parts, self._parts, self._size = self._parts, [], 0
            if isinstance(event, TextMessage):
                return "".join(parts)  # type: ignore[arg-type]
            return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
        if isinstance(event, Ping):
            with contextlib.suppress(WebSocketError):
                await self._write(self._conn.send(event.response()))
            return None
        if isinstance(event, CloseConnection):
            self.closed = Closed(event.code, event.reason or "")
            with contextlib.suppress(WebSocketError, LocalProtocolError):
                await self._write(self._conn.send(event.response()))
            await self.aclose()
            return self.closed
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake and close the connection."""
        if self.closed is None:
            self.closed = Closed(code, reason)
        with contextlib.suppress(WebSocketError, LocalProtocolError):
            await self._write(self._conn.send(CloseConnection(code=code, reason=reason)))
        await self.aclose()

    async def aclose(self) -> None:
        """Close the underlying connection without a handshake."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await self._stream.aclose()


async def _read_events(stream: anyio.abc.ByteStream, conn: WSConnection) -> tuple[list[Event], int]:
    """The events of the next read, and how many bytes it read."""
    try:
        data = await stream.receive(READ_SIZE)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise WebSocketError("connection closed during the WebSocket handshake") from exc
    try:
        conn.receive_data(data)
        return list(conn.events()), len(data)
    except RemoteProtocolError as exc:
        raise WebSocketError(f"bad WebSocket handshake: {exc}") from exc


_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")


def _tokens(value: bytes) -> list[str]:
    return [token.strip().decode("ascii", "replace") for token in value.split(b",") if token.strip()]


def parse_upgrade_request(head: bytes) -> Request:
    """Check an opening handshake (the request head without its blank line; RFC 6455 4.2.1).

    Raises WebSocketError unless it is a GET upgrade to WebSocket version 13 with a key.
    Agents connect many at once: this small parser costs a few microseconds where wsproto's
    h11-based one costs ~70 (measured), and keeps no HTTP machinery once the link is open.
    """
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[0] != b"GET" or request_line[2] != b"HTTP/1.1":
        raise WebSocketError(f"bad WebSocket handshake: not a GET HTTP/1.1 request: {lines[0][:100]!r}")
    headers: list[tuple[bytes, bytes]] = []
    values: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise WebSocketError(f"bad WebSocket handshake: malformed header line {line[:100]!r}")
        name, value = match[1].lower(), match[2]
        values.setdefault(name, []).append(value)
        if name not in (b"host", b"sec-websocket-extensions", b"sec-websocket-protocol"):
            headers.append((name, value))  # what wsproto reports as extra headers

    def joined(name: bytes) -> bytes:
        return b",".join(values.get(name, []))

    if "upgrade" not in (t.lower() for t in _tokens(joined(b"connection"))):
        raise WebSocketError("bad WebSocket handshake: missing 'Connection: Upgrade'")
    if "websocket" not in (t.lower() for t in _tokens(joined(b"upgrade"))):
        raise WebSocketError("bad WebSocket handshake: missing 'Upgrade: websocket'")
    if values.get(b"sec-websocket-version") != [b"13"]:
        raise WebSocketError("bad WebSocket handshake: 'Sec-WebSocket-Version' must be 13")
    if len(values.get(b"sec-websocket-key", [])) != 1 or not values[b"sec-websocket-key"][0]:
        raise WebSocketError("bad WebSocket handshake: missing 'Sec-WebSocket-Key'")
    if len(values.get(b"host", [])) != 1:
        raise WebSocketError("bad WebSocket handshake: missing 'Host'")
    try:
        raw_host = values[b"host"][0]
        host = raw_host.decode("ascii") if raw_host.isascii() else raw_host.decode("idna")
        target = request_line[1].decode("ascii")
    except UnicodeError as exc:
        raise WebSocketError(f"bad WebSocket handshake: {exc}") from exc
    return Request(host=host, target=target, extensions=_tokens(joined(b"sec-websocket-extensions")),
                   extra_headers=headers, subprotocols=_tokens(joined(b"sec-websocket-protocol")))


async def read_head(stream: anyio.abc.ByteStream, max_head: int = 16384) -> tuple[bytes, bytes]:
    """Read an HTTP request head: (the head without its blank line, the bytes read after it).

    Raises WebSocketError when the connection closes first or the head exceeds ``max_head``.
    """
    buffer = b""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        # Count the bytes actually read: a head split over several reads is normal.
        if len(buffer) > max_head:
            raise WebSocketError("WebSocket handshake head too large")
        try:
            buffer += await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise WebSocketError("connection closed during the WebSocket handshake") from exc
    if end > max_head:
        raise WebSocketError("WebSocket handshake head too large")
    return buffer[:end], buffer[end + 4 :]


_UPGRADE_HEADER = re.compile(rb"\r\nupgrade:[^\r]*websocket", re.IGNORECASE)


def asks_for_upgrade(head: bytes) -> bool:
    """Whether a request head asks for a WebSocket (else it is plain HTTP, e.g. an API call)."""
    return _UPGRADE_HEADER.search(head) is not None


async def accept(stream: anyio.abc.ByteStream, head: bytes, rest: bytes, max_message: int) -> tuple[WebSocket, Request]:
    """Answer an upgrade request head with 101 and return the open WebSocket.

    No extension or subprotocol is accepted. ``rest`` (bytes a client sent without waiting
    for the 101) is kept as the first WebSocket frames. Raises WebSocketError on a bad head.
    """
    request = parse_upgrade_request(head)
    key = next(value for name, value in request.extra_headers if name == b"sec-websocket-key")
    await stream.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n")
    conn = Connection(ConnectionType.SERVER)
    events: list[Event] = []
    if rest:
        try:
            conn.receive_data(rest)
            events = list(conn.events())
        except RemoteProtocolError as exc:
            raise WebSocketError(f"WebSocket protocol error: {exc}") from exc
    return WebSocket(stream, conn, max_message, events), request


async def server_handshake(
    stream: anyio.abc.ByteStream, max_message: int, max_head: int = 16384
) -> tuple[WebSocket, Request]:
    """Complete the server side of the opening handshake on an accepted connection."""
    head, rest = await read_head(stream, max_head)
    return await accept(stream, head, rest, max_message)


@dataclass(slots=True)
class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP response instead of 101."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def client_handshake(
    stream: anyio.abc.ByteStream,
    host: str,
    target: str,
    max_message: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
) -> tuple[WebSocket, AcceptConnection]:
    """Perform the client side of the opening handshake on a connected stream."""
    conn = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=host, target=target, extra_headers=headers or [], subprotocols=subprotocols or []
    )
    await stream.send(conn.send(request))
    reject: RejectConnection | None = None
    body = bytearray()
    while True:
        events, _ = await _read_events(stream, conn)
        while events:
            event = events.pop(0)
            if isinstance(event, AcceptConnection):
                assert conn.connection is not None  # set by the 101 response
                return WebSocket(stream, conn.connection, max_message, events), event
            if isinstance(event, RejectConnection):
                reject = event
                if not event.has_body:
                    raise HandshakeRejected(event.status_code, list(event.headers), b"")
            elif isinstance(event, RejectData) and reject is not None:
                body += event.data
                if len(body) > 1024 * 1024:
                    raise WebSocketError("rejection body too large")
                if event.body_finished:
                    raise HandshakeRejected(reject.status_code, list(reject.headers), bytes(body))


async def connect(
    url: str,
    max_message: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    connect_timeout: float = 10.0,
) -> WebSocket:
    """Open a WebSocket to a ``ws://`` or ``wss://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WebSocketError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    with anyio.fail_after(connect_timeout):
        if secure:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                parts.hostname, port, tls=True, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await anyio.connect_tcp(parts.hostname, port)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            ws, _ = await client_handshake(stream, netloc, target, max_message, headers)
        except BaseException:
            await stream.aclose()
            raise
    return ws
