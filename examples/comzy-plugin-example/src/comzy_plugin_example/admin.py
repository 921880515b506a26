"""``GET /example/blocked`` on the admin listener: the newest blocked requests, as JSON.

The admin listener checks the admin token before a route sees a request, so this app never
authenticates anyone itself. Query: ``alias`` (only that alias) and ``limit`` (1-1000, default
100). Answer: ``{"blocked": [{"alias", "method", "path", "client", "blocked_at"}, ...],
"dropped": N}``, newest first; ``dropped`` counts blocked requests not recorded since start-up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from comzy.db import describe_error

from .store import check_alias, check_limit, newest

if TYPE_CHECKING:
    from .plugin import ExamplePlugin

log = logging.getLogger("comzy_plugin_example")

#: Where the plugin's admin routes live: one prefix per plugin keeps them apart from the others'.
PREFIX = "/example"
BLOCKED_PATH = f"{PREFIX}/blocked"
DEFAULT_LIMIT = 100

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BlockedApi:
    """The ASGI app behind :data:`PREFIX`: reads ``example_blocked`` through the running plugin."""

    def __init__(self, plugin: ExamplePlugin) -> None:
        self.plugin = plugin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the admin listener routes WebSockets too: this API has none
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        status, document = await self.answer(scope)
        body = json.dumps(document).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        if status == 405:
            headers.append((b"allow", b"GET"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def answer(self, scope: Scope) -> tuple[int, dict[str, Any]]:
        """The status and JSON document for one HTTP request."""
        if scope["path"].rstrip("/") != BLOCKED_PATH:
            return 404, {"error": f"no API at {scope['path']}; try GET {BLOCKED_PATH}"}
        if scope["method"] != "GET":
            return 405, {"error": f"use GET {BLOCKED_PATH}"}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            alias = check_alias(query["alias"][-1]) if "alias" in query else None
            limit = check_limit(int(query["limit"][-1])) if "limit" in query else DEFAULT_LIMIT
        except ValueError as exc:
            # int() says "invalid literal for int() with base 10": not for a person.
            reason = str(exc) if "literal" not in str(exc) else "the limit must be a whole number"
            return 400, {"error": reason}
        engine = self.plugin.engine
        if engine is None:
            return 503, {"error": "the example plugin is not running"}
        try:
            records = await newest(engine, alias, limit)
        except Exception as exc:  # the database is down: say so, keep the admin listener serving
            log.warning("example: cannot read example_blocked: %s", describe_error(exc, engine.url))
            return 503, {"error": f"the blocked requests cannot be read right now ({type(exc).__name__}); "
                                  "try again"}
        return 200, {"blocked": [record.to_json() for record in records], "dropped": self.plugin.dropped}
