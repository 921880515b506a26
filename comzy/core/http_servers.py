"""The public listener's HTTP server: uvicorn (the default) or hypercorn (HTTP/2 too).

``COMZY_HTTP_SERVER`` picks one. Whatever the choice, the server is handed the listener's
pre-bound socket (so port 0 works) and the hypercorn ``Config`` that describes the listener
(TLS files, limits, grace), and behaves the same to visitors and to the edge: no Server or Date
header added, the response head written at ``http.response.start`` (SSE), request heads past
``h11_max_incomplete_size`` refused by the server itself (the edge answers 431 below that), a
visitor's WebSocket close code passed on, and a graceful stop within the grace once ``stop`` is
set. docs/benchmarks.md says what each costs and gives, and why granian is not offered.

Both answer 400 to an HTTP/1.1 request with more than one Host header, or none (RFC 9112 3.2),
before the edge sees it: hypercorn through h11, which checks it while parsing; uvicorn (httptools
does not check) through OneHostOnly, a thin wrapper around the app.
"""

from __future__ import annotations

import asyncio
import http
import importlib.util
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from comzy.core.asgi import TEXT, App, Receive, Scope, Send, respond
from comzy.core.headers import HOP_BY_HOP, connection_tokens, strip_hop_by_hop

HTTP_SERVERS = ("hypercorn", "uvicorn", "uvicorn-direct")

log = logging.getLogger("comzy.http")

#: The modules each server needs. Both are dependencies of comzy; they are checked anyway, so that
#: an install that lost one (a hand-pruned image, a broken venv) fails at start-up in one line.
_REQUIRES = {"uvicorn": ("uvicorn", "httptools"), "uvicorn-direct": ("uvicorn", "httptools"),
             "hypercorn": ("hypercorn",)}


class ResponseAborted(Exception):
    """Raised by the app to abort a visitor's connection mid-response, on purpose: the only honest
    end of a response whose body cannot be finished (the tunnel was lost). The HTTP servers abort
    the connection on any exception; :class:`QuietAborts` keeps them from logging this one as
    an application error with a traceback, once per aborted visitor."""


class QuietAborts(logging.Filter):
    """Drops the HTTP servers' "Exception in ASGI application" records for :class:`ResponseAborted`:
    a lost tunnel is the agent's news (logged once when its session ends, and in the request log
    per exchange), not an error of this server with a traceback per visitor."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BaseExceptionGroup):
            return exc.split(ResponseAborted)[1] is not None  # kept when it holds anything else
        return not isinstance(exc, ResponseAborted)


#: The loggers the servers report application errors on: uvicorn's, and hypercorn's errorlog.
_ERROR_LOGGERS = ("uvicorn.error", "comzy.http")


def quiet_aborts() -> None:
    """Attach :class:`QuietAborts` to the servers' error loggers (once per process)."""
    for name in _ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietAborts) for f in logger.filters):
            logger.addFilter(QuietAborts())


