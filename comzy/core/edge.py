"""The public listener: an ASGI app that carries each visitor request over a tunnel stream."""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import httptools

from comzy.core import protocol as p
from comzy.core.asgi import HTML, Receive, Scope, Send, lifespan, respond
from comzy.core.headers import (
    WS_HANDSHAKE,
    FramingError,
    add_forwarded,
    announces_body,
    head_size,
    host_header,
    host_name,
    host_of,
    is_trusted,
    origin_form,
    plain_request_headers,
    request_origin,
    strip_hop_by_hop,
)
from comzy.core.http_servers import DISCONNECT_WATCH, DisconnectWatch, PlainExchange, ResponseAborted
from comzy.core.logs import RateLimitedLog
from comzy.core.registry import Entry
from comzy.core.session import Session, SessionClosed
from comzy.core.stream import Stream, StreamReset
from comzy.core.types import Exchange, ForwardRequest, ForwardResponse, Reject, Tunnel

if TYPE_CHECKING:
    from comzy.core.cluster.edge_router import RouteEntry
    from comzy.core.server import ServerContext

log = logging.getLogger("comzy.edge")


#: Body bytes already buffered are handed to the server in one piece up to this size.
COALESCE_BODY = 512 * 1024
#: On refusals of a big head or of a busy tunnel: the HTTP server then drops the connection and the
#: buffer that held the head (kept alive, 2,000 refused visitors held 160 MB of heads).
CLOSE = [(b"connection", b"close")]
#: How long an HTTP/2 request without Content-Length may keep its first body message before its
#: head goes to the agent anyway (its body then follows chunked).
FIRST_MESSAGE_WAIT = 1.0
#: What a visitor gets (500) when a before_forward implementation fails with anything but Reject:
#: HTTP and WebSocket alike; the traceback goes to the server's log only.
PLUGIN_FAILED = "A server plugin failed while handling this request.\n"
#: Requests an edge may send again to another control node after their link died before a
#: response head: idempotent and bodyless only, as nginx's proxy_next_upstream does.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NO_EXTENSIONS: dict[str, Any] = {}


