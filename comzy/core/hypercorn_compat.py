"""The server's patches of its HTTP libraries, each installed once by ``run_server``.

**WebSocket close codes.** hypercorn (up to 0.18 at least, pgjones/hypercorn#127) answers a
client's close frame and then reports ``websocket.disconnect`` with 1006, dropping the client's
code and reason. The edge must pass a visitor's close code on to the local service, so the code
is recorded when the close frame arrives and used for the disconnect message.

**Reason phrases.** ASGI has no field for a response's reason phrase, so each server picks one:
uvicorn's httptools protocol sends the standard phrase of the code (``200 OK``), but h11, which
writes hypercorn's responses (the admin listener's always, the public listener's with
``COMZY_HTTP_SERVER=hypercorn``) and every WebSocket handshake answer (wsproto, in both servers),
sends none (``HTTP/1.1 200 ``, which urllib shows as ``HTTP Error 404: ``). A server-side
``h11.Connection.send`` fills in the standard phrase of a response that has none, so visitors see
the same status line from either server. A code without a standard phrase (599) keeps an empty
one, as uvicorn does; the local app's own phrase is not carried (ASGI cannot carry it to uvicorn).

**Departures behind a pipelined request.** While a pipelined request waits for the response
before it, hypercorn's HTTP/1.1 protocol (h11 ``PAUSED``) waits inside the call its connection's
read loop made, so nothing reads the connection: a visitor who pipelined a request behind a long
response (an event stream, a long poll) and left (FIN or RST) went unnoticed, and the stream of
the answering request, the local app's request and a slot of the tunnel's stream limit stayed
until the local app next wrote. The wait now reads on, into h11's buffer (the same bytes, in
order, parsed when the wait ends), at most ``h11_max_incomplete_size`` bytes plus one read, then
waits without reading as before; a departure closes the answering request's stream (the app is
told ``http.disconnect``) and ends the wait, and the read loop then reports the connection closed.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import h11
from hypercorn.asyncio.tcp_server import MAX_RECV
from hypercorn.asyncio.worker_context import EventWrapper
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import CloseConnection, Event

_PEER_CLOSE = "_comzy_peer_close"


def install() -> None:
    """Install every patch of this module (idempotent)."""
    _pass_close_codes()
    _send_reason_phrases()
    _notice_departures_while_paused()


class _PeerLeft(Exception):
    """The visitor left while a pipelined request waited (raised out of h11's PAUSED wait)."""


class _ReadingWhilePaused(EventWrapper):
    """An H11Protocol's ``can_read`` whose wait (h11 PAUSED: a pipelined request waits for the
    response before it) reads on from the connection's reader into h11's buffer, at most
    ``bound`` bytes plus one read, to notice the visitor leaving (see the module's docstring)."""

    def __init__(self, protocol: H11Protocol, reader: asyncio.StreamReader, bound: int) -> None:
        super().__init__()
        self.protocol = protocol
        self.reader = reader
        self.bound = bound

    async def wait(self) -> None:
        """Return once the protocol may parse again; raise _PeerLeft, with the answering request's
        stream closed, when the visitor leaves first."""
        ready = asyncio.ensure_future(super().wait())
        reading: asyncio.Future[bytes] | None = None
        held = 0
        try:
            while held <= self.bound:
                # Nobody else reads meanwhile: the read loop waits in this protocol's handle().
                reading = asyncio.ensure_future(self.reader.read(MAX_RECV))
                await asyncio.wait((ready, reading), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    # Gone from the reader before the read loop reads again; what it was waiting
                    # for stays in the reader's buffer.
                    await asyncio.wait((reading,))
                    if reading.cancelled():
                        return
                try:
                    data = reading.result()
                except (ConnectionError, OSError, ssl.SSLError):
                    data = b""
                if not data:
                    await self.protocol._close_stream()
                    raise _PeerLeft
                self.protocol.connection.receive_data(data)
                held += len(data)
                if ready.done():
                    return
            await ready
        finally:
            ready.cancel()
            if reading is not None:
                reading.cancel()  # only when this wait is cancelled itself


def _notice_departures_while_paused() -> None:
    """Make hypercorn's HTTP/1.1 protocol notice a visitor who leaves while a pipelined request waits."""
    if getattr(H11Protocol, "_comzy_departure_patch", False):
        return
    original_init = H11Protocol.__init__
    original_handle = H11Protocol.handle

    @functools.wraps(original_init)
    def __init__(self: H11Protocol, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # The asyncio server's protocol_send: its TCPServer holds the connection's reader.
        reader = getattr(getattr(self.send, "__self__", None), "reader", None)
        if isinstance(reader, asyncio.StreamReader):
            self.can_read = _ReadingWhilePaused(self, reader, self.config.h11_max_incomplete_size)

    @functools.wraps(original_handle)
    async def handle(self: H11Protocol, event: Any) -> None:
        try:  # noqa: SIM105 (a suppress() context manager per read costs more than try)
            await original_handle(self, event)
        except _PeerLeft:
            pass  # the read loop meets the end of the connection next, and reports it closed

    H11Protocol.__init__ = __init__  # type: ignore[method-assign]
    H11Protocol.handle = handle  # type: ignore[method-assign]
    H11Protocol._comzy_departure_patch = True  # type: ignore[attr-defined]


def standard_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (``b"Not Found"``), or ``b""`` for a code without one."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _send_reason_phrases() -> None:
    """Make a server's h11 connections send the standard reason phrase of a response without one."""
    if getattr(h11.Connection.send, "_comzy_reason_patch", False):
        return
    original_send = h11.Connection.send

    @functools.wraps(original_send)
    def send(self: h11.Connection, event: Any) -> bytes | None:
        if (type(event) in (h11.Response, h11.InformationalResponse) and not event.reason
                and self.our_role is h11.SERVER):
            # h11's public constructor; a Headers object is taken as it is (names' case kept).
            event = type(event)(status_code=event.status_code, headers=event.headers,
                                http_version=event.http_version, reason=standard_phrase(event.status_code))
        return original_send(self, event)

    send._comzy_reason_patch = True  # type: ignore[attr-defined]
    h11.Connection.send = send  # type: ignore[method-assign]


def _pass_close_codes() -> None:
    """Patch hypercorn's WSStream to report a client's close code."""
    if getattr(WSStream, "_comzy_close_code_patch", False):
        return
    original_handle_events = WSStream._handle_events
    original_handle = WSStream.handle

    async def _handle_events(self: Any) -> None:
        connection = self.connection
        if not getattr(connection, "_comzy_wrapped", False):
            events = connection.events

            def recording_events() -> Iterator[Event]:
                for event in events():
                    if isinstance(event, CloseConnection):
                        setattr(self, _PEER_CLOSE, (event.code, event.reason or ""))
                    yield event

            connection.events = recording_events
            connection._comzy_wrapped = True
        await original_handle_events(self)

    async def handle(self: Any, event: Any) -> None:
        peer_close = getattr(self, _PEER_CLOSE, None)
        if (isinstance(event, StreamClosed) and peer_close is not None and not self.closed
                and self.app_put is not None and self.state == ASGIWebsocketState.CONNECTED):
            self.closed = True
            code, reason = peer_close
            await self.app_put({"type": "websocket.disconnect", "code": code, "reason": reason})
            return
        await original_handle(self, event)

    WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream.handle = handle  # type: ignore[method-assign]
    WSStream._comzy_close_code_patch = True  # type: ignore[attr-defined]