def missing_requirement(kind: str) -> str | None:
    """Why ``kind`` cannot serve here (a message naming what to install), or None."""
    absent = [name for name in _REQUIRES.get(kind, ()) if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    verb = "is" if len(absent) == 1 else "are"
    return (f"{kind} is selected but {' and '.join(absent)} {verb} not installed (comzy depends on "
            f"{'it' if len(absent) == 1 else 'them'}: this install is incomplete); install "
            f"{'it' if len(absent) == 1 else 'them'} with: pip install {' '.join(absent)}")


async def serve(kind: str, app: Any, config: Config, stop: anyio.Event) -> None:
    """Serve ``app`` on the socket ``config.bind`` names (``fd://N``) until ``stop`` is set."""
    quiet_aborts()
    if kind in ("uvicorn", "uvicorn-direct"):
        # uvicorn-direct: the app serves what it can without ASGI (PlainServe, the app's serve_plain).
        await _serve_uvicorn(app, config, stop, getattr(app, "serve_plain", None) if kind == "uvicorn-direct" else None)
    else:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _bound_fd(config: Config) -> int:
    return int(config.bind[0].removeprefix("fd://"))


# -- uvicorn -------------------------------------------------------------------------------------

async def _serve_uvicorn(app: Any, config: Config, stop: anyio.Event, plain: PlainServe | None = None) -> None:
    import uvicorn

    grace = config.graceful_timeout
    server = uvicorn.Server(uvicorn.Config(
        OneHostOnly(app),
        loop="none",  # run on the caller's loop
        http=_bounded_head_protocol(config.h11_max_incomplete_size, plain),
        # wsproto (a core dependency, as in hypercorn) reports a visitor's close code and
        # supports the websocket.http.response extension the edge uses to refuse upgrades.
        ws="wsproto",
        ws_max_size=config.websocket_max_message_size,
        ws_ping_interval=None,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        # Off on purpose: the edge reads X-Forwarded-* and Forwarded itself, for both servers
        # alike (hypercorn has no such option), with COMZY_TRUSTED_PROXIES (uvicorn's middleware
        # reads no Forwarded, no X-Forwarded-Host), and must see the TCP peer to decide whether to
        # trust them: uvicorn's would already have replaced scope["client"] with a header's claim.
        proxy_headers=False,
        timeout_keep_alive=int(config.keep_alive_timeout),
        timeout_graceful_shutdown=grace,  # type: ignore[arg-type]  # a float works as well
        ssl_certfile=config.certfile,
        ssl_keyfile=config.keyfile,
    ))
    # uvicorn announces itself at INFO ("Press CTRL+C to quit"); comzy prints its own banner.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    sock = socket.socket(fileno=_bound_fd(config))

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_asked)
        try:
            # _serve, not serve: serve() takes over SIGINT/SIGTERM, which the CLI handles.
            await server._serve(sockets=[sock])
        finally:
            sock.close()
            tg.cancel_scope.cancel()


