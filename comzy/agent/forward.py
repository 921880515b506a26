"""The agent's side of a stream: call the local service and stream the answer back."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import httpx

from comzy.core import protocol as p
from comzy.core.session import SessionClosed, Stream, StreamReset
from comzy.core.websocket import Closed, HandshakeRejected, WebSocket, WebSocketError, client_handshake

log = logging.getLogger("comzy.agent")

#: Errors that mean "the pooled keep-alive connection was already dead": safe to retry
#: once when no request body byte has been consumed.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


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
        # Idle connections are dropped after 2 s: well before Node's 5 s keep-alive
        # timeout, so we rarely reuse a connection the local app is about to close.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10.0, read=None, write=None, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self.client.aclose()

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
        consumed = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal consumed
            while (chunk := await stream.receive()) is not None:
                consumed = True
                yield chunk[0]

        url = httpx.URL(scheme="http", host=self.host, port=self.port)
        for attempt in (1, 2):
            request = httpx.Request(head.method, url, headers=self._headers(head),
                                    content=body() if head.has_body else None,
                                    extensions={"target": head.target})
            try:
                response = await self.client.send(request, stream=True)
                break
            except httpx.ConnectError as exc:
                return await self._fail(stream, served, f"could not connect to {self.address} ({_why(exc)}). "
                                        f"Is anything listening on {self.address}?")
            except httpx.ConnectTimeout:
                return await self._fail(stream, served, f"connecting to {self.address} timed out. "
                                        f"Is the service on {self.address} overloaded?")
            except _STALE as exc:
                if attempt == 1 and not consumed:
                    continue  # the pooled connection was closed under us; a fresh one will do
                return await self._fail(stream, served, f"{self.address} closed the connection without "
                                        f"answering ({_why(exc)})")
        try:
            served.status = response.status_code
            stream.session.send_nowait(p.encode(
                p.FrameType.RESPONSE, stream.id,
                p.ResponseHead(response.status_code, list(response.headers.raw)).to_payload()))
            try:
                async for chunk in response.aiter_raw():
                    await stream.send_data(chunk)
            except httpx.HTTPError as exc:
                served.error = f"local service failed mid-response: {_why(exc)}"
                stream.reset(p.ResetCode.LOCAL_FAILED, served.error)
                return
            stream.send_end()
            if not stream.finished:
                # Wait for the edge's END (the request body may still be flowing) so the
                # stream closes cleanly rather than with a RESET.
                with anyio.move_on_after(5):
                    while await stream.receive() is not None:
                        pass
        finally:
            await response.aclose()

    async def _fail(self, stream: Stream, served: Served, message: str) -> None:
        served.status = 502
        served.error = message
        body = f"Comzy agent: {message}\n".encode()
        stream.session.send_nowait(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
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
            stream.session.send_nowait(p.encode(p.FrameType.RESPONSE, stream.id,
                                                p.ResponseHead(exc.status, exc.headers).to_payload()))
            if exc.body:
                await stream.send_data(exc.body)
            stream.send_end()
            return
        except (WebSocketError, OSError) as exc:
            await tcp.aclose()
            return await self._fail(stream, served, f"WebSocket handshake with {self.address} failed: {exc}")
        served.status = 101
        stream.session.send_nowait(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
            101, list(accept.extra_headers), accept.subprotocol).to_payload()))
        try:
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
        parts: list[bytes] = []
        try:
            while True:
                chunk = await stream.receive()
                if chunk is None:
                    code, reason = stream.ws_close or (1000, "")
                    await ws.close(code if code not in (1005, 1006, 1015) else 1000, reason)
                    scope.cancel()
                    return
                data, flags = chunk
                parts.append(data)
                if flags & p.FLAG_FIN:
                    payload = b"".join(parts)
                    parts = []
                    await ws.send(payload.decode("utf-8", "replace") if flags & p.FLAG_TEXT else payload)
        except WebSocketError:
            return


def _why(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text or "All connection attempts failed" in text:
        return "connection refused"
    return text or type(exc).__name__
