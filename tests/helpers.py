"""Small helpers several test modules share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from comzy import Tunnel, hookimpl
from comzy.core import protocol as p
from comzy.core.websocket import Closed, WebSocket


class DisconnectWatcher:
    """A plugin that records every ended tunnel and its reason, so tests can wait for clean-up."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self._changed = anyio.Event()

    @hookimpl
    def on_disconnect(self, tunnel: Tunnel, reason: str) -> None:
        self.ended[tunnel.alias] = reason
        self._changed.set()

    async def wait_for(self, *aliases: str) -> list[str]:
        """Wait until every alias has ended; their reasons, in order."""
        while not set(aliases) <= self.ended.keys():
            self._changed = anyio.Event()
            await self._changed.wait()
        return [self.ended[alias] for alias in aliases]


async def receive_until_closed(ws: WebSocket) -> tuple[Closed, list[p.Frame]]:
    """Every frame the peer sends (or had buffered) before it closes, and how it closed."""
    frames: list[p.Frame] = []
    with anyio.fail_after(5):
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                return message, frames
            assert isinstance(message, bytes)
            frames.extend(p.decode_message(message))


@asynccontextmanager
async def serve_tcp(handler: Callable[[anyio.abc.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port; yields the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield port
        tg.cancel_scope.cancel()
