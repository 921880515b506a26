"""The dashboard's ASGI app: the page and its assets, the ``/feed`` WebSocket, the JSON API.

The admin listener has checked the admin token before anything here runs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio

from comzy import __version__, assets

from .feed import tunnel_view

if TYPE_CHECKING:
    from comzy import LoggedRequest, ServerContext

    from .plugin import Dashboard

log = logging.getLogger("comzy.plugins.dashboard")

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: Requests the page gets in its first snapshot.
SNAPSHOT_REQUESTS = 100
MAX_LIMIT = 1000


def _static(name: str) -> bytes | None:
    """A file shipped in ``static/``, or one of the look shared with the agent's inspector
    (``comzy.assets``: base.css, the icon); names only: no directories, so no way out of it."""
    shared = assets.read(name)
    if shared is not None:
        return shared
    if "/" in name or "\\" in name or name.startswith(".") or not name:
        return None
    try:
        return (resources.files(__package__) / "static" / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class DashboardApp:
    """Routes the dashboard's paths; anything else is 404."""

    def __init__(self, plugin: Dashboard, server: ServerContext) -> None:
        self.plugin = plugin
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if scope["type"] == "websocket":
            if path == "/feed":
                await self.feed(receive, send, _host_of(scope))
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        if path.startswith("/api/"):
            status, document = await self.api(method, path, scope.get("query_string", b""))
            await _send(send, status, json.dumps(document).encode(), "application/json")
            return
        if method not in ("GET", "HEAD"):
            await _send(send, 405, b"Method not allowed.\n", "text/plain")
            return
        name = "index.html" if path == "/" else path.removeprefix("/static/") if path.startswith("/static/") else ""
        body = _static(name)
        if body is None:
            await _send(send, 404, b"Not found on the admin listener.\n", "text/plain")
            return
        suffix = name[name.rfind("."):]
        await _send(send, 200, body, CONTENT_TYPES.get(suffix, "application/octet-stream"),
                    [(b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                     (b"content-security-policy", b"default-src 'self'; connect-src 'self'; img-src 'self' data:"),
                     (b"x-frame-options", b"DENY")])

    # -- the feed -----------------------------------------------------------------------------
    async def snapshot(self, request_host: str = "") -> dict[str, Any]:
        """The first event of every feed connection (the cluster's tunnels, on a cluster node).

        ``request_host`` is the host the page reached this admin listener by: the agent URL's host
        when the agent listener listens on every address.
        """
        hub = self.plugin.hub
        try:
            tunnels = [tunnel_view(t, self.server) for t in await self.server.all_tunnels()]
        except Exception as exc:  # the cluster's bus is down: the feed still shows what comes next
            log.warning("the tunnel list cannot be gathered: %s: %s", type(exc).__name__, exc)
            tunnels = []
        return {"type": "snapshot", "time": time.time(),
                "server": {"version": __version__, "base_domain": self.server.settings.base_domain,
                           "plugins": self.server.plugin_names, "node": self.server.node,
                           "agent_url": self.agent_url(request_host)},
                "tunnels": tunnels,
                "recent": list(hub.recent)[-SNAPSHOT_REQUESTS:], "series": list(hub.series.view())}

    def agent_url(self, request_host: str) -> str | None:
        """The URL agents connect to, as the page tells the operator (see :func:`agent_url`)."""
        settings = self.server.settings
        return agent_url(settings.public_agent_url, bool(settings.ssl_cert_path), settings.host,
                         self.server.ports.ws, request_host)

    async def feed(self, receive: Any, send: Any, request_host: str = "") -> None:
        """Snapshot, then every event, until the client leaves."""
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        hub = self.plugin.hub
        subscriber = hub.subscribe()  # before the snapshot: nothing falls between the two
        try:
            await send({"type": "websocket.send", "text": json.dumps(await self.snapshot(request_host))})
            async with anyio.create_task_group() as tg:
                async def watch_for_close() -> None:
                    while (await receive())["type"] != "websocket.disconnect":
                        pass  # the feed is one-way: what the client says is ignored
                    tg.cancel_scope.cancel()

                async def end_at_shutdown() -> None:
                    await self.server.stopping.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_for_close)
                tg.start_soon(end_at_shutdown)
                while True:
                    for event in await subscriber.next_batch():
                        await send({"type": "websocket.send", "text": json.dumps(event)})
            if self.server.stopping.is_set():
                # The page shows "reconnecting" and comes back with the server.
                await send({"type": "websocket.close", "code": 1001, "reason": "server shutting down"})
        except OSError:
            pass  # the client went away mid-send
        finally:
            hub.unsubscribe(subscriber)

    # -- the JSON API --------------------------------------------------------------------------
    async def api(self, method: str, path: str, query: bytes) -> tuple[int, Any]:
        """``GET /api/tunnels``, ``DELETE /api/tunnels/ALIAS``, ``GET /api/requests?alias=&limit=``."""
        if path == "/api/tunnels":
            if method != "GET":
                return 405, {"error": "use GET to list tunnels, DELETE /api/tunnels/ALIAS to close one"}
            try:
                return 200, {"tunnels": [tunnel_view(t, self.server) for t in await self.server.all_tunnels()]}
            except Exception as exc:  # a cluster node cut off from NATS: say so rather than "no tunnels"
                return 503, {"error": f"the cluster's tunnels cannot be listed right now ({exc}); try again"}
        if path.startswith("/api/tunnels/"):
            alias = path.removeprefix("/api/tunnels/").lower()
            if method != "DELETE":
                return 405, {"error": "use DELETE to close a tunnel"}
            try:
                closed = await self.server.close_tunnel(alias, "closed by the server's operator (admin dashboard)")
            except Exception as exc:  # the node holding it did not answer (cluster): not a 404
                return 503, {"error": f"'{alias}' cannot be closed right now ({exc})"}
            if not closed:
                return 404, {"error": f"no live tunnel '{alias}'"}
            log.info("tunnel %s closed from the admin dashboard", alias)
            return 200, {"closed": alias}
        if path == "/api/requests":
            if method != "GET":
                return 405, {"error": "use GET"}
            args = parse_qs(query.decode("latin-1"))
            alias = (args.get("alias") or [""])[0].lower() or None
            try:
                limit = min(max(int((args.get("limit") or ["100"])[0]), 1), MAX_LIMIT)
            except ValueError:
                return 400, {"error": "limit must be a whole number (1-1000)"}
            return await self.requests(alias, limit)
        return 404, {"error": f"no API at {path}"}

    async def requests(self, alias: str | None, limit: int) -> tuple[int, Any]:
        """The newest requests: from a request-logging plugin (``recent_requests``) when one answers,
        else from the requests this plugin keeps in memory."""
        try:
            logged = await self.server.hooks.recent_requests(alias, limit, self.server)
        except Exception as exc:  # the log's store is down: say so, and keep serving the page
            log.warning("the request history cannot be read: %s: %s", type(exc).__name__, exc)
            return 503, {"error": f"the request log cannot be read right now ({type(exc).__name__}); try again"}
        if logged is None:
            rows = [r for r in self.plugin.hub.recent if alias is None or r["alias"] == alias]
            return 200, {"source": "memory", "requests": list(reversed(rows))[:limit]}
        return 200, {"source": "log", "requests": [_logged_view(r) for r in logged[:limit]]}


