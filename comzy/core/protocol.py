"""The agent <-> server wire protocol: a sans-I/O frame codec.

Every WebSocket binary message carries one or more whole frames. A frame is a fixed
10-byte header followed by its payload::

    length:u32  type:u8  flags:u8  stream:u32  payload[length]

Bodies travel as raw bytes in DATA frames (never base64). Structured payloads (HELLO,
WELCOME, REQUEST, RESPONSE, ...) are msgpack maps: the stream heads are read and written by
``RequestHead`` and ``ResponseHead`` here, the control messages by the dataclasses in
comzy/core/control.py. Nothing here touches a socket: the session module feeds bytes in and
sends the bytes this module returns. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBBI")
HEADER_SIZE = HEADER.size
#: Largest DATA payload a sender may put in one frame.
MAX_DATA_FRAME = 64 * 1024
#: Largest payload of any frame; control frames (request heads) may be bigger than DATA.
MAX_FRAME_PAYLOAD = 1024 * 1024
#: Largest PING/PONG payload (Comzy sends 8 random bytes); a bigger one is a protocol error, so a
#: peer cannot make us echo megabytes.
MAX_PING_PAYLOAD = 8
#: Initial per-stream receive window (bytes of DATA a sender may have in flight).
DEFAULT_WINDOW = 256 * 1024
#: The per-stream windows a HELLO or WELCOME may announce.
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 16 * 1024 * 1024
#: Extra window a receiver may grant, over all streams of a session, to streams whose reader
#: keeps up (a receiver's own choice: the sender only ever sees WINDOW credit).
SESSION_WINDOW_BUDGET = 16 * 1024 * 1024
MAX_STREAM_ID = 2**32 - 1

# DATA flags. On WebSocket streams a message is a run of DATA frames ending with FLAG_FIN.
FLAG_TEXT = 0x01
FLAG_FIN = 0x02


class FrameType(enum.IntEnum):
    """The closed set of frame types."""

    HELLO = 1  #: agent -> server: version, requested alias, resume secret, token
    WELCOME = 2  #: server -> agent: alias, public URL, resume secret, limits
    REJECT = 3  #: server -> agent: registration refused, with a human reason
    REQUEST = 4  #: server -> agent: opens a stream with an HTTP request head
    RESPONSE = 5  #: agent -> server: the response head of a stream
    DATA = 6  #: body bytes or a WebSocket message fragment
    END = 7  #: sender will send no more DATA on the stream (half-close)
    RESET = 8  #: abort a stream, with a code and a message
    WINDOW = 9  #: grant the peer more credit on a stream
    PING = 10  #: heartbeat; answered by PONG with the same payload
    PONG = 11
    GOAWAY = 12  #: sender is shutting down; no new streams
    NOTICE = 13  #: server -> agent: a message for the user (expiry warnings)
    WS_CLOSE = 14  #: a WebSocket stream closed with a code and reason


class ResetCode(enum.IntEnum):
    """Why a stream was aborted."""

    CANCEL = 0  #: the other end went away (visitor disconnected)
    INTERNAL = 1
    LOCAL_FAILED = 2  #: the local service failed mid-response
    REFUSED = 3  #: too many streams
    FLOW_CONTROL = 4
    #: Cluster links only, never sent to agents: the tunnel is not (or no longer) on this control
    #: node; the request never reached an agent, so the edge may look it up again and retry.
    MOVED = 5


# The type codes as ints, for the encoders run per request: reading a member off the Enum class goes
# through EnumType.__getattr__ on CPython 3.11 (about 1k instructions a read).
_REQUEST, _RESPONSE, _DATA, _END = (int(FrameType.REQUEST), int(FrameType.RESPONSE), int(FrameType.DATA),
                                    int(FrameType.END))
_T_DATA, _T_WINDOW, _T_RESET, _T_END, _T_PING, _T_PONG = (FrameType.DATA, FrameType.WINDOW, FrameType.RESET,
                                                         FrameType.END, FrameType.PING, FrameType.PONG)

# Frames whose payload is a msgpack map.
_MAP_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.REJECT,
        FrameType.REQUEST,
        FrameType.RESPONSE,
        FrameType.GOAWAY,
        FrameType.NOTICE,
        FrameType.WS_CLOSE,
    }
)
# Frames that belong to a stream; the rest must use stream 0.
_STREAM_TYPES = frozenset(
    {
        FrameType.REQUEST,
        FrameType.RESPONSE,
        FrameType.DATA,
        FrameType.END,
        FrameType.RESET,
        FrameType.WINDOW,
        FrameType.WS_CLOSE,
    }
)
_RESET = struct.Struct(">I")
_WINDOW = struct.Struct(">I")
#: Each type code's member and its two checks, read in one lookup per frame received: the enum's
#: own call (``FrameType(code)``) and the two set tests took about a third of decoding a small
#: response's three frames (micro-benchmark, docs/benchmarks.md).
_KINDS: dict[int, tuple[FrameType, bool, bool]] = {
    kind.value: (kind, kind in _STREAM_TYPES, kind in _MAP_TYPES) for kind in FrameType
}


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame; the session must close."""


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``payload`` is raw bytes (DATA, PING) or a decoded value."""

    type: FrameType
    stream: int = 0
    flags: int = 0
    payload: Any = b""


@dataclass(slots=True)
class RequestHead:
    """The head of a proxied HTTP request or WebSocket upgrade (REQUEST payload)."""

    method: str
    target: bytes  # raw path and query, exactly as the visitor sent them
    headers: list[tuple[bytes, bytes]]
    client: str = ""
    scheme: str = "http"
    http_version: str = "1.1"
    websocket: bool = False
    subprotocols: list[str] = field(default_factory=list)
    has_body: bool = False  # Content-Length > 0 or chunked: the agent must stream a body
    #: Which of the session's tunnels the request is for (``tn``): the agent's name for it, set only
    #: on a session that carries several (HELLO ``tunnels``). Never guessed from Host: custom
    #: domains map any name to a tunnel.
    tunnel: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire (``tn`` only when ``tunnel`` is set)."""
        payload: dict[str, Any] = {
            "m": self.method,
            "t": self.target,
            "h": [[k, v] for k, v in self.headers],
            "c": self.client,
            "s": self.scheme,
            "v": self.http_version,
            "w": self.websocket,
            "sp": self.subprotocols,
            "b": self.has_body,
        }
        if self.tunnel is not None:
            payload["tn"] = self.tunnel
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RequestHead:
        """Parse a REQUEST payload; raises ProtocolError on a malformed one."""
        # Once per request on the agent: the header list and the checks in line, no comprehension
        # over an empty subprotocol list, positional arguments (four calls fewer per request).
        get = payload.get
        try:
            target = payload["t"]
            if not isinstance(target, bytes):  # bytes(5) would be five NULs, bytes(2**63) an OverflowError
                raise TypeError("the target must be bytes")
            # msgpack decodes bin to bytes, never a subclass: the exact type test is the same check, cheaper.
            headers = [(name, value) if type(name) is bytes and type(value) is bytes else _not_bytes()
                       for name, value in payload["h"]]
            subprotocols = get("sp", _NONE)
            subprotocols = [] if subprotocols == [] else [str(p) for p in subprotocols]
            tunnel = get("tn")
            return cls(str(payload["m"]), target, headers, str(get("c", "")), str(get("s", "http")),
                       str(get("v", "1.1")), bool(get("w", False)), subprotocols, bool(get("b", False)),
                       None if tunnel is None else _tunnel_name(tunnel))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"malformed REQUEST head: {exc!r}") from exc


