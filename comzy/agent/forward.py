"""The agent's side of a stream: call the local service and stream the answer back."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from comzy.agent.capture import TUNNEL_NAME
from comzy.agent.local_http import ConnectFailed, LocalClient, LocalError, MalformedResponse, StaleConnection
from comzy.core import protocol as p
from comzy.core.logs import RateLimitedLog
from comzy.core.session import SessionClosed
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, WebSocketError, client_handshake

if TYPE_CHECKING:
    from comzy.agent.capture import Capture, Exchange

log = logging.getLogger("comzy.agent")


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

    async def serve(self, stream: Stream, head: p.RequestHead) -> None:
        """Serve one stream to the end; never raises (errors become 502 or RESET)."""
        started = time.monotonic()
        served = Served(head.method, head.target.decode("latin-1"), 0, 0.0, head.websocket)
        exchange: Exchange | None = None
        try:
            headers = self._headers(head) if head.websocket else self._http_headers(head)
            if self.capture is not None:
                exchange = self.capture.begin(head.method, head.target, headers, head.client,
                                              "websocket" if head.websocket else "http", tunnel_name=self.name)
                exchange.request_complete = head.websocket or not head.has_body
            if head.websocket:
                await self._websocket(stream, head, served, exchange)
            else:
                await self._http(stream, head, served, headers, exchange)
        except (StreamReset, SessionClosed) as exc:
            served.error = served.error or str(exc)
        except Exception as exc:  # a bug must not take the agent down with it
            log.exception("failed to serve %s %s", head.method, served.target)
            served.error = repr(exc)
            stream.reset(p.ResetCode.INTERNAL, "agent error")
        finally:
            stream.close()
            served.duration = time.monotonic() - started
            if exchange is not None:
                exchange.finish(served.error)
            if self.on_served is not None:
                self.on_served(served)

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
            lower = name.lower()
            if lower == b"host":
                host = True
            elif lower == b"content-length":
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
                    headers: list[tuple[bytes, bytes]], exchange: Exchange | None) -> None:
        async def body() -> AsyncIterator[bytes]:
            while (chunk := await stream.receive()) is not None:
                if exchange is not None:
                    exchange.request_data(chunk[0])
                yield chunk[0]
            if exchange is not None:
                exchange.request_complete = True

        for attempt in (1, 2):
            try:
                response = await self.local.request(head.method, head.target, headers,
                                                    body() if head.has_body else None)
                break
            except ConnectFailed as exc:
                return await self._fail(stream, served, exchange, f"could not connect to {self.address} ({exc}). "
                                        f"Is anything listening on {self.address}?")
            except StaleConnection:
                if attempt == 2:
                    return await self._fail(stream, served, exchange, f"{self.address} closed the connection "
                                            "without answering")
                # The pooled connection was closed under us; a fresh one will do.
            except MalformedResponse as exc:
                return await self._fail(stream, served, exchange, self._malformed(exc))
            except LocalError as exc:
                return await self._fail(stream, served, exchange, f"{self.address} failed: {exc}")
        served.status = response.status
        if exchange is not None:
            exchange.response(response.status, response.headers)
        clean = False
        try:
            # Heads wait like DATA while the link is backed up: the agent's queue never grows past
            # the high-water mark, so it never reaches the send budget and pauses its reader.
            await stream.session.send(p.encode(
                p.FrameType.RESPONSE, stream.id, p.ResponseHead(response.status, response.headers).to_payload()))
            whole = response.whole_body()
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
                await self.local.release(response.connection)
            else:
                await self.local.discard(response.connection)
        stream.send_end()
        if not stream.finished:
            # Wait for the edge's END (the request body may still be flowing) so the
            # stream closes cleanly rather than with a RESET.
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
