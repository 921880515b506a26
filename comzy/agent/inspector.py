"""The agent's inspector: the last requests it forwarded, kept in memory, and ngrok's local API
over them (``GET /api/tunnels``, ``/api/requests/http``, replay) on 127.0.0.1:4040.

Capture copies bytes as they pass through :class:`~comzy.agent.forward.LocalForwarder`, up to a cap
per body; it never holds the forwarded stream back. An exchange is one :class:`Exchange` in a
bounded deque (appended when the request arrives, so a stream still open is listed too): memory is
at most ``max_requests`` x (2 x ``max_body`` + heads), plus the exchanges in flight.

The API is a small HTTP/1.1 server on h11 (already installed with uvicorn and hypercorn), run in the
agent's event loop. docs/agent.md, "Inspector and local API", documents the shapes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11

if TYPE_CHECKING:
    from comzy.agent.local_http import LocalClient

log = logging.getLogger("comzy.agent")

#: Where the inspector listens unless ``--inspect`` says otherwise: ngrok's port, then the next
#: ones while they are busy (a second agent on the same machine takes 4041). Tests override it.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = range(4040, 4050)
DEFAULT_MAX_REQUESTS = 500
DEFAULT_MAX_BODY = 1024 * 1024
#: ngrok names the tunnel of its command line so; scripts look it up by that name.
TUNNEL_NAME = "command_line"
#: An API request's body is a small JSON document: anything longer is refused.
MAX_API_BODY = 64 * 1024
#: How long ``POST /api/requests/http`` waits for the replay to finish before answering 204 anyway
#: (the replay goes on and is listed; an event stream would otherwise hold the call forever).
REPLAY_WAIT = 10.0


class InspectError(Exception):
    """An API call that cannot be done: ``status`` and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True, eq=False)
