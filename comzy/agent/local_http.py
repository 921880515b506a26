"""HTTP/1.1 to the one local service, with a keep-alive pool made for one origin.

The agent talks to exactly one host:port, so its pool is a stack of idle connections:
taking one only checks what the event loop already knows, whether the local app closed it
while idle (Node closes idle keep-alive connections after 5 s). A general-purpose pool (httpx)
scans every pooled connection with several syscalls on every request, which profiling
showed was most of the agent's CPU under load.

The HTTP/1.1 client itself is small and written for this one job: build a request head,
read a response head, then the body by its framing (Content-Length, chunked, or until
close; none for HEAD, 1xx, 204 and 304). h11 did this before and was correct, but cost
about 50 µs per request here (a third of the agent's CPU under load); this costs a few.
It is as strict as h11 where strictness protects someone, and stricter where a proxy must be:
header names and values are checked before sending (no CR/LF smuggling into the local app)
and on receipt; Content-Length values must agree (``5, 5`` is one length, ``5, 6`` is an
error), Content-Length with Transfer-Encoding (h11 lets chunked win) and a 1xx that declares
a body (h11 reads that body as the next response) are refused; every MalformedResponse
closes the connection, and a connection is reused only after a complete, well-framed
exchange with nothing left over.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import anyio

#: Bytes read from the local app and not yet passed on, past which reading pauses.
READ_HIGH_WATER = 256 * 1024
#: Largest response head accepted (status line and headers).
MAX_HEAD = 256 * 1024
#: Largest chunk-size line or trailer section line accepted in a chunked body.
MAX_CHUNK_LINE = 4096

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
# Field values: no control characters but tab (so no CR/LF/NUL), as RFC 9110 5.5 allows.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
# Every header line of a head in the usual form (each ending in CRLF, none folded), in one match.
_FAST_HEADERS = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_HEAD_END_LF = re.compile(rb"\n\r?\n")  # tolerated like h11 does: a head whose lines end in a bare LF
_LINE_END = re.compile(rb"\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_NO_BODY_STATUS = (204, 304)


class LocalError(Exception):
    """The local service could not be reached or broke the exchange."""


class ConnectFailed(LocalError):
    """No connection could be made to the local service."""


class StaleConnection(LocalError):
    """A pooled connection turned out to be closed before any response byte arrived."""


class MalformedResponse(LocalError):
    """The local service sent something that is not a well-formed HTTP/1.1 response.

    The connection it came on is always closed, never pooled: after a framing error nobody
    can tell where the next response starts, and bytes a lenient reader took for a second
    response (a smuggled one) must never reach the next visitor.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"malformed response from the local service: {what}")
        self.what = what


