"""A small WebSocket endpoint on an anyio byte stream.

Used for the agent <-> server link (both ends) and by the agent to reach a local WebSocket
service. wsproto does the client's opening handshake, a small parser here the server's; once
the connection is open, frames are read by ``wsframe.FrameReader`` and written by
``wsframe``'s encoders (the data path, see there). Messages are bounded in size so a peer
cannot make us buffer without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from comzy.core import wsframe
from comzy.core.tls import PrefixedStream, client_tls_context, mismatch

READ_SIZE = 256 * 1024
#: Once a link is attached (``WebSocket.attach``), bytes the transport may hold unsent before it
#: tells the sink to stop writing (asyncio's pause_writing), and the level at which it resumes.
TRANSPORT_HIGH_WATER = 256 * 1024
TRANSPORT_LOW_WATER = 64 * 1024
#: How long closing an attached WebSocket waits for the peer to take what is buffered for it.
CLOSE_FLUSH_TIMEOUT = 5.0
#: A message still missing this many bytes after a read waits a loop turn for the next read.
READ_BATCH = 64 * 1024


class WebSocketError(Exception):
    """The WebSocket handshake or framing failed."""


@dataclass(slots=True)
class Closed:
    """The peer closed the WebSocket (or the connection dropped: code 1006)."""

    code: int
    reason: str = ""


class MessageSink(Protocol):
    """What an attached WebSocket calls, synchronously, from the event loop's read and write
    callbacks (see ``WebSocket.attach``); the agent link's Session is one."""

    def _link_message(self, message: bytes | str) -> None:
        """A whole message arrived."""

    def _link_lost(self, closed: Closed) -> None:
        """The WebSocket closed (the peer's close, a framing error, or the connection dropped)."""

    def _link_writable(self, writable: bool) -> None:
        """The transport's buffer passed its high-water mark (False) or drained below its low one (True)."""


#: What ``attach`` needs of a transport: asyncio's own and uvloop's (not asyncio.Transport
#: subclasses) both have these.
_TRANSPORT_METHODS = ("set_protocol", "write", "pause_reading", "resume_reading", "is_closing", "close", "abort",
                      "get_write_buffer_size", "set_write_buffer_limits")


