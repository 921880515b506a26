"""The agent's side of a stream: call the local service and stream the answer back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from comzy.agent.capture import TUNNEL_NAME
from comzy.agent.local_http import (
    ConnectFailed,
    LocalClient,
    LocalError,
    LocalResponse,
    MalformedResponse,
    StaleConnection,
)
from comzy.core import protocol as p
from comzy.core.logs import RateLimitedLog
from comzy.core.session import WRITE_HIGH_WATER, SessionClosed
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, WebSocketError, client_handshake

if TYPE_CHECKING:
    from comzy.agent.capture import Capture, Exchange
    from comzy.agent.local_http import _Connection

log = logging.getLogger("comzy.agent")

#: How long a response head that came alone from the local app waits for the first bytes of its
#: small Content-Length body, so that both reach the server in one link message (and one NATS
#: message in a cluster) rather than two. nginx writes its head and a file's bytes apart
#: (sendfile); at 1 connection the agent read the head alone in 15% of the bench's requests, the
#: body following within tens of microseconds.
HOLD_HEAD = 0.002


@dataclass(slots=True)
class Served:
    """What the agent prints for one request."""

    method: str
    target: str
    status: int
    duration: float
    websocket: bool = False
    error: str | None = None
    #: The tunnel's name when the agent serves several (``comzy 3000 8080``): the line names it.
    tunnel: str | None = None


class Serving:
    """What one session is serving: a task per stream served by a task, and the requests served
    from callbacks (``LocalForwarder.start``). ``stop`` ends them all when the session ends."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        #: Requests waiting, without a task, on a pooled connection for their answer (its head, or
        #: the rest of a small body).
        self.waiting: set[_Call] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a plain asyncio task, cancelled by ``stop``. Not anyio's
        TaskGroup.start_soon: that cost about a tenth of the agent's CPU per request (py-spy), and
        the work never raises, so a group's error handling buys nothing."""
        task = self._loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        """End whatever is still being served (the session is over)."""
        for call in list(self.waiting):
            call.abandon("the tunnel session ended")
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(self.tasks)


