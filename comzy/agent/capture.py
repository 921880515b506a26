"""What the agent's inspector keeps: the last exchanges it forwarded, in memory, bounded.

Capture copies bytes as they pass through :class:`~comzy.agent.forward.LocalForwarder`, up to a cap
per body; it never holds the forwarded stream back. An exchange is one :class:`Exchange` in a
bounded deque (appended when the request arrives, so a stream still open is listed too): memory is
at most ``max_requests`` x (2 x ``max_body`` + heads), plus the exchanges in flight. A WebSocket's
messages and an event stream's events are kept too, as a :class:`StreamLog`: the last
:data:`MAX_STREAM_ITEMS`, each cut at :data:`MAX_ITEM_BYTES`, at most ``max_body`` bytes of them.
:meth:`Capture.replay` sends one again to the local service, as it was or with :class:`Edits`. The API over it is in
comzy/agent/inspector.py; docs/agent.md, "Inspector and local API", documents both.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comzy.agent.local_http import LocalClient

DEFAULT_MAX_REQUESTS = 500
DEFAULT_MAX_BODY = 1024 * 1024
#: ngrok names the tunnel of its command line so; scripts look it up by that name.
TUNNEL_NAME = "command_line"
#: A stream's record keeps its last this many messages (WebSocket) or events (SSE) ...
MAX_STREAM_ITEMS = 100
#: ... each cut to its first this many bytes; and at most ``max_body`` bytes of them in all.
MAX_ITEM_BYTES = 4096
#: Edits of a replay: bounds on what a caller of the API may ask the agent to send.
MAX_EDIT_HEADERS = 100
MAX_EDIT_HEAD_BYTES = 64 * 1024
MAX_EDIT_URI = 8192
MAX_EDIT_METHOD = 32
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
#: Control characters but the tab (RFC 9110 5.5), and anything Latin-1 cannot carry.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
_BAD_URI = re.compile(r"[^\x21-\x7e]")
_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")


class InspectError(Exception):
    """An API call that cannot be done: ``status`` and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StreamLog:
    """A stream's messages (WebSocket) or events (SSE) as they passed, bounded: the last
    :data:`MAX_STREAM_ITEMS`, each kept to its first :data:`MAX_ITEM_BYTES`, and at most the
    exchange's body cap of kept bytes in all (the oldest go first; ``dropped`` counts them).

    Recording is a copy of at most :data:`MAX_ITEM_BYTES` and an append: nothing waits.
    """

    __slots__ = ("bytes", "close", "count", "dropped", "item_bytes", "items", "kept", "max_bytes", "started_ns")

    def __init__(self, started_ns: int, cap: int) -> None:
        self.started_ns = started_ns
        self.max_bytes = min(cap, MAX_STREAM_ITEMS * MAX_ITEM_BYTES)
        self.item_bytes = min(MAX_ITEM_BYTES, self.max_bytes)
        #: (bytes kept, the item as a tuple): tuples, not dicts, as a message may pass every few us.
        self.items: deque[tuple[int, tuple[Any, ...]]] = deque()
        self.kept = 0
        self.count = 0  # seen in all, kept or not
        self.dropped = 0
        self.bytes = 0  # payload bytes seen in all
        #: A WebSocket's first close: (direction, code, reason).
        self.close: tuple[str, int, str] | None = None

    def add(self, kept: int, item: tuple[Any, ...]) -> None:
        """Keep ``item`` (``kept`` bytes of data), dropping the oldest ones beyond the bounds."""
        self.count += 1
        self.items.append((kept, item))
        self.kept += kept
        while len(self.items) > MAX_STREAM_ITEMS or self.kept > self.max_bytes:
            self.kept -= self.items.popleft()[0]
            self.dropped += 1

    def message(self, direction: str, text: bool, data: bytes) -> None:
        """A WebSocket message: ``direction`` "in" (visitor to local service) or "out"."""
        self.bytes += len(data)
        kept = data[:self.item_bytes]
        self.add(len(kept), (self.count, direction, text, len(data), time.monotonic_ns() - self.started_ns, kept))

    def closed(self, direction: str, code: int, reason: str) -> None:
        """A close frame went through; the first one is what the record shows."""
        if self.close is None:
            self.close = (direction, code, reason[:123])

    def to_json(self, kind: str, detail: bool) -> dict[str, Any]:
        """The ``stream`` object: counts in the list, the items and bounds too in an exchange's detail."""
        close = None if self.close is None else \
            {"direction": self.close[0], "code": self.close[1], "reason": self.close[2]}
        result: dict[str, Any] = {"count": self.count, "dropped": self.dropped, "bytes": self.bytes, "close": close}
        if detail:
            result["limits"] = {"max_items": MAX_STREAM_ITEMS, "max_item_bytes": self.item_bytes,
                                "max_bytes": self.max_bytes}
            if kind == "websocket":
                result["messages"] = [
                    {"seq": seq, "direction": direction, "type": "text" if text else "binary", "size": size,
                     "time": at, "data": base64.b64encode(data).decode(), "truncated": len(data) < size}
                    for _, (seq, direction, text, size, at, data) in self.items]
            else:
                result["events"] = [
                    {"seq": seq, "time": at, "event": event, "id": event_id, "retry": retry, "data": data,
                     "size": size, "truncated": truncated}
                    for _, (seq, at, event, event_id, retry, data, size, truncated) in self.items]
        return result


