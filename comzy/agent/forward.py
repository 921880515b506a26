"""The agent's side of a stream: call the local service and stream the answer back."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio

from comzy.agent.local_http import ConnectFailed, LocalClient, LocalError, MalformedResponse, StaleConnection
from comzy.core import protocol as p
from comzy.core.logs import RateLimitedLog
from comzy.core.session import SessionClosed
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, WebSocketError, client_handshake

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


class LocalForwarder:
    """Sends streams to ``http://<host>:<port>`` and proxies WebSockets to it."""

    def __init__(self, host: str, port: int, rewrite_host: bool = False,
                 max_ws_message: int = 16 * 1024 * 1024,
                 on_served: Callable[[Served], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.rewrite_host = rewrite_host
        self.max_ws_message = max_ws_message
        self.on_served = on_served
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
        try:
            if head.websocket:
                await self._websocket(stream, head, served)
            else:
                await self._http(stream, head, served)
        except (StreamReset, SessionClosed) as exc:
            served.error = served.error or str(exc)
        except Exception as exc:  # a bug must not take the agent down with it
            log.exception("failed to serve %s %s", head.method, served.target)
            served.error = repr(exc)
            stream.reset(p.ResetCode.INTERNAL, "agent error")
        finally:
            stream.close()
            served.duration = time.monotonic() - started
            if self.on_served is not None:
                self.on_served(served)

    # -- HTTP ----------------------------------------------------------------------
    async def _http(self, stream: Stream, head: p.RequestHead, served: Served) -> None:
        headers = self._headers(head)
        if head.has_body and not any(n.lower() == b"content-length" for n, _ in headers):
            # The edge removed the visitor's (hop-by-hop) chunked framing; re-frame the body.
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        if not any(n.lower() == b"host" for n, _ in headers):
            headers = [(b"host", self.address.encode()), *headers]

        async def body() -> AsyncIterator[bytes]:
            while (chunk := await stream.receive()) is not None:
                yield chunk[0]

        for attempt in (1, 2):
            try:
                response = await self.local.request(head.method, head.target, headers,
                                                    body() if head.has_body else None)
                break
            except ConnectFailed as exc:
                return await self._fail(stream, served, f"could not connect to {self.address} ({exc}). "
                                        f"Is anything listening on {self.address}?")
            except StaleConnection:
                if attempt == 2:
                    return await self._fail(stream, served, f"{self.address} closed the connection "
                                            "without answering")
                # The pooled connection was closed under us; a fresh one will do.
            except MalformedResponse as exc:
                return await self._fail(stream, served, self._malformed(exc))
            except LocalError as exc:
                return await self._fail(stream, served, f"{self.address} failed: {exc}")
        served.status = response.status
        clean = False
        try:
            # Heads wait like DATA while the link is backed up: the agent's queue never grows past
            # the high-water mark, so it never reaches the send budget and pauses its reader.
            await stream.session.send(p.encode(
                p.FrameType.RESPONSE, stream.id, p.ResponseHead(response.status, response.headers).to_payload()))
            async for chunk in response.body():
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

    async def _fail(self, stream: Stream, served: Served, message: str) -> None:
        served.status = 502
        served.error = message
        body = f"Comzy agent: {message}\n".encode()
        await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
            502, [(b"content-type", b"text/plain; charset=utf-8"),
                  (b"content-length", str(len(body)).encode())]).to_payload()))
        await stream.send_data(body)
        stream.send_end()

    # -- WebSocket -------------------------------------------------------------------
    async def _websocket(self, stream: Stream, head: p.RequestHead, served: Served) -> None:
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
            return await self._fail(stream, served, f"could not connect to {self.address} ({exc.strerror or exc}). "
                                    f"Is anything listening on {self.address}?")
        try:
            ws, accept = await client_handshake(tcp, host, head.target.decode("latin-1"), self.max_ws_message,
                                                extra, head.subprotocols)
        except HandshakeRejected as exc:
            await tcp.aclose()
            served.status = exc.status
            await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id,
                                               p.ResponseHead(exc.status, exc.headers).to_payload()))
            if exc.body:
                await stream.send_data(exc.body)
            stream.send_end()
            return
        except (WebSocketError, OSError) as exc:
            await tcp.aclose()
            return await self._fail(stream, served, f"WebSocket handshake with {self.address} failed: {exc}")
        served.status = 101
        try:
            await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
                101, list(accept.extra_headers), accept.subprotocol).to_payload()))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ws_to_local, stream, ws, tg.cancel_scope)
                await self._ws_to_edge(stream, ws)
                tg.cancel_scope.cancel()
        finally:
            await ws.aclose()

    async def _ws_to_edge(self, stream: Stream, ws: WebSocket) -> None:
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                stream.session.send_nowait(p.encode(p.FrameType.WS_CLOSE, stream.id,
                                                    {"code": message.code, "reason": message.reason}))
                stream.send_end()
                return
            if isinstance(message, str):
                await stream.send_data(message.encode(), p.FLAG_TEXT | p.FLAG_FIN)
            else:
                await stream.send_data(message, p.FLAG_FIN)

    async def _ws_to_local(self, stream: Stream, ws: WebSocket, scope: anyio.CancelScope) -> None:
        try:
            while (message := await stream.receive_message()) is not None:
                await ws.send(message)
            code, reason = stream.ws_close or (1000, "")
            await ws.close(p.sendable_close_code(code), reason)
            scope.cancel()
        except WebSocketError:
            return
