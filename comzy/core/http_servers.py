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
import importlib.util
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from comzy.core.asgi import App, Receive, Scope, Send, respond

HTTP_SERVERS = ("hypercorn", "uvicorn")

#: The modules each server needs. Both are dependencies of comzy; they are checked anyway, so that
#: an install that lost one (a hand-pruned image, a broken venv) fails at start-up in one line.
_REQUIRES = {"uvicorn": ("uvicorn", "httptools"), "hypercorn": ("hypercorn",)}


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
    if kind == "uvicorn":
        await _serve_uvicorn(app, config, stop)
    else:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _bound_fd(config: Config) -> int:
    return int(config.bind[0].removeprefix("fd://"))


# -- uvicorn -------------------------------------------------------------------------------------

async def _serve_uvicorn(app: Any, config: Config, stop: anyio.Event) -> None:
    import uvicorn

    grace = config.graceful_timeout
    server = uvicorn.Server(uvicorn.Config(
        OneHostOnly(app),
        loop="none",  # run on the caller's loop
        http=_bounded_head_protocol(config.h11_max_incomplete_size),
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


def _bounded_head_protocol(limit: int) -> type:
    """uvicorn's httptools protocol with a bound on request heads, which httptools lacks."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHeadProtocol(HttpToolsProtocol):
        """Counts the bytes of an unfinished request head and answers 431 past ``limit``.

        The read that starts a head is not counted (it may also hold the previous request's
        body); every later read that leaves the head unfinished is, so a head can buffer at
        most ``limit`` bytes plus one read.
        """

        in_head = False
        head_started_now = False
        head_bytes = 0
        #: The watch of the newest request's scope (uvicorn tells only that request of a disconnect).
        watch: DisconnectWatch | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # uvicorn keeps the real transport for its flow control; its writes go through the cork.
            self.transport = CorkedTransport(transport, asyncio.get_running_loop())  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            was_in_head = self.in_head
            self.head_started_now = False
            super().data_received(data)
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
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.in_head = False
            cycle = self.cycle
            super().on_headers_complete()
            if self.cycle is not cycle:  # a request to serve (not an upgrade): it may watch the connection
                self.watch = DisconnectWatch()
                # Added to what the scope has: uvicorn may give it extensions of its own.
                self.scope.setdefault("extensions", {})[DISCONNECT_WATCH] = self.watch

        def on_response_complete(self) -> None:
            # The response is whole: it leaves now rather than at the end of the loop turn. The held
            # head and body still go in one send; the visitor gets them one loop iteration sooner
            # (an epoll_wait and the other connections' callbacks sooner), which a single
            # connection's latency sees.
            self.transport.flush()  # type: ignore[attr-defined]  # the CorkedTransport above
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            cycle, watch = self.cycle, self.watch
            super().connection_lost(exc)
            # As uvicorn's receive() would report it: only while the request's response is unfinished.
            if watch is not None and watch.callback is not None and cycle is not None and cycle.disconnected:
                watch.callback()

    return BoundedHeadProtocol


#: The scope extension (uvicorn only) holding the request's :class:`DisconnectWatch`.
DISCONNECT_WATCH = "comzy.disconnect_watch"


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


class CorkedTransport:
    """A transport whose writes made in one event-loop turn leave in one send.

    uvicorn writes a response's head the moment the app starts the response and its body on the
    next message: two sends, and two wake-ups of the visitor's client, for every small response
    (measured with strace: 3 sends per proxied request instead of 2; a loopback send with its
    wake-up is the largest single cost per request at one connection). Held data leaves at the
    end of the turn (``call_soon``), before the loop waits for anything, so nothing is delayed
    past the work already scheduled; ``close`` and ``write_eof`` send it first. What is held is
    at most what the app wrote in one turn: flow control still sees the real transport's buffer.
    Everything else is the real transport's (``__getattr__``).
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
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        """Hold each of ``lines`` (see :meth:`write`)."""
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is held now (a no-op when nothing is)."""
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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
