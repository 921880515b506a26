"""What the agent's inspector keeps: the last exchanges it forwarded, in memory, bounded.

Capture copies bytes as they pass through :class:`~comzy.agent.forward.LocalForwarder`, up to a cap
per body; it never holds the forwarded stream back. An exchange is one :class:`Exchange` in a
bounded deque (appended when the request arrives, so a stream still open is listed too): memory is
at most ``max_requests`` x (2 x ``max_body`` + heads), plus the exchanges in flight.
:meth:`Capture.replay` sends one again to the local service. The API over it is in
comzy/agent/inspector.py; docs/agent.md, "Inspector and local API", documents both.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comzy.agent.local_http import LocalClient

DEFAULT_MAX_REQUESTS = 500
DEFAULT_MAX_BODY = 1024 * 1024
#: ngrok names the tunnel of its command line so; scripts look it up by that name.
TUNNEL_NAME = "command_line"


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
        head = [b"HTTP/1.1 %d %s" % (self.status, reason_phrase(self.status).encode())]
        head += [name + b": " + value for name, value in headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + _framed(headers, self.response_body,
                                                          self.done and not self.response_truncated)

    def to_json(self) -> dict[str, Any]:
        """The exchange in ngrok's shape, plus Comzy's fields (docs/agent.md)."""
        target = self.target.decode("latin-1")
        response = None
        if self.response_headers is not None:
            response = {
                "status": f"{self.status} {reason_phrase(self.status)}".strip(),
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


def reason_phrase(status: int) -> str:
    """The standard reason phrase of ``status`` (empty for a code without one)."""
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
            if original.done:
                raise InspectError(400, "its request body never arrived whole (the visitor's request was cut "
                                        "short), so there is no whole request to send again")
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