#: Addresses that mean "every interface": no host an agent could connect to.
_EVERYWHERE = frozenset({"", "0.0.0.0", "::"})
#: What a Host header may hold for the page to show it as a host name (else "HOST").
_HOST_NAME = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def agent_url(public_agent_url: str | None, tls: bool, listen_host: str, ws_port: int,
              request_host: str) -> str | None:
    """Where agents connect: COMZY_PUBLIC_AGENT_URL when set (a proxy in front), else this node's
    agent listener, ``ws(s)://HOST:PORT``, with the port it bound; None on a node without one
    (a cluster edge). When the listener listens on every address, HOST is the name the operator
    reached the admin listener by (``request_host``, when it is a plain host name)."""
    if public_agent_url:
        return public_agent_url
    if not ws_port:
        return None
    host = listen_host
    if host in _EVERYWHERE:
        host = request_host if _HOST_NAME.fullmatch(request_host) else "HOST"
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{'wss' if tls else 'ws'}://{host}:{ws_port}"


def _host_of(scope: dict[str, Any]) -> str:
    """The Host header's host, without its port ('' when absent)."""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1")
            return host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return ""


def _logged_view(request: LoggedRequest) -> dict[str, Any]:
    return {"time": request.started_at, "alias": request.alias, "port": request.port, "method": request.method,
            "path": request.path, "status": request.status, "bytes_in": request.bytes_in,
            "bytes_out": request.bytes_out, "duration_ms": round(request.duration * 1000, 3),
            "client": request.client}


async def _send(send: Any, status: int, body: bytes, content_type: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