class EventStreamParser:
    """Server-Sent Events parsed from a response body as it passes (the HTML standard's
    "event stream interpretation"): any chunking, LF, CRLF or CR line ends; the events go to a
    :class:`StreamLog`. Memory is bounded whatever the stream: a line or an event's data is kept to
    the log's item size and the rest only counted (the event is then marked truncated)."""

    __slots__ = (
        "block_start",
        "data",
        "data_cut",
        "data_lines",
        "event",
        "event_id",
        "fed",
        "fields",
        "lines",
        "log",
        "pending",
        "pending_cut",
        "retry",
        "skip_lf",
    )

    def __init__(self, log: StreamLog) -> None:
        self.log = log
        self.pending = bytearray()  # the current line's start, when a chunk ended within it
        self.pending_cut = False
        self.skip_lf = False  # the last chunk ended with CR: a LF first in the next is the same line end
        self.fed = 0
        self.block_start = 0
        self.lines = 0
        self._reset()

    def _reset(self) -> None:
        self.fields = False
        self.event: bytes = b""
        self.event_id: bytes | None = None
        self.retry: int | None = None
        self.data = bytearray()
        self.data_lines = 0
        self.data_cut = False

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body."""
        if not chunk:
            return
        log = self.log
        log.bytes += len(chunk)
        start = 0
        if self.skip_lf:
            self.skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        limit = log.item_bytes + 16  # room for the field name
        for end in _SSE_LINE_END.finditer(chunk, start):
            line = chunk[start:end.start()]
            cut = False
            if self.pending:
                self.pending += line[:max(0, limit - len(self.pending))]
                line, cut = bytes(self.pending), self.pending_cut or len(self.pending) >= limit
                self.pending.clear()
                self.pending_cut = False
            start = end.end()
            # An event ends at its blank line's first byte: the same offset whether or not a CRLF
            # is split between two chunks (its LF then counts in the next event's size).
            self._line(line, cut, self.fed + end.start() + 1)
        if start < len(chunk):
            tail = chunk[start:start + max(0, limit - len(self.pending))]
            self.pending += tail
            self.pending_cut = self.pending_cut or start + len(tail) < len(chunk)
        elif chunk.endswith(b"\r"):
            self.skip_lf = True
        self.fed += len(chunk)

    def _line(self, line: bytes, cut: bool, end: int) -> None:
        if not self.lines and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a byte order mark before the first line is not part of it
        self.lines += 1
        if not line:  # a blank line ends the event
            if self.fields:
                self._dispatch(end)
            self.block_start = end
            return
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        self.fields = True
        if name == b"data":
            room = self.log.item_bytes - len(self.data)
            if self.data_lines:  # lines of data are joined by a LF
                value = b"\n" + value[:room]
            self.data_lines += 1
            self.data += value[:max(0, room)]
            self.data_cut = self.data_cut or cut or len(value) > room
        elif name == b"event":
            self.event = value[:256]
        elif name == b"id":
            if b"\0" not in value:  # as the standard says: an id with NUL is ignored
                self.event_id = value[:256]
        elif name == b"retry" and value.isdigit() and len(value) < 16:
            self.retry = int(value)

    def _dispatch(self, end: int) -> None:
        log = self.log
        data = bytes(self.data)
        event = self.event.decode("utf-8", "replace") or "message"
        event_id = None if self.event_id is None else self.event_id.decode("utf-8", "replace")
        kept = len(data) + len(self.event) + len(self.event_id or b"")
        log.add(kept, (log.count, time.monotonic_ns() - log.started_ns, event, event_id, self.retry,
                       data.decode("utf-8", "replace"), end - self.block_start, self.data_cut))
        self._reset()


@dataclass(slots=True)
class Edits:
    """What a replay with changes sends instead of the original's: None keeps the original's."""

    method: str | None = None
    target: bytes | None = None
    headers: list[tuple[bytes, bytes]] | None = None
    body: bytes | None = None

    FIELDS = ("id", "tunnel_name", "method", "uri", "headers", "body", "body_base64")

    @classmethod
    def from_json(cls, params: dict[str, Any], max_body: int) -> Edits | None:
        """The edits of ``POST /api/requests/http``'s document (None when it has none), validated:
        InspectError 400 saying which field is wrong and how."""
        unknown = sorted(set(params) - set(cls.FIELDS))
        if unknown:
            raise InspectError(400, f"unknown field {unknown[0]!r}: a replay takes {', '.join(cls.FIELDS)}")
        edits = cls()
        method = params.get("method")
        if method is not None:
            if not isinstance(method, str) or not _TOKEN.fullmatch(method) or len(method) > MAX_EDIT_METHOD:
                raise InspectError(400, f'"method" must be an HTTP method (a token of letters, digits and '
                                        f"!#$%&'*+-.^_`|~, at most {MAX_EDIT_METHOD} characters), e.g. \"POST\"")
            edits.method = method
        uri = params.get("uri")
        if uri is not None:
            if not isinstance(uri, str) or not uri.startswith("/") or _BAD_URI.search(uri) or len(uri) > MAX_EDIT_URI:
                raise InspectError(400, f'"uri" must be a path starting with "/" (and its query), at most '
                                        f"{MAX_EDIT_URI} characters, printable ASCII without spaces: "
                                        "percent-encode anything else")
            edits.target = uri.encode("ascii")
        headers = params.get("headers")
        if headers is not None:
            edits.headers = _edited_headers(headers)
        body, encoded = params.get("body"), params.get("body_base64")
        if body is not None and encoded is not None:
            raise InspectError(400, 'give the body as "body" (text) or as "body_base64", not both')
        if body is not None:
            if not isinstance(body, str):
                raise InspectError(400, '"body" must be a string (sent as UTF-8); use "body_base64" for bytes')
            edits.body = body.encode("utf-8", "replace")
        elif encoded is not None:
            with contextlib.suppress(binascii.Error, ValueError):
                edits.body = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
            if edits.body is None:
                raise InspectError(400, '"body_base64" must be a string of standard base64 (A-Z a-z 0-9 + /, '
                                        "= padding)")
        if edits.body is not None and len(edits.body) > max_body:
            raise InspectError(400, f"the edited body is {len(edits.body)} bytes, more than --inspect-max-body "
                                    f"({max_body}); a replay's body is kept whole, so run comzy with a larger "
                                    "--inspect-max-body")
        return None if edits == cls() else edits


def _edited_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """A replay's ``headers``, ``[[name, value], ...]``, validated (InspectError 400 if not)."""
    if not isinstance(headers, list) or len(headers) > MAX_EDIT_HEADERS:
        raise InspectError(400, f'"headers" must be a list of at most {MAX_EDIT_HEADERS} [name, value] pairs')
    result: list[tuple[bytes, bytes]] = []
    size = 0
    for i, pair in enumerate(headers):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InspectError(400, f'headers[{i}] must be a [name, value] pair of strings')
        name, value = pair
        if not _TOKEN.fullmatch(name):
            raise InspectError(400, f"headers[{i}]: a header name is a token (letters, digits and "
                                    f"!#$%&'*+-.^_`|~), not {name[:64]!r}")
        if _BAD_VALUE.search(value):
            raise InspectError(400, f"headers[{i}] ({name[:64]}): a header value must not contain CR, LF, NUL or "
                                    "other control characters (a tab is allowed), nor characters beyond "
                                    "Latin-1 (the API shows header bytes as Latin-1)")
        size += len(name) + len(value) + 4
        if size > MAX_EDIT_HEAD_BYTES:
            raise InspectError(400, f"the edited headers are longer than {MAX_EDIT_HEAD_BYTES} bytes in all")
        result.append((name.encode("ascii"), value.strip(" \t").encode("latin-1")))
    if sum(1 for name, _ in result if name.lower() == b"host") > 1:
        raise InspectError(400, "at most one Host header: two would let the local service pick either")
    return result