class Exchange:
    """One request and its response as the agent forwarded them, bodies cut at the cap."""

    id: str
    method: str
    target: bytes
    #: As sent to the local service: the Host rule applied, chunked framing added when needed.
    headers: list[tuple[bytes, bytes]]
    remote_addr: str
    started: float  # wall clock
    started_ns: int  # monotonic, for the duration
    cap: int
    kind: str = "http"  # "websocket" or "sse" for streams
    replay_of: str | None = None
    request_body: bytearray = field(default_factory=bytearray)
    request_size: int = 0
    #: The request body was read to its end (a replay needs all of it).
    request_complete: bool = False
    status: int = 0
    response_headers: list[tuple[bytes, bytes]] | None = None
    response_body: bytearray = field(default_factory=bytearray)
    response_size: int = 0
    duration_ns: int = 0
    done: bool = False
    error: str | None = None

    # -- the forwarder's hooks: O(1) per chunk, a copy only while under the cap -------------
    def request_data(self, chunk: bytes) -> None:
        """Bytes of the request body as they go to the local service."""
        self.request_size += len(chunk)
        room = self.cap - len(self.request_body)
        if room > 0:
            self.request_body += chunk[:room]

    def response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The response head from the local service (or the agent's own 502)."""
        self.status = status
        self.response_headers = headers
        if self.kind == "http" and any(n.lower() == b"content-type" and v.lower().startswith(b"text/event-stream")
                                       for n, v in headers):
            self.kind = "sse"

    def response_data(self, chunk: bytes) -> None:
        """Bytes of the response body as they go back to the visitor."""
        self.response_size += len(chunk)
        room = self.cap - len(self.response_body)
        if room > 0:
            self.response_body += chunk[:room]

    def finish(self, error: str | None = None) -> None:
        """The exchange is over (however it ended)."""
        self.duration_ns = time.monotonic_ns() - self.started_ns
        self.error = error
        self.done = True

    # -- the API's view --------------------------------------------------------------------
    @property
    def request_truncated(self) -> bool:
        """More request body passed than was kept."""
        return self.request_size > len(self.request_body)

    @property
    def response_truncated(self) -> bool:
        """More response body passed than was kept."""
        return self.response_size > len(self.response_body)

    def request_raw(self) -> bytes:
        """The request as sent to the local service (its body cut at the cap)."""
        head = [self.method.encode("latin-1") + b" " + self.target + b" HTTP/1.1"]
        head += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + _framed(self.headers, self.request_body,
                                                          self.request_complete and not self.request_truncated)

    def response_raw(self) -> bytes:
        """The response as the local service sent it (chunked framing as one chunk, body cut at the cap)."""
        headers = self.response_headers or []
        head = [b"HTTP/1.1 %d %s" % (self.status, _reason(self.status).encode())]
        head += [name + b": " + value for name, value in headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + _framed(headers, self.response_body,
                                                          self.done and not self.response_truncated)

    def to_json(self) -> dict[str, Any]:
        """The exchange in ngrok's shape, plus Comzy's fields (docs/agent.md)."""
        target = self.target.decode("latin-1")
        response = None
        if self.response_headers is not None:
            response = {
                "status": f"{self.status} {_reason(self.status)}".strip(),
                "status_code": self.status,
                "proto": "HTTP/1.1",
                "headers": _header_map(self.response_headers),
                "raw": base64.b64encode(self.response_raw()).decode(),
                "body_size": self.response_size,
                "body_truncated": self.response_truncated,
            }
        return {
            "uri": f"/api/requests/http/{self.id}",
            "id": self.id,
            "tunnel_name": TUNNEL_NAME,
            "remote_addr": self.remote_addr,
            "start": datetime.fromtimestamp(self.started, UTC).astimezone().isoformat(),
            "duration": self.duration_ns if self.done else time.monotonic_ns() - self.started_ns,
            "request": {
                "method": self.method,
                "proto": "HTTP/1.1",
                "headers": _header_map(self.headers),
                "uri": target,
                "raw": base64.b64encode(self.request_raw()).decode(),
                "body_size": self.request_size,
                "body_truncated": self.request_truncated,
            },
            "response": response,
            "kind": self.kind,
            "replay_of": self.replay_of,
            "done": self.done,
            "error": self.error,
        }


def _framed(headers: list[tuple[bytes, bytes]], body: bytes | bytearray, complete: bool) -> bytes:
    """``body`` as the message carries it: one chunk and the last one when the head says chunked
    and the body is whole; a cut body is left as the bytes kept."""
    if not complete or not any(n.lower() == b"transfer-encoding" for n, _ in headers):
        return bytes(body)
    return (b"%x\r\n%b\r\n" % (len(body), bytes(body)) if body else b"") + b"0\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    """Headers as ngrok (Go's http.Header) shows them: canonical names, a list of values each."""
    result: dict[str, list[str]] = {}
    for name, value in headers:
        canonical = "-".join(part[:1].upper() + part[1:].lower() for part in name.decode("latin-1").split("-"))
        result.setdefault(canonical, []).append(value.decode("latin-1"))
    return result


class Capture:
    """The last ``max_requests`` exchanges, newest last; a deque and an index by id, O(1) a request."""

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_requests = max_requests
        self.max_body = max_body
        self._exchanges: deque[Exchange] = deque()
        self._by_id: dict[str, Exchange] = {}
        # ngrok's ids are 16 hex digits; a random half per run keeps ids of two runs apart.
        self._prefix = secrets.token_hex(4)
        self._next = 0

    def begin(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], remote_addr: str,
              kind: str = "http", replay_of: str | None = None) -> Exchange:
        """A new exchange, listed at once; the oldest one goes when the list is full."""
        self._next += 1
        exchange = Exchange(f"{self._prefix}{self._next:08x}", method, target, headers, remote_addr,
                            time.time(), time.monotonic_ns(), self.max_body, kind, replay_of)
        if len(self._exchanges) >= self.max_requests:
            old = self._exchanges.popleft()
            del self._by_id[old.id]
        self._exchanges.append(exchange)
        self._by_id[exchange.id] = exchange
        return exchange

    def get(self, exchange_id: str) -> Exchange | None:
        """The exchange with this id, if still kept."""
        return self._by_id.get(exchange_id)

    def newest_first(self) -> list[Exchange]:
        """Every kept exchange, newest first (as ngrok lists them)."""
        return list(reversed(self._exchanges))

    def clear(self) -> None:
        """Forget every exchange."""
        self._exchanges.clear()
        self._by_id.clear()

    async def replay(self, exchange_id: str, local: LocalClient) -> Exchange:
        """Send a captured request to the local service again, byte for byte as it was forwarded
        (the tunnel need not be up), and keep the result as a new exchange marked ``replay_of``.

        Raises InspectError when it cannot be replayed as it was.
        """
        original = self.get(exchange_id)
        if original is None:
            raise InspectError(404, f"no captured request has id {exchange_id!r} (it may have been dropped: "
                                    "only the last --inspect-max-requests are kept); list them with "
                                    "GET /api/requests/http")
        if original.kind == "websocket":
            raise InspectError(400, "a WebSocket cannot be replayed; open it again from its client")
        if original.request_truncated:
            raise InspectError(400, f"its request body ({original.request_size} bytes) was longer than "
                                    f"--inspect-max-body ({original.cap}) and was kept cut; it cannot be "
                                    "replayed as it was. Run comzy with a larger --inspect-max-body")
        if not original.request_complete:
            raise InspectError(409, "its request body is still arriving; replay it once it has")
        body = bytes(original.request_body)
        has_body = bool(body) or any(n.lower() in (b"content-length", b"transfer-encoding")
                                     for n, _ in original.headers)
        exchange = self.begin(original.method, original.target, original.headers, "", original.kind,
                              replay_of=original.id)

        async def send_body() -> AsyncIterator[bytes]:
            if body:
                exchange.request_data(body)
                yield body
            exchange.request_complete = True

        if not has_body:
            exchange.request_complete = True
        from comzy.agent.local_http import LocalError  # the inspector loads without the HTTP client

        try:
            response = await local.request(original.method, original.target, original.headers,
                                           send_body() if has_body else None)
        except LocalError as exc:
            exchange.finish(f"replay failed: {exc}")
            raise InspectError(502, f"the local service did not answer the replay: {exc}") from exc
        exchange.response(response.status, response.headers)
        clean = False
        try:
            async for chunk in response.body():
                exchange.response_data(chunk)
            clean = True
        except LocalError as exc:
            exchange.finish(f"local service failed mid-response: {exc}")
            return exchange
        finally:
            if clean:
                await local.release(response.connection)
            else:
                await local.discard(response.connection)
        exchange.finish()
        return exchange


@dataclass(slots=True)
class TunnelInfo:
    """What ``GET /api/tunnels`` shows: set by the CLI as the tunnel comes up."""

    addr: str
    public_url: str | None = None


class InspectorAPI:
    """ngrok's agent API over a :class:`Capture`, served on a socket the CLI bound."""

    def __init__(self, capture: Capture, tunnel: TunnelInfo, local: Callable[[], LocalClient],
                 check_host: bool = True) -> None:
        self.capture = capture
        self.tunnel = tunnel
        self.local = local
        #: Only Host: localhost/127.0.0.1/[::1] on a loopback address: a web page that rebinds its
        #: DNS name to 127.0.0.1 cannot read captured requests.
        self.check_host = check_host
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Serve until cancelled."""
        server = await asyncio.start_server(self._connection, sock=sock)
        try:
            async with server:
                await server.serve_forever()
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next_event(conn, reader)
                if not isinstance(request, h11.Request):
                    return
                body = bytearray()
                too_long = False
                while not isinstance(event := await _next_event(conn, reader), h11.EndOfMessage):
                    if isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_API_BODY:
                            too_long = True
                            break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                if too_long:
                    status, payload = 413, _error(413, f"a request body of at most {MAX_API_BODY} bytes")
                else:
                    status, payload = await self._handle(request, bytes(body))
                data = b"" if payload is None else json.dumps(payload, indent=2).encode() + b"\n"
                headers = [(b"content-length", str(len(data)).encode())]
                if payload is not None:
                    headers.append((b"content-type", b"application/json"))
                if too_long:
                    headers.append((b"connection", b"close"))
                writer.write(conn.send(h11.Response(status_code=status, headers=headers,
                                                    reason=_reason(status).encode())))
                if data:
                    writer.write(conn.send(h11.Data(data=data)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, request: h11.Request, body: bytes) -> tuple[int, Any]:
        headers = {name.lower(): value for name, value in request.headers}
        if self.check_host and not _loopback_host(headers.get(b"host", b"")):
            return 403, _error(403, "the inspector answers only Host: localhost, 127.0.0.1 or [::1]")
        method = request.method.decode()
        parts = urlsplit(request.target.decode("latin-1"))
        path = parts.path.rstrip("/") or "/"
        try:
            if path == "/api/tunnels" and method == "GET":
                return 200, {"tunnels": self._tunnels(), "uri": "/api/tunnels"}
            if path == f"/api/tunnels/{TUNNEL_NAME}" and method == "GET":
                tunnels = self._tunnels()
                if not tunnels:
                    raise InspectError(404, "the tunnel is not up yet")
                return 200, tunnels[0]
            if path == "/api/requests/http":
                if method == "GET":
                    return 200, self._list(parse_qs(parts.query))
                if method == "DELETE":
                    self.capture.clear()
                    return 204, None
                if method == "POST":
                    return await self._replay(headers, body)
                raise InspectError(405, "use GET, POST (replay) or DELETE on /api/requests/http")
            if path.startswith("/api/requests/http/") and method == "GET":
                exchange = self.capture.get(path.rsplit("/", 1)[1])
                if exchange is None:
                    raise InspectError(404, "no captured request has this id; list them with GET /api/requests/http")
                return 200, exchange.to_json()
            raise InspectError(404, f"no {method} {path} here; the API is under /api (docs/agent.md)")
        except InspectError as exc:
            return exc.status, _error(exc.status, str(exc))

    def _tunnels(self) -> list[dict[str, Any]]:
        url = self.tunnel.public_url
        if url is None:
            return []
        return [{
            "name": TUNNEL_NAME,
            "uri": f"/api/tunnels/{TUNNEL_NAME}",
            "public_url": url,
            "proto": urlsplit(url).scheme or "http",
            "config": {"addr": f"http://{self.tunnel.addr}", "inspect": True},
        }]

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        exchanges = self.capture.newest_first()
        name = query.get("tunnel_name", [None])[0]
        if name is not None and name != TUNNEL_NAME:
            exchanges = []
        limit = query.get("limit", [""])[0]
        if limit.isdigit():
            exchanges = exchanges[:int(limit)]
        return {"uri": "/api/requests/http", "requests": [e.to_json() for e in exchanges]}

    async def _replay(self, headers: dict[bytes, bytes], body: bytes) -> tuple[int, Any]:
        # A JSON body only: a page elsewhere can post a form or text/plain to 127.0.0.1 without
        # asking, but not application/json.
        if not headers.get(b"content-type", b"").lower().startswith(b"application/json"):
            raise InspectError(415, 'send Content-Type: application/json and {"id": "..."}')
        try:
            params = json.loads(body)
            exchange_id = params["id"]
        except (ValueError, TypeError, KeyError):
            raise InspectError(400, 'the body must be JSON with the id to replay: {"id": "..."}') from None
        if not isinstance(exchange_id, str):
            raise InspectError(400, '"id" must be a string')
        name = params.get("tunnel_name")
        if name not in (None, "", TUNNEL_NAME):
            raise InspectError(404, f"no tunnel is named {name!r}; this agent's is {TUNNEL_NAME!r}")
        task = asyncio.ensure_future(self.capture.replay(exchange_id, self.local()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({task}, timeout=REPLAY_WAIT)
        if done:
            task.result()  # its InspectError is the answer
        return 204, None


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        return event


def _error(status: int, message: str) -> dict[str, Any]:
    """ngrok's error document."""
    return {"error_code": status, "status_code": status, "msg": message, "details": {}}


def _loopback_host(host: bytes) -> bool:
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name == "localhost" or is_loopback(name)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int]:
    """``--inspect`` ADDR: ``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1); ValueError if not."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--inspect {text!r} is not an address: give HOST:PORT (e.g. 127.0.0.1:4040), "
                         "a port, or off")
    return host, int(port)


def bind(host: str, ports: Iterable[int]) -> socket.socket:
    """A listening socket on the first of ``ports`` that is free on ``host``; OSError of the last
    one when none is."""
    error: OSError | None = None
    for port in ports:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return socket.create_server((host, port), family=family)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


def url_of(sock: socket.socket) -> str:
    """The inspector's URL for a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
