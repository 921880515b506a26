"""Plain HTTP on the agent listener: the small JSON API the stock agent calls.

The agent listener speaks WebSocket to agents. A request that does not ask for an upgrade is
answered here instead, one request per connection: ``GET /api/v1/status`` (built in: is this a
Comzy server, which version), plus the routes plugins contribute with the ``agent_routes`` hook
(the account API behind ``comzy login``, ``comzy status`` and ``comzy aliases``, documented in
docs/agent_api.md, when a plugin keeps accounts). Only the agent's own URL is needed to reach it,
so a server behind one port forward or one TLS terminator needs nothing more. Every error this
module answers has the account API's one shape (comzy/core/account_api.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
import anyio.abc
import h11

from comzy import __version__
from comzy.core import protocol as p
from comzy.core.account_api import STATUS_PATH, ErrorCode, error_document
from comzy.core.admin import AdminRoute

if TYPE_CHECKING:
    from comzy.core.server import ServerContext

log = logging.getLogger("comzy.agents")

#: Request bodies on this API are small JSON documents.
MAX_BODY = 64 * 1024
#: A slow or silent client gets this long for its whole request.
REQUEST_TIMEOUT = 10.0
#: A plugin gets this long to answer; then the agent is told to try again (its own wait is 10 s).
ANSWER_TIMEOUT = 8.0


def json_response(status: int, document: Any) -> tuple[int, bytes]:
    """``(status, body)`` of a JSON answer."""
    return status, json.dumps(document).encode() + b"\n"


def error_response(code: ErrorCode, message: str) -> tuple[int, bytes]:
    """``(status, body)`` of an error answer in the account API's shape."""
    return json_response(code.status, error_document(code, message))


class AgentApi:
    """Routes API requests on the agent listener by longest path prefix."""

    def __init__(self, server: ServerContext, routes: list[AdminRoute]) -> None:
        self.server = server
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    async def serve(self, stream: anyio.abc.ByteStream, head: bytes, rest: bytes, client: tuple[str, int]) -> None:
        """Answer the one HTTP request whose head was read already, then close."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 8)
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                conn.receive_data(head + b"\r\n\r\n" + rest)
                request = conn.next_event()
                if not isinstance(request, h11.Request):
                    raise h11.RemoteProtocolError("not an HTTP/1.1 request")
                body = await _read_body(stream, conn)
        except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            return  # the client is slow or gone: nobody to answer
        except (h11.RemoteProtocolError, _BodyTooLarge) as exc:
            code = ErrorCode.TOO_LARGE if isinstance(exc, _BodyTooLarge) else ErrorCode.BAD_REQUEST
            await _write_simple(stream, code, f"bad request: {exc}")
            return
        await self._dispatch(stream, conn, request, body, client)

    async def _dispatch(self, stream: anyio.abc.ByteStream, conn: h11.Connection, request: h11.Request,
                        body: bytes, client: tuple[str, int]) -> None:
        raw_path, _, query = request.target.partition(b"?")
        path = unquote(raw_path.decode("latin-1"))
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method.decode("ascii"), "scheme": "http", "path": path, "raw_path": raw_path,
            "query_string": query, "root_path": "", "headers": [(k.lower(), v) for k, v in request.headers],
            "client": client, "server": None,
        }
        response: dict[str, Any] = {}
        chunks: list[bytes] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        own: tuple[int, bytes] | None = None  # our JSON answer, in place of a plugin's
        app = self._route(path)
        try:
            if app is None:
                own = self._builtin(scope)
            else:
                with anyio.move_on_after(ANSWER_TIMEOUT) as deadline:
                    await app(scope, receive, send)
                if deadline.cancelled_caught:
                    log.warning("agent API: %s %s got no answer from its plugin within %g s",
                                scope["method"], path, ANSWER_TIMEOUT)
                    own = error_response(ErrorCode.UNAVAILABLE, "the server is too busy to answer right now; "
                                                                "try again in a minute")
        except Exception:
            log.exception("agent API: %s %s failed in a plugin", scope["method"], path)
            own = error_response(ErrorCode.INTERNAL, "the server failed to answer; see its log")
        if own is None and "status" not in response:
            own = error_response(ErrorCode.INTERNAL, "the server sent no answer")
        if own is not None:
            response = {"status": own[0], "headers": [(b"content-type", b"application/json")]}
            chunks = [own[1]]
        payload = b"".join(chunks)
        framing = (b"content-length", b"connection")
        headers = [(k, v) for k, v in response.get("headers", []) if k.lower() not in framing]
        headers += [(b"content-length", str(len(payload)).encode()), (b"connection", b"close")]
        try:
            data = conn.send(h11.Response(status_code=response["status"], headers=headers))
            data += conn.send(h11.Data(data=payload)) if payload and request.method != b"HEAD" else b""
            data += conn.send(h11.EndOfMessage())
            await stream.send(data)
        except (anyio.BrokenResourceError, OSError, h11.LocalProtocolError):
            pass

    def _route(self, path: str) -> Any:
        for route in self.routes:
            if path == route.prefix or path.startswith(route.prefix.rstrip("/") + "/"):
                return route.app
        return None

    def _builtin(self, scope: dict[str, Any]) -> tuple[int, bytes]:
        path = scope["path"]
        settings = self.server.settings
        if path == STATUS_PATH:
            return json_response(200, {
                "server": f"comzy/{__version__}", "protocol": p.PROTOCOL_VERSION,
                "base_domain": settings.base_domain, "draining": self.server.draining,
                "agent_url": settings.public_agent_url,
            })
        if path == "/":
            return json_response(200, {"message": "This is the agent listener of a Comzy server. Connect an agent: "
                                       f"comzy 3000 --server {settings.agent_url('<this host>')}"})
        # The agent reads this code on an account path as "this server keeps no accounts".
        return error_response(ErrorCode.NO_API, f"nothing on this server (comzy/{__version__}) serves {path}")


class _BodyTooLarge(Exception):
    def __init__(self) -> None:
        super().__init__(f"request body over {MAX_BODY} bytes")


async def _read_body(stream: anyio.abc.ByteStream, conn: h11.Connection) -> bytes:
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive(65536))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                conn.receive_data(b"")
            continue
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _BodyTooLarge()
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before the request body ended")


async def _write_simple(stream: anyio.abc.ByteStream, code: ErrorCode, message: str) -> None:
    status, body = error_response(code, message)
    reason = {400: b"Bad Request", 413: b"Content Too Large"}.get(status, b"Error")
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body)))
    with contextlib.suppress(anyio.BrokenResourceError, OSError):
        await stream.send(head + body)
