"""WebSocket frames after the handshake (RFC 6455 section 5): encoding, and a parser for receiving.

Every byte through the tunnel crosses the agent link as binary WebSocket messages, so this is
the data path. wsproto does the protocol well but slowly here: its receive buffer copied every
byte twice more and emitted an event per piece of a frame (profiled at ~30% of the server's CPU
during a download). ``FrameReader`` is a parser written for this job: a frame that arrived
whole in one read is sliced out of that read; a frame that spans reads is collected as a list
of pieces and joined once; masked payloads are unmasked by the C ``apply_mask`` from the
``websockets`` package. It enforces what RFC 6455 asks of a receiver (see ``FrameReader``) and
bounds a message's size from its frames' announced lengths, before their payloads arrive.

wsproto still does the opening handshakes (comzy/core/websocket.py), and the visitor-facing
WebSockets of the public listener (hypercorn): ``install`` gives those its masking in C too.
"""

from __future__ import annotations

import codecs
import functools
import os
import struct
from dataclasses import dataclass

import wsproto.frame_protocol as _frame_protocol
from websockets.speedups import apply_mask  # type: ignore[import-not-found,unused-ignore]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80
_RSV = 0x70
_OPCODE = 0x0F
_MASK_BIT = 0x80
_LENGTH = 0x7F
_MAX_CONTROL_PAYLOAD = 125
_UNSIGNED_SHORT = struct.Struct("!H")
_UNSIGNED_LONG_LONG = struct.Struct("!Q")
#: The all-zero masking key: XOR with it changes nothing, so a frame masked with it is sent and
#: received without a pass over its payload (see ``encode_pieces``). Any other key is unmasked.
ZERO_KEY = b"\x00\x00\x00\x00"
#: Pieces of payload smaller than this are merged as they come (see _append).
_SMALL_PIECE = 16 * 1024
_Piece = bytes | bytearray | memoryview

#: Close codes a peer may send (RFC 6455 7.4.1, and 1012-1013 from the IANA registry), as wsproto
#: (hypercorn's and uvicorn's WebSockets) accepts them; 3000-4999 are allowed too. 1005, 1006
#: and 1015 only ever describe a close locally and must not appear in a frame.
_PEER_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013})
#: What a close without a status code reports (RFC 6455 7.1.5).
NO_STATUS = 1005
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009


class FrameError(Exception):
    """The peer broke RFC 6455 (or our size bound): close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True, frozen=True)
class Ping:
    """A ping from the peer: answer it with a pong carrying the same payload."""

    payload: bytes


@dataclass(slots=True, frozen=True)
class CloseFrame:
    """The peer's close frame: its code (1005 when it gave none) and reason."""

    code: int
    reason: str


def _protocol_error(reason: str) -> FrameError:
    return FrameError(PROTOCOL_ERROR, reason)