class Exchange:
    """One request and its response as the agent forwarded them, bodies cut at the cap.

    Recording it is on the path of every forwarded request, so it keeps what passes as it is and
    leaves the formatting to whoever views it: the constructor sets only what a request brings (the
    rest are class-level defaults until they change), the id is formatted when first asked for, and
    a body kept in one piece is the very bytes object that passed (a reference, not a copy); a
    second piece turns it into a bytearray that grows to the cap, as before.
    """

    kind: str = "http"  # "websocket" or "sse" for streams
    replay_of: str | None = None
    request_size: int = 0
    #: The request body was read to its end (a replay needs all of it).
    request_complete: bool = False
    status: int = 0
    response_headers: list[tuple[bytes, bytes]] | None = None
    response_size: int = 0
    duration_ns: int = 0
    done: bool = False
    error: str | None = None
    #: A replay with changes (``replay_of`` names the original).
    edited: bool = False
    #: A WebSocket's messages or an event stream's events (None for plain HTTP).
    stream: StreamLog | None = None
    sse: EventStreamParser | None = None
    # The bodies' first ``cap`` bytes: None, the one piece that passed, or a bytearray of several.
    _request_kept: bytes | bytearray | None = None
    _response_kept: bytes | bytearray | None = None
    _id: str | None = None

    def __init__(self, prefix: str, number: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                 remote_addr: str, cap: int, tunnel_name: str = TUNNEL_NAME) -> None:
        self._prefix = prefix
        #: Its place in the capture's sequence (the id's last 8 hex digits).
        self.number = number
        self.method = method
        self.target = target
        #: As sent to the local service: the Host rule applied, chunked framing added when needed.
        self.headers = headers
        self.remote_addr = remote_addr
        self.cap = cap
        #: The tunnel it came through (its name in comzy.yml, or ``PORT`` with several ports), whose
        #: local service a replay goes to; ngrok's ``command_line`` for ``comzy 3000``.
        self.tunnel_name = tunnel_name
        self.started = time.time()  # wall clock
        self.started_ns = time.monotonic_ns()  # monotonic, for the duration

    @property
    def id(self) -> str:
        """ngrok's shape: 16 hex digits, the capture's random half then the sequence number."""
        if self._id is None:
            self._id = f"{self._prefix}{self.number:08x}"
        return self._id

    # -- the forwarder's hooks: O(1) per chunk, a copy only while under the cap -------------
    def request_data(self, chunk: bytes) -> None:
        """Bytes of the request body as they go to the local service."""
        size = self.request_size
        self.request_size = size + len(chunk)
        if size < self.cap:
            self._request_kept = _keep(self._request_kept, chunk, self.cap - size)

    def response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The response head from the local service (or the agent's own 502)."""
        self.status = status
        self.response_headers = headers
        if self.kind == "http":
            # A plain loop: a generator over the fields cost more than the rest of recording.
            for name, value in headers:
                if len(name) == 12 and name.lower() == b"content-type" and \
                        value[:17].lower() == b"text/event-stream":
                    self.kind = "sse"
                    self.stream = StreamLog(self.started_ns, self.cap)
                    self.sse = EventStreamParser(self.stream)
                    break

    def response_data(self, chunk: bytes | memoryview) -> None:
        """Bytes of the response body as they go back to the visitor (a large body's reads come
        as read-only views: local_http's ``_DirectBody``)."""
        size = self.response_size
        self.response_size = end = size + len(chunk)
        if size < self.cap:
            if self._response_kept is None and end <= self.cap and type(chunk) is bytes:
                self._response_kept = chunk  # _keep's first case, in line: most bodies are one piece
            else:
                self._response_kept = _keep(self._response_kept, chunk, self.cap - size)
        if self.sse is not None:
            self.sse.feed(chunk if type(chunk) is bytes else bytes(chunk))

    def ws_message(self, direction: str, text: bool, data: bytes) -> None:
        """A WebSocket message, "in" (from the visitor) or "out" (from the local service): its bytes
        join the request's or the response's raw body (up to the cap) and it is logged as a message."""
        if direction == "in":
            self.request_data(data)
        else:
            self.response_data(data)
        if self.stream is not None:
            self.stream.message(direction, text, data)

    def ws_close(self, direction: str, code: int, reason: str) -> None:
        """A WebSocket close frame, "in" or "out"."""
        if self.stream is not None:
            self.stream.closed(direction, code, reason)

    def finish(self, error: str | None = None) -> None:
        """The exchange is over (however it ended)."""
        self.duration_ns = time.monotonic_ns() - self.started_ns
        self.error = error
        self.done = True

    # -- the API's view --------------------------------------------------------------------
    @property
    def request_truncated(self) -> bool:
        """More request body passed than was kept."""
        return self.request_size > self.cap

    @property
    def response_truncated(self) -> bool:
        """More response body passed than was kept."""
        return self.response_size > self.cap

    @property
    def request_body(self) -> bytes:
        """The request body's first ``cap`` bytes."""
        return bytes(self._request_kept or b"")

    @property
    def response_body(self) -> bytes:
        """The response body's first ``cap`` bytes."""
        return bytes(self._response_kept or b"")

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

    def to_json(self, detail: bool = False) -> dict[str, Any]:
        """The exchange in ngrok's shape, plus Comzy's fields (docs/agent.md); ``detail`` adds a
        stream's messages or events (the list has their counts only)."""
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
            "tunnel_name": self.tunnel_name,
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
            "edited": self.edited,
            "stream": None if self.stream is None else self.stream.to_json(self.kind, detail),
            "done": self.done,
            "error": self.error,
        }


