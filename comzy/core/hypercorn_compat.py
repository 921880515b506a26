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
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import h11
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import CloseConnection, Event

_PEER_CLOSE = "_comzy_peer_close"


def install() -> None:
    """Install every patch of this module (idempotent)."""
    _pass_close_codes()
    _send_reason_phrases()


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