class EdgeApp:
    """ASGI application for visitors: resolve host -> tunnel, hooks, stream, respond."""

    def __init__(self, server: ServerContext) -> None:
        self.server = server
        self.settings = server.settings
        self.hooks = server.hooks
        # A misconfigured node refuses every visitor of a protected tunnel: one line a minute says so.
        self._unenforced_log = RateLimitedLog(log, interval=60.0, level=logging.ERROR)
        # The plain exchanges waiting for their response head, with their deadlines, oldest first
        # (one timeout for all: insertion order is deadline order), and the one timer for the
        # oldest: a loop timer per request (call_later and its cancel) cost more (see _Taskless).
        self._heads_due: dict[_Taskless, float] = {}
        self._heads_timer: asyncio.TimerHandle | None = None
        # The settings read per request, read once (they do not change while the server runs): an
        # attribute of the settings (a pydantic model, which has __getattr__) costs ~1k instructions.
        self._max_request_head = self.settings.max_request_head
        self._max_streams = self.settings.max_streams_per_tunnel
        self._response_timeout = self.settings.response_timeout

    def serve_plain(self, conn: Any, method: str, url: bytes, headers: list[tuple[bytes, bytes]], http_version: str,
                    keep_alive: bool) -> PlainExchange | None:
        """Serve a bodyless HTTP/1.x request to a tunnel of this node without ASGI and without a task
        (``PlainServe``, uvicorn only): the hooks are called now, the REQUEST goes out now, and the
        response is written to the visitor from the stream's events (:class:`_Taskless`); a hook that
        returns something to await is awaited in a task, from which the exchange goes on. None (the
        ASGI app serves it, as before) for everything else: a body, a Host not exactly one, no tunnel
        here (404), 431 and a policy this node cannot enforce; without before_forward hooks, also 503
        and 502 before the stream. Nothing has been called, written or sent then.

        An edge of a cluster serves the same way a request whose alias has a cached route: the
        stream goes over the link to the control node holding it (its retries before a response
        head too, see ``_Taskless``); a route still to look up (a NATS request to await) goes to
        the ASGI app.
        """
        peer: _Peer = conn.plain_peer or self._peer(conn)
        plain = plain_request_headers(headers, peer.trusted)
        if plain is None:
            return None  # a body, Transfer-Encoding, or a Host not exactly one (OneHostOnly's 400)
        forwarded, host_value, size = plain
        try:
            parsed = httptools.parse_url(url)  # as uvicorn splits it for the scope
        except httptools.HttpParserInvalidURLError:
            return None
        target = origin_form(parsed.path or b"")
        if parsed.query:
            target = target + b"?" + parsed.query
        if host_value != peer.host_value:  # a connection's requests mostly name the same Host
            peer.host_value, peer.host = host_value, host_name(host_value)
        host = peer.host
        alias = self.hooks.resolve_host(host, self.server) if host else None
        entry: Entry | RouteEntry | None = self.server.registry.get(alias) if alias else None
        route: RouteEntry | None = None
        if entry is None:
            router = self.server.router
            if router is None or not alias:
                return None
            entry = route = router.cached(alias)
            if route is None:
                return None
        if self._head_too_large(size + len(target)) is not None:
            return None
        client, scheme = peer.client, peer.scheme
        if peer.trusted:  # as in _request
            origin = request_origin(headers, client, scheme, host_value, self.settings.trusted_networks)
            forwarded = add_forwarded(forwarded, client, scheme, host_value, True, origin)
            client, scheme = origin.client, origin.scheme
        else:  # add_forwarded's: plain_request_headers dropped the visitor's own
            forwarded += peer.forwarded
            forwarded.append((b"x-forwarded-host", host_value))
        # alias is not None here: an entry was found for it.
        request = ForwardRequest(alias, method, target, forwarded, host, client, scheme)  # type: ignore[arg-type]
        tunnel, session = entry.tunnel, entry.session
        if tunnel.policies and self._unenforced(tunnel) is not None:
            return None
        if not self.hooks.has_before_forward:
            busy = self._busy(session, tunnel) if route is None else _link_busy(route)
            if busy is not None or session.closed is not None:
                return None
            exchange = _Taskless(self, conn, request, tunnel, keep_alive, route)
            self._open_plain(exchange, session, http_version)  # checked just above: it opens
            return exchange
        exchange = _Taskless(self, conn, request, tunnel, keep_alive, route)
        try:
            pending = self.hooks.before_forward_now(request, tunnel, self.server)
        except Exception as exc:
            exchange.refused(exc, "before_forward")
            return exchange
        if pending is None:
            self._forward_plain(exchange, session, http_version)
        else:
            exchange.hold(self._forward_after(exchange, pending, session, http_version))
        return exchange

    def _peer(self, conn: Any) -> _Peer:
        """``conn``'s :class:`_Peer`, made at its first request served plain."""
        client = conn.client
        peer = conn.plain_peer = _Peer(client[0] if client else "", "https" if conn.scheme == "https" else "http",
                                       self.settings.trusted_networks)
        return peer

    async def _forward_after(self, exchange: _Taskless, pending: Awaitable[None], session: Session,
                             http_version: str) -> None:
        """A plain exchange whose before_forward returned something to await (a password check off the loop, say)."""
        try:
            await pending
        except Exception as exc:
            exchange.refused(exc, "before_forward")
            return
        exchange.pending = None
        if not exchange.done:  # the visitor may have left meanwhile
            self._forward_plain(exchange, session, http_version)

    def _forward_plain(self, exchange: _Taskless, session: Session, http_version: str) -> None:
        """Open the plain exchange's stream, or answer 503 or 502 as ``http`` does."""
        tunnel, route = exchange.tunnel, exchange.route
        busy = self._busy(session, tunnel) if route is None else _link_busy(route)
        if busy is not None:
            exchange.answer(503, busy, [(b"retry-after", b"1"), *CLOSE])
        elif session.closed is not None:
            exchange.answer(502, f"The agent for {tunnel.alias} has disconnected.\n")
        else:
            self._open_plain(exchange, session, http_version)

    @staticmethod
    def _open_plain(exchange: _Taskless, session: Session, http_version: str) -> None:
        """Open the plain exchange's stream on ``session`` (open: its limits checked) and send its
        REQUEST, END with it in one link message, as on the ASGI path."""
        request, route = exchange.request, exchange.route
        if route is None:
            stream = session.open_stream()
            extra = None
        else:
            # Over a cluster link: the far agent's windows, and the link keys last in the REQUEST's
            # map, as _open sends them; REQUEST and END in one piece of the session's queue, as on
            # a tunnel of this node. The RequestHead is made only should the stream be sent again
            # (_Taskless.routed_head).
            stream = session.open_stream(window=route.stream_window, credit=route.peer_window)
            extra = route.head_extra
            exchange.http_version = http_version
        stream.send_request_ended(p.encode_bodyless_request(
            stream.id, request.method, request.target, request.headers, request.client, request.scheme,
            http_version, exchange.tunnel.name, extra))
        exchange.begin(stream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            await self.websocket(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)

    def _wait_head(self, exchange: _Taskless) -> None:
        """Give ``exchange`` COMZY_RESPONSE_TIMEOUT for its head (``_Taskless._timed_out`` after)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._response_timeout
        self._heads_due[exchange] = deadline
        if self._heads_timer is None:
            self._heads_timer = loop.call_at(deadline, self._heads_late)

    def _heads_late(self) -> None:
        """Time out every exchange past its deadline; the timer then waits for the next one."""
        self._heads_timer = None
        due = self._heads_due
        loop = asyncio.get_running_loop()
        now = loop.time()
        while due:
            exchange, deadline = next(iter(due.items()))
            if deadline > now:
                self._heads_timer = loop.call_at(deadline, self._heads_late)
                return
            del due[exchange]
            try:
                exchange._timed_out()
            except Exception:  # a bug in one exchange must not hold back the others' timeouts
                log.exception("a plain exchange failed to answer its response timeout")

    # -- routing shared by HTTP and WebSocket --------------------------------------
    def _forward_request(self, scope: Scope, websocket: bool) -> tuple[ForwardRequest, Entry | None, str]:
        target = origin_form(scope.get("raw_path") or scope["path"].encode())
        if scope.get("query_string"):
            target = target + b"?" + scope["query_string"]
        client = scope.get("client")
        return self._request(scope["headers"], target, scope.get("method", "GET"), client[0] if client else "",
                             "https" if scope.get("scheme") in ("https", "wss") else "http", websocket)

    def _request(self, headers: list[tuple[bytes, bytes]], target: bytes, method: str, client_ip: str, scheme: str,
                 websocket: bool) -> tuple[ForwardRequest, Entry | None, str]:
        """The request to forward, the local tunnel its Host names (None: not here) and that host."""
        host = host_of(headers)
        alias = self.hooks.resolve_host(host, self.server) if host else None
        entry = self.server.registry.get(alias) if alias else None
        forwarded = strip_hop_by_hop(headers, WS_HANDSHAKE if websocket else frozenset())
        networks = self.settings.trusted_networks
        # Behind a trusted proxy, plugins, logs, the dashboard and the app see the visitor's address
        # and scheme as the proxy names them (X-Forwarded-* or Forwarded); from anyone else, the
        # connection's own. The HTTP servers' proxy-header support stays off (http_servers.py).
        # Read once: the Host header's bytes and the trust check (which parses the peer's address).
        # From an untrusted peer the origin is the connection itself, so none is built.
        host_value = host_header(headers)
        trusted = is_trusted(client_ip, networks)
        origin = request_origin(headers, client_ip, scheme, host_value, networks) if trusted else None
        forwarded = add_forwarded(forwarded, client_ip, scheme, host_value, trusted, origin)
        if origin is not None:
            client_ip, scheme = origin.client, origin.scheme
        request = ForwardRequest(
            alias=alias or "",
            method=method,
            target=target,
            headers=forwarded,
            host=host,
            client=client_ip,
            scheme=scheme,
            websocket=websocket,
        )
        return request, entry, host

    # -- HTTP ---------------------------------------------------------------------
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one visitor HTTP request."""
        started = time.time()
        try:
            has_body = announces_body(scope["headers"])  # one pass: refusal and framing both
        except FramingError as exc:
            await respond(send, 400, str(exc), headers=CLOSE)
            return
        request, local, host = self._forward_request(scope, websocket=False)
        entry: Entry | RouteEntry | None = local
        route: RouteEntry | None = None
        if entry is None:
            if self.server.router is None:
                await respond(send, 404, _not_active(host), HTML)
                return
            # An edge of a cluster: a control node holds the tunnel (design/cluster.md 1.4).
            route = await self._route(request.alias, host, send)
            if route is None:
                return  # answered: 404, 502 or 504
            entry = route
        too_large = self._head_too_large(len(request.target) + head_size(scope["headers"]))
        if too_large is not None:
            await respond(send, 431, too_large, headers=CLOSE)
            return
        tunnel, session = entry.tunnel, entry.session
        if tunnel.policies and (unenforced := self._unenforced(tunnel)):
            await respond(send, 502, unenforced)
            return
        try:
            await self.hooks.before_forward(request, tunnel, self.server)
        except Reject as exc:
            await respond(send, exc.status, exc.body, headers=exc.headers)
            await self.hooks.on_request_refused(request, tunnel, exc, self.server)
            return
        except Exception:
            log.exception("before_forward failed for %s; answering 500", tunnel.alias)
            await respond(send, 500, PLUGIN_FAILED)
            return
        http_version = scope.get("http_version", "1.1")
        first: dict[str, Any] | None = None
        if has_body is None:
            if http_version in ("1.1", "1.0"):
                has_body = False  # no framing header means no body in HTTP/1.x (RFC 9112 6.3)
            else:
                # HTTP/2 and 3 need not announce a body: whether one follows comes from the ASGI
                # messages. The first one is read before the head goes out, so a body that came
                # whole gets its Content-Length; one still streaming (or not started within a
                # moment) is forwarded chunked.
                try:
                    first = await asyncio.wait_for(receive(), FIRST_MESSAGE_WAIT)
                except TimeoutError:
                    has_body = True
                else:
                    if first["type"] != "http.request":
                        return  # the visitor left before sending anything
                    body = first.get("body", b"")
                    has_body = bool(body) or first.get("more_body", False)
                    if body and not first.get("more_body", False):
                        request.headers.append((b"content-length", str(len(body)).encode()))
        # From the limits to the REQUEST frame nothing awaits: no other request can slip in
        # between and overrun them.
        busy = self._busy(session, tunnel) if route is None else _link_busy(route)
        if busy is not None:
            await respond(send, 503, busy, headers=[(b"retry-after", b"1"), *CLOSE])
            return
        head = p.RequestHead(request.method, request.target, request.headers, request.client,
                             request.scheme, http_version, has_body=has_body, tunnel=tunnel.name)
        try:
            stream = _open(session, route, head)
        except SessionClosed:
            await respond(send, 502, f"The agent for {tunnel.alias} has disconnected.\n")
            return
        state = _Exchange()
        if self.hooks.has_before_response:
            state.hooked = (request, tunnel)
        if not has_body:
            # END goes with REQUEST in one WebSocket message: one write here and one wakeup in
            # the agent instead of two.
            stream.send_end()
            state.request_done = True
        tunnel.stream_opened(False)  # back down in _finish, which the finally below always reaches
        try:
            if route is None:
                watch = (scope.get("extensions") or _NO_EXTENSIONS).get(DISCONNECT_WATCH) if not has_body else None
                if watch is not None:
                    await self._proxy_bodyless(stream, send, state, watch)
                else:
                    await self._proxy_http(stream, receive, send, state, first)
            else:
                stream = await self._proxy_routed(stream, route, request, head, receive, send, state, first)
        finally:
            await self._finish(stream, request, tunnel, state, started)

    def _unenforced(self, tunnel: Tunnel) -> str | None:
        """Why this node must refuse ``tunnel``'s visitors: a plugin enforcing its policy is not
        enabled here (an edge configured apart from the tunnel's control node). None: all are."""
        missing = [name for name in tunnel.policies if name not in self.server.plugin_names]
        if not missing:
            return None
        self._unenforced_log("tunnel %s needs the %s plugin for its policy, which is not enabled here: its visitors "
                             "get 502 (enable it in COMZY_PLUGINS on every node that serves visitors)",
                             tunnel.alias, ", ".join(missing))
        return (f"Tunnel {tunnel.alias} has a policy this server cannot enforce (the {', '.join(missing)} plugin is "
                "not enabled on it); the request was refused rather than passed on unprotected.\n")

    def _head_too_large(self, head_size: int) -> str | None:
        """Why a request head of ``head_size`` (its target and :func:`head_size`) is refused with 431
        (None: it fits COMZY_MAX_REQUEST_HEAD)."""
        if head_size > self._max_request_head:
            return f"Request head of {head_size} bytes exceeds the limit of {self._max_request_head}.\n"
        return None

    def _busy(self, session: Session, tunnel: Tunnel) -> str | None:
        """Why a new stream on ``session`` is refused with 503 (None: it may open).

        A tunnel whose agent does not read its link would otherwise queue every visitor's
        request head in this process (see Session.congested).
        """
        if len(session.streams) >= self._max_streams:
            return (f"Tunnel {tunnel.alias} is busy ({self._max_streams} "
                    "requests in flight); retry shortly.\n")
        if session.congested:
            return (f"Tunnel {tunnel.alias} is not keeping up: its agent has not read the "
                    f"{session.queued} bytes already sent to it; retry shortly.\n")
        return None

    # -- an edge of a cluster ----------------------------------------------------------------
    async def _route(self, alias: str, host: str, send: Send, scope: Scope | None = None,
                     state: _Exchange | None = None) -> RouteEntry | None:
        """The route to the control node holding ``alias``, or None after answering the visitor
        (see ``_find_route``; the status goes into ``state`` when given)."""
        found = await self._find_route(alias, host)
        if not isinstance(found, tuple):
            return found
        status, body, headers = found
        await respond(send, status, body, headers=headers, scope=scope)
        if state is not None:
            state.status = status
        return None

    async def _find_route(self, alias: str, host: str) -> RouteEntry | tuple[int, str, list[tuple[bytes, bytes]]]:
        """The route to the control node holding ``alias``, or the visitor's answer instead: 404
        nobody holds it, 502 NATS unreachable or a bad reply, 504 lookup timeout."""
        # Imported here: role all never gets this far, and the router's module needs nats.
        from comzy.core.cluster.edge_router import BusDown, RouteError

        router = self.server.router
        try:
            route: RouteEntry | None = (router.cached(alias) or await router.lookup(alias)) if alias else None
        except (RouteError, BusDown) as exc:
            return exc.status if isinstance(exc, RouteError) else 502, _sentence(str(exc)), []
        if route is None:
            return 404, _not_active(host), [(b"content-type", HTML)]
        return route

    async def _proxy_routed(self, stream: Stream, route: RouteEntry, request: ForwardRequest, head: p.RequestHead,
                            receive: Receive, send: Send, state: _Exchange, first: dict[str, Any] | None) -> Stream:
        """``_proxy_http`` over a cluster link, with the retries allowed before a response head
        (design/cluster.md 1.4); returns the stream that ended the exchange."""
        retried = False
        while True:
            state.routed = True
            try:
                await self._proxy_http(stream, receive, send, state, first)
                return stream
            except _BeforeHead as failure:
                stream.close()
                answer = self._no_head(failure.reset, stream, route, head, state, retried)
                if answer is None:
                    retried = True
                    route = await self._route(request.alias, request.host, send, state=state)  # type: ignore[assignment]
                    if route is None:
                        return stream  # answered there (404, 502 or 504)
                    try:
                        stream = _open(route.session, route, head)
                    except SessionClosed as exc:
                        answer = (502, _failed_before_head(str(exc)), [])
                if answer is not None:
                    status, body, headers = answer
                    state.status = status
                    await respond(send, status, body, headers=headers)
                    return stream
                # The retried request starts over: its body, if any, comes from the visitor again.
                state.bytes_in = 0
                state.error = None
                state.request_done = not head.has_body
                if not head.has_body:
                    stream.send_end()

    def _no_head(self, reset: StreamReset, stream: Stream, route: RouteEntry, head: p.RequestHead,
                 state: _Exchange, retried: bool) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """What the visitor gets when a routed stream failed before its response head; None: retry it."""
        link_lost = stream.session.closed is not None
        if reset.code == p.ResetCode.REFUSED and not link_lost:
            # The control node's own limits (max streams per tunnel, an agent not reading): today's 503.
            return 503, _sentence(reset.message), [(b"retry-after", b"1"), *CLOSE]
        if reset.code == p.ResetCode.MOVED and not link_lost:
            # The request provably never reached an agent: look the alias up again, once.
            self.server.router.invalidate(route.tunnel.alias, route.node, route.tunnel.session)
            if not retried and state.bytes_in == 0:
                return None
            return 502, "The tunnel moved to another node during the request; retry.\n", []
        if link_lost and not retried and not head.has_body and head.method in RETRYABLE_METHODS:
            return None  # the route went with the link (Links.on_link_closed): the lookup is fresh
        return 502, _failed_before_head(reset.message), []

    async def _finish(self, stream: Stream, request: ForwardRequest, tunnel: Tunnel, state: _Exchange,
                      started: float) -> None:
        """Release the stream, count the exchange on its tunnel and tell after_response."""
        stream.close()
        tunnel.stream_finished(stream.websocket, state.bytes_in, state.bytes_out)
        if self.hooks.has_after_response:
            exchange = Exchange(request, tunnel, state.status, state.bytes_in, state.bytes_out,
                                started, time.time() - started, state.error)
            await self.hooks.after_response(exchange, self.server)  # shields what it awaits

    async def _proxy_http(self, stream: Stream, receive: Receive, send: Send, state: _Exchange,
                          first: dict[str, Any] | None) -> None:
        # The request body (and the visitor's disconnect) is pumped by a task of its own: a plain
        # asyncio task, not an anyio task group, whose set-up, cancel scopes and cancel delivery
        # cost more per request than the rest of the edge (profiled). Both comzy listeners run
        # on asyncio. Every way out of this method stops the pump (finally below).
        pump = asyncio.get_running_loop().create_task(self._pump_request(stream, receive, state, first))
        pump.add_done_callback(_report_pump_failure)
        try:
            await self._pump_response(stream, send, state)
        except StreamReset as exc:
            if state.visitor_gone:
                return  # the pump reset the stream: there is nobody left to answer
            await self._response_failed(exc, state, send)
        finally:
            try:
                if (state.complete or state.status == 502) and not state.request_done and not pump.done():
                    # The local app answered before reading the whole request body: let the
                    # body finish (the agent waits for it too), for a while.
                    await asyncio.wait({pump}, timeout=5)
            finally:
                # Otherwise the pump only waits for the visitor's disconnect, which the server
                # may report late or never on a kept-alive connection.
                pump.cancel()

    async def _proxy_bodyless(self, stream: Stream, send: Send, state: _Exchange, watch: DisconnectWatch) -> None:
        """``_proxy_http`` for a request without a body on a server that reports a disconnect
        through ``watch`` (uvicorn): no pump task, which would only wait for that disconnect."""
        watch.callback = lambda: self._visitor_left(stream, state)
        try:
            await self._pump_response(stream, send, state)
        except StreamReset as exc:
            if not state.visitor_gone:
                await self._response_failed(exc, state, send)
        finally:
            watch.callback = None

    @staticmethod
    def _visitor_left(stream: Stream, state: _Exchange) -> None:
        """The visitor disconnected: unless the response was complete, reset the stream, which
        wakes the response side (waiting for the head or body) with StreamReset."""
        if not state.complete:
            state.visitor_gone = True
            state.error = state.error or "visitor disconnected"
            stream.reset(p.ResetCode.CANCEL, "visitor disconnected")

    @staticmethod
    async def _response_failed(exc: StreamReset, state: _Exchange, send: Send) -> None:
        """A stream reset during the response: the visitor gets a 502 saying so, or, where that
        cannot be (the head went out, or a cluster route decides), the matching exception."""
        state.error = exc.message
        if state.started:
            # Aborting the connection is the only honest end: a clean finish would
            # tell the visitor a truncated body was complete. The servers abort it on any
            # exception; this one they do not log as an application error.
            raise ResponseAborted(exc.message) from exc
        if state.routed:
            raise _BeforeHead(exc) from None  # over a cluster link: 503, a retry or 502
        await respond(send, 502, _failed_before_head(exc.message))
        state.status = 502

    async def _pump_request(self, stream: Stream, receive: Receive, state: _Exchange,
                            first: dict[str, Any] | None) -> None:
        try:
            while True:
                message, first = (first, None) if first is not None else (await receive(), None)
                if message["type"] == "http.disconnect":
                    # The server also reports a disconnect once a response is complete: not an error.
                    self._visitor_left(stream, state)
                    return
                if state.request_done:
                    continue
                body = message.get("body", b"")
                if body:
                    state.bytes_in += len(body)
                    await stream.send_data(body)
                if not message.get("more_body", False):
                    state.request_done = True
                    stream.send_end()
        except (StreamReset, SessionClosed):
            return  # the response side reports it

    async def _pump_response(self, stream: Stream, send: Send, state: _Exchange) -> None:
        head = await stream.wait_head(self.settings.response_timeout)
        if head is None:
            stream.reset(p.ResetCode.CANCEL, "response timeout")
            state.status = 504
            state.error = "response timeout"
            await respond(send, 504, _no_answer(self.settings.response_timeout))
            return
        assert isinstance(head, p.ResponseHead)
        state.status = head.status
        headers = strip_hop_by_hop(head.headers)
        if state.hooked is not None:
            edited = await self._before_response(state, head, headers, send)
            if edited is None:
                stream.reset(p.ResetCode.CANCEL, "the response was refused by a server plugin")
                return
            headers = edited
        await send({"type": "http.response.start", "status": head.status, "headers": headers})
        state.started = True
        # hypercorn writes the head on http.response.start, so a visitor sees it before the
        # first body byte (SSE, long polls); the SSE test guards this.
        while True:
            chunk = await stream.receive_coalesced(COALESCE_BODY)
            if chunk is None:
                state.complete = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            data = chunk[0]
            state.bytes_out += len(data)
            # When END is already here, the last chunk ends the response: one write, not two.
            last = stream.drained_and_ended
            state.complete = last
            await send({"type": "http.response.body", "body": data, "more_body": not last})
            if last:
                return

    # -- WebSocket -------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Carry one visitor WebSocket to the local service."""
        started = time.time()
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        request, local, host = self._forward_request(scope, websocket=True)
        entry: Entry | RouteEntry | None = local
        route: RouteEntry | None = None
        if entry is None:
            if self.server.router is None:
                await respond(send, 404, _not_active(host), HTML, scope=scope)
                return
            route = await self._route(request.alias, host, send, scope)
            if route is None:
                return  # answered: 404, 502 or 504
            entry = route
        too_large = self._head_too_large(len(request.target) + head_size(scope["headers"]))
        if too_large is not None:
            await respond(send, 431, too_large, scope=scope)
            return
        tunnel, session = entry.tunnel, entry.session
        if tunnel.policies and (unenforced := self._unenforced(tunnel)):
            await respond(send, 502, unenforced, scope=scope)
            return
        try:
            await self.hooks.before_forward(request, tunnel, self.server)
        except Reject as exc:
            await respond(send, exc.status, exc.body, headers=exc.headers, scope=scope)
            await self.hooks.on_request_refused(request, tunnel, exc, self.server)
            return
        except Exception:  # the same policy as for HTTP: the visitor gets 500, the log the traceback
            log.exception("before_forward failed for %s; answering 500", tunnel.alias)
            await respond(send, 500, PLUGIN_FAILED, scope=scope)
            return
        busy = self._busy(session, tunnel) if route is None else _link_busy(route)
        if busy is not None:
            await respond(send, 503, busy, headers=[(b"retry-after", b"1")], scope=scope)
            return
        head = p.RequestHead(request.method, request.target, request.headers, request.client,
                             request.scheme, "1.1", websocket=True,
                             subprotocols=list(scope.get("subprotocols", [])), tunnel=tunnel.name)
        try:
            stream = _open(session, route, head)
        except SessionClosed:
            await respond(send, 502, f"The agent for {tunnel.alias} has disconnected.\n", scope=scope)
            return
        state = _Exchange()
        state.routed = route is not None
        if self.hooks.has_before_response:
            state.hooked = (request, tunnel)
        tunnel.stream_opened(True)  # back down in _finish, which the finally below always reaches
        retried = False
        try:
            while True:
                try:
                    await self._proxy_websocket(scope, stream, receive, send, state)
                    break
                except _BeforeHead as failure:  # only over a cluster link (state.routed)
                    assert route is not None
                    stream.close()
                    answer = self._no_head(failure.reset, stream, route, head, state, retried)
                    if answer is None:
                        route = await self._route(request.alias, host, send, scope, state)
                        if route is None:
                            break  # answered: 404, 502 or 504
                        try:
                            retry = _open(route.session, route, head)
                        except SessionClosed as exc:
                            answer = (502, _failed_before_head(str(exc)), [])
                        else:
                            retried, stream = True, retry
                            continue
                    status, body, headers = answer
                    state.status = status
                    await respond(send, status, body, headers=headers, scope=scope)
                    break
        finally:
            await self._finish(stream, request, tunnel, state, started)

    async def _proxy_websocket(self, scope: Scope, stream: Stream, receive: Receive, send: Send,
                               state: _Exchange) -> None:
        try:
            head = await stream.wait_head(self.settings.response_timeout)
        except StreamReset as exc:
            if state.routed:
                raise _BeforeHead(exc) from None  # over a cluster link: 503, a retry or 502
            state.status = 502
            await respond(send, 502, _failed_before_head(exc.message), scope=scope)
            return
        if head is None:
            state.status = 504
            await respond(send, 504, "The local service did not answer the WebSocket upgrade in time.\n",
                          scope=scope)
            return
        assert isinstance(head, p.ResponseHead)
        state.status = head.status
        if head.status != 101:
            body = bytearray()
            try:
                while (chunk := await stream.receive()) is not None:
                    body += chunk[0]
            except StreamReset:
                pass
            refusal = strip_hop_by_hop(head.headers)
            edited = refusal if state.hooked is None else await self._before_response(state, head, refusal, send,
                                                                                        scope)
            if edited is not None:
                await respond(send, head.status, bytes(body), headers=edited, scope=scope)
            return
        accept_headers = strip_hop_by_hop(head.headers, WS_HANDSHAKE)
        if state.hooked is not None:
            edited = await self._before_response(state, head, accept_headers, send, scope, WS_HANDSHAKE)
            if edited is None:
                stream.reset(p.ResetCode.CANCEL, "the upgrade was refused by a server plugin")
                return
            accept_headers = edited
        await send({"type": "websocket.accept", "subprotocol": head.subprotocol, "headers": accept_headers})
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._ws_from_visitor, stream, receive, state, tg.cancel_scope)
            await self._ws_to_visitor(stream, send, state)
            tg.cancel_scope.cancel()

    async def _before_response(self, state: _Exchange, head: p.ResponseHead, headers: list[tuple[bytes, bytes]],
                               send: Send, scope: Scope | None = None,
                               extra: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]] | None:
        """The response head's headers as the before_response hooks left them; None after answering
        the visitor instead (a Reject's answer, or 500 when an implementation failed).

        The framing stays the local service's: whatever hop-by-hop header (``extra``: a WebSocket
        handshake's too) a hook added is dropped, and a Content-Length it added, removed or changed
        is put back as the local service sent it, since the body that follows is the local
        service's (a wrong length would cut the response or hang the visitor)."""
        assert state.hooked is not None
        request, tunnel = state.hooked
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        response = ForwardResponse(head.status, headers)
        try:
            await self.hooks.before_response(response, request, tunnel, self.server)
        except Reject as exc:
            state.status = exc.status
            await respond(send, exc.status, exc.body, headers=exc.headers, scope=scope)
            return None
        except Exception:
            log.exception("before_response failed for %s; answering 500", tunnel.alias)
            state.status = 500
            await respond(send, 500, PLUGIN_FAILED, scope=scope)
            return None
        return _kept_framing(response.headers, lengths, tunnel, extra)

    async def _ws_from_visitor(self, stream: Stream, receive: Receive, state: _Exchange,
                               scope: anyio.CancelScope) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    if message.get("text") is not None:
                        data = message["text"].encode()
                        flags = p.FLAG_TEXT | p.FLAG_FIN
                    else:
                        data = message.get("bytes") or b""
                        flags = p.FLAG_FIN
                    state.bytes_in += len(data)
                    await stream.send_data(data, flags)
                elif message["type"] == "websocket.disconnect":
                    code = int(message.get("code", 1005))
                    stream.session.send_nowait(p.encode(p.FrameType.WS_CLOSE, stream.id,
                                                        {"code": code, "reason": message.get("reason") or ""}))
                    # The visitor is gone: nothing more can reach it.
                    scope.cancel()
                    return
        except (StreamReset, SessionClosed):
            return

    async def _ws_to_visitor(self, stream: Stream, send: Send, state: _Exchange) -> None:
        try:
            while (message := await stream.receive_message()) is not None:
                if isinstance(message, str):
                    state.bytes_out += len(message.encode())  # bytes on the wire, not characters
                    await send({"type": "websocket.send", "text": message})
                else:
                    state.bytes_out += len(message)
                    await send({"type": "websocket.send", "bytes": message})
            code, reason = stream.ws_close or (1000, "")
            await send({"type": "websocket.close", "code": p.sendable_close_code(code), "reason": reason})
        except StreamReset as exc:
            state.error = exc.message
            await send({"type": "websocket.close", "code": 1011, "reason": "tunnel lost"})