@dataclass(slots=True)
class LocalResponse:
    """A response head from the local service; read the body with ``body()``."""

    status: int
    headers: list[tuple[bytes, bytes]]
    connection: _Connection

    def body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives (chunked framing removed, bytes untouched)."""
        return self.connection.body()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the bytes read but not yet used, and the current response's framing.

    A plain asyncio protocol rather than an anyio stream: anyio turns reading on and off
    around every receive (two epoll_ctl calls each), and telling whether an idle connection
    was closed took a poll() per request; here reading stays on, bounded by READ_HIGH_WATER,
    and the loop's callbacks say when the peer closed.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.received_any = False
        # True once an exchange finished cleanly and the connection may carry another.
        self.reusable = False
        self._buffer = b""
        self._keep_alive = False
        # Body framing of the response being read: -1 chunked, -2 until close, else a byte count.
        self._length = 0
        self._received: deque[bytes] = deque()  # read by the loop, not yet taken by _receive
        self._received_size = 0
        self._reading_paused = False
        self._eof = False
        self._lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False

    # -- asyncio.Protocol callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports have asyncio's methods but do not subclass
        # its ABCs, so asserting asyncio.Transport failed here on uvloop, the transport was never
        # kept, and every request became a 502 ("connection lost while sending").
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received.append(data)
        self._received_size += len(data)
        if self._received_size > READ_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()  # a fast local app and a slow tunnel: stop reading
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- I/O -------------------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise LocalError(f"connection lost while sending ({self._lost or 'closed'})")
        transport.write(data)
        while self._writing_paused and not transport.is_closing():
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self._lost is not None:
            raise LocalError(f"connection lost while sending ({self._lost})")

    async def _receive(self) -> bytes:
        """The next bytes from the local service; b"" at end of stream."""
        while not self._received:
            if self._eof:
                if self._lost is not None:
                    raise LocalError(f"connection lost while reading ({self._lost})")
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._received) == 1:
            data = self._received.popleft()
        else:
            # Everything read so far in one piece (at most READ_HIGH_WATER plus one read): the
            # loop reads whatever has arrived, often 64 KiB or less, and each piece passed on
            # costs a DATA frame of its own, often a runt; one copy here is cheaper (measured).
            data = b"".join(self._received)
            self._received.clear()
        self._received_size -= len(data)
        if self._reading_paused and self._received_size <= READ_HIGH_WATER // 2:
            assert self.transport is not None
            self._reading_paused = False
            self.transport.resume_reading()
        self.received_any = True
        return data

    async def _more(self) -> bytes:
        """More body bytes; a body cut short by the end of the stream is an error."""
        data = await self._receive()
        if not data:
            raise LocalError("the local service closed the connection before the end of the response body")
        return data

    # -- the response head ---------------------------------------------------------------
    async def read_head(self, method: str, request_keep_alive: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Read a final response head (1xx are skipped) and set up the body framing."""
        informational = 0  # the last 1xx status skipped, for the error message
        while True:
            buffer = self._buffer
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0:
                    head, buffer = buffer[:end], buffer[end + 4 :]
                    break
                if b"\n" in buffer and (match := _HEAD_END_LF.search(buffer)):
                    head, buffer = buffer[: match.start()], buffer[match.end() :]
                    break
                if len(buffer) > MAX_HEAD:
                    raise MalformedResponse(f"response head larger than {MAX_HEAD} bytes")
                data = await self._receive()
                if not data:
                    if buffer:
                        raise LocalError("the local service closed the connection in the middle of a response head")
                    raise LocalError("the local service closed the connection without answering")
                buffer += data
            self._buffer = buffer
            first_end = head.find(b"\r\n")
            block = head[first_end + 2 :] + b"\r\n" if first_end >= 0 else b""
            if first_end >= 0 and _FAST_HEADERS.fullmatch(block):
                # The usual head: CRLF lines, no folding. One regex checks every header line,
                # so each is only split here (a regex per line cost more than the rest).
                status_line = _STATUS_LINE.fullmatch(head, 0, first_end)
                headers = []
                for line in block.split(b"\r\n")[:-1]:
                    name, _, value = line.partition(b":")
                    headers.append((name, value.strip(b" \t")))
            else:
                lines = _LINE_END.split(head) if b"\n" in head else [head]
                status_line = _STATUS_LINE.fullmatch(lines[0])
                headers = _parse_header_lines(lines)
            if status_line is None:
                first_line = _LINE_END.split(head, maxsplit=1)[0][:100]
                if informational:
                    # A 1xx has no body (RFC 9110 15.2): whatever follows it must be a status line.
                    raise MalformedResponse(f"bytes that are not a status line after a {informational} "
                                            f"response (a 1xx response has no body): {first_line!r}")
                raise MalformedResponse(f"bad status line {first_line!r}")
            status = int(status_line[3])
            if status >= 200:
                break
            if status == 101:
                raise MalformedResponse("101 Switching Protocols to a plain HTTP request")
            # 1xx informational responses (100 Continue, 103 Early Hints) are skipped. One that
            # declares a body is refused: a reader that honours the declaration and one that
            # ignores it (as RFC 9110 says to) would take different bytes for the real response.
            _check_no_body_declared(status, headers)
            informational = status
        self._frame(method, status, headers, (int(status_line[1]), int(status_line[2])), request_keep_alive)
        return status, headers

    def _frame(self, method: str, status: int, headers: list[tuple[bytes, bytes]], version: tuple[int, int],
               request_keep_alive: bool) -> None:
        """Work out the body's framing (RFC 9112 6.3) and whether the connection stays open."""
        keep_alive = request_keep_alive and version >= (1, 1)
        chunked = False
        length: bytes | None = None
        unusual = False  # Content-Length repeated, or as a list ("5, 5"): passed on as one value
        for name, value in headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                # Like h11: "chunked" is the only transfer coding a response may use here.
                if chunked or value.strip().lower() != b"chunked":
                    raise MalformedResponse(f"unsupported Transfer-Encoding {value[:100]!r}")
                chunked = True
            elif lower == b"content-length":
                sent = value
                value = value.strip()
                if not value.isdigit() or len(value) > 18:
                    value = _list_content_length(value)
                if length is not None and value != length:
                    raise MalformedResponse(f"conflicting Content-Length values {length.decode()} and {value.decode()}")
                unusual = unusual or length is not None or value != sent
                length = value
            elif lower == b"connection" and b"close" in value.lower() and any(
                    token.strip() == b"close" for token in value.lower().split(b",")):
                keep_alive = False
        if chunked and length is not None:
            # RFC 9112 6.1: a sender MUST NOT send both; a proxy that picks one while the next
            # hop picks the other is how responses get split, so neither is trusted.
            raise MalformedResponse(f"both Content-Length ({length.decode()}) and Transfer-Encoding: chunked")
        if unusual and length is not None:
            # One plain value for the next hop: some (uvicorn) fail on a list, others take the first.
            at, spelt = next((i, name) for i, (name, _) in enumerate(headers) if name.lower() == b"content-length")
            headers[:] = [h for h in headers if h[0].lower() != b"content-length"]
            headers.insert(at, (spelt, length))
        if method == "HEAD" or status in _NO_BODY_STATUS:
            self._length = 0
        elif chunked:
            self._length = -1
        elif length is not None:
            self._length = int(length)
        else:
            self._length = -2
            keep_alive = False
        self._keep_alive = keep_alive

    # -- the response body ---------------------------------------------------------------
    async def body(self) -> AsyncIterator[bytes]:
        """The body of the response whose head was read last; marks the connection reusable at its end."""
        if self._length == -1:
            async for piece in self._chunked_body():
                yield piece
        elif self._length == -2:
            if self._buffer:
                data, self._buffer = self._buffer, b""
                yield data
            while data := await self._receive():
                yield data
        else:
            left = self._length
            buffer, self._buffer = self._buffer, b""
            while left:
                if not buffer:
                    buffer = await self._more()
                if len(buffer) <= left:
                    left -= len(buffer)
                    piece, buffer = buffer, b""
                else:
                    piece, buffer = buffer[:left], buffer[left:]
                    left = 0
                yield piece
            self._buffer = buffer  # more than the body: see the leftover check below
        # Bytes after the body that nobody asked for (a premature next response) make the
        # connection unsafe to reuse: the next exchange would read them as its answer.
        self.reusable = self._keep_alive and not self._buffer

    async def _chunked_body(self) -> AsyncIterator[bytes]:
        """Chunked transfer coding (RFC 9112 7.1): data yielded as it arrives, trailers dropped."""
        buffer = self._buffer
        pos = 0
        while True:
            # chunk-size [; extensions] CRLF
            while (eol := buffer.find(b"\n", pos)) < 0:
                if len(buffer) - pos > MAX_CHUNK_LINE:
                    raise MalformedResponse("chunk-size line too long")
                buffer = buffer[pos:] + await self._more()
                pos = 0
            line = buffer[pos:eol]
            pos = eol + 1
            size_field = line.split(b";", 1)[0].strip(b" \t\r")
            if not line.endswith(b"\r") or not _CHUNK_SIZE.fullmatch(size_field):
                raise MalformedResponse(f"bad chunk-size line {line[:100]!r}")
            size = int(size_field, 16)
            if size == 0:
                break
            while size:
                if pos == len(buffer):
                    buffer, pos = await self._more(), 0
                # When the whole read is chunk data it is passed on as it is: no copy.
                piece = buffer if pos == 0 and len(buffer) <= size else buffer[pos : pos + size]
                pos += len(piece)
                size -= len(piece)
                yield piece
            while len(buffer) - pos < 2:
                buffer = buffer[pos:] + await self._more()
                pos = 0
            if buffer[pos : pos + 2] != b"\r\n":
                raise MalformedResponse("chunk data not followed by CRLF")
            pos += 2
        # Trailer section: header lines up to an empty line.
        while True:
            while (eol := buffer.find(b"\n", pos)) < 0:
                if len(buffer) - pos > MAX_CHUNK_LINE:
                    raise MalformedResponse("trailer line too long")
                buffer = buffer[pos:] + await self._more()
                pos = 0
            line = buffer[pos:eol]
            pos = eol + 1
            if line in (b"", b"\r"):
                break
        self._buffer = buffer[pos:]

    def closed_while_idle(self) -> bool:
        """True if the peer closed (or sent bytes nobody asked for, e.g. a 408) while idle."""
        return self._eof or bool(self._received) or self.transport is None or self.transport.is_closing()

    async def aclose(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _list_content_length(value: bytes) -> bytes:
    """The one length of a Content-Length list like ``5, 5`` (RFC 9110 8.6 allows identical
    repeats); anything else is a MalformedResponse."""
    values = {part.strip(b" \t") for part in value.split(b",")}
    if not all(part.isdigit() and len(part) <= 18 for part in values):
        raise MalformedResponse(f"bad Content-Length {value[:100]!r}")
    if len(values) > 1:
        raise MalformedResponse(f"conflicting Content-Length values in {value[:100]!r}")
    return values.pop()


def _check_no_body_declared(status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse a 1xx response that announces a body (Transfer-Encoding, or a non-zero Content-Length)."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() != b"0"):
            raise MalformedResponse(f"a {status} response with a body ({name.decode('latin-1')}: "
                                    f"{value[:100].decode('latin-1')}); a 1xx response has none")


def _parse_header_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines after the status line, in order, duplicates kept; obsolete folding unfolded."""
    headers: list[tuple[bytes, bytes]] = []
    for index in range(1, len(lines)):
        line = lines[index]
        if line[:1] in (b" ", b"\t"):
            # obs-fold (RFC 9112 5.2): a continuation of the previous value, joined by a space.
            if not headers or _BAD_VALUE.search(line):
                raise MalformedResponse(f"bad header continuation line {line[:100]!r}")
            name, value = headers[-1]
            headers[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" \t"))
            continue
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise MalformedResponse(f"malformed header line {line[:100]!r}")
        headers.append((match[1], match[2]))
    return headers


def _request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, int, bool]:
    """The request head, the body framing (-1 chunked, else the Content-Length; none declared
    means no body, RFC 9112 6.3), and whether the request lets the connection stay open.

    Raises LocalError for anything that cannot be sent as HTTP/1.1 unchanged.
    """
    method_bytes = method.encode("ascii", "replace")
    if not _TOKEN.fullmatch(method_bytes) or not target or _BAD_TARGET.search(target):
        raise LocalError(f"request cannot be sent as HTTP/1.1: bad method or target {method!r} {target[:100]!r}")
    lines = [method_bytes + b" " + target + b" HTTP/1.1"]
    framing = 0
    keep_alive = True
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise LocalError(f"request cannot be sent as HTTP/1.1: invalid header {name[:100]!r}")
        lower = name.lower()
        if lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise LocalError(f"request cannot be sent as HTTP/1.1: Transfer-Encoding {value[:100]!r}")
            framing = -1
        elif lower == b"content-length" and framing != -1:
            if not value.strip().isdigit():
                raise LocalError(f"request cannot be sent as HTTP/1.1: Content-Length {value[:100]!r}")
            framing = int(value)
        elif lower == b"connection" and any(token.strip() == b"close" for token in value.lower().split(b",")):
            keep_alive = False
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines), framing, keep_alive


class LocalClient:
    """Sends requests to ``host:port`` over pooled keep-alive connections."""

    def __init__(self, host: str, port: int, max_idle: int = 64, idle_expiry: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        try:
            with anyio.fail_after(self.connect_timeout):
                # Every address of the name is tried in turn ("localhost" may be ::1 and 127.0.0.1).
                transport, conn = await asyncio.get_running_loop().create_connection(
                    _Connection, self.host, self.port)
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting timed out after {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(_connect_reason(exc)) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def _take(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.idle_expiry and not conn.closed_while_idle():
                return conn, True
            await conn.aclose()
        return await self._connect(), False

    async def release(self, conn: _Connection) -> None:
        """Return a connection whose exchange finished; reuse it if it can be reused."""
        if conn.reusable and len(self._idle) < self.max_idle:
            conn.reusable = False
            conn.idle_since = time.monotonic()
            conn.received_any = False
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def discard(self, conn: _Connection) -> None:
        """Close a connection whose exchange did not finish cleanly."""
        await conn.aclose()

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: AsyncIterator[bytes] | None) -> LocalResponse:
        """Send a request and return the response head.

        A request is retried once on a fresh connection when a pooled one proves dead before
        any response byte and before any body byte was consumed.
        """
        head, framing, keep_alive = _request_head(method, target, headers)
        conn, reused = await self._take()
        consumed = False
        try:
            if body is None and framing == 0:
                await conn.send(head)
            else:
                pending = head  # the head goes out with the first piece of body: one write
                sent = 0
                async for chunk in body or _no_body():
                    consumed = True
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if framing == -1:
                        chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                    elif sent > framing:
                        raise LocalError(f"request cannot be sent as HTTP/1.1: body longer than its "
                                         f"Content-Length of {framing}")
                    await conn.send(pending + chunk if pending else chunk)
                    pending = b""
                if framing == -1:
                    pending += b"0\r\n\r\n"
                elif sent != framing:
                    raise LocalError(f"request cannot be sent as HTTP/1.1: body of {sent} bytes for a "
                                     f"Content-Length of {framing}")
                if pending:
                    await conn.send(pending)
            status, response_headers = await conn.read_head(method, keep_alive)
            return LocalResponse(status, response_headers, conn)
        except LocalError as exc:
            await conn.aclose()
            if reused and not conn.received_any and not consumed:
                raise StaleConnection(str(exc)) from exc
            raise
        except BaseException:
            await conn.aclose()
            raise

    async def aclose(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def _connect_reason(exc: OSError) -> str:
    # anyio wraps the per-address errors in "All connection attempts failed"; the cause says why.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == 111:
            return "connection refused"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    # asyncio sums up several failed addresses as "Multiple exceptions: [Errno 111] Connect call failed ...".
    if "[Errno 111]" in text:
        return "connection refused"
    return text
