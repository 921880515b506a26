"""HTTP/1.1 to the one local service, with a keep-alive pool made for one origin.

The agent talks to exactly one host:port, so its pool is a stack of idle connections:
taking one only checks what the event loop already knows, whether the local app closed it
while idle (Node closes idle keep-alive connections after 5 s). A general-purpose pool (httpx)
scans every pooled connection with several syscalls on every request, which profiling
showed was most of the agent's CPU under load.

The client builds request heads itself (names and values checked before sending, so no CR/LF
can smuggle a second request into the local app) and parses responses with llhttp, through
httptools (uvicorn's parser, a base dependency): the status line and headers, then the body by
its framing (Content-Length, chunked with extensions and trailers, or until close; none for
HEAD, 1xx, 204 and 304). The reader drives the parser: bytes are fed as the body is asked for,
so a slow tunnel pauses reading (READ_HIGH_WATER) and no body is ever held whole; the rest of a
Content-Length body that spans reads is only counted (llhttp would copy it). llhttp replaced
a hand-written parser (itself h11's successor) in issue 13: the client's CPU per response 22.0 ->
17.4 µs in process, the whole agent's per request -6 to -10% at 50 connections on a quiet
machine and within the noise on a busy one (docs/benchmarks.md, "One HTTP parser in the agent");
tests/test_local_http_differential.py lists odd responses and every case where the two differ.

A request without a body may instead be written with ``request_nowait`` to an idle pooled
connection: its response head (and then the rest of a small Content-Length body, ``stream_body``)
is handed to a listener from the connection's read callback, with the same parsing and the same
rules, and no task waits for it (the agent's forwarder, issue 13).

Strictness where it protects someone: llhttp refuses bad header bytes, conflicting lengths and
Content-Length with Transfer-Encoding; on top of it this client refuses what llhttp would take: a
transfer coding other than one "chunked", a 1xx that declares a body (llhttp skips it: another
reader would take different bytes for the real response), a 101 to a plain request, control
characters in the reason phrase, heads past MAX_HEAD, and endless chunk framing; and it never
keeps an HTTP/1.0 connection. Where llhttp refuses what RFC 9110/9112 let a recipient accept and
this client always did (identical repeated Content-Lengths, ``5, 5``; obsolete line folding), the
head is put right by _normal_head and parsed again. Every MalformedResponse closes the
connection, and a connection is reused only after a complete, well-framed exchange with nothing
left over.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, cast

import anyio
import httptools

#: Bytes read from the local app and not yet passed on, past which reading pauses.
READ_HIGH_WATER = 256 * 1024
#: Largest response head accepted (status line and headers).
MAX_HEAD = 256 * 1024
#: A Content-Length body with at least this much still to read is read straight into buffers of
#: its own (``_DirectBody``) rather than through the loop's read buffer and a bytes copy of it.
DIRECT_FROM = 1024 * 1024
#: The size of those buffers: one read at most (the loop's own read buffer is as large).
DIRECT_BUFFER = 256 * 1024
#: How much more than the rest of the body the last of them may read.
SLACK = 4096

#: What llhttp raises on a response it refuses (HttpParserCallbackError, one of ours raised in a callback,
#: is an HttpParserError).
_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
# Field values: no control characters but tab (so no CR/LF/NUL), as RFC 9110 5.5 allows.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
# Request fields as _request_head lays them out, "name: value" joined by CRLF: a token, then a value
# without control characters but tab (the same two checks as _TOKEN and _BAD_VALUE).
_FIELDS = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+: [^\x00-\x08\x0a-\x1f\x7f]*"
                     rb"(?:\r\n[-!#$%&'*+.^_`|~0-9a-zA-Z]+: [^\x00-\x08\x0a-\x1f\x7f]*)*")
# b": ".join((name, value)): a field laid out by C code, no Python frame per field.
_FIELD = b": ".join
_NO_BODY_STATUS = (204, 304)
# The lengths of transfer-encoding, content-length and connection.
_FRAMING_NAME_SIZES = frozenset({17, 14, 10})
# Methods most requests use, known to be tokens: no encoding and no regex for them.
_COMMON_METHODS = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


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
        """The response body as it arrives (chunked framing removed, bytes untouched). The reads
        of a large Content-Length body come as read-only memoryviews (see ``_DirectBody``)."""
        return self.connection.body()

    def whole_body(self) -> bytes | None:
        """The whole body if it was read with the head, else None (read it with ``body()``).

        Most small responses arrive in one read; passing them on without ``body()``'s async
        generator saves its setup, one turn and its close on every such request."""
        return self.connection.whole_body()


class HeadListener(Protocol):
    """Who is told, from the connection's callbacks, how a request sent by
    ``LocalClient.request_nowait`` went: exactly one of the two methods is called, once."""

    def head_read(self, status: int, headers: list[tuple[bytes, bytes]], connection: _Connection) -> None:
        """The final response head was read (and the body bytes that came with it parsed): what
        ``LocalResponse`` holds, given apart (no object made for the requests answered at once)."""

    def head_failed(self, error: LocalError) -> None:
        """No head: StaleConnection when the pooled connection was found closed before any byte
        of answer (send the request again on a fresh one), else why; the connection is closed."""


class BodyListener(Protocol):
    """Who is given the rest of a Content-Length body from the connection's callbacks
    (``_Connection.stream_body``): pieces as they are read, then exactly one of the two ends."""

    def body_data(self, data: bytes) -> None:
        """The next bytes of the body (never empty)."""

    def body_done(self) -> None:
        """The body is complete (and the connection's reuse decided, as at the end of ``body()``)."""

    def body_failed(self, error: LocalError) -> None:
        """The connection ended before the body did; it is closed."""


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
        self._parser = _new_parser(self)
        self._replace_parser = False  # after a response without a body whose framing llhttp would read
        # The exchange under way: set by read_head, filled in by the parser's callbacks.
        self._no_body = False  # the request was HEAD
        self._request_keep_alive = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []  # the fields of the head being read
        self._response_headers: list[tuple[bytes, bytes]] = []  # the final head's, once read
        self._informational = 0  # the last 1xx status skipped, for the error message
        self._informational_count = 0  # 1xx responses skipped before the final one
        self._begins_http11 = False  # the response's first read began b"HTTP/1.1 "
        self._head_done = False  # the final head was read
        self._complete = False  # the whole response was read
        self._leftover = False  # bytes came after the response
        self._until_close = False  # the body ends when the connection does
        self._keep_alive = False
        self._pieces: list[bytes] = []  # body bytes parsed, not yet passed on
        self._remaining = -1  # body bytes still to come when the body has a Content-Length
        self._body_error: MalformedResponse | None = None
        self._received: deque[bytes] = deque()  # read by the loop, not yet taken by _receive
        self._received_size = 0
        self._reading_paused = False
        self._eof = False
        self._lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        # Reading a head from the loop's callbacks (request_nowait): who is told, and the state
        # that read_head keeps in locals.
        self._head_listener: HeadListener | None = None
        self._body_listener: BodyListener | None = None  # the same for the body (stream_body)
        self._fed = 0
        self._read: list[bytes] = []
        self._rescuing = False

    # -- asyncio.Protocol callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports have asyncio's methods but do not subclass
        # its ABCs, so asserting asyncio.Transport failed here on uvloop, the transport was never
        # kept, and every request became a 502 ("connection lost while sending").
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head_listener is not None:
            self._head_received(data)
            return
        if self._body_listener is not None:
            self._body_received(data)
            return
        self._received.append(data)
        self._received_size += len(data)
        if self._received_size > READ_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()  # a fast local app and a slow tunnel: stop reading
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        if self._head_listener is not None:
            self._head_failed(self._head_cut())
        elif self._body_listener is not None:
            self._body_failed()
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        if self._head_listener is not None:
            self._head_failed(self._head_cut())
        elif self._body_listener is not None:
            self._body_failed()
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

    async def _receive(self, join: bool = True) -> bytes:
        """The next bytes from the local service; b"" at end of stream. Everything read so far
        comes joined in one piece unless ``join`` is False (then one read at a time: a read of
        ``_DirectBody``, a read-only view of a buffer of its own, is passed on uncopied)."""
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
        if len(self._received) == 1 or not join:
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

    # -- the response, parsed by llhttp ---------------------------------------------------------
    # httptools calls these while feed_data runs; they only collect what the readers below need.
    def on_message_begin(self) -> None:
        if self._complete:
            # A response that starts after the one asked for: a reused connection would serve it
            # (a smuggled response) to the next visitor, so this connection is never reused.
            self._leftover = True

    def on_status(self, reason: bytes) -> None:
        # On top of llhttp, which takes any byte but CR and LF in a reason phrase: no control
        # characters but tab, as in field values (the phrase is not passed on: the visitor gets
        # the standard one, but a head carrying them is not trusted).
        if _BAD_VALUE.search(reason):
            raise MalformedResponse(f"bad status line: control characters in the reason phrase {reason[:100]!r}")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            # Trailer fields (or a later response's), dropped as they come: kept in a list they
            # would cost 20-30 times their wire size (MAX_HEAD of tiny fields: megabytes per
            # response) until the connection's next exchange.
            return
        # llhttp drops the whitespace before a value but keeps the whitespace after it.
        self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        if self._complete:
            # The head of a response after the one asked for (on_message_begin marked the
            # connection unusable): nothing of it is taken, its status least of all.
            return
        parser = self._parser
        status = parser.get_status_code()
        headers = self._headers
        if status < 200:
            if status == 101:
                raise MalformedResponse("101 Switching Protocols to a plain HTTP request")
            # 1xx informational responses (100 Continue, 103 Early Hints) are skipped. One that
            # declares a body is refused: a reader that honours the declaration and one that
            # ignores it (as RFC 9110 says to, and llhttp does) would take different bytes for the
            # real response.
            _check_no_body_declared(status, headers)
            self._informational = status
            self._informational_count += 1
            self._headers = []
            return
        self._status = status
        self._head_done = True
        self._response_headers = headers
        self._headers = []
        # On top of llhttp, which reads a body until close for any other coding and takes
        # "chunked, chunked" or a repeated Transfer-Encoding as chunked: "chunked" is the only
        # transfer coding a response may use here, once (as h11 and our client always did).
        chunked = length = False
        # Whether the connection stays open is decided here, not by llhttp's should_keep_alive:
        # that keeps an HTTP/1.0 connection open when it says keep-alive (this client never did),
        # and closes after a response to HEAD without framing (llhttp takes it for a body until close).
        # get_http_version formats a string on every call: a head that began "HTTP/1.1 " (no 1xx
        # before it) was read as 1.1 by llhttp, so it needs no asking.
        keep_alive = self._request_keep_alive and (
            (self._begins_http11 and not self._informational_count) or parser.get_http_version() >= "1.1")
        for name, value in headers:
            if len(name) not in _FRAMING_NAME_SIZES:
                continue  # most fields: not one of the three below, told without lowering the name
            lower = name.lower()
            if lower == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    raise MalformedResponse(f"unsupported Transfer-Encoding {value[:100]!r}")
                chunked = True
            elif lower == b"content-length":
                length = True
                self._remaining = int(value)  # llhttp checked it: digits, one value
            elif lower == b"connection" and b"close" in value.lower() and _says_close(value):
                keep_alive = False  # (the substring test first spares "keep-alive" the call)
        if self._no_body or status in _NO_BODY_STATUS:
            # llhttp cannot be told a response answers HEAD (httptools offers no way): it would
            # read the declared body. The response ends with its head, and the parser is replaced
            # before the connection's next exchange; what it reads after the head here counts as
            # bytes nobody asked for.
            self._complete = True
            self._replace_parser = True
        elif not chunked and not length:
            self._until_close = True
            keep_alive = False
        self._keep_alive = keep_alive

    def on_body(self, data: bytes) -> None:
        if self._complete:
            self._leftover = True  # after a response to HEAD, a 204 or a 304
        else:
            self._pieces.append(data)
            self._remaining -= len(data)

    def on_message_complete(self) -> None:
        if self._head_done:
            self._complete = True

    def _feed(self, data: bytes, rescue: bool = False) -> None:
        """Parse ``data``; a malformed response raises MalformedResponse (after the head: the
        error waits in ``_body_error`` until the body read so far is passed on), a head that
        _normal_head may put right raises _Rescue when ``rescue``."""
        try:
            self._parser.feed_data(data)
        except _PARSER_ERRORS as exc:
            self._feed_failed(exc, rescue)

    def _feed_failed(self, exc: Exception, rescue: bool) -> None:
        """``_feed``'s answer to llhttp's refusal ``exc`` (raised while it is handled)."""
        if isinstance(exc, httptools.HttpParserCallbackError):
            # A check of ours refused the response from inside a callback.
            if isinstance(exc.__context__, LocalError):
                raise exc.__context__ from None
            raise MalformedResponse(str(exc)) from None
        if self._complete:
            self._leftover = True  # garbage after the response: only the pool is concerned
            return
        if self._head_done:
            self._body_error = MalformedResponse(f"{exc} in the body")
            return
        if rescue and str(exc) in _RESCUED:
            raise _Rescue from None
        raise _Refused(str(exc)) from None

    def _refused(self, exc: _Refused, read: bytes) -> MalformedResponse:
        """llhttp's refusal of a head, saying which line (llhttp's messages do not)."""
        found = _refused_line(read)
        if found is None:
            return MalformedResponse(exc.what)
        line, status_line = found
        if self._informational and status_line:
            # A 1xx has no body (RFC 9110 15.2): whatever follows it must be a status line.
            return MalformedResponse(f"bytes that are not a status line after a {self._informational} "
                                     f"response (a 1xx response has no body): {line[:100]!r}")
        return MalformedResponse(f"{exc.what} in {line[:100]!r}")

    # -- the response head ---------------------------------------------------------------
    async def read_head(self, method: str, request_keep_alive: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Read a final response head (1xx are skipped) and set up the body framing."""
        self._start_head(method, request_keep_alive)
        while not self._head_done:
            data = await self._receive()
            if not data:
                raise self._head_cut()
            self._head_step(data)
        return self._status, self._response_headers

    def _start_head(self, method: str, request_keep_alive: bool) -> None:
        """Get ready to read the head of the response to a request just sent."""
        if self._replace_parser:
            self._parser = _new_parser(self)
            self._replace_parser = False
        self._no_body = method == "HEAD"
        self._request_keep_alive = request_keep_alive
        self._headers = []
        self._pieces = []
        self._head_done = self._complete = self._leftover = self._until_close = False
        self._informational = self._informational_count = 0
        self._remaining = -1
        self._body_error = None
        self._fed = 0
        self._read = []  # kept for _normal_head while the final head is not read
        self._rescuing = False

    def _head_step(self, data: bytes) -> None:
        """Parse the next bytes read (not empty) while the final head is not read; raises
        MalformedResponse. Sets ``_head_done`` once it is (the body bytes read with it parsed)."""
        if not self._fed:
            self._begins_http11 = data.startswith(b"HTTP/1.1 ")
        self._fed += len(data)
        read = self._read
        read.append(data)
        try:
            if not self._rescuing:
                try:
                    # _feed in line (a call less per response read at once).
                    try:
                        self._parser.feed_data(data)
                    except _PARSER_ERRORS as exc:
                        self._feed_failed(exc, True)
                except _Rescue:
                    self._rescuing = True
            if self._rescuing:
                # The head llhttp refused, whole (with the 1xx heads before it, which have no body).
                read[:] = [b"".join(read)]
                if (head := _head_at(read[0], self._informational_count)) is not None:
                    start, end = head
                    # What llhttp reads from here on (a refusal of it is quoted from it).
                    read[:] = [read[0][:start] + _normal_head(read[0][start:end]) + read[0][end:]]
                    self._parser = _new_parser(self)
                    self._headers = []
                    self._feed(read[0][start:])
                    self._rescuing = False
        except _Refused as exc:
            raise self._refused(exc, b"".join(read)) from None
        if self._head_done:
            self._read = []
        elif self._fed > MAX_HEAD:
            # llhttp has no bound of its own, and httptools joins a header's pieces in memory.
            raise MalformedResponse(f"response head larger than {MAX_HEAD} bytes")

    def _head_cut(self) -> LocalError:
        """Why no head will come: the connection ended before (or in the middle of) it."""
        if self._lost is not None:
            return LocalError(f"connection lost while reading ({self._lost})")
        if self._fed:
            return LocalError("the local service closed the connection in the middle of a response head")
        return LocalError("the local service closed the connection without answering")

    # -- the head read from the loop's callbacks (request_nowait) ------------------------------
    def _head_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._head_step(data)
        except LocalError as exc:
            self._head_failed(exc)
            return
        if self._head_done:
            listener = self._head_listener
            assert listener is not None
            self._head_listener = None  # what comes next waits in _received for body()
            listener.head_read(self._status, self._response_headers, self)

    def _head_failed(self, error: LocalError) -> None:
        listener = self._head_listener
        assert listener is not None
        self._head_listener = None
        self.close()
        if not self.received_any and not isinstance(error, MalformedResponse):
            # As request() decides for a pooled connection: closed before any byte of answer.
            error = StaleConnection(str(error))
        listener.head_failed(error)

    def abandon(self) -> None:
        """Close the connection and tell its listener nothing more (the stream it served is gone)."""
        self._head_listener = self._body_listener = None
        self.close()

    # -- the rest of a Content-Length body from the loop's callbacks (stream_body) ------------
    def counted_body_left(self) -> int:
        """Bytes of a Content-Length body not yet passed on (read with the head, and still to
        come) when some are still to come; -1 when none are, or the body is framed otherwise
        (chunked, until close)."""
        if self._complete or self._remaining <= 0 or self._body_error is not None or self._received:
            return -1
        return self._remaining + sum(map(len, self._pieces))

    def take_parsed_body(self) -> bytes:
        """The body bytes parsed so far (read with the head), taken."""
        pieces = self._pieces
        self._pieces = []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def stream_body(self, listener: BodyListener) -> None:
        """Give the rest of the body (``counted_body_left`` bytes) to ``listener`` as the loop reads
        it, counted as ``body()`` counts it, instead of waiting for a reader; after
        ``take_parsed_body``, from the callback that read the head (nothing is buffered)."""
        assert self.counted_body_left() > 0 and not self._pieces and not self._eof
        self._body_listener = listener

    def _body_received(self, data: bytes) -> None:
        listener = self._body_listener
        assert listener is not None
        self._replace_parser = True  # llhttp was left waiting for the body (see body())
        if len(data) < self._remaining:
            self._remaining -= len(data)
            listener.body_data(data)
            return
        if len(data) > self._remaining:
            self._leftover = True  # bytes after the body
            data = data[: self._remaining]
        self._remaining = 0
        self._complete = True
        listener.body_data(data)
        if self._body_listener is not listener:
            return  # abandoned while it was passed on
        self._body_listener = None
        self._body_read()
        listener.body_done()

    def _body_failed(self) -> None:
        listener = self._body_listener
        assert listener is not None
        self._body_listener = None
        self.close()
        if self._lost is not None:
            error = LocalError(f"connection lost while reading ({self._lost})")
        else:
            error = LocalError("the local service closed the connection before the end of the response body")
        listener.body_failed(error)

    # -- the response body ---------------------------------------------------------------
    async def body(self) -> AsyncIterator[bytes]:
        """The body of the response whose head was read last; marks the connection reusable at its end."""
        # Bytes fed without a byte of body coming out: only chunk framing and trailers do that.
        stalled = 0
        direct: bool | None = None  # reading the rest of the body with _DirectBody (None: not decided)
        while True:
            pieces = self._pieces
            if pieces:
                self._pieces = []
                stalled = 0
                # All a read held in one piece: each piece passed on costs a DATA frame.
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if self._body_error is not None:
                raise self._body_error
            if self._complete:
                break
            data = await self._receive(not direct)
            if not data:
                if self._until_close:
                    break
                raise LocalError("the local service closed the connection before the end of the response body")
            if self._remaining > 0:
                # The rest of a Content-Length body is counted, not fed: llhttp would copy every
                # read into a new bytes object (on_body), which cost the agent 5% more CPU per GiB
                # downloaded (measured); a read that is all body is passed on as it is. llhttp,
                # left waiting for that body, is replaced before the next exchange.
                self._replace_parser = True
                if len(data) < self._remaining:
                    self._remaining -= len(data)
                    if direct is None and self._remaining >= DIRECT_FROM:
                        direct = self._read_direct()
                    yield data
                    continue
                if len(data) > self._remaining:
                    self._leftover = True  # bytes after the body
                    data = data[: self._remaining]
                self._remaining = 0
                self._complete = True
                yield data
                break
            self._feed(data)
            stalled += len(data)
            if stalled > MAX_HEAD and not self._pieces and not self._complete:
                raise MalformedResponse(f"more than {MAX_HEAD} bytes of chunk framing or trailers without data")
        self._body_read()

    def _read_direct(self) -> bool:
        """Read the rest of a Content-Length body with ``_DirectBody``: each read lands in a buffer
        that is then passed on as it is (the loop's read copies every read into a new bytes object:
        about a tenth of the agent's CPU during a download, py-spy). False, changing nothing, when
        more than the body was read already or the transport cannot switch protocols."""
        transport = self.transport
        left = self._remaining - self._received_size  # the body's bytes not read yet
        if transport is None or transport.is_closing() or self._eof or left <= 0:
            return False
        if not hasattr(transport, "set_protocol"):
            return False
        # Reading restarts under the new protocol: uvloop picks its read callbacks when reading
        # starts, so switching protocols while reading would keep the old ones.
        transport.pause_reading()
        transport.set_protocol(_DirectBody(self, left))
        if not self._reading_paused:
            transport.resume_reading()
        return True

    def _direct_done(self, reader: _DirectBody) -> None:
        """The body was read to its last byte: the connection reads for itself again."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            transport.set_protocol(self)
            if not self._reading_paused:
                transport.resume_reading()

    def _body_read(self) -> None:
        """The response was read to its end: decide whether the connection may serve another."""
        # Bytes after the body that nobody asked for (a premature next response) make the
        # connection unsafe to reuse: the next exchange would read them as its answer.
        self.reusable = self._keep_alive and not self._leftover and not self._received

    def whole_body(self) -> bytes | None:
        """The whole body when it came with the head (a small response, read at once), marking
        the connection reusable as the end of ``body()`` does; None when more must be read (then
        use ``body()``)."""
        if not self._complete or self._body_error is not None:
            return None
        pieces = self._pieces
        self._pieces = []
        # _body_read() in line (a call less on every small response).
        self.reusable = self._keep_alive and not self._leftover and not self._received
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def closed_while_idle(self) -> bool:
        """True if the peer closed (or sent bytes nobody asked for, e.g. a 408) while idle."""
        return self._eof or bool(self._received) or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    async def aclose(self) -> None:
        self.close()


class _DirectBody(asyncio.BufferedProtocol):
    """The protocol of a connection while the rest of a large Content-Length body is read: the loop
    reads straight into a buffer of ours (``get_buffer``), and the body's part of the
    read goes to the connection as a read-only view of that buffer, which is never written again
    (a new one is made for the next read), so the view can be sent on without a copy
    (``protocol.data_frame``). A short read is copied out instead and its buffer used again: a
    view would keep a whole buffer alive for a few bytes. Once the body is read, the connection
    is the transport's protocol again; closing and flow control go to it meanwhile."""

    __slots__ = ("_buffer", "_conn", "_left")

    def __init__(self, conn: _Connection, left: int) -> None:
        self._conn = conn
        self._left = left  # body bytes not yet read from the socket
        self._buffer: bytearray | None = None

    def get_buffer(self, sizehint: int) -> bytearray:
        if self._buffer is None:
            # Room for a little more than the body: bytes after it that arrive with its end are
            # read with it, so the connection is known to be unusable (as _Connection.body does).
            self._buffer = bytearray(min(self._left + SLACK, DIRECT_BUFFER))
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer = self._buffer
        assert buffer is not None
        body = min(nbytes, self._left)
        self._left -= body
        if body * 4 < len(buffer) and self._left:
            data: bytes | memoryview = bytes(memoryview(buffer)[:body])
        else:
            data = memoryview(buffer)[:body].toreadonly()
            self._buffer = None
        conn = self._conn
        conn.data_received(data)  # type: ignore[arg-type]
        if body < nbytes:
            conn.data_received(bytes(memoryview(buffer)[body:nbytes]))  # after the body: the connection is not reused
        if not self._left:
            conn._direct_done(self)

    def eof_received(self) -> bool:
        return self._conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()


class _Refused(MalformedResponse):
    """llhttp refused a head (the message is its own)."""


def _refused_line(read: bytes) -> tuple[bytes, bool] | None:
    """The line of ``read`` (a response's bytes so far) that llhttp refuses, found by feeding it
    line by line to a parser with no callbacks, and whether it is where a status line belongs
    (first, or after an empty line); None if it refuses none."""
    parser = _new_parser(None)
    lines = read.split(b"\n")
    first = True
    for index, line in enumerate(lines):
        try:
            parser.feed_data(line if index == len(lines) - 1 else line + b"\n")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return line.rstrip(b"\r"), first
        first = line in (b"", b"\r")
    return None


class _Rescue(Exception):
    """llhttp refused a head that the old rules of this client decide (see _RESCUED)."""


#: llhttp's refusals of a head, with no leniency to turn them off, that this client decided
#: otherwise before llhttp (and h11 before it): identical Content-Lengths are one length (RFC
#: 9110 8.6 allows it), obsolete line folding is unfolded (RFC 9112 5.2 allows it), and the
#: refusals of conflicting lengths and of Content-Length with Transfer-Encoding say which values.
_RESCUED = frozenset({
    "Duplicate Content-Length", "Invalid character in Content-Length", "Unexpected whitespace after header value",
    "Unexpected space after start line",
    "Transfer-Encoding can't be present with Content-Length", "Content-Length can't be present with Transfer-Encoding",
})
_HEAD_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")


def _head_at(data: bytes, skipped: int) -> tuple[int, int] | None:
    """Where the head after ``skipped`` 1xx heads starts and ends in ``data`` (None: not all read).
    A 1xx response has no body, so each of those heads ends at the next blank line."""
    start = 0
    for _ in range(skipped + 1):
        match = _HEAD_END.search(data, start)
        if match is None:
            return None
        begin, start = start, match.end()
    return begin, start


def _normal_head(head: bytes) -> bytes:
    """A head llhttp refused, as this client reads it: folded lines joined by a space, repeated
    or listed identical Content-Lengths made one plain value in the first one's place; anything
    else the old rules refuse is a MalformedResponse saying what, and what is left llhttp parses
    again (its own checks all still apply)."""
    lines = _LINE_END.split(head.lstrip(b"\r\n").rstrip(b"\r\n"))
    unfolded = lines[:1]
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if len(unfolded) == 1:
                raise MalformedResponse(f"bad header continuation line {line[:100]!r}")
            unfolded[-1] = unfolded[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
        else:
            unfolded.append(line)
    kept = unfolded[:1]
    length: bytes | None = None
    chunked = False
    for line in unfolded[1:]:
        name, _, value = line.partition(b":")
        lower = name.lower()
        if lower == b"transfer-encoding":
            if chunked or value.strip(b" \t").lower() != b"chunked":
                raise MalformedResponse(f"unsupported Transfer-Encoding {value.strip(b' ')[:100]!r}")
            chunked = True
        elif lower == b"content-length":
            value = value.strip(b" \t")
            values = {part.strip(b" \t") for part in value.split(b",")}
            if not all(part.isdigit() and len(part) <= 18 for part in values):
                raise MalformedResponse(f"bad Content-Length {value[:100]!r}")
            if len(values) > 1:
                raise MalformedResponse(f"conflicting Content-Length values in {value[:100]!r}")
            one = values.pop()
            if length is not None:
                if one != length:
                    raise MalformedResponse(f"conflicting Content-Length values {length.decode()} and {one.decode()}")
                continue  # a repeat: the first one stands for both
            length, line = one, name + b": " + one
        kept.append(line)
    if chunked and length is not None:
        # RFC 9112 6.1: a sender MUST NOT send both; a proxy that picks one while the next
        # hop picks the other is how responses get split, so neither is trusted.
        raise MalformedResponse(f"both Content-Length ({length.decode()}) and Transfer-Encoding: chunked")
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _new_parser(conn: _Connection | None) -> httptools.HttpResponseParser:
    """An llhttp response parser calling back ``conn`` (None: nothing), lenient only where the old
    client was."""
    parser = httptools.HttpResponseParser(conn)
    # Heads whose lines end in a bare LF, as h11 and our own parser took them (a chunk-size line
    # still needs its CR); and spaces after a chunk size, which we took too.
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True)
    return parser


def _check_no_body_declared(status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse a 1xx response that announces a body (Transfer-Encoding, or a non-zero Content-Length)."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() != b"0"):
            raise MalformedResponse(f"a {status} response with a body ({name.decode('latin-1')}: "
                                    f"{value[:100].decode('latin-1')}); a 1xx response has none")


def _request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, int, bool]:
    """The request head, the body framing (-1 chunked, else the Content-Length; none declared
    means no body, RFC 9112 6.3), and whether the request lets the connection stay open.

    Raises LocalError for anything that cannot be sent as HTTP/1.1 unchanged.
    """
    method_bytes = _COMMON_METHODS.get(method)
    if method_bytes is None and _TOKEN.fullmatch(encoded := method.encode("ascii", "replace")):
        method_bytes = encoded
    if method_bytes is None or not target or _BAD_TARGET.search(target):
        raise LocalError(f"request cannot be sent as HTTP/1.1: bad method or target {method!r} {target[:100]!r}")
    if headers:
        # The fields laid out by C code (map and join: 15.2k instructions for wrk's four fields, where
        # a list of concatenations took 19.3k, callgrind), and every one checked by one regex over
        # them all rather than two per field; as many line ends as fields less one proves that no
        # value holds an LF (and the regex, that none holds a CR).
        fields = b"\r\n".join(map(_FIELD, headers))
        if fields.count(b"\n") != len(headers) - 1 or not _FIELDS.fullmatch(fields):
            _refuse_field(headers)
        head = method_bytes + b" " + target + b" HTTP/1.1\r\n" + fields + b"\r\n\r\n"
    else:
        head = method_bytes + b" " + target + b" HTTP/1.1\r\n\r\n"
    framing = 0
    keep_alive = True
    for name, value in headers:
        if len(name) not in _FRAMING_NAME_SIZES:
            # Most fields: not one of the three below, told without lowering the name (0.9 -> 0.3
            # µs for wrk's four fields, where the lowered fields were searched for each name).
            continue
        lower = name.lower()
        if lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise LocalError(f"request cannot be sent as HTTP/1.1: Transfer-Encoding {value[:100]!r}")
            framing = -1
        elif lower == b"content-length" and framing != -1:
            if not value.strip().isdigit():
                raise LocalError(f"request cannot be sent as HTTP/1.1: Content-Length {value[:100]!r}")
            framing = int(value)
        elif lower == b"connection" and _says_close(value):
            keep_alive = False
    return head, framing, keep_alive


def _says_close(value: bytes) -> bool:
    """Whether a Connection field's value lists ``close``."""
    lower = value.lower()
    # Most say "keep-alive": the substring test spares them the split and the generator.
    return b"close" in lower and any(token.strip() == b"close" for token in lower.split(b","))


def _refuse_field(headers: list[tuple[bytes, bytes]]) -> None:
    """Raise LocalError naming the first field that cannot be sent (_FIELDS refused one)."""
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise LocalError(f"request cannot be sent as HTTP/1.1: invalid header {name[:100]!r}")
    raise AssertionError("_FIELDS and the per-field checks disagree")  # pragma: no cover


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

    def _take_idle(self) -> _Connection | None:
        """A pooled connection still good to use, or None (a plain call: no coroutine per request)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            # closed_while_idle() in line (a call less on every request).
            transport = conn.transport
            if now - conn.idle_since < self.idle_expiry and not (
                    conn._eof or conn._received or transport is None or transport.is_closing()):
                return conn
            conn.close()
        return None

    async def release(self, conn: _Connection) -> None:
        """Return a connection whose exchange finished; reuse it if it can be reused."""
        self.release_nowait(conn)

    def release_nowait(self, conn: _Connection) -> None:
        """``release`` as a plain call (closing a connection needs no waiting)."""
        if conn.reusable and len(self._idle) < self.max_idle:
            conn.reusable = False
            conn.idle_since = time.monotonic()
            conn.received_any = False
            self._idle.append(conn)
        else:
            conn.close()

    async def discard(self, conn: _Connection) -> None:
        """Close a connection whose exchange did not finish cleanly."""
        await conn.aclose()

    def request_nowait(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                       listener: HeadListener) -> _Connection | None:
        """Send a request without a body on a pooled connection, without waiting: the head is
        written now, and ``listener`` is called back from the connection's callbacks with the
        response head (or why there is none). The connection, to ``abandon`` it should the
        answer no longer be wanted; None when this cannot be done (no idle connection, or a head
        that declares a body or cannot be sent): then use ``request``, which says why.

        A plain call instead of ``request``'s coroutine: a task per request cost most of what the
        agent spends on a small one (docs/benchmarks.md).
        """
        try:
            head, framing, keep_alive = _request_head(method, target, headers)
        except LocalError:
            return None
        if framing:
            return None
        conn = self._take_idle()
        if conn is None:
            return None
        transport = conn.transport
        assert transport is not None  # an idle connection that is not closing has one
        conn._start_head(method, keep_alive)
        conn._head_listener = listener
        # No waiting for the write buffer to drain, as request() does: the head is all there is.
        transport.write(head)
        return conn

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: AsyncIterator[bytes] | None) -> LocalResponse:
        """Send a request and return the response head.

        A request is retried once on a fresh connection when a pooled one proves dead before
        any response byte and before any body byte was consumed.
        """
        head, framing, keep_alive = _request_head(method, target, headers)
        conn = self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
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