def _keep(kept: bytes | bytearray | None, chunk: bytes | memoryview, room: int) -> bytes | bytearray:
    """``kept`` (a body's bytes kept so far) with the first ``room`` bytes of ``chunk`` added."""
    if kept is None:
        # A body's first piece, often its only one: kept as it is when it is whole and immutable.
        return chunk if type(chunk) is bytes and len(chunk) <= room else bytes(chunk[:room])
    if type(kept) is bytes:
        kept = bytearray(kept)
    kept += chunk[:room]
    return kept


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
    """The last ``max_requests`` exchanges, newest last: a deque of that length, so adding one is an
    append (the oldest falls off) and finding one by id an index (ids number them in order)."""

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_requests = max_requests
        self.max_body = max_body
        self._exchanges: deque[Exchange] = deque(maxlen=max_requests)
        # ngrok's ids are 16 hex digits; a random half per run keeps ids of two runs apart.
        self._prefix = secrets.token_hex(4)
        self._next = 0
        #: Each tunnel's Host rule (``--host-header``) by tunnel name, applied to a replay's edited
        #: headers; every forwarder sharing this capture adds its own.
        self.host_rules: dict[str, Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]] = {}

    def begin(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], remote_addr: str,
              kind: str = "http", replay_of: str | None = None, tunnel_name: str = TUNNEL_NAME,
              request_complete: bool = False) -> Exchange:
        """A new exchange, listed at once; the oldest one goes when the list is full.
        ``request_complete``: it has no request body to wait for."""
        self._next += 1
        exchange = Exchange(self._prefix, self._next, method, target, headers, remote_addr, self.max_body,
                            tunnel_name)
        if kind != "http":
            exchange.kind = kind
            if kind == "websocket":
                exchange.stream = StreamLog(exchange.started_ns, self.max_body)
        if replay_of is not None:
            exchange.replay_of = replay_of
        if request_complete:
            exchange.request_complete = True
        self._exchanges.append(exchange)
        return exchange

    def get(self, exchange_id: str) -> Exchange | None:
        """The exchange with this id, if still kept."""
        exchanges = self._exchanges
        if not exchanges or len(exchange_id) != 16 or not exchange_id.startswith(self._prefix):
            return None
        try:
            index = int(exchange_id[len(self._prefix):], 16) - exchanges[0].number
        except ValueError:
            return None
        if not 0 <= index < len(exchanges):
            return None
        exchange = exchanges[index]
        # int() takes more spellings than the id's own ("+1", upper case, "_"): only that one finds it.
        return exchange if exchange.id == exchange_id else None

    def newest_first(self) -> list[Exchange]:
        """Every kept exchange, newest first (as ngrok lists them)."""
        return list(reversed(self._exchanges))

    def clear(self) -> None:
        """Forget every exchange."""
        self._exchanges.clear()

    async def replay(self, exchange_id: str, local: LocalClient, edits: Edits | None = None) -> Exchange:
        """Send a captured request to the local service again (see :meth:`start_replay`) and
        return the replay's exchange once its response has been read."""
        _, send = self.start_replay(exchange_id, edits)
        return await send(local)

    def start_replay(self, exchange_id: str, edits: Edits | None = None, tunnel_name: str | None = None,
                     ) -> tuple[Exchange, Callable[[LocalClient], Awaitable[Exchange]]]:
        """A replay of a captured request, listed at once as a new exchange marked ``replay_of``
        (and ``edited`` with ``edits``), and the call that sends it to the local service (the tunnel
        need not be up): the local service of ``tunnel_name``, by default the tunnel the original
        came through (the replay's ``tunnel_name`` says which; the caller passes its local client).
        Without edits it goes byte for byte as it was forwarded; with edits, the fields given
        replace the original's, the body is framed with its Content-Length and that tunnel's Host
        rule (``host_rules``) is applied to the headers.

        Raises InspectError when it cannot be replayed.
        """
        original = self.get(exchange_id)
        if original is None:
            raise InspectError(404, f"no captured request has id {exchange_id!r} (it may have been dropped: "
                                    "only the last --inspect-max-requests are kept); list them with "
                                    "GET /api/requests/http")
        if original.kind == "websocket":
            raise InspectError(400, "a WebSocket cannot be replayed; open it again from its client")
        if edits is None or edits.body is None:
            if original.request_truncated:
                raise InspectError(400, f"its request body ({original.request_size} bytes) was longer than "
                                        f"--inspect-max-body ({original.cap}) and was kept cut; it cannot be "
                                        "replayed as it was. Run comzy with a larger --inspect-max-body, or "
                                        "replay it with a new body")
            if not original.request_complete:
                if original.done:
                    raise InspectError(400, "its request body never arrived whole (the visitor's request was cut "
                                            "short), so there is no whole request to send again")
                raise InspectError(409, "its request body is still arriving; replay it once it has")
        method, target, headers = original.method, original.target, original.headers
        body = bytes(original.request_body)
        has_body = bool(body) or any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers)
        if edits is not None:
            method = edits.method or method
            target = edits.target or target
            body = body if edits.body is None else edits.body
            headers = [(n, v) for n, v in (headers if edits.headers is None else edits.headers)
                       if n.lower() not in (b"content-length", b"transfer-encoding")]
            if body or has_body:
                headers.append((b"content-length", b"%d" % len(body)))
            has_body = bool(body) or has_body
            host_rule = self.host_rules.get(tunnel_name or original.tunnel_name)
            if host_rule is not None:
                headers = host_rule(headers)
        # "http": its response decides whether it is an event stream again (a WebSocket is refused above).
        exchange = self.begin(method, target, headers, "", "http", replay_of=original.id,
                              tunnel_name=tunnel_name or original.tunnel_name)
        exchange.edited = edits is not None
        if not has_body:
            exchange.request_complete = True

        async def send_body() -> AsyncIterator[bytes]:
            if body:
                exchange.request_data(body)
                yield body
            exchange.request_complete = True

        async def send(local: LocalClient) -> Exchange:
            # The inspector loads without the HTTP client.
            from comzy.agent.local_http import LocalError, StaleConnection

            for attempt in (1, 2):
                try:
                    response = await local.request(method, target, headers, send_body() if has_body else None)
                    break
                except StaleConnection:
                    if attempt == 1:
                        continue  # a pooled connection closed under us, nothing sent: a fresh one, as a forward
                    exchange.finish("replay failed: the local service closed the connection without answering")
                    raise InspectError(502, "the local service closed the connection without answering the "
                                            "replay") from None
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

        return exchange, send