#: REQUEST ``sp`` when absent: no subprotocols.
_NONE: list[str] = []


def _tunnel_name(value: Any) -> str | None:
    """REQUEST ``tn``: None, or a tunnel name of at most 64 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise TypeError("'tn' must be a tunnel name (a string of 1 to 64 characters)")
    return value


@dataclass(slots=True)
class ResponseHead:
    """The head of a response (RESPONSE payload); status 101 accepts a WebSocket."""

    status: int
    headers: list[tuple[bytes, bytes]]
    subprotocol: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire."""
        return {"s": self.status, "h": [[k, v] for k, v in self.headers], "sp": self.subprotocol}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ResponseHead:
        """Parse a RESPONSE payload; raises ProtocolError on a malformed one."""
        try:
            status = int(payload["s"])
            if not 100 <= status <= 999:
                raise ValueError(f"status {status} out of range")
            sub = payload.get("sp")
            return cls(status, _header_list(payload["h"]), None if sub is None else str(sub))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"malformed RESPONSE head: {exc!r}") from exc


def sendable_close_code(code: int) -> int:
    """A close code that may go on the wire: 1005/1006/1015 only describe a missing or
    abnormal close and must never be sent, so they become a normal 1000."""
    return 1000 if code in (1005, 1006, 1015) or code < 1000 else code