def _bounded_head_protocol(limit: int, plain: PlainServe | None = None) -> type:
    """uvicorn's httptools protocol with a bound on request heads, which httptools lacks, reads
    that go on (bounded) while uvicorn holds its parser back, so that a visitor who leaves then is
    noticed, and (``plain``) the app's own handling of plain requests without ASGI (see
    :data:`PlainServe`)."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class ParsingFlow(FlowControl):
        """uvicorn's flow control, whose pause of reading holds back the parser, not the reads.

        uvicorn pauses reading while a pipelined request waits for the response before it (and
        while a request body waits for the app). A paused transport does not see the visitor's
        FIN or RST either, so one who pipelined a request behind a long response (an event
        stream, a long poll) and left kept its stream, the local app's request and a slot of the
        tunnel's stream limit until the local app next wrote. The protocol reads on instead and
        holds the bytes unparsed (:meth:`BoundedHeadProtocol.hold`), up to ``limit``.
        """

        def __init__(self, protocol: BoundedHeadProtocol, transport: asyncio.Transport) -> None:
            super().__init__(transport)
            self.protocol = protocol

        def pause_reading(self) -> None:
            self.read_paused = True

        def resume_reading(self) -> None:
            if self.read_paused:
                self.read_paused = False
                self.protocol.release()

    class BoundedHeadProtocol(HttpToolsProtocol):
        """Counts the bytes of an unfinished request head and answers 431 past ``limit``.

        The read that starts a head is not counted (it may also hold the previous request's
        body); every later read that leaves the head unfinished is, so a head can buffer at
        most ``limit`` bytes plus one read. Bytes read while uvicorn holds its parser back
        (:class:`ParsingFlow`) are held, unparsed, up to ``limit`` plus one read as well; past
        that the transport pauses for real until uvicorn parses again.
        """

        in_head = False
        head_started_now = False
        head_bytes = 0
        #: What was read while the parser was held back, in order, not yet parsed, and its size.
        held: list[bytes] | None = None
        held_bytes = 0
        #: The transport is paused: ``held`` is past ``limit``.
        reads_stopped = False
        #: A call to parse ``held`` is scheduled.
        feed_due = False
        #: The request whose ASGI task uvicorn started last (it runs one at a time): the one being
        #: answered, while a pipelined request queued behind it is uvicorn's ``cycle``.
        running: Any = None
        #: The request ``plain`` serves, while its response is unfinished (it may no longer be the
        #: newest: a pipelined request queued behind it is uvicorn's ``cycle`` then).
        plain_exchange: PlainExchange | None = None
        #: What ``plain`` keeps about this connection from one request to the next (its own object).
        plain_peer: Any = None
        #: The keep-alive timeout, kept lazily (uvicorn arms a loop timer when a response completes
        #: and cancels it when the next read begins: a timer made and cancelled per request). Here
        #: the connection notes when it became idle (None: busy) and one timer, armed when none is,
        #: checks at its deadline whether it is still idle and since when, and goes again if not.
        idle_since: float | None = None
        keep_alive_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = ParsingFlow(self, transport)
            # uvicorn keeps the real transport for its flow control; its writes go through the cork.
            self.transport = CorkedTransport(transport, asyncio.get_running_loop())  # type: ignore[assignment]

        def hold(self, data: bytes) -> None:
            """Keep ``data`` for the parser, which uvicorn holds back; past ``limit``, stop reading."""
            if self.held is None:
                self.held = []
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > limit and not self.reads_stopped:
                self.reads_stopped = True
                self.transport.pause_reading()

        def release(self) -> None:
            """uvicorn parses again: read on, and parse what was held (soon: this may be called
            from inside the parser's callbacks, where the parser must not be fed)."""
            if self.reads_stopped:
                self.reads_stopped = False
                self.transport.resume_reading()
            if self.held and not self.feed_due:
                self.feed_due = True
                self.loop.call_soon(self.parse_held)

        def parse_held(self) -> None:
            self.feed_due = False
            held = self.held
            # Held back again meanwhile (the next release schedules this again), or the connection is gone.
            if not held or self.flow.read_paused or self.parser is None or self.transport.is_closing():
                return
            self.held = None
            self.held_bytes = 0
            if self.reads_stopped:
                # Past the bound after uvicorn let go (a read came between release and this call):
                # read on now, or nothing would (release only acts while uvicorn holds back).
                self.reads_stopped = False
                self.transport.resume_reading()
            # Usually one or two reads (the transport pauses past the limit): one read is fed uncopied.
            self.data_received(held[0] if len(held) == 1 else b"".join(held))

        def data_received(self, data: bytes) -> None:
            if self.flow.read_paused or self.held:
                self.hold(data)
                return
            was_in_head = self.in_head
            self.head_started_now = False
            super().data_received(data)
            cycle = self.cycle
            if self.idle_since is not None and cycle is not None and not cycle.response_complete:
                # A response finished inside this read's parsing (a plain exchange's refusal, answered
                # from the parser's callback) made the connection idle, and a request parsed after it
                # in the same read is being served: the keep-alive timer would close its connection.
                # uvicorn disarms it only when a read begins.
                self.idle_since = None
            if not (was_in_head and self.in_head and not self.head_started_now):
                return
            self.head_bytes += len(data)
            if self.head_bytes > limit and not self.transport.is_closing():
                body = f"Request head larger than {limit} bytes.\n".encode()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                     b"content-type: text/plain; charset=utf-8\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                self.transport.close()

        def on_message_begin(self) -> None:
            self.in_head = self.head_started_now = True
            self.head_bytes = 0
            if plain is None:
                super().on_message_begin()
                return
            # uvicorn's, but the scope is built only for a request the app does not serve itself
            # (see _uvicorn_scope): a plain one never reads it.
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self.scope = None  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            if isinstance(self.cycle, PlainExchange):
                return  # its request had no body, and nobody waits for the body's end (_NoEvent)
            super().on_message_complete()

        def on_headers_complete(self) -> None:
            self.in_head = False
            cycle = self.cycle
            # Offered to the app first: a request that is not an upgrade (nor CONNECT) and has no
            # request before it still answering (a pipelined one queues as uvicorn queues it).
            # url: origin-form only; uvicorn's own path handles whatever else it may meet.
            if plain is not None and (cycle is None or cycle.response_complete) and self.url[:1] == b"/" \
                    and not self.parser.should_upgrade():
                version = self.parser.get_http_version()
                if version == "1.1" or version == "1.0":
                    # keep_alive exactly as uvicorn's cycle decides it (HTTP/1.0: never).
                    method = self.parser.get_method().decode("ascii")
                    keep_alive = version != "1.0" and self.parser.should_keep_alive()
                    try:
                        exchange = plain(self, method, self.url, self.headers, version, keep_alive)
                    except Exception:
                        # A plugin's resolve_host failed, say: uvicorn's answer to an app's exception.
                        log.exception("Exception while serving a request; answering 500")
                        exchange = PlainExchange(self, method, keep_alive)
                        self.cycle = exchange  # type: ignore[assignment]
                        exchange.internal_error()
                        return
                    if exchange is not None:
                        self.cycle = self.plain_exchange = exchange  # type: ignore[assignment]
                        return
            if self.scope is None:
                self.scope = self._uvicorn_scope()
            super().on_headers_complete()
            if self.cycle is not cycle:  # a request to serve (not an upgrade): it may watch the connection
                # Added to what the scope has: uvicorn may give it extensions of its own.
                self.scope.setdefault("extensions", {})[DISCONNECT_WATCH] = DisconnectWatch()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self.running = cycle
            super()._start_asgi_task(cycle, app)

        def _uvicorn_scope(self) -> Any:
            """The scope uvicorn's on_message_begin makes, made when it is needed (the same keys)."""
            return {
                "type": "http",
                "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                "http_version": "1.1",
                "server": self.server,
                "client": self.client,
                "scheme": self.scheme,
                "root_path": self.root_path,
                "headers": self.headers,
                "state": self.app_state.copy(),
            }

        def on_response_complete(self) -> None:
            self.running = None  # its scope need not live as long as the connection
            # The response is whole: it leaves now rather than at the end of the loop turn. The held
            # head and body still go in one send; the visitor gets them one loop iteration sooner
            # (an epoll_wait and the other connections' callbacks sooner), which a single
            # connection's latency sees.
            cork: CorkedTransport = self.transport  # type: ignore[assignment]
            if cork._held:  # (a plain exchange holds nothing there: it writes at once)
                cork.flush()
            # uvicorn's, with the keep-alive timer kept lazily (see idle_since).
            self.server_state.total_requests += 1
            if cork._transport.is_closing():
                return
            if self.flow.read_paused:
                self.flow.resume_reading()
            if self.pipeline:  # a pipelined request waits for its turn: it starts now
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            loop = self.loop
            since = self.idle_since = loop.time()
            if self.keep_alive_timer is None:
                self.keep_alive_timer = loop.call_at(since + self.timeout_keep_alive, self._keep_alive_due)

        def _unset_keepalive_if_required(self) -> None:
            # uvicorn's name, called as a read begins and as the connection is lost: busy now.
            self.idle_since = None

        def _keep_alive_due(self) -> None:
            """The keep-alive timer: close the connection if it has been idle for the timeout (as
            uvicorn's timer would have), else wait for the deadline of its latest idle spell."""
            self.keep_alive_timer = None
            since = self.idle_since
            if since is None:
                return  # busy: the response that ends it arms the timer again
            deadline = since + self.timeout_keep_alive
            # A loop timer may fire up to a millisecond before its time (uvloop rounds to ms).
            if self.loop.time() >= deadline - 0.002:
                self.timeout_keep_alive_handler()
            else:
                self.keep_alive_timer = self.loop.call_at(deadline, self._keep_alive_due)

        def connection_lost(self, exc: Exception | None) -> None:
            cycle, running, exchange = self.cycle, self.running, self.plain_exchange
            if self.keep_alive_timer is not None:
                self.keep_alive_timer.cancel()  # it would keep this protocol until it fires
                self.keep_alive_timer = None
            super().connection_lost(exc)
            self.held = None
            self.held_bytes = 0
            # As uvicorn's receive() would report it: only while the request's response is unfinished.
            if running is not None and not running.response_complete:
                if running is not cycle:
                    # uvicorn tells only its newest request, which waits (pipelined) behind this one.
                    running.disconnected = True
                    running.message_event.set()
                watch = running.scope.get("extensions", _NO_EXTENSIONS).get(DISCONNECT_WATCH)
                if watch is not None and watch.callback is not None:
                    watch.callback()
            if exchange is not None:
                self.plain_exchange = None
                exchange.visitor_left()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.plain_exchange is not None:
                # Not from here: the transport calls this in the middle of its own write, and a
                # response that ends (and closes the connection) from inside it would have the
                # transport report the connection lost twice (asyncio's _write_ready).
                self.loop.call_soon(self.plain_exchange.writable)

    return BoundedHeadProtocol


#: The scope extension (uvicorn only) holding the request's :class:`DisconnectWatch`.
DISCONNECT_WATCH = "comzy.disconnect_watch"
_NO_EXTENSIONS: dict[str, Any] = {}


class DisconnectWatch:
    """Tells the app the moment a visitor's connection is lost while its response is unfinished.

    ASGI reports a disconnect only through ``receive()``, so an app that must notice it while it
    waits for something else (the edge, for the response head) needs a task parked on
    ``receive()`` per request: a task's creation, its steps and its wakeup cost several µs of every
    proxied request. A request without a body needs no such task where the HTTP server calls
    ``callback`` itself (uvicorn, through the protocol below, at the point its ``receive()`` would
    report ``http.disconnect``); the app sets ``callback`` and clears it when done.
    """

    __slots__ = ("callback",)

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None


#: A status line per status, as uvicorn writes it ("HTTP/1.1 200 OK"), for :class:`PlainExchange`.
_STATUS_LINES: dict[int, bytes] = {}
#: The bytes uvicorn refuses in a response header's name and in its value (it closes the connection
#: instead): its HEADER_RE and HEADER_VALUE_RE as sets.
_BAD_NAME_BYTES = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \\"'
_BAD_VALUE_BYTES = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"


def _changing(refused: bytes) -> bytes:
    """A ``bytes.translate`` table that changes exactly the ``refused`` bytes: what it leaves equal
    holds none of them. A pass at a few instructions a byte (and no copy kept) where a regex search
    took about 40 a byte: the two searches were 10k instructions of every proxied request (callgrind)."""
    return bytes(byte ^ 1 if byte in refused else byte for byte in range(256))


_NAME_CHECK = _changing(_BAD_NAME_BYTES)
_VALUE_CHECK = _changing(_BAD_VALUE_BYTES)
#: The response header names start_response looks at, one set test per header: the framing ones,
#: and with ``hop_by_hop`` every hop-by-hop one (Content-Length is end-to-end: headers.PROTECTED).
_NOTED = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_NOTED_HOP_BY_HOP = HOP_BY_HOP | {b"content-length"}
#: Connection header values that name only hop-by-hop headers, as most responses send it (nginx's
#: "keep-alive"): dropped with the header, without splitting them into tokens first. Not "close":
#: a header of that name is dropped too (strip_hop_by_hop's second pass).
_HOP_BY_HOP_ONLY = frozenset({b"keep-alive", b"Keep-Alive"})


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


class _NoEvent:
    """uvicorn sets its cycle's ``message_event`` when the request ends or the visitor leaves; a
    plain exchange has nobody waiting on it."""

    __slots__ = ()

    def set(self) -> None:
        """Nothing waits."""


_NO_EVENT = _NoEvent()


class PlainExchange:
    """One request the app serves on the connection's protocol itself, without ASGI: no scope, no
    message dicts, no task (``PlainServe``). It stands where uvicorn keeps its request's cycle, so
    uvicorn's protocol (keep-alive, pipelining, graceful stop, disconnects) sees what it expects,
    and writes the response exactly as uvicorn's cycle frames one (status line, headers checked
    the same way, ``connection: close`` when not kept alive, chunked without a Content-Length, no
    body for HEAD, 204 or 304, a body longer or shorter than its Content-Length closes the
    connection). The subclass is told :meth:`visitor_left` and :meth:`writable`.
    """

    __slots__ = ("body", "chunked", "conn", "disconnected", "head_only", "keep_alive", "message_event",
                 "more_body", "out", "remaining", "response_complete", "response_started")

    def __init__(self, conn: Any, method: str, keep_alive: bool) -> None:
        # What uvicorn's protocol reads and writes on its cycle:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive  # uvicorn's shutdown() clears it: the connection closes after
        self.message_event = _NO_EVENT
        self.body = bytearray()  # only for an unexpected body, which nobody reads
        self.more_body = True
        # The response's framing:
        self.conn = conn
        self.head_only = method == "HEAD"
        self.response_started = False
        self.chunked: bool | None = None
        self.remaining = 0
        #: What is written and not yet handed to the connection, in order (see start_response).
        self.out: list[bytes] | None = None

    @property
    def write_paused(self) -> bool:
        """Whether the visitor's connection holds enough unsent data: wait for :meth:`writable`."""
        return bool(self.conn.flow.write_paused)

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]], hop_by_hop: bool = False) -> bool:
        """Write the head; False when the connection was closed instead (a header uvicorn refuses).

        What the exchange writes is gathered in ``out``, and the end sends it at once, in one send
        (``CorkedTransport.write_now``): a small response is one write to the socket, without the
        cork's calls, its loop callback and its flushes. A caller that returns to the loop with a
        response unfinished hands ``out`` to the cork (:meth:`hand_over`: the edge does at the end of
        each stream event), which sends it at the turn's end as it would have.

        With ``hop_by_hop`` (a head from the tunnel, unfiltered), the hop-by-hop headers are left
        out here, as :func:`~comzy.core.headers.strip_hop_by_hop` does, in the same pass that lowers
        each name once: two passes over every header, with two ``lower`` each, were one."""
        content = [_STATUS_LINES.get(status) or _status_line(status)]
        closing = False
        chunked, remaining = self.chunked, self.remaining
        named: set[bytes] | None = None
        noted = _NOTED_HOP_BY_HOP if hop_by_hop else _NOTED
        defaults = self.conn.server_state.default_headers  # none: comzy turns Server and Date off
        if defaults:
            headers = defaults + headers
        try:
            for name, value in headers:
                name = name.lower()
                if name in noted:
                    if name == b"content-length":
                        if chunked is None:
                            remaining = int(value.decode())
                            chunked = False
                    elif hop_by_hop:
                        if name == b"connection" and value not in _HOP_BY_HOP_ONLY:
                            named = connection_tokens(value, named)
                        continue
                    elif name == b"transfer-encoding":
                        if value.lower() == b"chunked":
                            remaining = 0
                            chunked = True
                    elif b"close" in connection_tokens(value):  # connection
                        closing = True
                content += (name, b": ", value, b"\r\n")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._refuse_head(f"bad response head: {exc}")
        if named is not None and not named <= HOP_BY_HOP:
            # The Connection header names more to drop: the general function's second pass.
            return self.start_response(status, strip_hop_by_hop(headers))
        # uvicorn's checks, in one pass over all names and one over all values (a search per
        # header each cost ~1 µs per response): joined by a byte each allows ("-" in names, tab in
        # values), and unchanged by a table that changes every refused byte.
        names = b"-".join(content[1::4])
        values = b"\t".join(content[3::4])
        if names.translate(_NAME_CHECK) != names or values.translate(_VALUE_CHECK) != values:
            return self._refuse_head("invalid HTTP header in the response")
        self.response_started = True
        self.chunked, self.remaining = chunked, remaining
        if closing:
            self.keep_alive = False
        elif not self.keep_alive:
            content.append(b"connection: close\r\n")
        if self.chunked is None and not self.head_only and status not in (204, 304):
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.out = [b"".join(content)]
        return True

    def hand_over(self) -> None:
        """Hand what is written to the connection's cork (sent at the end of the loop's turn)."""
        out = self.out
        if out:
            self.out = None
            self.conn.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = [data]
        else:
            out.append(data)

    def _refuse_head(self, why: str) -> bool:
        """A response head uvicorn would refuse: the connection is closed (False, as start_response)."""
        self.response_started = True
        self.abort_response(why)
        return False

    def send_body(self, data: bytes) -> bool:
        """Write body bytes; False when the connection was closed instead (past Content-Length)."""
        if self.head_only:
            self.remaining = 0
        elif self.chunked:
            if data:
                self._write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            if len(data) > self.remaining:
                self.abort_response("response content longer than Content-Length")
                return False
            self.remaining -= len(data)
            self._write(data)
        return True

    def end_response(self) -> bool:
        """End the response (the connection stays open for the next request if kept alive); False
        when the connection was closed instead (shorter than its Content-Length)."""
        if self.head_only:
            self.remaining = 0
        elif self.chunked:
            self._write(b"0\r\n\r\n")
        if self.remaining != 0:
            self.abort_response("response content shorter than Content-Length")
            return False
        out = self.out
        if out:
            self.out = None
            self.conn.transport.write_now(out[0] if len(out) == 1 else b"".join(out))
        self.response_complete = True
        conn = self.conn
        if conn.plain_exchange is self:
            conn.plain_exchange = None
        if not self.keep_alive:
            conn.transport.close()
        conn.on_response_complete()
        return True

    def respond(self, status: int, body: bytes | str, headers: Iterable[tuple[bytes, bytes]] | None = None) -> bool:
        """A whole response as :func:`comzy.core.asgi.respond` makes one: ``headers`` in their order
        (text/plain first unless they give a Content-Type), then its own Content-Length."""
        data = body.encode() if isinstance(body, str) else body
        fields = [(n, v) for n, v in headers or () if n.lower() != b"content-length"]
        if not any(n.lower() == b"content-type" for n, _ in fields):
            fields.insert(0, (b"content-type", TEXT))
        fields.append((b"content-length", b"%d" % len(data)))
        return self.start_response(status, fields) and self.send_body(data) and self.end_response()

    def internal_error(self) -> None:
        """uvicorn's 500 for an app that failed before its response started (then the connection closes)."""
        self.start_response(500, [(b"content-type", TEXT), (b"content-length", b"21"), (b"connection", b"close")])
        self.send_body(b"Internal Server Error")
        self.end_response()

    def abort_response(self, why: str) -> None:
        """Close the visitor's connection: a response that cannot be finished honestly (the
        tunnel failed after its head, or its framing is broken) is never marked complete."""
        conn = self.conn
        if conn.plain_exchange is self:
            conn.plain_exchange = None
        if why:
            log.debug("closing a visitor's connection: %s", why)
        self.hand_over()  # what was written goes first, as it would have: the close then tells the rest
        conn.transport.close()

    def visitor_left(self) -> None:
        """The connection was lost before the response was complete."""

    def writable(self) -> None:
        """The connection takes data again after :attr:`write_paused`."""


