"""The admin listener: a small ASGI router for routes that plugins contribute."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comzy.core.server import ServerContext

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


@dataclass(slots=True)
class AdminRoute:
    """A path prefix on the admin listener served by an ASGI app."""

    prefix: str
    app: ASGIApp


class AdminApp:
    """Routes admin requests to plugin apps by longest prefix; ``/healthz`` is built in."""

    def __init__(self, server: ServerContext, routes: list[AdminRoute]) -> None:
        self.server = server
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "/")
        for route in self.routes:
            if path == route.prefix or path.startswith(route.prefix.rstrip("/") + "/") or route.prefix == "/":
                await route.app(scope, receive, send)
                return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        if path == "/healthz":
            body = json.dumps({"status": "ok", "tunnels": len(self.server.registry),
                               "draining": self.server.draining}).encode()
            await _respond(send, 200, body, b"application/json")
        else:
            await _respond(send, 404, b"Not found on the admin listener.\n", b"text/plain")


async def _respond(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
