"""A small WebSocket endpoint on an anyio byte stream, driven by wsproto.

Used for the agent <-> server link (both ends) and by the agent to reach a local
WebSocket service. wsproto does the framing; this module only moves bytes and
assembles messages, with a bound on message size so a peer cannot make us buffer
without limit.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
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
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

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
    """One open WebSocket connection: send and receive whole messages."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: WSConnection,
        max_message: int,
        pending: list[Event] | None = None,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._max_message = max_message
        self._events: list[Event] = pending or []
        self._parts: list[bytes | str] = []
        self._size = 0
        self._send_lock = anyio.Lock()
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
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.closed = self.closed or Closed(1006, "connection lost")
                raise WebSocketError("connection lost while sending") from exc

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


async def server_handshake(
    stream: anyio.abc.ByteStream, max_message: int, max_head: int = 16384
) -> tuple[WebSocket, Request]:
    """Complete the server side of the opening handshake on an accepted connection."""
    conn = WSConnection(ConnectionType.SERVER)
    received = 0
    events: list[Event] = []
    while not events:
        # Count the bytes actually read: a head split over several reads is normal.
        events, size = await _read_events(stream, conn)
        received += size
        if not events and received > max_head:
            raise WebSocketError("WebSocket handshake head too large")
    first = events.pop(0)
    if not isinstance(first, Request):
        raise WebSocketError(f"expected a WebSocket upgrade request, got {type(first).__name__}")
    await stream.send(conn.send(AcceptConnection()))
    return WebSocket(stream, conn, max_message, events), first


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
                return WebSocket(stream, conn, max_message, events), event
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