def _header_list(raw: Any) -> list[tuple[bytes, bytes]]:
    # msgpack decodes bin to bytes, never a subclass: the exact type test is the same check, cheaper.
    return [(name, value) if type(name) is bytes and type(value) is bytes else _not_bytes() for name, value in raw]


def _not_bytes() -> tuple[bytes, bytes]:
    raise TypeError("header names and values must be bytes")


#: One packer for every map: ``msgpack.packb`` builds a Packer on each call. Packing is a single C
#: call that never releases the GIL or calls back into Python (no ``default``), so sharing it is safe.
_PACKER = msgpack.Packer(use_bin_type=True)


def encode(frame_type: FrameType, stream: int = 0, payload: Any = b"", flags: int = 0) -> bytes:
    """Encode one frame. Map-typed frames take a dict; the others take bytes."""
    body = _PACKER.pack(payload) if frame_type in _MAP_TYPES else payload
    return HEADER.pack(len(body), frame_type, flags, stream) + body


def encode_bodyless_request(stream: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]], client: str,
                            scheme: str, http_version: str, tunnel: str | None,
                            extra: dict[str, Any] | None = None) -> bytes:
    """The REQUEST frame of an HTTP request without a body, then the stream's END, in one piece:
    what ``encode(REQUEST, stream, RequestHead(...).to_payload())`` and ``encode(END, stream)``
    give, made without the dataclass, its header list copy and two more calls (the edge's plain
    path, once per request). ``headers`` pairs are packed as they are (a tuple is a msgpack array).
    ``extra`` entries go last in the map (an edge's link keys, ``RouteEntry.head_extra``)."""
    payload: dict[str, Any] = {"m": method, "t": target, "h": headers, "c": client, "s": scheme, "v": http_version,
                               "w": False, "sp": [], "b": False}
    if tunnel is not None:
        payload["tn"] = tunnel
    if extra:
        payload.update(extra)
    body = _PACKER.pack(payload)
    return HEADER.pack(len(body), _REQUEST, 0, stream) + body + HEADER.pack(0, _END, 0, stream)


def encode_data(stream: int, data: bytes | memoryview, flags: int = 0) -> bytes:
    """Encode a DATA frame (the hot path: no msgpack, one copy of ``data``)."""
    return HEADER.pack(len(data), _DATA, flags, stream) + data