class FrameReader:
    """A sans-I/O parser of the frames a WebSocket peer sends once the connection is open.

    ``feed`` it what was read, then call ``next`` until it returns None (more bytes needed). It
    returns whole messages (bytes for binary, str for text) and the control frames the caller
    must answer (``Ping``, ``CloseFrame``); pongs are dropped. It raises ``FrameError`` for
    anything RFC 6455 forbids: reserved bits (no extension is ever negotiated), unknown
    opcodes, fragmented or over-long control frames, a length not in its shortest form or
    with the high bit set, wrong masking for the side (``client`` frames come unmasked, a
    server's masked), a continuation with no message to continue or a new message inside a
    fragmented one, text that is not UTF-8 (checked as each fragment arrives), and a bad
    close code or reason. A message past ``max_message`` bytes is refused (1009) as soon as
    the header announcing it is parsed, before any of its payload is buffered.

    An idle reader holds no buffer: whatever it consumed is released.
    """

    __slots__ = ("_buffer", "_decoder", "_fragments", "_masked", "_max_message", "_missing", "_offset", "_opcode",
                 "_pending", "_size")

    def __init__(self, client: bool, max_message: int) -> None:
        self._masked = not client  # RFC 6455 5.1: what a client sends is masked, what a server sends is not
        self._max_message = max_message
        # Bytes read and not yet parsed: the last read itself (not a copy), from _offset on.
        self._buffer = b""
        self._offset = 0
        # A frame whose payload spans reads: its first byte, masking key and payload pieces so
        # far, and how many payload bytes are still missing.
        self._pending: tuple[int, bytes, list[_Piece]] | None = None
        self._missing = 0
        # The fragmented message in progress: its opcode (0: none), size so far, payload so far,
        # and for text the UTF-8 decoder that checks each fragment as it comes.
        self._opcode = 0
        self._size = 0
        self._fragments: list[_Piece] | None = None
        self._decoder: codecs.IncrementalDecoder | None = None

    @property
    def missing(self) -> int:
        """Payload bytes still to come of a frame that spans reads (0: none pending)."""
        return self._missing

    def whole_message(self, data: bytes) -> bytes | None:
        """The payload of ``data`` when it is exactly one whole, final binary frame with nothing
        else of the connection's bytes still to parse (unmasked), the usual read of a busy agent
        link: what ``feed`` and ``next`` would return, in one call instead of five (two of
        ``next``, two of ``_parse_frame``, ``_on_frame``). Otherwise None, and nothing is taken:
        ``feed`` ``data`` as usual (including whatever here is refused: the checks are theirs)."""
        if self._pending is not None or self._opcode or self._offset < len(self._buffer):
            return None
        size = len(data)
        if size < 2 or data[0] != _FIN | OP_BINARY:
            return None
        second = data[1]
        length = second & _LENGTH
        header = 2
        if length == 126:
            if size < 4:
                return None
            (length,) = _UNSIGNED_SHORT.unpack_from(data, 2)
            if length < 126:
                return None
            header = 4
        elif length == 127:
            return None  # 64 KiB or more: a message that large is read in pieces anyway
        if second & _MASK_BIT:
            if not self._masked:
                return None
            header += 4
        elif self._masked:
            return None
        if header + length != size or length > self._max_message:
            return None
        self._buffer, self._offset = b"", 0  # the last read, all consumed: released
        if not self._masked:
            return data[header:]
        key = data[header - 4 : header]
        if key == ZERO_KEY:
            return data[header:]
        with memoryview(data) as view:
            return apply_mask(view[header:], key)  # type: ignore[no-any-return]

    def feed(self, data: bytes) -> None:
        """Add what was read from the connection."""
        missing = self._missing
        if missing:
            # More of a frame that spans reads: keep the piece, join them all once at the end.
            assert self._pending is not None
            pieces = self._pending[2]
            if len(data) <= missing:
                _append(pieces, data)
                self._missing = missing - len(data)
                return
            _append(pieces, memoryview(data)[:missing])
            self._missing = 0
            self._buffer, self._offset = data, missing
        elif self._offset >= len(self._buffer):
            self._buffer, self._offset = data, 0
        else:
            # Only part of a frame header (< 14 bytes) is ever left over here: joining it to
            # the new read copies that read once, which happens once per header split by a read.
            self._buffer, self._offset = self._buffer[self._offset :] + data, 0

    def next(self) -> bytes | str | Ping | CloseFrame | None:
        """The next message or control frame, or None until more bytes are fed."""
        if self._pending is None and not self._opcode:
            # The agent link's usual frame first, in line: a whole, final binary frame (a read
            # under load holds several), parsed with the checks of _parse_frame for that case and
            # no call of it or of _on_frame. Anything else, or anything wrong, goes the long way.
            buffer, start = self._buffer, self._offset
            available = len(buffer) - start
            if not available:
                if buffer:
                    self._buffer, self._offset = b"", 0  # all consumed: release the read
                return None
            if available >= 2 and buffer[start] == _FIN | OP_BINARY:
                second = buffer[start + 1]
                length = second & _LENGTH
                header = 2
                if length == 126 and available >= 4:
                    (length,) = _UNSIGNED_SHORT.unpack_from(buffer, start + 2)
                    header = 4 if length >= 126 else 0
                elif length >= 126:
                    header = 0
                masked = self._masked
                if header and bool(second & _MASK_BIT) == masked and length <= self._max_message:
                    body = start + header + 4 if masked else start + header
                    end = body + length
                    if end <= len(buffer):
                        self._offset = end
                        if not masked:
                            return buffer[body:end]
                        key = buffer[body - 4 : body]
                        if key == ZERO_KEY:
                            return buffer[body:end]
                        with memoryview(buffer) as view:
                            return apply_mask(view[body:end], key)  # type: ignore[no-any-return]
        while True:
            if self._pending is not None:
                if self._missing:
                    return None
                first, key, pieces = self._pending
                self._pending = None
                payload = b"".join(pieces)
                if key:
                    payload = apply_mask(payload, key)
            else:
                frame = self._parse_frame()
                if frame is None:
                    return None
                first, payload = frame
            result = self._on_frame(first, payload)
            if result is not None:
                return result

    def _parse_frame(self) -> tuple[int, bytes] | None:
        """The next frame's first byte and unmasked payload, or None until more bytes come."""
        buffer, start = self._buffer, self._offset
        available = len(buffer) - start
        if available < 2:
            if not available and buffer:
                self._buffer, self._offset = b"", 0  # all consumed: release the read
            return None
        first, second = buffer[start], buffer[start + 1]
        if first & _RSV:
            raise _protocol_error("reserved bits set in a frame (no extension was negotiated)")
        opcode = first & _OPCODE
        length = second & _LENGTH
        header = 2
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise _protocol_error(f"unknown opcode {opcode:#x}")
            if not first & _FIN:
                raise _protocol_error("fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise _protocol_error("control frame payload longer than 125 bytes")
        elif opcode > OP_BINARY:
            raise _protocol_error(f"unknown opcode {opcode:#x}")
        elif length == 126:
            if available < 4:
                return None
            (length,) = _UNSIGNED_SHORT.unpack_from(buffer, start + 2)
            if length < 126:
                raise _protocol_error("frame length not in its shortest form")
            header = 4
        elif length == 127:
            if available < 10:
                return None
            (length,) = _UNSIGNED_LONG_LONG.unpack_from(buffer, start + 2)
            if length >> 63:
                raise _protocol_error("frame length with the most significant bit set")
            if length < 65536:
                raise _protocol_error("frame length not in its shortest form")
            header = 10
        if second & _MASK_BIT:
            if not self._masked:
                raise _protocol_error("masked frame from a server")
            header += 4
        elif self._masked:
            raise _protocol_error("unmasked frame from a client")
        if opcode < OP_CLOSE:
            # The message rules and the size bound, checked before waiting for any payload.
            if (opcode == OP_CONTINUATION) != bool(self._opcode):
                raise _protocol_error("continuation frame without a message to continue"
                                      if opcode == OP_CONTINUATION else "new message inside a fragmented message")
            if self._size + length > self._max_message:
                raise FrameError(MESSAGE_TOO_BIG, f"message larger than {self._max_message} bytes")
        if available < header:
            return None
        body = start + header
        end = body + length
        key = buffer[body - 4 : body] if self._masked else b""
        if key == ZERO_KEY:
            key = b""  # unmasking with it is the identity: no pass over the payload
        if end > len(buffer):
            # The payload spans reads: collect it piece by piece (see feed), no buffer to grow.
            pieces: list[_Piece] = []
            _append(pieces, memoryview(buffer)[body:])
            self._pending = (first, key, pieces)
            self._missing = end - len(buffer)
            self._buffer, self._offset = b"", 0
            return None
        self._offset = end
        if not key:
            return first, buffer[body:end]
        with memoryview(buffer) as view:
            return first, apply_mask(view[body:end], key)

    def _on_frame(self, first: int, payload: bytes) -> bytes | str | Ping | CloseFrame | None:
        """What a whole frame means: a message, a control frame, or None (a fragment, a pong)."""
        opcode = first & _OPCODE
        fin = bool(first & _FIN)
        if opcode == OP_BINARY and fin:
            return payload  # the data path: one frame, one message
        if opcode == OP_TEXT and fin:
            return _decode_text(payload)
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_CLOSE:
            return _parse_close(payload)
        if opcode == OP_PONG:
            return None  # we send no pings, and an unsolicited pong is allowed (RFC 6455 5.5.3)
        if opcode != OP_CONTINUATION:  # the first fragment (_parse_frame checked the order)
            self._opcode, self._size, self._fragments = opcode, 0, []
            if opcode == OP_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        assert self._fragments is not None
        self._size += len(payload)
        _append(self._fragments, payload)
        if self._decoder is not None:
            # Each fragment is checked as it arrives: a bad message fails at its first bad fragment.
            try:
                self._decoder.decode(payload, fin)
            except UnicodeDecodeError as exc:
                raise FrameError(INVALID_DATA, f"text message is not valid UTF-8: {exc.reason}") from None
        if not fin:
            return None
        message, text = b"".join(self._fragments), self._decoder is not None
        self._opcode, self._size, self._fragments, self._decoder = 0, 0, None, None
        return message.decode("utf-8") if text else message


def _append(pieces: list[_Piece], piece: _Piece) -> None:
    """Add a piece of a payload to be joined later; small pieces are merged as they come, so a
    peer sending a byte per read or per fragment cannot make the list outgrow its payload."""
    if len(piece) >= _SMALL_PIECE:
        pieces.append(piece)
    elif pieces and type(pieces[-1]) is bytearray:
        pieces[-1] += piece
    elif piece:
        pieces.append(bytearray(piece))


def _decode_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(INVALID_DATA, f"text message is not valid UTF-8: {exc.reason}") from None


def _parse_close(payload: bytes) -> CloseFrame:
    if not payload:
        return CloseFrame(NO_STATUS, "")
    if len(payload) == 1:
        raise _protocol_error("close frame with a 1-byte payload")
    (code,) = _UNSIGNED_SHORT.unpack_from(payload)
    if code not in _PEER_CLOSE_CODES and not 3000 <= code <= 4999:
        raise _protocol_error(f"close code {code} is not allowed")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not valid UTF-8") from None
    return CloseFrame(code, reason)


# -- sending -----------------------------------------------------------------------------------
def _header(opcode: int, length: int, masked: bool) -> bytes:
    """A frame's header (FIN set) up to the masking key."""
    mask_bit = _MASK_BIT if masked else 0
    first = _FIN | opcode
    if length < 126:
        return struct.pack("!BB", first, mask_bit | length)
    if length < 65536:
        return struct.pack("!BBH", first, mask_bit | 126, length)
    return struct.pack("!BBQ", first, mask_bit | 127, length)


#: The header of a final binary frame of each length below 126, unmasked (a server's) and masked
#: with the zero key (a client's on a link no intermediary reads): ``binary_header``'s table.
BINARY_HEADERS = tuple(bytes((_FIN | OP_BINARY, length)) for length in range(126))
ZERO_KEY_HEADERS = tuple(bytes((_FIN | OP_BINARY, _MASK_BIT | length)) + ZERO_KEY for length in range(126))
#: The same for lengths from 126 to 65535, called with the length (the 16-bit length form).
binary_header_16 = functools.partial(struct.Struct("!BBH").pack, _FIN | OP_BINARY, 126)
zero_key_header_16 = functools.partial(struct.Struct("!BBH4s").pack, _FIN | OP_BINARY, _MASK_BIT | 126)


def binary_header(length: int, masked: bool) -> bytes:
    """The header of a final binary frame of ``length`` bytes, with the zero key if ``masked``:
    what ``encode_binary(payload, masked, zero_key=True)`` puts in front of the payload, which it
    leaves as it is. Short frames' headers come from a table."""
    if length < 126:
        return ZERO_KEY_HEADERS[length] if masked else BINARY_HEADERS[length]
    header = _header(OP_BINARY, length, masked)
    return header + ZERO_KEY if masked else header


def encode_frame(opcode: int, payload: bytes | bytearray, masked: bool, zero_key: bool = False) -> bytes:
    """One complete frame (FIN set), masked as a client must: one copy of the payload.

    ``zero_key`` (with ``masked``) masks with the all-zero key instead of a random one: see
    ``encode_pieces`` for when a client may.
    """
    header = _header(opcode, len(payload), masked)
    if not masked:
        return header + payload
    if zero_key:
        return header + ZERO_KEY + payload
    # RFC 6455 5.3: a fresh, unpredictable key for every frame.
    key = os.urandom(4)
    return header + key + apply_mask(payload, key)


def encode_binary(payload: bytes | bytearray, masked: bool, zero_key: bool = False) -> bytes:
    """One complete binary message."""
    return encode_frame(OP_BINARY, payload, masked, zero_key)


def encode_pieces(pieces: list[_Piece], size: int, masked: bool, zero_key: bool = False) -> list[_Piece]:
    """One binary message whose payload is ``pieces`` (``size`` bytes in all), as buffers for one
    ``writelines``: the payload is never joined, so a large message costs no copy of it here.

    Masked with a random key, each piece is masked on its own (one pass over the payload, the key
    turned to where the piece starts). With ``zero_key`` it is not touched at all: XOR with zeros
    is the identity. RFC 6455 5.3 asks a client for an unpredictable key so that a sender whose
    payload is chosen by an attacker cannot have it read as HTTP by an intermediary on the way
    (section 10.3, cache poisoning through proxies that do not know WebSocket). The agent uses the
    zero key only where no such intermediary can read the bytes: a TLS link (it sees ciphertext)
    and a loopback one (there is no intermediary); across a network on plain ws:// it keeps
    random keys. Any receiver unmasks a zero-key frame correctly: it is a valid key, only a
    predictable one.
    """
    header = _header(OP_BINARY, size, masked)
    if not masked:
        return [header, *pieces]
    if zero_key:
        return [header + ZERO_KEY, *pieces]
    key = os.urandom(4)
    keys = (key, key[1:] + key[:1], key[2:] + key[:2], key[3:] + key[:3])
    out: list[_Piece] = [header + key]
    offset = 0
    for piece in pieces:
        out.append(apply_mask(piece, keys[offset & 3]))
        offset += len(piece)
    return out


def encode_close(code: int | None, reason: str, masked: bool) -> bytes:
    """A close frame: with no code (and no reason) for None, as a close that had none is answered."""
    if code is None:
        return encode_frame(OP_CLOSE, b"", masked)
    if code in (NO_STATUS, 1006, 1015):  # local-only codes (RFC 6455 7.4.1): a normal close instead
        code = 1000
    # A control frame's payload is at most 125 bytes: cut the reason at a character boundary.
    encoded = reason.encode("utf-8")[: _MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, _UNSIGNED_SHORT.pack(code) + encoded, masked)


# -- wsproto's masking, for the visitor-facing WebSockets of the public listener ------------------
class FastMasker:
    """Drop-in for wsproto's XorMaskerSimple: same streaming contract (the key rotates
    across calls so a payload may be unmasked in pieces), C speed."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        """XOR ``data`` with the (rotating) key.

        Returns bytes, not the bytearray wsproto's own masker returns: wsproto only appends
        an empty bytearray to the result and then calls ``bytes()`` on it, and for a bytes
        object both are free, where a bytearray is copied once more.
        """
        if not data:
            return b""
        masked: bytes = apply_mask(data, self._key)
        rotation = len(data) % 4
        if rotation:
            self._key = self._key[rotation:] + self._key[:rotation]
        return masked


def install() -> None:
    """Make wsproto unmask received frames with FastMasker (idempotent)."""
    _frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]


install()
