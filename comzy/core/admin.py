"""The admin listener: the admin token, and a small ASGI router for routes that plugins contribute.

Every request needs the admin token (COMZY_ADMIN_TOKEN, or one the server made and keeps in the
data directory), presented in one of three ways:

- ``Authorization: Bearer <token>`` (scripts, Prometheus' ``authorization`` setting);
- the ``comzy_admin`` cookie, which the login form (``/login``) or a link with ``?token=`` sets
  (browsers; the token is then dropped from the address bar by a redirect);
- ``?token=`` on a WebSocket handshake (a browser cannot set headers on one).

``?token=`` is accepted on GET, HEAD and WebSocket requests only: query strings end up in logs,
histories and Referer headers, and a link must never be able to change anything. The cookie holds
an HMAC of the token, not the token, is HttpOnly and SameSite=Strict, and changing the token
invalidates it. Requests that change something with only the cookie must come from the admin
page's own origin (a WebSocket too: the feed streams what the server sees).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from comzy.core.asgi import HTML, JSON, TEXT, lifespan, respond
from comzy.core.datadir import FILE_MODE, create_private_file, make_private

if TYPE_CHECKING:
    from comzy.core.server import ServerContext
    from comzy.core.settings import ServerSettings

log = logging.getLogger("comzy.admin")

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

#: The file in COMZY_DATA_DIR holding the token the server made (when COMZY_ADMIN_TOKEN is unset).
TOKEN_FILE = "admin_token"
COOKIE = "comzy_admin"
#: Largest login form body.
MAX_FORM = 4096


@dataclass(slots=True)
class AdminRoute:
    """A path prefix on the admin listener (or, from ``agent_routes``, the agent listener) served
    by an ASGI app."""

    prefix: str
    app: ASGIApp


@dataclass(frozen=True, slots=True)
class AdminToken:
    """The admin token and where it comes from (for the start-up line; never the value)."""

    value: str
    path: Path | None

    @property
    def source(self) -> str:
        """``COMZY_ADMIN_TOKEN`` or the file that holds it."""
        return "COMZY_ADMIN_TOKEN" if self.path is None else str(self.path)


def load_admin_token(settings: ServerSettings) -> AdminToken:
    """COMZY_ADMIN_TOKEN, else the token in ``<data dir>/admin_token``, made (mode 0600) if missing.

    Raises OSError when the file can be neither read nor written.
    """
    if settings.admin_token is not None and settings.admin_token.get_secret_value().strip():
        return AdminToken(settings.admin_token.get_secret_value().strip(), None)
    path = settings.data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        # Copied, restored from a backup or made by hand: others may have read it already.
        make_private(path, FILE_MODE, "admin token file",
                     then="to replace the token, delete the file and restart the server")
        return AdminToken(token, path)
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before the token is written: it is never readable by others, not even for a moment.
    create_private_file(path)
    make_private(path, FILE_MODE, "admin token file")  # an empty one left behind, loose
    path.write_text(token + "\n")
    return AdminToken(token, path)


class AdminApp:
    """Checks the admin token, then routes by longest prefix; ``/healthz`` and ``/login`` are built in."""

    def __init__(self, server: ServerContext, routes: list[AdminRoute], token: AdminToken) -> None:
        self.server = server
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._token = token.value.encode()
        # What the cookie holds: proof of the token that is useless as a bearer token elsewhere.
        self._session = hmac.new(self._token, b"comzy admin session", hashlib.sha256).hexdigest()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        path = scope.get("path", "/")
        if scope["type"] == "http" and path == "/login":
            await self._login(scope, receive, send)
            return
        how = self._authenticated(scope)
        if how is None:
            await self._refuse(scope, send)
            return
        if how == "query" and scope["type"] == "http":
            if scope["method"] in ("GET", "HEAD"):
                await self._keep_in_cookie(scope, send)
                return
            # A link or a logged URL must never change anything: the token goes in a header for that.
            log.info("admin: %s %r refused: the token came in the query string", scope["method"], path)
            await self._deny(scope, send, 401, f"?token= works on GET and WebSocket requests only; send "
                             f"'Authorization: Bearer <token>' with {scope['method']} requests")
            return
        if how == "cookie" and not self._same_origin(scope):
            origin = dict(scope.get("headers", [])).get(b"origin", b"").decode("latin-1")
            log.info("admin: cross-origin %s %r from origin %r refused",
                     "WebSocket" if scope["type"] == "websocket" else scope["method"], path, origin)
            await self._deny(scope, send, 403, "cross-origin request refused; use the admin page itself")
            return
        for route in self.routes:
            if route.prefix != "/" and (path == route.prefix or path.startswith(route.prefix.rstrip("/") + "/")):
                await route.app(scope, receive, send)
                return
        if scope["type"] == "http" and path in ("/healthz", "/logout"):
            await self._builtin(path, send)
            return
        # A route at "/" (the dashboard) answers whatever nothing else did.
        fallback = next((route for route in self.routes if route.prefix == "/"), None)
        if fallback is not None:
            await fallback.app(scope, receive, send)
        elif scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await respond(send, 404, b"Not found on the admin listener.\n", TEXT)

    async def _builtin(self, path: str, send: Any) -> None:
        if path == "/healthz":
            health: dict[str, Any] = {"status": "ok", "tunnels": len(self.server.registry),
                                      "draining": self.server.draining, "role": self.server.role}
            if self.server.cluster is not None:  # which node, and whether it reaches NATS
                health.update(self.server.cluster.health())
            body = json.dumps(health).encode()
            await respond(send, 200, body, JSON)
        else:  # /logout
            await send({"type": "http.response.start", "status": 303, "headers": [
                (b"location", b"/login"),
                (b"set-cookie", f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict".encode())]})
            await send({"type": "http.response.body", "body": b""})

    # -- who is asking ------------------------------------------------------------------
    def _check(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def _authenticated(self, scope: dict[str, Any]) -> str | None:
        """How the request proved the token (``bearer``, ``cookie``, ``query``), or None."""
        cookies = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and self._check(token.strip()):
                    return "bearer"
            elif name == b"cookie":
                try:
                    cookies.load(value.decode("latin-1"))
                except Exception:  # a malformed Cookie header: as if absent
                    continue
        morsel = cookies.get(COOKIE)
        if morsel is not None and hmac.compare_digest(morsel.value.encode(), self._session.encode()):
            return "cookie"
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if "token" in query and self._check(query["token"]):
            return "query"
        return None

    def _same_origin(self, scope: dict[str, Any]) -> bool:
        """Whether a cookie-authenticated request may act: reads always, changes from our own origin."""
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return True
        headers = dict(scope.get("headers", []))
        origin = headers.get(b"origin")
        if origin is None:
            return scope["type"] == "http"  # not a browser's cross-site request: browsers send Origin
        return urlsplit(origin.decode("latin-1")).netloc == headers.get(b"host", b"").decode("latin-1")

    # -- answers ---------------------------------------------------------------------------
    def _cookie_header(self) -> tuple[bytes, bytes]:
        return (b"set-cookie", f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict".encode())

    async def _keep_in_cookie(self, scope: dict[str, Any], send: Any) -> None:
        # Take the token out of the address bar (and history, and Referer headers).
        query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k != "token"]
        location = scope.get("path", "/") + (f"?{urlencode(query)}" if query else "")
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode()), self._cookie_header()]})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: dict[str, Any], send: Any) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = dict(scope.get("headers", [])).get(b"accept", b"")
        if scope["method"] == "GET" and b"text/html" in accept:
            await respond(send, 401, _login_page(scope.get("path", "/")), HTML)
            return
        await self._deny(scope, send, 401, "the admin token is missing or wrong: send 'Authorization: Bearer "
                         "<token>' (the token is COMZY_ADMIN_TOKEN, or the file the server named at start-up)")

    async def _deny(self, scope: dict[str, Any], send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await respond(send, status, body, JSON, headers=[(b"www-authenticate", b'Bearer realm="comzy admin"')],
                      scope=scope)

    async def _login(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            await respond(send, 200, _login_page("/"), HTML)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_FORM:
                await respond(send, 413, b"Login form too large.\n", TEXT)
                return
            if not message.get("more_body"):
                break
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        target = form.get("next", "/")
        if not _local_path(target):
            target = "/"  # never redirect off this listener
        if not self._check(form.get("token", "").strip()):
            log.info("admin login refused from %s", (scope.get("client") or ("?",))[0])
            await respond(send, 401, _login_page(target, failed=True), HTML)
            return
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", target.encode()), self._cookie_header()]})
        await send({"type": "http.response.body", "body": b""})


def _local_path(target: str) -> bool:
    """Whether ``target`` is a path on this listener. Browsers read ``/\\host`` as ``//host``
    and drop tabs and newlines, so a backslash or a control character anywhere is refused."""
    return (target.startswith("/") and not target.startswith("//")
            and "\\" not in target and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in target))


def _login_page(target: str, failed: bool = False) -> bytes:
    problem = '<p class="error">That token is not right.</p>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Comzy admin: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:grid;place-items:center;
height:100vh;margin:0}}form{{background:#1e293b;padding:2rem;border-radius:12px;min-width:320px}}
input{{width:100%;box-sizing:border-box;padding:.6rem;margin:.5rem 0 1rem;border-radius:6px;border:1px solid #475569;
background:#0f172a;color:#e2e8f0}}button{{padding:.6rem 1.2rem;border:0;border-radius:6px;background:#38bdf8;
color:#0f172a;font-weight:600}}.error{{color:#f87171}}small{{color:#94a3b8}}</style></head>
<body><form method="post" action="/login"><h1>Comzy admin</h1>{problem}
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{html.escape(target)}">
<button type="submit">Log in</button><br><br>
<small>The token is COMZY_ADMIN_TOKEN, or the file the server named at start-up.</small></form></body></html>
""".encode()