class _LinkProtocol(asyncio.Protocol):
    """The asyncio protocol of an attached WebSocket: hands every event straight to it."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    def data_received(self, data: bytes) -> None:
        self._ws._data_received(data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._ws._connection_lost()

    def pause_writing(self) -> None:
        self._ws._set_writable(False)

    def resume_writing(self) -> None:
        self._ws._set_writable(True)


class WebSocket:
    """One open WebSocket connection: send and receive whole messages.

    ``client`` says which end this is (a client masks what it sends, a server what it
    receives); ``received`` is what was read after the handshake, the first frames. Only a
    frame parser and a few fields are kept per connection: idle tunnels are many.
    """

    def __init__(self, stream: anyio.abc.ByteStream, client: bool, max_message: int, received: bytes = b"") -> None:
        self._stream = stream
        self._client = client
        self._reader = wsframe.FrameReader(client, max_message)
        self._reader.feed(received)
        # One write at a time (the session's writer, and the reader answering a ping or a close).
        # Contention is rare, so this is a flag plus an event made only when someone must wait:
        # no lock object (and its waiter queue) per idle connection, no extra yield per send.
        self._writing = False
        self._write_done: anyio.Event | None = None
        self.closed: Closed | None = None
        # Set by attach: the socket's asyncio transport, the sink its events go to, and a future
        # done when the connection is gone (aclose waits on it so buffered bytes go out first).
        self._transport: asyncio.Transport | None = None
        self._sink: MessageSink | None = None
        self._gone: asyncio.Future[None] | None = None
        # While paused, nothing more is parsed (not even what the last read brought): the sink
        # sees no message between pause_reading and resume_reading.
        self._paused = False
        self._breathing = False
        #: Mask binary messages with the all-zero key (a client only): no pass over what is sent.
        #: ``connect`` sets it on links no intermediary can read (TLS, loopback); see
        #: ``wsframe.encode_pieces`` for why only there.
        self.zero_key = False

    # -- attached: driven by the event loop's callbacks, no task -------------------------------
    def attach(self, sink: MessageSink) -> bool:
        """Take the socket over as an asyncio protocol: from now on every message goes to ``sink``
        from the loop's read callback, and ``write_message`` hands frames straight to the transport.

        The agent link does this once its handshake is done: reading through an anyio stream
        costs a task wakeup and two ``epoll_ctl`` calls per read, writing through it a task
        wakeup per message (docs/benchmarks.md, "The agent link as asyncio protocols"). Returns
        False, changing nothing, where there is no plain asyncio socket transport underneath
        (TLS, which anyio does in Python over the socket, or another backend): the caller keeps
        using ``receive`` and ``send``. ``receive`` must not be called once attached.
        """
        stream: Any = self._stream
        prefix = b""
        if isinstance(stream, PrefixedStream):  # the server's plain agent port: its first read put back
            stream, prefix = stream.stream, stream.prefix
        # anyio's asyncio socket stream: its transport, and the protocol holding what it read ahead.
        transport: Any = getattr(stream, "_transport", None)
        old = getattr(stream, "_protocol", None)
        queue = getattr(old, "read_queue", None)
        if (self.closed is not None or not all(hasattr(transport, name) for name in _TRANSPORT_METHODS)
                or transport.is_closing()
                or queue is None or getattr(old, "is_at_eof", True) or getattr(old, "exception", None) is not None):
            return False
        pending = [prefix, *queue] if prefix else list(queue)
        queue.clear()
        self._transport, self._sink = transport, sink
        self._gone = asyncio.get_running_loop().create_future()
        transport.set_protocol(_LinkProtocol(self))
        transport.set_write_buffer_limits(TRANSPORT_HIGH_WATER, TRANSPORT_LOW_WATER)
        # What the reader or anyio already holds comes first, in order.
        self._data_received(b"")
        for chunk in pending:
            if self.closed is not None:
                break
            self._data_received(chunk)
        if self.closed is None and not self._paused:
            transport.resume_reading()  # anyio leaves reading paused between receives
        return True

    @property
    def attached(self) -> bool:
        """Whether ``attach`` took the socket over."""
        return self._transport is not None

    def write_message(self, message: bytes) -> None:
        """Send one binary message without waiting (attached only): the transport buffers what
        the socket does not take; the sink hears when that passes the high-water mark."""
        transport = self._transport
        assert transport is not None
        if self.closed is None and not transport.is_closing():
            if self._client and not self.zero_key:
                transport.write(wsframe.encode_binary(message, True))  # masked with a random key
            else:  # the payload as it is, behind its header: encode_binary's bytes without its calls
                size = len(message)
                if size < 126:
                    header = (wsframe.ZERO_KEY_HEADERS if self._client else wsframe.BINARY_HEADERS)[size]
                elif size < 65536:
                    header = (wsframe.zero_key_header_16(size, wsframe.ZERO_KEY) if self._client
                              else wsframe.binary_header_16(size))
                else:
                    header = wsframe.binary_header(size, self._client)
                transport.write(header + message)

    def write_pieces(self, pieces: list[bytes | memoryview], size: int) -> None:
        """Send one binary message whose payload is ``pieces`` (``size`` bytes) without joining
        them (attached only): one ``writelines``, a writev on uvloop. The pieces must not change
        until written (the transport may keep them)."""
        transport = self._transport
        assert transport is not None
        if self.closed is None and not transport.is_closing():
            transport.writelines(wsframe.encode_pieces(pieces, size, self._client, self.zero_key))

    def pause_reading(self) -> None:
        """Hand the sink no more messages, and stop reading from the socket, until ``resume_reading``
        (attached only)."""
        if self._transport is not None and self.closed is None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again (attached only); messages already read come first, from
        the next loop turn (never from inside the caller)."""
        if self._transport is not None and self.closed is None and self._paused:
            self._paused = False
            self._transport.resume_reading()
            asyncio.get_running_loop().call_soon(self._data_received, b"")

    @property
    def write_buffered(self) -> int:
        """Bytes the transport holds unsent (attached; 0 otherwise)."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def _data_received(self, data: bytes) -> None:
        reader, sink = self._reader, self._sink
        assert sink is not None
        if data:
            if not self._paused and self.closed is None:
                message = reader.whole_message(data)
                if message is not None:  # one read, one message: the agent link's usual case
                    sink._link_message(message)
                    return
            reader.feed(data)
        while self.closed is None and not self._paused:
            try:
                message = reader.next()
            except wsframe.FrameError as exc:
                told = "message too big" if exc.code == wsframe.MESSAGE_TOO_BIG else exc.reason
                self._close_attached(Closed(exc.code, exc.reason), wsframe.encode_close(exc.code, told, self._client))
                return
            if message is None:
                if reader.missing >= READ_BATCH and not self._breathing and not self._paused:
                    # A large message spans reads: let the kernel gather more of it for a loop turn
                    # (fewer, larger reads; anyio's stream did this between receives).
                    self._breathing = True
                    transport = self._transport
                    assert transport is not None
                    transport.pause_reading()
                    asyncio.get_running_loop().call_soon(self._breathe_out)
                return
            if isinstance(message, (bytes, str)):
                sink._link_message(message)
            elif isinstance(message, wsframe.Ping):
                self._transport_write(wsframe.encode_frame(wsframe.OP_PONG, message.payload, self._client))
            else:
                code = None if message.code == wsframe.NO_STATUS else message.code
                self._close_attached(Closed(message.code, message.reason),
                                     wsframe.encode_close(code, message.reason, self._client))

    def _breathe_out(self) -> None:
        self._breathing = False
        if self._transport is not None and self.closed is None and not self._paused:
            self._transport.resume_reading()

    def _transport_write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close_attached(self, closed: Closed, close_frame: bytes | None) -> None:
        """Record the close, send ``close_frame`` (after what is buffered) and close the transport."""
        if self.closed is None:
            self.closed = closed
            if close_frame is not None:
                self._transport_write(close_frame)
            if self._sink is not None:
                self._sink._link_lost(closed)
        if self._transport is not None:
            self._transport.close()

    def _connection_lost(self) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self._close_attached(Closed(1006, "connection lost"), None)

    def _set_writable(self, writable: bool) -> None:
        if self._sink is not None:
            self._sink._link_writable(writable)

    async def _aclose_attached(self) -> None:
        """Wait until the socket is closed: a close already under way (``close``, or answering the
        peer's) first sends what the transport buffers, which a peer that does not read gets
        CLOSE_FLUSH_TIMEOUT seconds to take; any other connection is dropped at once, as anyio's
        aclose does."""
        transport, gone = self._transport, self._gone
        assert transport is not None and gone is not None
        if not transport.is_closing():
            transport.abort()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_FLUSH_TIMEOUT):
            await gone
        if not gone.done():
            transport.abort()

    # -- reading and writing through the anyio stream -------------------------------------------
    async def send(self, message: bytes | str) -> None:
        """Send one message (bytes: binary, str: text)."""
        if self.closed is not None:
            raise WebSocketError(f"WebSocket is closed ({self.closed.code})")
        if isinstance(message, str):
            data = wsframe.encode_frame(wsframe.OP_TEXT, message.encode("utf-8"), self._client)
        else:
            data = wsframe.encode_binary(message, self._client, self.zero_key)
        if self._transport is not None:
            self._transport_write(data)
        else:
            await self._write(data)

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
        reader = self._reader
        while self.closed is None:
            try:
                message = reader.next()
            except wsframe.FrameError as exc:
                # RFC 6455 7.1.7: fail the connection, telling the peer why.
                told = "message too big" if exc.code == wsframe.MESSAGE_TOO_BIG else exc.reason
                await self._close_with(Closed(exc.code, exc.reason), wsframe.encode_close(exc.code, told, self._client))
                break
            if message is None:
                try:
                    data = await self._stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    self.closed = Closed(1006, "connection lost")
                    break
                reader.feed(data)
            elif isinstance(message, (bytes, str)):
                return message
            elif isinstance(message, wsframe.Ping):
                with contextlib.suppress(WebSocketError):
                    await self._write(wsframe.encode_frame(wsframe.OP_PONG, message.payload, self._client))
            else:
                # The peer's close: answer with its own code, or none if it gave none (RFC 6455 5.5.1).
                code = None if message.code == wsframe.NO_STATUS else message.code
                await self._close_with(Closed(message.code, message.reason),
                                       wsframe.encode_close(code, message.reason, self._client))
        assert self.closed is not None
        return self.closed

    async def _close_with(self, closed: Closed, close_frame: bytes) -> None:
        """Record how the WebSocket closed, send ``close_frame`` and close the connection."""
        self.closed = closed
        with contextlib.suppress(WebSocketError):
            await self._write(close_frame)
        await self.aclose()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake and close the connection."""
        if self._transport is not None:
            self._close_attached(Closed(code, reason), wsframe.encode_close(code, reason, self._client))
            await self._aclose_attached()
        elif self.closed is None:
            await self._close_with(Closed(code, reason), wsframe.encode_close(code, reason, self._client))
        else:
            await self.aclose()  # a close frame went out already, or the connection is gone

    async def aclose(self) -> None:
        """Close the underlying connection without a handshake."""
        if self._transport is not None:
            await self._aclose_attached()
            self._close_attached(Closed(1006, "connection lost"), None)
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await self._stream.aclose()


async def _read_events(stream: anyio.abc.ByteStream, conn: WSConnection) -> tuple[list[Event], bytes]:
    """The handshake events of the next read, and what it read."""
    try:
        data = await stream.receive(READ_SIZE)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise WebSocketError("connection closed during the WebSocket handshake") from exc
    try:
        conn.receive_data(data)
        return list(conn.events()), data
    except RemoteProtocolError as exc:
        raise WebSocketError(f"bad WebSocket handshake: {exc}") from exc


#: The end of an HTTP head, as h11 (under wsproto) finds it: lines may end in a bare LF.
_HEAD_END = re.compile(rb"\n\r?\n")
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
    return WebSocket(stream, False, max_message, rest), request


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
    received = bytearray()  # what was read: the bytes after the 101's head are the first frames
    reject: RejectConnection | None = None
    body = bytearray()
    while True:
        events, data = await _read_events(stream, conn)
        if reject is None:
            received += data
        for event in events:
            if isinstance(event, AcceptConnection):
                # wsproto accepts only if the first response is the 101, so its head ends at
                # the first blank line (found as h11 finds it); whatever follows is frames, for
                # our reader (wsproto parsed them too, into a connection we drop).
                head_end = _HEAD_END.search(received)
                assert head_end is not None
                return WebSocket(stream, True, max_message, bytes(received[head_end.end() :])), event
            if isinstance(event, RejectConnection):
                reject, received = event, bytearray()
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
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocket:
    """Open a WebSocket to a ``ws://`` or ``wss://`` URL (``wss://`` trusting ``ssl_context``, by
    default the system's CAs or SSL_CERT_FILE's).

    Raises TLSMismatch, one line saying which scheme to use, when the port speaks TLS to a
    ``ws://`` URL or does not to a ``wss://`` one, or when the server's certificate is not trusted.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WebSocketError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    with anyio.fail_after(connect_timeout):
        stream: anyio.abc.ByteStream
        if secure:
            try:
                # Not standard_compatible: closing then sends close_notify without waiting for the
                # peer's (a read racing the link's reader task); the WebSocket close frames already
                # tell truncation from a clean end.
                stream = await anyio.connect_tcp(parts.hostname, port, tls=True,
                                                 ssl_context=ssl_context or client_tls_context(),
                                                 tls_standard_compatible=False)
            except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                raise TLSMismatch(mismatch(url, exc) or f"{url}: TLS handshake failed ({exc!r})") from None
        else:
            stream = await anyio.connect_tcp(parts.hostname, port)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            ws, _ = await client_handshake(stream, netloc, target, max_message, headers)
        except HandshakeRejected as exc:
            await stream.aclose()
            line = mismatch(url, exc)
            if line is not None:
                raise TLSMismatch(line) from None
            raise
        except BaseException:
            await stream.aclose()
            raise
    # No intermediary reads a TLS link's bytes, nor a loopback one's: masking protects nobody there.
    ws.zero_key = secure or _loopback(stream)
    return ws


def _loopback(stream: anyio.abc.ByteStream) -> bool:
    """Whether ``stream`` is a TCP connection to this host's loopback (127.0.0.0/8, ::1)."""
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return False
    if not isinstance(address, tuple):
        return False
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False


class TLSMismatch(WebSocketError):
    """The agent and the server disagree about TLS on the agent port (or the server's certificate is
    not trusted); the message is one line saying what to use."""
