"""The agent's inspector: ngrok's local API (``GET /api/tunnels``, ``/api/requests/http``, replay)
over what comzy/agent/capture.py keeps, on 127.0.0.1:4040 (the next free port up to 4049).

A small HTTP/1.1 server on h11 (already installed with uvicorn and hypercorn), run in the agent's
event loop on a socket the CLI binds first, so that the port is known, and printed, before the
tunnel starts. docs/agent.md, "Inspector and local API", documents the shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import h11

from comzy.agent import inspector_page
from comzy.agent.capture import TUNNEL_NAME, Capture, Edits, Exchange, InspectError, reason_phrase
from comzy.agent.inspector_page import Reply

if TYPE_CHECKING:
    from comzy.agent.local_http import LocalClient

#: Where the inspector listens unless ``--inspect`` says otherwise: ngrok's port, then the next
#: ones while they are busy (a second agent on the same machine takes 4041). Tests override it.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = range(4040, 4050)
#: An API request's body is a small JSON document: anything longer is refused (a replay with an
#: edited body may be longer: up to twice --inspect-max-body more, for its base64 or JSON escapes).
MAX_API_BODY = 64 * 1024
#: How long ``POST /api/requests/http`` waits for the replay to finish before answering 204 anyway
#: (the replay goes on and is listed; an event stream would otherwise hold the call forever).
REPLAY_WAIT = 10.0


@dataclass(slots=True)
class TunnelInfo:
    """What ``GET /api/tunnels`` shows: set by the CLI as the tunnel comes up."""

    addr: str
    public_url: str | None = None
    #: The tunnel's name: ngrok's ``command_line`` for ``comzy 3000``; its own for an agent that
    #: serves several (``comzy 3000 8080``, ``comzy start web api``).
    name: str = TUNNEL_NAME
    #: The agent's other tunnels, listed after this one (empty: one tunnel).
    more: list[TunnelInfo] = field(default_factory=list)


class InspectorAPI:
    """ngrok's agent API over a :class:`Capture`, served on a socket the CLI bound."""

    def __init__(self, capture: Capture, tunnel: TunnelInfo, local: Callable[[str], LocalClient],
                 check_host: bool = True) -> None:
        self.capture = capture
        self.tunnel = tunnel
        #: The local client of a tunnel, by its name: where a replay of that tunnel's request goes.
        self.local = local
        #: Only Host: localhost/127.0.0.1/[::1] on a loopback address: a web page that rebinds its
        #: DNS name to 127.0.0.1 cannot read captured requests.
        self.check_host = check_host
        self._tasks: set[asyncio.Task[Any]] = set()
        self.max_api_body = MAX_API_BODY + 2 * capture.max_body
        self.streams = inspector_page.Streams(capture, tunnel)

    async def serve(self, sock: socket.socket) -> None:
        """Serve until cancelled."""
        server = await asyncio.start_server(self._connection, sock=sock)
        try:
            async with server:
                await server.serve_forever()
        finally:
            self.streams.closing.set()
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
                        if len(body) > self.max_api_body:
                            too_long = True
                            break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                if too_long:
                    status, result = 413, _error(413, f"a request body of at most {self.max_api_body} bytes")
                else:
                    status, result = await self._handle(request, bytes(body))
                # A replay is answered 204, with where it is listed (Comzy's Location).
                location, result = (result.location, None) if isinstance(result, Replayed) else (None, result)
                if isinstance(result, Reply):  # the page, its assets, the live stream
                    if not await _send_reply(conn, reader, writer, status, result):
                        return
                    conn.start_next_cycle()
                    continue
                payload = result if result is None or isinstance(result, Listing) else \
                    json.dumps(result, indent=2).encode() + b"\n"
                headers = [] if isinstance(payload, Listing) else \
                    [(b"content-length", b"0" if payload is None else b"%d" % len(payload))]
                if payload is not None:
                    headers.append((b"content-type", b"application/json"))
                headers += inspector_page.COMMON_HEADERS
                if too_long:
                    headers.append((b"connection", b"close"))
                if location is not None:
                    headers.append((b"location", location.encode()))
                writer.write(conn.send(h11.Response(status_code=status, headers=headers,
                                                    reason=reason_phrase(status).encode())))
                # A listing goes out an exchange at a time (chunked): 500 of them with 1 MiB bodies
                # are a gigabyte of base64, never built whole.
                for data in payload if isinstance(payload, Listing) else [payload or b""]:
                    if data:
                        writer.write(conn.send(h11.Data(data=data)))
                        await writer.drain()
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # The agent is stopping with a connection open (a page's live stream, a keep-alive): the
            # loop cancels this task, which nothing awaits, and Python 3.11's start_server callback
            # would print the CancelledError as a traceback on Ctrl-C. End quietly instead.
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(self, request: h11.Request, body: bytes) -> tuple[int, Any]:
        headers = {name.lower(): value for name, value in request.headers}
        if self.check_host and not _loopback_host(headers.get(b"host", b"")):
            return 403, _error(403, "the inspector answers only Host: localhost, 127.0.0.1 or [::1]")
        method = request.method.decode()
        if (refusal := inspector_page.cross_site(method, headers)) is not None:
            return 403, _error(403, refusal)
        parts = urlsplit(request.target.decode("latin-1"))
        path = parts.path.rstrip("/") or "/"
        if method == "GET" and (page := inspector_page.asset(path)) is not None:
            return 200, page
        if path == "/api/stream" and method == "GET":
            stream = self.streams.reply()
            if stream is None:
                return 503, _error(503, f"{inspector_page.MAX_STREAMS} inspector pages are open already; "
                                        "close one and reload")
            return 200, stream
        try:
            if path == "/api/tunnels" and method == "GET":
                return 200, {"tunnels": self._tunnels(), "uri": "/api/tunnels"}
            if path.startswith("/api/tunnels/") and method == "GET":
                wanted = unquote(path[len("/api/tunnels/"):])
                tunnels = [tunnel for tunnel in self._tunnels() if tunnel["name"] == wanted]
                if not tunnels:
                    raise InspectError(404, "the tunnel is not up yet" if wanted == self.tunnel.name else
                                       "no tunnel has this name; list them with GET /api/tunnels")
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
                return 200, exchange.to_json(detail=True)
            raise InspectError(404, f"no {method} {path} here; the API is under /api (docs/agent.md)")
        except InspectError as exc:
            return exc.status, _error(exc.status, str(exc))

    def _tunnels(self) -> list[dict[str, Any]]:
        return [{
            "name": tunnel.name,
            "uri": f"/api/tunnels/{quote(tunnel.name)}",
            "public_url": tunnel.public_url,
            "proto": urlsplit(tunnel.public_url).scheme or "http",
            "config": {"addr": f"http://{tunnel.addr}", "inspect": True},
        } for tunnel in (self.tunnel, *self.tunnel.more) if tunnel.public_url is not None]

    def _list(self, query: dict[str, list[str]]) -> Listing:
        exchanges = self.capture.newest_first()
        name = query.get("tunnel_name", [None])[0]
        if name is not None:
            exchanges = [exchange for exchange in exchanges if exchange.tunnel_name == name]
        limit = query.get("limit", [""])[0]
        if limit.isdigit():
            exchanges = exchanges[:int(limit)]
        return Listing(exchanges)

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
        # ngrok's tunnel_name: the tunnel whose local service gets the replay (by default the one
        # the original came through).
        name = params.get("tunnel_name") or None
        names = [tunnel.name for tunnel in (self.tunnel, *self.tunnel.more)]
        if name is not None and name not in names:
            raise InspectError(404, f"no tunnel is named {str(name)[:64]!r}; this agent's: {', '.join(names)}")
        edits = Edits.from_json(params, self.capture.max_body)  # Comzy's extension: replay with changes
        replay, send = self.capture.start_replay(exchange_id, edits, name)
        task = asyncio.ensure_future(send(self.local(replay.tunnel_name)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({task}, timeout=REPLAY_WAIT)
        if done:
            task.result()  # its InspectError is the answer
        return 204, Replayed(f"/api/requests/http/{replay.id}")


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        return event


class Listing:
    """``GET /api/requests/http``'s document, as pieces of JSON: an exchange each."""

    def __init__(self, exchanges: list[Exchange]) -> None:
        self.exchanges = exchanges

    def __iter__(self) -> Iterator[bytes]:
        yield b'{"uri": "/api/requests/http", "requests": ['
        for i, exchange in enumerate(self.exchanges):
            yield (b", " if i else b"") + json.dumps(exchange.to_json()).encode()
        yield b"]}\n"


async def _send_reply(conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      status: int, reply: Reply) -> bool:
    """Write ``reply``; whether the connection can take another request (not after a stream)."""
    headers = reply.headers + inspector_page.COMMON_HEADERS
    writer.write(conn.send(h11.Response(status_code=status, headers=headers,
                                        reason=reason_phrase(status).encode())))
    if reply.body:
        writer.write(conn.send(h11.Data(data=reply.body)))
    if reply.stream is not None:
        # A page sends nothing more on its stream: the end of its side means it went, and its slot
        # is given back at the next tick (not at the next write, up to a keep-alive later).
        gone = asyncio.ensure_future(reader.read(1))
        gone.add_done_callback(lambda done: done.cancelled() or done.exception())  # a reset is an end too
        try:
            async for data in reply.stream:
                if gone.done():
                    break
                writer.write(conn.send(h11.Data(data=data)))
                await asyncio.wait_for(writer.drain(), reply.write_timeout)
        except TimeoutError:
            pass
        finally:
            gone.cancel()
            await reply.stream.aclose()
        return False
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


@dataclass(slots=True)
class Replayed:
    """A replay's answer: 204, and the replay's exchange in ``Location``."""

    location: str


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