class _Call:
    """One stream being served: what its terminal line and the inspector need, however it is served.

    A request without a body is written from the REQUEST callback to a pooled connection, and
    this object hears the response head from that connection's read callback (it is the
    connection's HeadListener): a response that came whole with its head, or whose Content-Length
    body follows it (then this object is its BodyListener), and that fits the stream's credit goes
    back from there, with no task at all. Anything else (a larger body, chunked or until close, no
    credit, a link backed up, a stale connection or an error) goes on in a task from the point
    reached, by the same code as a request served by a task from the start.
    """

    __slots__ = ("connection", "exchange", "forwarder", "head", "headers", "held", "served", "serving", "started",
                 "stream", "task")

    def __init__(self, forwarder: LocalForwarder, stream: Stream, head: p.RequestHead, serving: Serving | None) -> None:
        self.forwarder = forwarder
        self.stream = stream
        self.head = head
        self.served = Served(head.method, head.target.decode("latin-1"), 0, 0.0, head.websocket)
        self.exchange: Exchange | None = None
        self.started = time.monotonic()
        self.serving = serving
        self.headers: list[tuple[bytes, bytes]] = []
        #: The pooled connection the request was written to, while its answer is awaited.
        self.connection: _Connection | None = None
        #: The task serving the stream (``run`` in a task of ``serving``), cancelled if the stream is reset.
        self.task: asyncio.Task[Any] | None = None
        #: A response head that came alone, held for the body's first bytes: status, fields, the timer.
        self.held: tuple[int, list[tuple[bytes, bytes]], asyncio.TimerHandle] | None = None

    def done(self) -> None:
        """The stream was served (or failed): release it, and report."""
        self.stream.close()
        served = self.served
        served.duration = time.monotonic() - self.started
        if self.exchange is not None:
            self.exchange.finish(served.error)
        on_served = self.forwarder.on_served
        if on_served is not None:
            on_served(served)

    async def run(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (the rest of serving this stream) to the end; never raises (errors become
        502 or RESET); in a task of ``serving``, it is cancelled should the stream be reset meanwhile."""
        served, stream = self.served, self.stream
        if self.serving is not None and not self.head.websocket:  # (a WebSocket's reset follows its close)
            task = self.task = asyncio.current_task()
            stream.on_event = self._reset_while_running
            if stream.reset_error is not None and task is not None:
                # Reset before this task began: the work stops at its first wait, its own cleanup
                # (closing the local connection it holds) run, as when the reset comes later.
                served.error = served.error or str(stream.reset_error)
                task.cancel()
        try:
            await work
        except (StreamReset, SessionClosed) as exc:
            served.error = served.error or str(exc)
        except Exception as exc:  # a bug must not take the agent down with it
            log.exception("failed to serve %s %s", served.method, served.target)
            served.error = repr(exc)
            stream.reset(p.ResetCode.INTERNAL, "agent error")
        finally:
            stream.on_event = None
            self.done()

    def _reset_while_running(self) -> None:
        """``Stream.on_event`` while a task serves the stream: once the server resets it (its visitor
        left, a response timeout) or the session ends, the task is cancelled, so the local connection
        it holds is closed now (the local app sees its client leave) rather than when the app next
        writes: a head, or an event stream's next event, may be long in coming. A reset the task
        made itself is its own to finish."""
        reset, task = self.stream.reset_error, self.task
        if reset is not None and task is not None and task is not asyncio.current_task():
            self.stream.on_event = None
            self.served.error = self.served.error or str(reset)
            task.cancel()

    def _go_on(self, work: Coroutine[Any, Any, None]) -> None:
        assert self.serving is not None
        self.serving.spawn(self.run(work))

    # -- served from callbacks: the pooled connection's (HeadListener) and the stream's ---------
    def head_read(self, status: int, headers: list[tuple[bytes, bytes]], conn: _Connection) -> None:
        """The response head (and what came with it) is here: send it all back if it can go now;
        else the body goes on from the connection's callbacks, or in a task."""
        stream, exchange, forwarder = self.stream, self.exchange, self.forwarder
        stream.on_event = None  # _stop_waiting's work, here in line: this runs for every request
        self.connection = None
        assert self.serving is not None
        self.serving.waiting.discard(self)
        answered = False  # the whole answer and its END were queued
        try:
            self.served.status = status
            if exchange is not None:
                exchange.response(status, headers)
            whole = conn.whole_body()
            if stream.session.queued > WRITE_HIGH_WATER:
                pass  # heads wait like DATA while the link is backed up: in a task, below
            elif whole is not None:
                # The whole answer came with its head (most small ones): RESPONSE, DATA and END go
                # in one piece, one link message.
                if stream.send_answer_nowait(status, headers, whole):
                    if exchange is not None and whole:
                        exchange.response_data(whole)
                    answered = True
                elif len(whole) <= stream.credit:  # a body too large to copy behind its head
                    self._send_head(status, headers)
                    if whole:
                        if exchange is not None:
                            exchange.response_data(whole)
                        stream.send_data_nowait(whole)
                    stream.send_end()
                    answered = True
                if answered:
                    forwarder.local.release_nowait(conn)
            elif 0 < conn.counted_body_left() <= stream.credit:
                # The rest of a small Content-Length body is still to come (a local app that wrote
                # its head and its body apart, as nginx does with sendfile): it goes on as it is
                # read, within the credit. A head that came alone waits for the body's first bytes,
                # HOLD_HEAD at most, so that they reach the server in one message.
                first = conn.take_parsed_body()
                if first:
                    self._send_head(status, headers)
                    if exchange is not None:
                        exchange.response_data(first)
                    stream.send_data_nowait(first)
                else:
                    self.held = (status, headers,
                                 asyncio.get_running_loop().call_later(HOLD_HEAD, self._head_held_long))
                self._wait_on(conn)
                conn.stream_body(self)
                return
            if not answered:
                # A body to read, no credit for it yet, or a link backed up: a task goes on from
                # here, as a request served by a task from the start would.
                self._go_on(forwarder._respond(stream, self.served, LocalResponse(status, headers, conn), exchange,
                                               whole))
                return
        except Exception as exc:  # a bug must not take the agent down with it
            served = self.served
            log.exception("failed to serve %s %s", served.method, served.target)
            conn.close()
            self._drop_held()
            served.error = repr(exc)
            stream.reset(p.ResetCode.INTERNAL, "agent error")
            self._done_here()
            return
        # _answered() and _done_here() in line: this runs for every request answered at once.
        forwarder.answered_without_task += 1
        if not stream.finished:
            self._go_on(forwarder._await_end(stream))
            return
        try:
            self.done()
        except Exception:
            log.exception("failed to report %s %s", self.served.method, self.served.target)

    def _send_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream.session.send_nowait(p.encode(p.FrameType.RESPONSE, self.stream.id,
                                                 p.ResponseHead(status, headers).to_payload()))

    def _send_held(self) -> None:
        """Send the head held for the body's first bytes (they are here, or the wait is over)."""
        held = self.held
        if held is not None:
            self.held = None
            status, headers, timer = held
            timer.cancel()
            self._send_head(status, headers)

    def _head_held_long(self) -> None:
        """The body did not follow its head within HOLD_HEAD: the head goes alone (a local app
        that flushes its head early has its reasons: the visitor sees it as before)."""
        try:
            self._send_held()
        except Exception:  # a loop callback must not raise; _send_head never should
            log.exception("failed to serve %s %s", self.served.method, self.served.target)

    def _drop_held(self) -> None:
        """Forget the held head (the stream is gone: nobody waits for it)."""
        if self.held is not None:
            self.held[2].cancel()
            self.held = None

    def head_failed(self, error: LocalError) -> None:
        """No response head on the pooled connection: retried on a fresh one, or a 502, by a task."""
        self._stop_waiting()
        forwarder = self.forwarder
        if isinstance(error, StaleConnection):
            # Closed by the local app while it was idle: one more try, on a fresh connection.
            self._go_on(forwarder._http(self.stream, self.head, self.served, self.headers, self.exchange, (2,)))
        else:
            self._go_on(forwarder._fail(self.stream, self.served, self.exchange, forwarder._failure(error)))

    def body_data(self, data: bytes) -> None:
        """The next piece of a body streamed from the connection's callbacks (within the credit)."""
        if self.held is not None:
            self._send_held()
        if self.exchange is not None:
            self.exchange.response_data(data)
        if not self.stream.send_data_nowait(data):  # never: the credit was checked for the whole body
            self.stream.reset(p.ResetCode.INTERNAL, "agent error")  # stream_event abandons the call

    def body_done(self) -> None:
        """The body streamed from callbacks is complete."""
        conn = self.connection
        self._stop_waiting()
        if conn is not None:
            self.forwarder.local.release_nowait(conn)
        self._end()

    def body_failed(self, error: LocalError) -> None:
        """The local connection ended in the middle of a body streamed from callbacks."""
        self._stop_waiting()
        self._send_held()  # as when the head went at once: the visitor sees it, then the abort
        served = self.served
        served.error = f"local service failed mid-response: {error}"
        self.stream.reset(p.ResetCode.LOCAL_FAILED, served.error)
        self._done_here()

    def _end(self) -> None:
        """The whole answer was queued: END, and report (or wait for the edge's END in a task)."""
        self.stream.send_end()
        self._answered()

    def _answered(self) -> None:
        """The whole answer and its END were queued: report (or wait for the edge's END in a task)."""
        stream = self.stream
        self.forwarder.answered_without_task += 1
        if not stream.finished:
            self._go_on(self.forwarder._await_end(stream))
            return
        self._done_here()

    def _wait_on(self, conn: _Connection) -> None:
        """Wait, without a task, for ``conn``'s answer: a reset stream or the session's end ends
        the wait (``stream_event``, ``Serving.stop``)."""
        assert self.serving is not None
        self.connection = conn
        self.serving.waiting.add(self)
        self.stream.on_event = self.stream_event

    def stream_event(self) -> None:
        """The stream changed while the answer is awaited (``Stream.on_event``): once it is reset
        (the server gave up on it: its visitor left, or the session ended), the answer would go
        nowhere, so the local connection is closed at once rather than when the answer comes."""
        reset = self.stream.reset_error
        if reset is not None:
            self.abandon(str(reset))

    def abandon(self, why: str) -> None:
        """Stop waiting for the answer: close the local connection (never reused) and report."""
        conn = self.connection
        self._stop_waiting()
        self._drop_held()
        if conn is not None:
            conn.abandon()
        self.served.error = why
        self._done_here()

    def _stop_waiting(self) -> None:
        self.stream.on_event = None
        self.connection = None
        assert self.serving is not None
        self.serving.waiting.discard(self)

    def _done_here(self) -> None:
        """``done`` from a loop callback (the connection's or the session reader's), which must not raise."""
        try:
            self.done()
        except Exception:
            log.exception("failed to report %s %s", self.served.method, self.served.target)


class LocalForwarder:
    """Sends streams to ``http://<host>:<port>`` and proxies WebSockets to it."""

    def __init__(self, host: str, port: int, rewrite_host: bool = False,
                 max_ws_message: int = 16 * 1024 * 1024,
                 on_served: Callable[[Served], None] | None = None, capture: Capture | None = None,
                 name: str = TUNNEL_NAME) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.rewrite_host = rewrite_host
        self.max_ws_message = max_ws_message
        self.on_served = on_served
        #: The inspector's store (``--inspect``): each exchange's heads and first bytes are copied
        #: there as they pass. None: nothing is copied, the hot path pays one test per chunk.
        self.capture = capture
        #: The tunnel's name, recorded with each captured exchange: several tunnels share one
        #: capture, and a replay goes to the local service of the tunnel it came through.
        self.name = name
        if capture is not None:
            # A replay with edited headers follows this tunnel's Host rule.
            capture.host_rules[name] = self.host_rule
        self.local = LocalClient(host, port)
        #: Requests answered from the local connection's callbacks, without a task (``start``):
        #: tests and benchmarks read it to tell which path served them.
        self.answered_without_task = 0
        # A local app that keeps sending malformed responses gets one log line per minute.
        self._log_malformed = RateLimitedLog(log, interval=60.0)

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self.local.aclose()

    def _headers(self, head: p.RequestHead) -> list[tuple[bytes, bytes]]:
        if not self.rewrite_host:
            return head.headers
        local = self.address.encode()
        return [(n, local if n.lower() == b"host" else v) for n, v in head.headers]

    def start(self, stream: Stream, head: p.RequestHead, serving: Serving) -> None:
        """Serve one stream (called from the REQUEST callback): a request without a body goes to
        an idle pooled connection at once and is answered from its callbacks (see ``_Call``);
        anything else is served by a task of ``serving``, as ``serve`` does."""
        call = _Call(self, stream, head, serving)
        if not head.has_body and not head.websocket:
            headers = self._http_headers(head)
            conn = self.local.request_nowait(head.method, head.target, headers, call)
            if conn is not None:
                call.headers = headers
                if self.capture is not None:
                    call.exchange = self.capture.begin(head.method, head.target, headers, head.client, "http",
                                                       tunnel_name=self.name, request_complete=True)
                call._wait_on(conn)
                return
        serving.spawn(call.run(self._begin(call)))

    async def serve(self, stream: Stream, head: p.RequestHead) -> None:
        """Serve one stream to the end; never raises (errors become 502 or RESET)."""
        call = _Call(self, stream, head, None)
        await call.run(self._begin(call))

    async def _begin(self, call: _Call) -> None:
        stream, head = call.stream, call.head
        headers = self._headers(head) if head.websocket else self._http_headers(head)
        exchange = None
        if self.capture is not None:
            exchange = call.exchange = self.capture.begin(head.method, head.target, headers, head.client,
                                                          "websocket" if head.websocket else "http",
                                                          tunnel_name=self.name,
                                                          request_complete=head.websocket or not head.has_body)
        if head.websocket:
            await self._websocket(stream, head, call.served, exchange)
        else:
            await self._http(stream, head, call.served, headers, exchange)

    def host_rule(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` with the Host rule applied: Host rewritten to the local address with
        ``--host-header rewrite``, and the local address when there is none."""
        local = self.address.encode()
        if self.rewrite_host:
            headers = [(n, local if n.lower() == b"host" else v) for n, v in headers]
        if not any(n.lower() == b"host" for n, _ in headers):
            headers = [(b"host", local), *headers]
        return headers

    # -- HTTP ----------------------------------------------------------------------
    def _http_headers(self, head: p.RequestHead) -> list[tuple[bytes, bytes]]:
        """The request's headers as they go to the local service."""
        headers = head.headers
        # One walk over the names for both questions, not a generator walk for each (1.35 ->
        # 0.5 us in process for a GET's four fields).
        host = length = False
        for name, _ in headers:
            size = len(name)  # most fields are neither: told without lowering the name
            if size == 4 and name.lower() == b"host":
                host = True
            elif size == 14 and name.lower() == b"content-length":
                length = True
        if host and self.rewrite_host:
            headers = self._headers(head)
        if head.has_body and not length:
            # The edge removed the visitor's (hop-by-hop) chunked framing; re-frame the body.
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        if not host:
            headers = [(b"host", self.address.encode()), *headers]
        return headers

    async def _http(self, stream: Stream, head: p.RequestHead, served: Served,
                    headers: list[tuple[bytes, bytes]], exchange: Exchange | None,
                    attempts: tuple[int, ...] = (1, 2)) -> None:
        async def body() -> AsyncIterator[bytes]:
            while (chunk := await stream.receive()) is not None:
                if exchange is not None:
                    exchange.request_data(chunk[0])
                yield chunk[0]
            if exchange is not None:
                exchange.request_complete = True

        for attempt in attempts:
            try:
                response = await self.local.request(head.method, head.target, headers,
                                                    body() if head.has_body else None)
                break
            except StaleConnection:
                if attempt == 2:
                    return await self._fail(stream, served, exchange, f"{self.address} closed the connection "
                                            "without answering")
                # The pooled connection was closed under us; a fresh one will do.
            except LocalError as exc:
                return await self._fail(stream, served, exchange, self._failure(exc))
        served.status = response.status
        if exchange is not None:
            exchange.response(response.status, response.headers)
        await self._respond(stream, served, response, exchange, response.whole_body())

    def _failure(self, exc: LocalError) -> str:
        """What the visitor's 502 says when no response head came from the local service."""
        if isinstance(exc, ConnectFailed):
            return f"could not connect to {self.address} ({exc}). Is anything listening on {self.address}?"
        if isinstance(exc, MalformedResponse):
            return self._malformed(exc)
        return f"{self.address} failed: {exc}"

    async def _respond(self, stream: Stream, served: Served, response: LocalResponse, exchange: Exchange | None,
                       whole: bytes | None) -> None:
        """Send the response whose head was read: ``whole``, its body when it came with the head
        (``LocalResponse.whole_body``), else read as it arrives."""
        clean = False
        try:
            # Heads wait like DATA while the link is backed up: the agent's queue never grows past
            # the high-water mark, so it never reaches the send budget and pauses its reader.
            await stream.session.send(p.encode(
                p.FrameType.RESPONSE, stream.id, p.ResponseHead(response.status, response.headers).to_payload()))
            if whole is not None:  # a small response, read with its head: no async generator
                if whole:
                    if exchange is not None:
                        exchange.response_data(whole)
                    await stream.send_data(whole)
            else:
                async for chunk in response.body():
                    if exchange is not None:
                        exchange.response_data(chunk)
                    await stream.send_data(chunk)
            clean = True
        except LocalError as exc:
            if isinstance(exc, MalformedResponse):
                self._malformed(exc)
            served.error = f"local service failed mid-response: {exc}"
            stream.reset(p.ResetCode.LOCAL_FAILED, served.error)
            return
        finally:
            if clean:
                self.local.release_nowait(response.connection)
            else:
                response.connection.close()
        stream.send_end()
        if not stream.finished:
            await self._await_end(stream)

    async def _await_end(self, stream: Stream) -> None:
        """Wait for the edge's END (the request body may still be flowing) so the stream closes
        cleanly rather than with a RESET."""
        with anyio.move_on_after(5):
            while await stream.receive() is not None:
                pass

    def _malformed(self, exc: MalformedResponse) -> str:
        """Log (rate-limited) a malformed response from the local service; the message for the visitor."""
        message = (f"the local service at {self.address} sent a malformed response: {exc.what}; "
                   "the connection to it was closed")
        self._log_malformed("%s", message)
        return message

    async def _fail(self, stream: Stream, served: Served, exchange: Exchange | None, message: str) -> None:
        served.status = 502
        served.error = message
        body = f"Comzy agent: {message}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if exchange is not None:
            exchange.response(502, headers)
            exchange.response_data(body)
        await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(502, headers).to_payload()))
        await stream.send_data(body)
        stream.send_end()

    # -- WebSocket -------------------------------------------------------------------
    async def _websocket(self, stream: Stream, head: p.RequestHead, served: Served, exchange: Exchange | None) -> None:
        host = self.address
        extra = []
        for name, value in head.headers:
            if name.lower() == b"host":
                if not self.rewrite_host:
                    host = value.decode("latin-1")
            else:
                extra.append((name, value))
        try:
            tcp = await anyio.connect_tcp(self.host, self.port)
        except OSError as exc:
            return await self._fail(stream, served, exchange, f"could not connect to {self.address} "
                                    f"({exc.strerror or exc}). Is anything listening on {self.address}?")
        try:
            ws, accept = await client_handshake(tcp, host, head.target.decode("latin-1"), self.max_ws_message,
                                                extra, head.subprotocols)
        except HandshakeRejected as exc:
            await tcp.aclose()
            served.status = exc.status
            if exchange is not None:
                exchange.response(exc.status, exc.headers)
                exchange.response_data(exc.body or b"")
            await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id,
                                               p.ResponseHead(exc.status, exc.headers).to_payload()))
            if exc.body:
                await stream.send_data(exc.body)
            stream.send_end()
            return
        except (WebSocketError, OSError) as exc:
            await tcp.aclose()
            return await self._fail(stream, served, exchange, f"WebSocket handshake with {self.address} failed: {exc}")
        served.status = 101
        if exchange is not None:
            exchange.response(101, list(accept.extra_headers))
        try:
            await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
                101, list(accept.extra_headers), accept.subprotocol).to_payload()))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ws_to_local, stream, ws, tg.cancel_scope, exchange)
                await self._ws_to_edge(stream, ws, exchange)
                tg.cancel_scope.cancel()
        finally:
            await ws.aclose()

    async def _ws_to_edge(self, stream: Stream, ws: WebSocket, exchange: Exchange | None) -> None:
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                if exchange is not None:
                    exchange.ws_close("out", message.code, message.reason)
                stream.session.send_nowait(p.encode(p.FrameType.WS_CLOSE, stream.id,
                                                    {"code": message.code, "reason": message.reason}))
                stream.send_end()
                return
            data = message.encode() if isinstance(message, str) else message
            if exchange is not None:  # a copy of its first bytes, and its bytes to the raw body's cap
                exchange.ws_message("out", isinstance(message, str), data)
            await stream.send_data(data, p.FLAG_TEXT | p.FLAG_FIN if isinstance(message, str) else p.FLAG_FIN)

    async def _ws_to_local(self, stream: Stream, ws: WebSocket, scope: anyio.CancelScope,
                           exchange: Exchange | None) -> None:
        try:
            while (message := await stream.receive_message()) is not None:
                if exchange is not None:
                    exchange.ws_message("in", isinstance(message, str),
                                        message.encode() if isinstance(message, str) else message)
                await ws.send(message)
            code, reason = stream.ws_close or (1000, "")
            if exchange is not None:
                exchange.ws_close("in", code, reason)
            await ws.close(p.sendable_close_code(code), reason)
            scope.cancel()
        except WebSocketError:
            return
