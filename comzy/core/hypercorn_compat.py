"""Make hypercorn tell the app the close code a WebSocket client sent.

hypercorn (up to 0.18 at least, pgjones/hypercorn#127) answers a client's close frame and then
reports ``websocket.disconnect`` with 1006, dropping the client's code and reason. The edge
must pass a visitor's close code on to the local service, so the code is recorded when the
close frame arrives and used for the disconnect message. Installed once, by ``run_server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import CloseConnection, Event

_PEER_CLOSE = "_comzy_peer_close"


def install() -> None:
    """Patch hypercorn's WSStream (idempotent)."""
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