def _kept_framing(headers: list[tuple[bytes, bytes]], lengths: list[bytes], tunnel: Tunnel,
                  extra: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The headers a before_response hook left, with the local service's framing (see _before_response)."""
    edited = strip_hop_by_hop(headers, extra)
    if [value for name, value in edited if name.lower() == b"content-length"] != lengths:
        log.warning("a before_response hook changed %s's Content-Length; the local service's is kept", tunnel.alias)
        edited = [(n, v) for n, v in edited if n.lower() != b"content-length"]
        edited += [(b"content-length", value) for value in lengths]
    return edited


class _Peer:
    """What the plain path keeps about a visitor's connection between its requests (the
    connection's ``plain_peer``): its address and scheme, whether it is a trusted proxy, the
    X-Forwarded-For and -Proto the edge adds for it, and its last Host with the host it names.
    Read once per connection rather than once per request."""

    __slots__ = ("client", "forwarded", "host", "host_value", "scheme", "trusted")

    def __init__(self, client: str, scheme: str, networks: tuple[Any, ...]) -> None:
        self.client = client
        self.scheme = scheme
        self.trusted = is_trusted(client, networks)
        # add_forwarded's, for a peer that is not trusted (no chain of its own to extend).
        self.forwarded = [(b"x-forwarded-for", client.encode())] if client else []
        self.forwarded.append((b"x-forwarded-proto", scheme.encode()))
        self.host_value = b""
        self.host = ""


class _Exchange:
    """Mutable counters for one proxied exchange."""

    __slots__ = ("bytes_in", "bytes_out", "complete", "error", "hooked", "request_done", "routed", "started",
                 "status", "visitor_gone")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.started = False
        self.complete = False
        self.request_done = False  # the whole request body went to the agent, END included
        self.visitor_gone = False  # the visitor disconnected before the response was complete
        self.routed = False  # over a cluster link: a failure before the head is the caller's to answer
        self.error: str | None = None
        #: The request and tunnel for the before_response hooks (None: no plugin implements it).
        self.hooked: tuple[ForwardRequest, Tunnel] | None = None


class _Taskless(PlainExchange):
    """A bodyless request's exchange driven by its stream's events (``Stream.on_event``) and its
    connection's (``visitor_left``, ``writable``): no task, no ASGI messages. It keeps what
    ``EdgeApp.http`` does for the same request on the ASGI path: before_forward's refusals (and
    on_request_refused), 503 and 502 before the stream, the response timeout (504), a reset before
    the head (502) or after it (the connection is closed, never a truncated response marked
    complete), before_response's edits and refusals, the visitor leaving (RESET CANCEL), the
    response's backpressure (the stream is not read while the visitor's connection is paused, so
    its window holds the agent back), and ``_finish``'s bookkeeping with after_response (called at
    once when its implementations are plain functions, as the built-in ones are). A hook that
    returns something to await is awaited in a task (``pending``), from which the exchange goes on.

    Over a cluster link (``route``, an edge) a stream that fails before its response head is
    answered as ``EdgeApp._proxy_routed`` answers it (``EdgeApp._no_head``: the control node's 503,
    or 502 with the reason), or sent once more after a new lookup (RESET MOVED; the link lost under
    a GET, HEAD or OPTIONS), in a task: a lookup is a NATS request to await.
    """

    __slots__ = ("done", "edge", "head", "http_version", "pending", "request", "retried", "route", "started", "state",
                 "stream", "tunnel")

    def __init__(self, edge: EdgeApp, conn: Any, request: ForwardRequest, tunnel: Tunnel, keep_alive: bool,
                 route: RouteEntry | None = None) -> None:
        super().__init__(conn, request.method, keep_alive)
        self.edge = edge
        self.request = request
        self.tunnel = tunnel
        #: The cluster route the stream goes over (None: a tunnel of this node).
        self.route = route
        #: The REQUEST head sent over a cluster link (made by ``routed_head`` when first needed), the
        #: request's HTTP version (set when the stream opens), and whether it was sent again over a new route.
        self.head: p.RequestHead | None = None
        self.http_version = "1.1"
        self.retried = False
        self.started = time.time()
        self.state = _Exchange()
        self.state.request_done = True
        self.done = False
        self.stream: Stream | None = None
        #: A hook's awaitable being awaited (the stream's events wait until it is done).
        self.pending: asyncio.Task[None] | None = None

    def begin(self, stream: Stream) -> None:
        """The stream is open and its REQUEST and END queued: wait for the response."""
        self.stream = stream
        self.tunnel.stream_opened(False)  # back down in _finish
        stream.on_event = self._on_event
        self.edge._wait_head(self)

    def hold(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Go on in a task (a hook's awaitable), which a graceful stop waits for like uvicorn's own."""
        task = self.pending = asyncio.get_running_loop().create_task(coroutine)
        tasks = self.conn.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def answer(self, status: int, body: bytes | str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer without a stream (a refusal): nothing to finish after."""
        self.done = True
        self.pending = None
        self.respond(status, body, headers=headers)

    def refused(self, exc: Exception, hook: str) -> None:
        """A before_forward implementation refused the request (Reject) or failed (500)."""
        edge, tunnel = self.edge, self.tunnel
        if isinstance(exc, Reject):
            self.answer(exc.status, exc.body, headers=exc.headers)
            self.hold(edge.hooks.on_request_refused(self.request, tunnel, exc, edge.server))
        else:
            log.error("%s failed for %s; answering 500", hook, tunnel.alias, exc_info=exc)
            self.answer(500, PLUGIN_FAILED)

    def _on_event(self) -> None:
        """The stream changed (head, data, end, credit, reset): move the response on. Runs in the
        session's reader, which must not see an exception."""
        if self.done or self.pending is not None:
            return
        try:
            if self.state.started or self._head_came():
                self._pump()
            if self.out:  # a response still unfinished: what it wrote leaves at the turn's end
                self.hand_over()
        except Exception:
            log.exception("serving a request without a task failed; closing the visitor's connection")
            if not self.done:
                self.abort_response("")
                self._finish()

    def writable(self) -> None:
        """The visitor's connection takes data again: read on."""
        self._on_event()

    def _head_came(self) -> bool:
        """Before the response head is written: write it if it came (False: not yet, or the exchange
        ended instead, answered by a refusal or a 502 of a reset)."""
        stream = self.stream
        assert stream is not None
        head = stream.head
        if head is None:
            if stream.reset_error is not None:
                self._failed_before_head(stream.reset_error)
            return False  # credit: nothing to do before the head
        self.edge._heads_due.pop(self, None)
        assert isinstance(head, p.ResponseHead)
        self.state.status = head.status
        if not self.edge.hooks.has_before_response:
            return self._start(head.status, head.headers, hop_by_hop=True)  # stripped as it is written
        headers = strip_hop_by_hop(head.headers)
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        response = ForwardResponse(head.status, headers)
        try:
            pending = self.edge.hooks.before_response_now(response, self.request, self.tunnel, self.edge.server)
        except Exception as exc:
            self._response_refused(exc)
            return False
        if pending is not None:
            self.hold(self._edited_later(pending, response, lengths))
            return False
        return self._start(head.status, _kept_framing(response.headers, lengths, self.tunnel))

    async def _edited_later(self, pending: Awaitable[None], response: ForwardResponse, lengths: list[bytes]) -> None:
        """A before_response implementation returned something to await: the head waits for it."""
        try:
            await pending
        except Exception as exc:
            self.pending = None
            self._response_refused(exc)
            return
        self.pending = None
        if not self.done and self._start(response.status, _kept_framing(response.headers, lengths, self.tunnel)):
            self._on_event()

    def _start(self, status: int, headers: list[tuple[bytes, bytes]], hop_by_hop: bool = False) -> bool:
        """Write the response head (``hop_by_hop``: see ``start_response``); False when the exchange
        ended instead."""
        self.state.started = True
        if not self.start_response(status, headers, hop_by_hop):
            self._finish()
            return False
        return True

    def _pump(self) -> None:
        stream, state, flow = self.stream, self.state, self.conn.flow
        assert stream is not None
        while not flow.write_paused:  # write_paused's, without a property call per event
            data = stream.receive_nowait(COALESCE_BODY)
            if data is None:
                if stream.remote_ended:
                    # As on the ASGI path: the exchange is complete once the end is written.
                    state.complete = True
                    self.end_response()
                    self._finish()
                elif stream.reset_error is not None:
                    # Closing is the only honest end: a clean finish would tell the visitor a
                    # truncated body was complete (ResponseAborted on the ASGI path).
                    state.error = stream.reset_error.message
                    self.abort_response(state.error)
                    self._finish()
                return
            state.bytes_out += len(data)
            if not self.send_body(data):
                self._finish()
                return

    def _response_refused(self, exc: Exception) -> None:
        """before_response refused the response (Reject: its answer) or failed (500)."""
        if self.done:
            return
        state = self.state
        if isinstance(exc, Reject):
            state.status = exc.status
            self.respond(exc.status, exc.body, headers=exc.headers)
        else:
            log.error("before_response failed for %s; answering 500", self.tunnel.alias, exc_info=exc)
            state.status = 500
            self.respond(500, PLUGIN_FAILED)
        stream = self.stream
        assert stream is not None
        stream.on_event = None
        stream.reset(p.ResetCode.CANCEL, "the response was refused by a server plugin")
        self._finish()

    def _failed_before_head(self, error: StreamReset) -> None:
        route, stream, state = self.route, self.stream, self.state
        assert stream is not None
        headers: list[tuple[bytes, bytes]] = []
        if route is None:
            status, body = 502, _failed_before_head(error.message)
        else:
            answer = self.edge._no_head(error, stream, route, self.routed_head(), state, self.retried)
            if answer is None:
                self._reroute()
                return
            status, body, headers = answer
        state.error = error.message
        state.status = status
        self.respond(status, body, headers)
        self._finish()

    def routed_head(self) -> p.RequestHead:
        """The REQUEST head sent over the cluster link (``EdgeApp._open_plain`` sent its bytes
        without making it): what ``_no_head`` reads and a retry sends again."""
        head = self.head
        if head is None:
            request = self.request
            head = self.head = p.RequestHead(request.method, request.target, request.headers, request.client,
                                             request.scheme, self.http_version, has_body=False,
                                             tunnel=self.tunnel.name)
        return head

    def _reroute(self) -> None:
        """Send the request again over a route looked up anew (the old one is gone: its link ended,
        or RESET MOVED invalidated it); the lookup is awaited in a task."""
        stream = self.stream
        assert stream is not None
        self.edge._heads_due.pop(self, None)  # a new deadline comes with the new stream
        stream.on_event = None
        stream.close()
        self.retried = True
        self.hold(self._rerouted())

    async def _rerouted(self) -> None:
        """``_reroute``'s task: the lookup, then the new stream, or the visitor's answer."""
        edge, request, state, head = self.edge, self.request, self.state, self.routed_head()
        try:
            found: Any = await edge._find_route(request.alias, request.host)
        except Exception as exc:  # a bug: the visitor still gets an answer (no deadline is left to give one)
            log.exception("looking up %s again failed", request.alias)
            found = (502, _failed_before_head(repr(exc)), [])
        self.pending = None
        if self.done:
            return
        if isinstance(found, tuple):
            status, body, headers = found
        else:
            try:
                stream = _open(found.session, found, head)
            except SessionClosed as exc:
                status, body, headers = 502, _failed_before_head(str(exc)), []
            except Exception as exc:  # a bug, as above
                log.exception("sending %s again failed", request.alias)
                status, body, headers = 502, _failed_before_head(repr(exc)), []
            else:
                # As a retry on the ASGI path: the exchange starts over on the new stream (counted
                # once, under the tunnel of the first route).
                self.route, self.stream = found, stream
                state.error = None
                stream.send_end()
                stream.on_event = self._on_event
                edge._wait_head(self)
                return
        state.status = status
        self.respond(status, body, headers)
        self._finish()

    def _timed_out(self) -> None:
        if self.done or self.state.started:
            return
        stream, state = self.stream, self.state
        assert stream is not None
        stream.on_event = None  # the reset below is ours
        stream.reset(p.ResetCode.CANCEL, "response timeout")
        state.status = 504
        state.error = "response timeout"
        self.respond(504, _no_answer(self.edge.settings.response_timeout))
        self._finish()

    def visitor_left(self) -> None:
        """The visitor disconnected before the response was complete: reset the stream."""
        if self.done:
            return
        if self.pending is not None:
            self.pending.cancel()  # a hook's await: nobody is left to answer
            self.pending = None
        if self.stream is None:
            self.done = True  # before the stream (a hook's await): nothing was counted
            return
        state = self.state
        state.visitor_gone = True
        state.error = state.error or "visitor disconnected"
        self.stream.on_event = None
        self.stream.reset(p.ResetCode.CANCEL, "visitor disconnected")
        self._finish()

    def _finish(self) -> None:
        """``EdgeApp._finish`` for this exchange: release the stream, count it, tell after_response."""
        if self.done:
            return
        self.done = True
        stream, state, edge = self.stream, self.state, self.edge
        assert stream is not None
        edge._heads_due.pop(self, None)
        stream.on_event = None
        stream.close()
        self.tunnel.stream_finished(False, state.bytes_in, state.bytes_out)
        if edge.hooks.has_after_response:
            exchange = Exchange(self.request, self.tunnel, state.status, state.bytes_in, state.bytes_out,
                                self.started, time.time() - self.started, state.error)
            task = edge.hooks.after_response_soon(exchange, edge.server)
            if task is not None:
                # Counted with uvicorn's request tasks: a graceful stop waits for it as for them.
                tasks = self.conn.tasks
                tasks.add(task)
                task.add_done_callback(tasks.discard)


class _BeforeHead(Exception):
    """A stream over a cluster link failed before its response head (the caller answers or retries)."""

    def __init__(self, reset: StreamReset) -> None:
        super().__init__(reset.message)
        self.reset = reset


def _open(session: Session, route: RouteEntry | None, head: p.RequestHead) -> Stream:
    """Open a stream for ``head`` and queue its REQUEST; raises SessionClosed.

    Over a cluster link (``route``) the stream takes the far agent's windows and the REQUEST names
    the alias and tunnel session, which the control node checks before it relays the stream.
    """
    if route is None:
        stream = session.open_stream()
        payload = head.to_payload()
    else:
        stream = session.open_stream(window=route.stream_window, credit=route.peer_window)
        payload = head.to_payload()
        payload.update(route.head_extra)
    stream.websocket = head.websocket
    session.send_nowait(p.encode(p.FrameType.REQUEST, stream.id, payload))
    return stream


def _link_busy(route: RouteEntry) -> str | None:
    """Why a new stream over ``route``'s cluster link is refused with 503 (the per-tunnel limits are
    the control node's, which answers RESET REFUSED)."""
    if route.session.congested:
        return (f"The cluster link to node {route.node} is not keeping up ({route.session.queued} bytes "
                "waiting); retry shortly.\n")
    return None


def _failed_before_head(why: str) -> str:
    """The visitor's 502 answer for a stream that failed before its response head."""
    return f"The tunnel failed before a response: {why}\n"


def _no_answer(timeout: float) -> str:
    """The visitor's 504 answer when the local service sent no response head in ``timeout`` seconds."""
    return f"The local service did not answer within {timeout:g} s.\n"


def _sentence(text: str) -> str:
    """``text`` as a visitor's one-line answer: capitalised, ending in a full stop and a newline."""
    text = text.rstrip().rstrip(".")
    return f"{text[:1].upper()}{text[1:]}.\n"


def _report_pump_failure(task: asyncio.Task[None]) -> None:
    """Log a request pump that died of a bug (it handles every expected error itself)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("request body pump failed: %r", error, exc_info=error)


def _not_active(host: str) -> str:
    safe = html.escape(host or "(no Host header)")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Tunnel Not Active</title></head>"
        f"<body><h1>Tunnel Not Active</h1><p>No tunnel is connected for <b>{safe}</b>.</p>"
        "<p>If this is your tunnel, start the agent again: <code>comzy PORT</code>.</p></body></html>\n"
    )
