"""HTTP/1.1 to the one local service, on h11, with a keep-alive pool made for one origin.

The agent talks to exactly one host:port, so its pool is a stack of idle connections:
taking one costs a single non-blocking peek to see whether the local app closed it while
idle (Node closes idle keep-alive connections after 5 s). A general-purpose pool (httpx)
scans every pooled connection with several syscalls on every request, which profiling
showed was most of the agent's CPU under load.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import anyio.abc
import h11

# The event loop reads up to 256 KiB at a time; asking for less makes anyio copy the rest.
READ_SIZE = 256 * 1024


class LocalError(Exception):
    """The local service could not be reached or broke the exchange."""


class ConnectFailed(LocalError):
    """No connection could be made to the local service."""


class StaleConnection(LocalError):
    """A pooled connection turned out to be closed before any response byte arrived."""


@dataclass(slots=True)
class LocalResponse:
    """A response head from the local service; read the body with ``body()``."""

    status: int
    headers: list[tuple[bytes, bytes]]
    connection: _Connection

    async def body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives (chunked framing removed, bytes untouched)."""
        conn = self.connection
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise LocalError(f"unexpected {type(event).__name__} in a response body")


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=256 * 1024)
        self.sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self.idle_since = 0.0
        self.received_any = False

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise LocalError(f"connection lost while sending ({exc})") from exc

    async def next_event(self) -> h11.Event:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise LocalError(f"invalid HTTP from the local service: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise LocalError(f"connection lost while reading ({exc})") from exc
            if data:
                self.received_any = True
            self.h11.receive_data(data)

    def closed_while_idle(self) -> bool:
        """True if the peer closed (or sent bytes nobody asked for, e.g. a 408) while idle.

        The event loop's transport reads a peer's EOF by itself and then closes the socket
        (fileno -1); until it gets there, the socket polls readable. Either way: not reusable.
        """
        fd = self.sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await self.stream.aclose()


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
                stream = await anyio.connect_tcp(self.host, self.port)
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting timed out after {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(_connect_reason(exc)) from exc
        stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(stream)

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
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and len(self._idle) < self.max_idle:
            conn.h11.start_next_cycle()
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
        conn, reused = await self._take()
        consumed = False
        try:
            await conn.send(h11.Request(method=method, target=target, headers=headers))
            if body is not None:
                async for chunk in body:
                    consumed = True
                    if chunk:
                        await conn.send(h11.Data(data=chunk))
            await conn.send(h11.EndOfMessage())
            while True:
                event = await conn.next_event()
                if isinstance(event, h11.Response):
                    return LocalResponse(event.status_code, list(event.headers.raw_items()), conn)
                if isinstance(event, h11.ConnectionClosed):
                    raise LocalError("the local service closed the connection without answering")
                # 1xx informational responses (100 Continue, 103 Early Hints) are skipped.
        except LocalError as exc:
            await conn.aclose()
            if reused and not conn.received_any and not consumed:
                raise StaleConnection(str(exc)) from exc
            raise
        except h11.LocalProtocolError as exc:
            await conn.aclose()
            raise LocalError(f"request cannot be sent as HTTP/1.1: {exc}") from exc
        except BaseException:
            await conn.aclose()
            raise

    async def aclose(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


def _connect_reason(exc: OSError) -> str:
    # anyio wraps the per-address errors in "All connection attempts failed"; the cause says why.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == 111:
            return "connection refused"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc)