#: The app's offer to serve a request itself, on the connection's protocol (uvicorn only):
#: ``(connection, method, target, headers, http_version, keep_alive)`` -> the exchange now under
#: way, or None to let the ASGI app have it. Offered only an HTTP/1.x request that is no upgrade,
#: with an origin-form target, before its body (if any) is read. The headers are httptools' (names
#: in lower case, trailing whitespace stripped), the list uvicorn would put in the scope.
PlainServe = Callable[[Any, str, bytes, list[tuple[bytes, bytes]], str, bool], PlainExchange | None]


class CorkedTransport:
    """A transport whose writes made in one event-loop turn leave in one send.

    uvicorn writes a response's head the moment the app starts the response and its body on the
    next message: two sends, and two wake-ups of the visitor's client, for every small response
    (measured with strace: 3 sends per proxied request instead of 2; a loopback send with its
    wake-up is the largest single cost per request at one connection). Held data leaves at the
    end of the turn (``call_soon``), before the loop waits for anything, so nothing is delayed
    past the work already scheduled; ``close`` and ``write_eof`` send it first. What is held is
    at most what the app wrote in one turn: flow control still sees the real transport's buffer.

    The rest of asyncio's transport interface is passed through, each method spelled out: a
    ``__getattr__`` fallback would make every attribute read of this object, its own ``write``
    included, take CPython's slow path (no specialised attribute access, a second lookup through
    ``__getattribute__``): about 19 reads and 22k instructions per proxied request (callgrind).
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport: Any = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Hold ``data`` until the end of this loop turn."""
        if not data:
            return
        held = self._held
        if not held:
            self._loop.call_soon(self.flush)
        held.append(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        """Hold each of ``lines`` (see :meth:`write`)."""
        for data in lines:
            self.write(data)

    def write_now(self, data: bytes) -> None:
        """Send ``data`` now, with anything held before it, in one send: for a writer that gathers
        what it writes itself (:class:`PlainExchange`), and so needs no end-of-turn flush."""
        held = self._held
        if held:
            held.append(data)
            self.flush()
            return
        transport = self._transport
        if not transport.is_closing():
            transport.write(data)

    def flush(self) -> None:
        """Send what is held now (a no-op when nothing is)."""
        held = self._held
        if held:
            self._held = []
            transport = self._transport
            if not transport.is_closing():
                transport.write(held[0] if len(held) == 1 else b"".join(held))

    def is_closing(self) -> bool:
        """The real transport's."""
        return bool(self._transport.is_closing())

    def get_write_buffer_size(self) -> int:
        """The real transport's buffer plus what this turn holds."""
        return int(self._transport.get_write_buffer_size()) + sum(map(len, self._held))

    def write_eof(self) -> None:
        """Send what is held, then half-close."""
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        """Send what is held, then close (the real transport sends its buffer first)."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is held and the real transport's buffer: the connection is reset."""
        self._held.clear()
        self._transport.abort()

    # -- the real transport's, passed through -------------------------------------------------------
    def can_write_eof(self) -> bool:
        """The real transport's."""
        return bool(self._transport.can_write_eof())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The real transport's (the socket, the peer's address, TLS details)."""
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """The real transport's (uvicorn's WebSocket upgrade hands the connection over)."""
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The real transport's."""
        return self._transport.get_protocol()  # type: ignore[no-any-return]

    def is_reading(self) -> bool:
        """The real transport's."""
        return bool(self._transport.is_reading())

    def pause_reading(self) -> None:
        """The real transport's."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """The real transport's."""
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The real transport's."""
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The real transport's."""
        return self._transport.get_write_buffer_limits()  # type: ignore[no-any-return]


class OneHostOnly:
    """Answers 400 to a request with more than one Host header (or none, in HTTP/1.1).

    RFC 9112 3.2: a server MUST answer 400 to such a request. A proxy that routed by one Host
    while the app behind it read another would let a visitor reach one tunnel while appearing to
    ask for another. h11 (hypercorn) refuses these while parsing; httptools (uvicorn) passes
    every header through, so this check stands in front of the app there. It costs one pass
    over the header list per request.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an ambiguous request, pass everything else to the app untouched."""
        if scope["type"] != "lifespan":
            hosts = 0
            for name, _ in scope["headers"]:
                if name == b"host":  # both servers give header names in lower case
                    hosts += 1
            if hosts > 1:
                return await _bad_request(scope, send, "more than one Host header")
            if not hosts and scope.get("http_version") == "1.1":  # HTTP/1.0 may omit it
                return await _bad_request(scope, send, "no Host header")
        await self.app(scope, receive, send)


async def _bad_request(scope: Scope, send: Send, why: str) -> None:
    # Close the connection: after an ambiguous request, nothing on it is worth trusting.
    await respond(send, 400, f"Bad Request: {why} (RFC 9112 3.2).\n", headers=[(b"connection", b"close")],
                  scope=scope, close_code=1002)