def encode_answer(stream: int, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A whole answer in one piece: its RESPONSE head (``ResponseHead(status, headers)``), ``body``
    in one DATA frame unless it is empty, and END; byte for byte the frames ``encode`` makes of
    each. ``body`` must fit one DATA frame (MAX_DATA_FRAME)."""
    # msgpack packs a tuple as the array a list makes: the header pairs need no copy into lists.
    head = _PACKER.pack({"s": status, "h": headers, "sp": None})
    pack = HEADER.pack
    if body:
        return b"".join((pack(len(head), _RESPONSE, 0, stream), head, pack(len(body), _DATA, 0, stream), body,
                         pack(0, _END, 0, stream)))
    return pack(len(head), _RESPONSE, 0, stream) + head + pack(0, _END, 0, stream)


#: DATA payloads from this size on are queued beside their header rather than copied behind it
#: (see ``DataFrame``); smaller ones are cheaper to copy than to carry as one more buffer.
PIECES_FROM = 16 * 1024


class DataFrame:
    """A DATA frame held as its header and its payload, not joined: the session queues it as it
    is, and the agent link writes both with the rest of its message in one ``writelines``
    (``WebSocket.write_frames``), so a body's bytes are not copied between the local app's read
    and the kernel. ``len()`` is its size on the wire, as for a frame in bytes.

    ``payload`` must not change until the frame is written: ``data_frame`` makes one only of an
    immutable ``bytes`` (or a view of one).
    """

    __slots__ = ("header", "payload", "size")

    def __init__(self, header: bytes, payload: bytes | memoryview) -> None:
        self.header = header
        self.payload = payload
        self.size = len(header) + len(payload)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.header + self.payload


#: What a session queues for its peer: whole frames in bytes, or large DATA frames in two pieces.
Queued = bytes | DataFrame


def data_frame(stream: int, data: bytes | memoryview, flags: int = 0, immutable: bool = True) -> Queued:
    """A DATA frame for a session's queue: a ``DataFrame`` for a large payload of immutable
    bytes (``immutable``: ``data`` is, or views, a ``bytes``), else bytes as ``encode_data``."""
    if immutable and len(data) >= PIECES_FROM:
        return DataFrame(HEADER.pack(len(data), _DATA, flags, stream), data)
    return HEADER.pack(len(data), _DATA, flags, stream) + data


def join_frames(frames: list[Queued]) -> bytes:
    """Queued frames as one message in bytes (for a link that cannot write pieces)."""
    return b"".join(frame_pieces(frames))


def frame_pieces(frames: list[Queued]) -> list[bytes | memoryview]:
    """Queued frames as the buffers of one message, in order (headers and payloads unjoined)."""
    pieces: list[bytes | memoryview] = []
    for frame in frames:
        if type(frame) is bytes:
            pieces.append(frame)
        else:
            assert isinstance(frame, DataFrame)
            pieces.append(frame.header)
            pieces.append(frame.payload)
    return pieces


def encode_reset(stream: int, code: ResetCode, message: str = "") -> bytes:
    """Encode a RESET frame: a u32 code then a UTF-8 message."""
    return encode(_T_RESET, stream, _RESET.pack(code) + message.encode()[:1024])


def encode_window(stream: int, increment: int) -> bytes:
    """Encode a WINDOW frame granting ``increment`` more bytes of credit."""
    return encode(_T_WINDOW, stream, _WINDOW.pack(increment))


def decode_message(message: bytes) -> Iterator[Frame]:
    """Decode every frame in one WebSocket message.

    Raises ProtocolError for a truncated, oversized or unknown frame, or a payload that
    does not fit its type. Frames before a bad one are yielded first.
    """
    # Slicing bytes copies once; any other buffer goes through a view (bytes() of its slice).
    source: Any = message if type(message) is bytes else memoryview(message)
    offset = 0
    end = len(message)
    if end == 0:
        raise ProtocolError("empty message")
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise ProtocolError(f"truncated frame header ({end - offset} bytes)")
        length, type_code, flags, stream = HEADER.unpack_from(source, offset)
        offset += HEADER_SIZE
        if length > MAX_FRAME_PAYLOAD:
            raise ProtocolError(f"frame payload of {length} bytes exceeds {MAX_FRAME_PAYLOAD}")
        if end - offset < length:
            raise ProtocolError(f"truncated frame: {length} bytes announced, {end - offset} left")
        body = source[offset : offset + length]
        if type(body) is not bytes:
            body = bytes(body)
        offset += length
        yield decode_frame(type_code, flags, stream, body)


def decode_frame(type_code: int, flags: int, stream: int, body: bytes) -> Frame:
    """One frame from its header's fields and its payload (``body``, all of it), checked as
    ``decode_message`` checks a frame once its header and length are: for a reader that walks a
    message's headers itself (``Session``) and decodes here the frames it does not handle in line."""
    kind = _KINDS.get(type_code)
    if kind is None:
        raise ProtocolError(f"unknown frame type {type_code}")
    frame_type, on_stream, is_map = kind
    if on_stream != (stream != 0):
        raise ProtocolError(f"{frame_type.name} frame on stream {stream}")
    if frame_type is _T_DATA:  # the common case first, with its one check
        if len(body) > MAX_DATA_FRAME:
            raise ProtocolError(f"DATA frame of {len(body)} bytes exceeds {MAX_DATA_FRAME}")
        return Frame(frame_type, stream, flags, body)
    return Frame(frame_type, stream, flags, _decode_payload(frame_type, body, is_map))


def decode_map(frame_type: FrameType, body: bytes) -> dict[str, Any]:
    """The payload of a map-typed frame (REQUEST, RESPONSE, ...), checked as ``decode_message``
    checks it; raises ProtocolError."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{frame_type.name} payload is not msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{frame_type.name} payload is not a map")
    return value


def _decode_payload(frame_type: FrameType, body: bytes, is_map: bool) -> Any:
    if is_map:
        return decode_map(frame_type, body)
    if frame_type == _T_WINDOW:
        if len(body) != _WINDOW.size:
            raise ProtocolError("WINDOW payload must be 4 bytes")
        (increment,) = _WINDOW.unpack(body)
        if increment == 0:
            raise ProtocolError("WINDOW increment of 0")
        return increment
    if frame_type == _T_RESET:
        if len(body) < _RESET.size:
            raise ProtocolError("RESET payload shorter than its code")
        (code,) = _RESET.unpack_from(body)
        return (code, body[_RESET.size :].decode("utf-8", "replace"))
    if frame_type == _T_END and body:
        raise ProtocolError("END carries no payload")
    if frame_type in (_T_PING, _T_PONG) and len(body) > MAX_PING_PAYLOAD:
        raise ProtocolError(f"{frame_type.name} payload of {len(body)} bytes exceeds {MAX_PING_PAYLOAD}")
    return body
