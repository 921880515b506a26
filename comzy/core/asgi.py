"""ASGI types and the one way comzy's listeners answer a request themselves (an error, a refusal),
whether it arrived as HTTP or as a WebSocket upgrade."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

TEXT = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"


async def respond(send: Send, status: int, body: bytes | str, content_type: bytes = TEXT, headers: Headers = (),
                  scope: Scope | None = None, close_code: int = 1008) -> None:
    """Answer with a whole response: ``body`` with ``headers`` in their order (a Content-Type among
    them wins over ``content_type``), and its own Content-Length.

    For a WebSocket upgrade (``scope`` given, of type websocket) the same HTTP response goes through
    ASGI's ``websocket.http.response`` extension where the server offers it, else the upgrade is
    closed with ``close_code`` (which servers answer with 403).
    """
    data = body.encode() if isinstance(body, str) else body
    response_headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    if not any(n.lower() == b"content-type" for n, _ in response_headers):
        response_headers.insert(0, (b"content-type", content_type))
    response_headers.append((b"content-length", str(len(data)).encode()))
    if scope is None or scope["type"] == "http":
        prefix = "http.response"
    elif "websocket.http.response" in scope.get("extensions", {}):
        prefix = "websocket.http.response"
    else:
        await send({"type": "websocket.close", "code": close_code})
        return
    await send({"type": f"{prefix}.start", "status": status, "headers": response_headers})
    await send({"type": f"{prefix}.body", "body": data, "more_body": False})


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge ASGI lifespan events (comzy's resources live in the server, not the app)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
