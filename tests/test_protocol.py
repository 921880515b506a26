"""The frame codec (property tests) and the session rules it supports (real WebSockets on loopback)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comzy.core import protocol as p
from comzy.core.session import Session
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import WebSocket, client_handshake, server_handshake
from tests.helpers import receive_until_closed

FT = p.FrameType
STREAM_TYPES = [FT.REQUEST, FT.RESPONSE, FT.DATA, FT.END, FT.RESET, FT.WINDOW, FT.WS_CLOSE]
CONTROL_TYPES = [t for t in FT if t not in STREAM_TYPES]
MAP_TYPES = [FT.HELLO, FT.WELCOME, FT.REJECT, FT.REQUEST, FT.RESPONSE, FT.GOAWAY, FT.NOTICE, FT.WS_CLOSE]
KNOWN_CODES = {int(t) for t in FT}

stream_ids = st.integers(1, p.MAX_STREAM_ID)
flags = st.integers(0, 255)
header_lists = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=200)), max_size=12)
# Every value msgpack carries back unchanged (lists, not tuples; no NaN, which is not equal to itself).
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
maps = st.dictionaries(st.text(max_size=12), msgpack_values, max_size=8)
request_heads = st.builds(
    p.RequestHead,
    method=st.text(min_size=1, max_size=12),
    target=st.binary(max_size=300),
    headers=header_lists,
    client=st.text(max_size=40),
    scheme=st.sampled_from(["http", "https"]) | st.text(max_size=8),
    http_version=st.sampled_from(["1.0", "1.1", "2"]),
    websocket=st.booleans(),
    subprotocols=st.lists(st.text(max_size=12), max_size=3),
    has_body=st.booleans(),
)
response_heads = st.builds(
    p.ResponseHead,
    status=st.integers(100, 999),
    headers=header_lists,
    subprotocol=st.none() | st.text(max_size=12),
)


def decode_all(message: bytes) -> list[p.Frame]:
    """Every frame of ``message`` (raises ProtocolError like the session's reader)."""
    return list(p.decode_message(message))


def decode_one(message: bytes) -> p.Frame:
    """The single frame of ``message``."""
    frames = decode_all(message)
    assert len(frames) == 1
    return frames[0]


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[bytes, p.Frame]:
    """Any valid frame: its encoding and the Frame decoding must give back."""
    kind = draw(st.sampled_from(list(FT)))
    stream = draw(stream_ids) if kind in STREAM_TYPES else 0
    if kind == FT.DATA:
        data, flag = draw(st.binary(max_size=2048)), draw(flags)
        return p.encode_data(stream, data, flag), p.Frame(kind, stream, flag, data)
    if kind == FT.REQUEST:
        payload = draw(request_heads).to_payload()
    elif kind == FT.RESPONSE:
        payload = draw(response_heads).to_payload()
    elif kind in MAP_TYPES:
        payload = draw(maps)
    elif kind == FT.WINDOW:
        increment = draw(st.integers(1, 2**32 - 1))
        return p.encode_window(stream, increment), p.Frame(kind, stream, 0, increment)
    elif kind == FT.RESET:
        code, message = draw(st.integers(0, 2**32 - 1)), draw(st.text(max_size=40))
        return p.encode_reset(stream, code, message), p.Frame(kind, stream, 0, (code, message))  # type: ignore[arg-type]
    elif kind == FT.END:
        payload = b""
    else:  # PING, PONG
        payload = draw(st.binary(max_size=p.MAX_PING_PAYLOAD))
    return p.encode(kind, stream, payload), p.Frame(kind, stream, 0, payload)


# -- round trips -----------------------------------------------------------------------
@given(stream=stream_ids, data=st.binary(max_size=p.MAX_DATA_FRAME), flag=flags)
@settings(suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
def test_data_round_trips(stream: int, data: bytes, flag: int) -> None:
    encoded = p.encode_data(stream, data, flag)
    assert encoded == p.encode(FT.DATA, stream, data, flag)  # the hot path is the general path
    assert len(encoded) == p.HEADER_SIZE + len(data)
    assert decode_one(encoded) == p.Frame(FT.DATA, stream, flag, data)


@pytest.mark.parametrize("size", [0, 1, p.MAX_DATA_FRAME])
def test_data_size_edges_round_trip(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert decode_one(p.encode_data(7, data, p.FLAG_FIN | p.FLAG_TEXT)).payload == data


@given(stream=stream_ids, head=request_heads)
def test_request_head_round_trips(stream: int, head: p.RequestHead) -> None:
    frame = decode_one(p.encode(FT.REQUEST, stream, head.to_payload()))
    assert (frame.type, frame.stream) == (FT.REQUEST, stream)
    assert p.RequestHead.from_payload(frame.payload) == head


@given(stream=stream_ids, head=request_heads)
def test_a_bodyless_request_encodes_as_its_head_and_end(stream: int, head: p.RequestHead) -> None:
    """The edge's plain path encodes REQUEST and END in one call: the same bytes as the general path."""
    head.websocket, head.subprotocols, head.has_body = False, [], False
    encoded = p.encode_bodyless_request(stream, head.method, head.target, head.headers, head.client, head.scheme,
                                        head.http_version, head.tunnel)
    assert encoded == p.encode(FT.REQUEST, stream, head.to_payload()) + p.encode(FT.END, stream)


@given(stream=stream_ids, head=request_heads, alias=st.text(max_size=70), session=st.integers(0, 2**63 - 1))
def test_a_bodyless_request_over_a_link_encodes_as_its_head_with_the_link_keys_and_end(
        stream: int, head: p.RequestHead, alias: str, session: int) -> None:
    """An edge's plain path over a cluster link: the link keys (``RouteEntry.head_extra``) go last
    in the map, byte for byte what ``edge._open`` sends with ``send_end`` after it (the order the
    control node's relay cuts them off by, control_relay._agent_head)."""
    head.websocket, head.subprotocols, head.has_body = False, [], False
    extra = {"al": alias, "ts": session}
    encoded = p.encode_bodyless_request(stream, head.method, head.target, head.headers, head.client, head.scheme,
                                        head.http_version, head.tunnel, extra)
    assert encoded == p.encode(FT.REQUEST, stream, {**head.to_payload(), **extra}) + p.encode(FT.END, stream)


@given(stream=stream_ids, head=response_heads)
def test_response_head_round_trips(stream: int, head: p.ResponseHead) -> None:
    frame = decode_one(p.encode(FT.RESPONSE, stream, head.to_payload()))
    assert (frame.type, frame.stream) == (FT.RESPONSE, stream)
    assert p.ResponseHead.from_payload(frame.payload) == head


@given(stream=stream_ids, status=st.integers(100, 999), headers=header_lists,
       body=st.binary(max_size=300) | st.sampled_from([b"", bytes(p.MAX_DATA_FRAME)]))
def test_a_whole_answer_is_its_frames_back_to_back(stream: int, status: int, headers: list[tuple[bytes, bytes]],
                                                   body: bytes) -> None:
    """``encode_answer`` (the agent's small answers, one piece) makes the very bytes of RESPONSE,
    DATA (none for an empty body) and END encoded apart, header pairs as tuples included."""
    apart = p.encode(FT.RESPONSE, stream, p.ResponseHead(status, headers).to_payload())
    if body:
        apart += p.encode_data(stream, body)
    apart += p.encode(FT.END, stream)
    answer = p.encode_answer(stream, status, headers, body)
    assert answer == apart
    frames = decode_all(answer)
    assert p.ResponseHead.from_payload(frames[0].payload) == p.ResponseHead(status, headers)
    assert [(f.type, f.stream) for f in frames[1:]] == [(FT.DATA, stream)] * bool(body) + [(FT.END, stream)]


def test_header_order_and_duplicates_survive() -> None:
    headers = [(b"set-cookie", b"a=1"), (b"X-Odd", b"\x00\xff"), (b"set-cookie", b"b=2")]
    head = p.RequestHead("GET", b"/a%2Fb?q=%20", headers)
    assert p.RequestHead.from_payload(decode_one(p.encode(FT.REQUEST, 1, head.to_payload())).payload).headers == headers


@given(stream=stream_ids, increment=st.integers(1, 2**32 - 1))
def test_window_round_trips(stream: int, increment: int) -> None:
    assert decode_one(p.encode_window(stream, increment)) == p.Frame(FT.WINDOW, stream, 0, increment)


@given(stream=stream_ids, code=st.sampled_from(list(p.ResetCode)) | st.integers(0, 2**32 - 1), message=st.text())
def test_reset_round_trips(stream: int, code: int, message: str) -> None:
    frame = decode_one(p.encode_reset(stream, code, message))  # type: ignore[arg-type]
    got_code, got_message = frame.payload
    assert (frame.type, frame.stream, got_code) == (FT.RESET, stream, code)
    raw = message.encode()
    # The message is capped at 1024 bytes; a cut multi-byte character becomes U+FFFD.
    assert got_message == (message if len(raw) <= 1024 else raw[:1024].decode("utf-8", "replace"))


@given(kind=st.sampled_from([FT.PING, FT.PONG]), payload=st.binary(max_size=p.MAX_PING_PAYLOAD))
def test_ping_pong_round_trip(kind: FT, payload: bytes) -> None:
    assert decode_one(p.encode(kind, 0, payload)) == p.Frame(kind, 0, 0, payload)


@given(kind=st.sampled_from([FT.PING, FT.PONG]),
       size=st.integers(p.MAX_PING_PAYLOAD + 1, p.MAX_FRAME_PAYLOAD))
@settings(max_examples=25)
def test_ping_pong_payload_past_the_clock_is_a_protocol_error(kind: FT, size: int) -> None:
    # A 1 MiB PING used to be answered with a 1 MiB PONG: a peer could make us queue that freely.
    with pytest.raises(p.ProtocolError, match=f"exceeds {p.MAX_PING_PAYLOAD}"):
        decode_all(p.encode(kind, 0, bytes(size)))


@given(stream=stream_ids)
def test_end_round_trips(stream: int) -> None:
    assert decode_one(p.encode(FT.END, stream)) == p.Frame(FT.END, stream, 0, b"")


@given(kind=st.sampled_from([FT.HELLO, FT.WELCOME, FT.REJECT, FT.GOAWAY, FT.NOTICE]), payload=maps)
def test_control_maps_round_trip(kind: FT, payload: dict[str, Any]) -> None:
    assert decode_one(p.encode(kind, 0, payload)) == p.Frame(kind, 0, 0, payload)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (FT.HELLO, {"v": p.PROTOCOL_VERSION, "agent": "comzy/0.1.0", "port": 3000, "subdomain": None,
                    "token": None, "window": p.DEFAULT_WINDOW, "resume": {"alias": "a", "secret": "s" * 32}}),
        (FT.WELCOME, {"v": 1, "server": "comzy/0.1.0", "alias": "a", "url": "http://a.localhost:8190",
                      "resume_secret": "x" * 32, "heartbeat": 10.0, "window": 262144, "expires_at": None,
                      "user": None, "notices": ["hi"]}),
        (FT.REJECT, {"code": "version", "reason": "upgrade"}),
        (FT.GOAWAY, {"reason": "server shutting down", "reconnect": True}),
        (FT.NOTICE, {"level": "warning", "message": "expires in 5 min"}),
    ],
)
def test_handshake_and_control_payloads_round_trip(kind: FT, payload: dict[str, Any]) -> None:
    assert decode_one(p.encode(kind, 0, payload)).payload == payload


@given(stream=stream_ids, code=st.integers(1000, 4999), reason=st.text(max_size=100))
def test_ws_close_round_trips(stream: int, code: int, reason: str) -> None:
    payload = {"code": code, "reason": reason}
    assert decode_one(p.encode(FT.WS_CLOSE, stream, payload)) == p.Frame(FT.WS_CLOSE, stream, 0, payload)


@given(frames=st.lists(valid_frames(), min_size=1, max_size=12))
def test_many_frames_in_one_message_decode_in_order(frames: list[tuple[bytes, p.Frame]]) -> None:
    message = b"".join(encoded for encoded, _ in frames)
    assert decode_all(message) == [frame for _, frame in frames]


# -- malformed input -------------------------------------------------------------------
def test_empty_message_is_an_error() -> None:
    with pytest.raises(p.ProtocolError):
        decode_all(b"")


@given(frames=st.lists(valid_frames(), min_size=1, max_size=6), data=st.data())
def test_truncated_message_is_an_error(frames: list[tuple[bytes, p.Frame]], data: st.DataObject) -> None:
    message = b"".join(encoded for encoded, _ in frames)
    boundaries, offset = {0}, 0
    for encoded, _ in frames:
        offset += len(encoded)
        boundaries.add(offset)
    cut = data.draw(st.integers(1, len(message) - 1).filter(lambda n: n not in boundaries))
    whole = sum(1 for b in boundaries if 0 < b < cut)
    seen: list[p.Frame] = []
    with pytest.raises(p.ProtocolError, match="truncated"):
        for frame in p.decode_message(message[:cut]):
            seen.append(frame)
    # Frames before the cut are delivered; the cut one is never delivered half.
    assert seen == [frame for _, frame in frames[:whole]]


@given(kind=st.integers(0, 255), length=st.integers(p.MAX_FRAME_PAYLOAD + 1, 2**32 - 1), stream=st.integers(0, 9),
       tail=st.binary(max_size=32))
def test_oversized_announced_length_is_an_error(kind: int, length: int, stream: int, tail: bytes) -> None:
    with pytest.raises(p.ProtocolError, match="exceeds"):
        decode_all(p.HEADER.pack(length, kind, 0, stream) + tail)


def test_payload_at_frame_limit_is_accepted_and_one_more_byte_is_not() -> None:
    # A GOAWAY map {"reason": str}: 1 (map) + 7 ("reason") + 5 (str32 header) bytes around the text.
    def goaway(size: int) -> bytes:
        return p.encode(FT.GOAWAY, 0, {"reason": "x" * (size - 13)})

    assert len(goaway(p.MAX_FRAME_PAYLOAD)) == p.HEADER_SIZE + p.MAX_FRAME_PAYLOAD
    assert len(decode_one(goaway(p.MAX_FRAME_PAYLOAD)).payload["reason"]) == p.MAX_FRAME_PAYLOAD - 13
    with pytest.raises(p.ProtocolError, match="exceeds"):
        decode_all(goaway(p.MAX_FRAME_PAYLOAD + 1))


@given(extra=st.integers(1, p.MAX_FRAME_PAYLOAD - p.MAX_DATA_FRAME), stream=stream_ids)
@settings(max_examples=25)
def test_oversized_data_frame_is_an_error(extra: int, stream: int) -> None:
    with pytest.raises(p.ProtocolError, match="DATA frame"):
        decode_all(p.encode_data(stream, bytes(p.MAX_DATA_FRAME + extra)))


@given(code=st.integers(0, 255).filter(lambda c: c not in KNOWN_CODES), stream=st.integers(0, 9),
       payload=st.binary(max_size=64))
def test_unknown_frame_type_is_an_error(code: int, stream: int, payload: bytes) -> None:
    with pytest.raises(p.ProtocolError, match="unknown frame type"):
        decode_all(p.HEADER.pack(len(payload), code, 0, stream) + payload)


def _valid_payload(kind: FT) -> bytes:
    if kind in MAP_TYPES:
        return msgpack.packb({"code": 1000, "reason": ""})
    if kind == FT.WINDOW:
        return (1).to_bytes(4, "big")
    if kind == FT.RESET:
        return bytes(4)
    return b""


@pytest.mark.parametrize("kind", STREAM_TYPES, ids=lambda k: k.name)
def test_stream_frame_on_stream_zero_is_an_error(kind: FT) -> None:
    payload = _valid_payload(kind)
    with pytest.raises(p.ProtocolError, match="on stream 0"):
        decode_all(p.HEADER.pack(len(payload), kind, 0, 0) + payload)


@given(kind=st.sampled_from(CONTROL_TYPES), stream=stream_ids)
def test_control_frame_on_a_stream_is_an_error(kind: FT, stream: int) -> None:
    payload = _valid_payload(kind)
    with pytest.raises(p.ProtocolError, match=f"on stream {stream}"):
        decode_all(p.HEADER.pack(len(payload), kind, 0, stream) + payload)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # nothing
        b"\xc1",  # the never-used msgpack byte
        msgpack.packb({"a": 1})[:-1],  # truncated map
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb("text"),
        msgpack.packb(7),
        msgpack.packb({1: "int key"}),  # keys must be strings
        msgpack.packb({(1, 2): "x"}, use_bin_type=True),
        b"\xdf\xff\xff\xff\xff",  # a map announcing 2**32 - 1 entries
        b"\xa3\xff\xfe\xfd",  # a str that is not UTF-8
    ],
)
@pytest.mark.parametrize("kind", MAP_TYPES, ids=lambda k: k.name)
def test_malformed_msgpack_is_an_error(kind: FT, body: bytes) -> None:
    stream = 1 if kind in STREAM_TYPES else 0
    with pytest.raises(p.ProtocolError):
        decode_all(p.HEADER.pack(len(body), kind, 0, stream) + body)


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        (FT.WINDOW, b"", "4 bytes"),
        (FT.WINDOW, b"\x00\x00\x01", "4 bytes"),
        (FT.WINDOW, b"\x00\x00\x00\x01\x00", "4 bytes"),
        (FT.WINDOW, bytes(4), "increment of 0"),
        (FT.RESET, b"\x00\x00\x01", "shorter than its code"),
        (FT.END, b"x", "no payload"),
    ],
)
def test_malformed_fixed_payloads_are_errors(kind: FT, body: bytes, match: str) -> None:
    with pytest.raises(p.ProtocolError, match=match):
        decode_all(p.HEADER.pack(len(body), kind, 0, 3) + body)


GOOD_REQUEST = p.RequestHead("GET", b"/", [(b"host", b"a")]).to_payload()
GOOD_RESPONSE = p.ResponseHead(200, [(b"a", b"b")]).to_payload()


@pytest.mark.parametrize(
    "change",
    [
        {"m": None},  # a missing key
        {"t": None},
        {"h": None},
        {"t": "/text-not-bytes"},
        {"t": 5},  # bytes(5) would silently be five NULs
        {"t": 2**63},
        {"t": [1, 2, 3]},
        {"h": 7},
        {"h": [[b"a"]]},
        {"h": [[b"a", b"b", b"c"]]},
        {"h": [["str-name", b"v"]]},
        {"h": [[b"n", 1]]},
        {"h": [b"ab"]},
        {"sp": 3},
        {"tn": ""},
        {"tn": 5},
        {"tn": "x" * 65},
    ],
)
def test_malformed_request_head_is_an_error(change: dict[str, Any]) -> None:
    payload = {k: v for k, v in {**GOOD_REQUEST, **change}.items() if v is not None}
    with pytest.raises(p.ProtocolError, match="malformed REQUEST"):
        p.RequestHead.from_payload(payload)


@pytest.mark.parametrize(("change", "subprotocols", "tunnel"), [
    ({"sp": None, "tn": None}, [], None),  # both left out
    ({"sp": []}, [], None),
    ({"sp": ["chat", "v2"], "tn": "web"}, ["chat", "v2"], "web"),
])
def test_request_head_subprotocols_and_tunnel(change: dict[str, Any], subprotocols: list[str],
                                              tunnel: str | None) -> None:
    """What ``from_payload`` reads in line (no comprehension for an empty list, no call without a name)."""
    payload = {k: v for k, v in {**GOOD_REQUEST, **change}.items() if v is not None}
    head = p.RequestHead.from_payload(payload)
    assert (head.subprotocols, head.tunnel) == (subprotocols, tunnel)
    if subprotocols == []:
        head.subprotocols.append("x")  # a list of its own, never one shared between heads
        assert p.RequestHead.from_payload(payload).subprotocols == []


@pytest.mark.parametrize(
    "change",
    [
        {"s": None},
        {"h": None},
        {"s": 99},
        {"s": 1000},
        {"s": -200},
        {"s": "abc"},
        {"s": math.inf},
        {"s": -math.inf},
        {"s": math.nan},
        {"s": [200]},
        {"h": [[b"a", "str"]]},
        {"h": {"a": "b"}},
    ],
)
def test_malformed_response_head_is_an_error(change: dict[str, Any]) -> None:
    payload = {k: v for k, v in {**GOOD_RESPONSE, **change}.items() if v is not None}
    with pytest.raises(p.ProtocolError, match="malformed RESPONSE"):
        p.ResponseHead.from_payload(payload)


def _decode_everything(message: bytes) -> None:
    """Decode like a session does, including heads; only ProtocolError may escape."""
    for frame in p.decode_message(message):
        if frame.type == FT.REQUEST:
            p.RequestHead.from_payload(frame.payload)
        elif frame.type == FT.RESPONSE:
            p.ResponseHead.from_payload(frame.payload)


@given(message=st.binary(max_size=512))
@settings(max_examples=500)
def test_random_bytes_decode_or_raise_protocol_error(message: bytes) -> None:
    with suppress(p.ProtocolError):
        _decode_everything(message)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers and random payloads: they get past the header checks."""
    kind = draw(st.integers(0, 16))
    stream = draw(st.sampled_from([0, 1, 2**32 - 1]))
    if draw(st.booleans()):
        body = msgpack.packb(draw(maps | msgpack_values), use_bin_type=True)
    else:
        body = draw(st.binary(max_size=64))
    length = len(body) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
    return p.HEADER.pack(length, kind, draw(flags), stream) + body


head_keys = st.sampled_from(["m", "t", "h", "c", "s", "v", "w", "sp", "b"])
# Edge values that Python's int()/bytes() reject with something other than ValueError/TypeError.
awkward_numbers = st.sampled_from([math.inf, -math.inf, math.nan, 2**63, 2**64 - 1, -1, 0, 1e300])
head_values = (
    msgpack_values
    | awkward_numbers
    | st.floats()
    | st.lists(st.lists(st.binary(max_size=4) | msgpack_values, max_size=3))
)


@given(frames=st.lists(plausible_frames(), min_size=1, max_size=4))
@settings(max_examples=500)
def test_plausible_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    with suppress(p.ProtocolError):
        _decode_everything(b"".join(frames))


@given(payload=st.dictionaries(head_keys, head_values, max_size=9))
@settings(max_examples=500)
def test_random_heads_parse_or_raise_protocol_error(payload: dict[str, Any]) -> None:
    for parse in (p.RequestHead.from_payload, p.ResponseHead.from_payload):
        try:
            head = parse(payload)
        except p.ProtocolError:
            continue
        # A head that parses has the wire types the rest of the code relies on.
        for name, value in head.headers:
            assert isinstance(name, bytes) and isinstance(value, bytes)
        if isinstance(head, p.RequestHead):
            assert isinstance(head.target, bytes)
        else:
            assert 100 <= head.status <= 999


# -- session rules over a real WebSocket pair ----------------------------------------------
@asynccontextmanager
async def ws_pair() -> AsyncIterator[tuple[WebSocket, WebSocket]]:
    """A server-side and a client-side WebSocket joined by a loopback TCP connection."""
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener = multi.listeners[0]
    assert isinstance(listener, anyio.abc.SocketListener)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    sides: dict[str, WebSocket] = {}
    async with multi:

        async def accept() -> None:
            stream = await listener.accept()
            sides["server"], _ = await server_handshake(stream, 4 * 1024 * 1024)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept)
                client_stream = await anyio.connect_tcp("127.0.0.1", port)
                sides["client"], _ = await client_handshake(client_stream, f"127.0.0.1:{port}", "/", 4 * 1024 * 1024)
    try:
        yield sides["server"], sides["client"]
    finally:
        await sides["server"].aclose()
        await sides["client"].aclose()


async def next_frames(ws: WebSocket) -> list[p.Frame]:
    """The frames of the next binary message (fails on close or text)."""
    message = await ws.receive()
    assert isinstance(message, bytes), message
    return decode_all(message)


@asynccontextmanager
async def running_session(ws: WebSocket, **options: Any) -> AsyncIterator[tuple[Session, dict[str, str]]]:
    """A Session serving ``ws`` in the background; ``result["reason"]`` is set when run() returns."""
    session = Session(ws, **options)
    result: dict[str, str] = {}

    async def run() -> None:
        result["reason"] = await session.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield session, result
        await session.close()


@pytest.mark.anyio
async def test_peer_overrunning_the_window_is_a_protocol_error() -> None:
    async with ws_pair() as (near, far), running_session(near, window=65536) as (session, result):
        stream = session.open_stream()
        await far.send(p.encode_data(stream.id, bytes(p.MAX_DATA_FRAME)))  # exactly the window: fine
        await far.send(p.encode_data(stream.id, b"x"))  # one byte beyond it
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "overran the window" in result["reason"]
    item = await stream.receive()  # what arrived within the window is still readable...
    assert item is not None and len(item[0]) == p.MAX_DATA_FRAME
    with pytest.raises(StreamReset):  # ...then the stream fails: never a clean end
        await stream.receive()


@pytest.mark.anyio
async def test_window_is_reopened_when_half_consumed() -> None:
    window = 65536
    async with ws_pair() as (near, far), running_session(near, window=window) as (session, _):
        stream = session.open_stream()
        chunks = [bytes([i]) * 8192 for i in range(8)]  # 64 KiB: the whole window
        await far.send(b"".join(p.encode_data(stream.id, c) for c in chunks))
        with anyio.fail_after(5):  # all buffered before reading: a reader that never waits keeps its window
            while stream._buffered < window:
                await anyio.wait_all_tasks_blocked()
        received = []
        for _ in range(4):  # half the window
            item = await stream.receive()
            assert item is not None
            received.append(item[0])
        with anyio.fail_after(5):
            frames = await next_frames(far)
        assert frames == [p.Frame(FT.WINDOW, stream.id, 0, window // 2)]
        # With the credit back the peer may send another half window without overrunning.
        await far.send(b"".join(p.encode_data(stream.id, c) for c in chunks[:4]) + p.encode(FT.END, stream.id))
        while (item := await stream.receive()) is not None:
            received.append(item[0])
        assert received == chunks + chunks[:4]
        assert session.closed is None


@pytest.mark.anyio
async def test_a_reader_that_waits_for_data_grows_its_window_within_the_session_budget() -> None:
    window = 65536
    chunks = [bytes([i]) * 8192 for i in range(4)]  # half a window
    async with ws_pair() as (near, far), running_session(near, window=window) as (session, _):
        session.window_budget = budget = window + window // 2
        fast, slow = session.open_stream(), session.open_stream()
        # The slow stream's reader falls behind: its data is buffered before it reads.
        await far.send(b"".join(p.encode_data(slow.id, c) for c in chunks))
        with anyio.fail_after(5):
            while slow._buffered < window // 2:
                await anyio.wait_all_tasks_blocked()
        for _ in chunks:
            await slow.receive()
        assert await next_frames(far) == [p.Frame(FT.WINDOW, slow.id, 0, window // 2)]  # no growth
        # The fast stream's reader is waiting when its data arrives: the window doubles.
        received: list[bytes] = []

        async def read(count: int) -> None:
            for _ in range(count):
                item = await fast.receive()
                assert item is not None
                received.append(item[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, len(chunks))
            await anyio.wait_all_tasks_blocked()
            await far.send(b"".join(p.encode_data(fast.id, c) for c in chunks))
        with anyio.fail_after(5):
            assert await next_frames(far) == [p.Frame(FT.WINDOW, fast.id, 0, window // 2 + window)]
        assert session.window_budget == budget - window
        # Next time only what is left of the budget: half a window, not a doubling.
        async with anyio.create_task_group() as tg:
            tg.start_soon(read, 8)  # half of the grown window (128 KiB)
            await anyio.wait_all_tasks_blocked()
            # Within the grown window: the peer had 64 KiB of credit plus 96 KiB granted.
            await far.send(b"".join(p.encode_data(fast.id, c) for c in chunks * 2))
        with anyio.fail_after(5):
            assert await next_frames(far) == [p.Frame(FT.WINDOW, fast.id, 0, window + window // 2)]
        assert session.window_budget == 0 and received == chunks * 3
        # The growth goes back to the session when the stream ends.
        fast.close()
        assert session.window_budget == budget
        assert session.closed is None


@pytest.mark.anyio
async def test_a_stream_reset_while_its_data_is_read_keeps_the_budget_whole() -> None:
    window = 65536
    chunks = [bytes([i]) * 8192 for i in range(4)]  # half a window
    async with ws_pair() as (near, far), running_session(near, window=window) as (session, _):
        budget = session.window_budget
        stream = session.open_stream()
        received: list[bytes] = []

        async def drain() -> None:
            with pytest.raises(StreamReset):
                while (item := await stream.receive()) is not None:
                    received.append(item[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await anyio.wait_all_tasks_blocked()  # the reader waits: a grant would grow the window
            # Half a window, then the peer gives up (its local service failed mid-body).
            await far.send(b"".join(p.encode_data(stream.id, c) for c in chunks)
                           + p.encode_reset(stream.id, p.ResetCode.INTERNAL, "local service failed"))
        assert received == chunks  # what arrived before the RESET is still handed out...
        assert session.window_budget == budget  # ...but no credit, nor growth, for a reset stream
        assert stream.id not in session.streams and stream.grown == 0


@pytest.mark.anyio
async def test_empty_messages_use_no_credit_so_their_number_is_bounded() -> None:
    from comzy.core.stream import MAX_EMPTY_MESSAGES

    async with ws_pair() as (near, far), running_session(near) as (session, _):
        stream, other = session.open_stream(), session.open_stream()
        # Empty pieces that end nothing are not kept at all...
        await far.send(b"".join(p.encode_data(stream.id, b"") for _ in range(5000)))
        # ...empty messages are, up to the bound; past it only this stream is reset.
        await far.send(b"".join(p.encode_data(stream.id, b"", p.FLAG_FIN) for _ in range(MAX_EMPTY_MESSAGES + 1)))
        with anyio.fail_after(5):
            frames = await next_frames(far)
        assert frames[0].type == FT.RESET and frames[0].stream == stream.id
        assert frames[0].payload[0] == p.ResetCode.FLOW_CONTROL
        messages = 0
        with pytest.raises(StreamReset):
            while (item := await stream.receive()) is not None:
                assert item == (b"", p.FLAG_FIN)
                messages += 1
        assert messages == MAX_EMPTY_MESSAGES
        assert session.closed is None and other.id in session.streams  # the session goes on


@pytest.mark.anyio
async def test_sender_waits_for_credit() -> None:
    peer_window = 65536
    async with ws_pair() as (near, far), running_session(near, peer_window=peer_window) as (session, _):
        stream = session.open_stream()
        body = bytes(range(256)) * 1024  # 256 KiB: four windows
        done = anyio.Event()

        async def send() -> None:
            await stream.send_data(body)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            got = bytearray()
            with anyio.fail_after(5):
                while len(got) < len(body):
                    granted = len(got) + peer_window
                    while len(got) < granted:
                        for frame in await next_frames(far):
                            assert frame.type == FT.DATA and len(frame.payload) <= p.MAX_DATA_FRAME
                            got += frame.payload
                    assert len(got) == granted  # never a byte beyond the credit
                    if len(got) < len(body):
                        # Let time pass: without credit nothing more may arrive.
                        with anyio.move_on_after(0.1):
                            extra = await far.receive()
                            pytest.fail(f"sender exceeded its credit: {extra!r:.80}")
                        assert not done.is_set()
                        await far.send(p.encode_window(stream.id, peer_window))
                await done.wait()
        assert bytes(got) == body


@pytest.mark.anyio
async def test_data_after_end_is_a_protocol_error() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        stream = session.open_stream()
        await far.send(p.encode(FT.END, stream.id) + p.encode_data(stream.id, b"late"))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "DATA after END" in result["reason"]


@pytest.mark.anyio
async def test_text_message_on_the_link_is_a_protocol_error() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        await far.send("hello")
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "text message" in result["reason"]


@pytest.mark.anyio
async def test_malformed_frame_closes_session_and_resets_open_streams() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        stream = session.open_stream()
        await far.send(p.HEADER.pack(0, 99, 0, 0))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
        with pytest.raises(StreamReset, match="tunnel session ended"):
            await stream.wait_head()
    assert closed.code == 1002
    assert "unknown frame type 99" in result["reason"]


@pytest.mark.anyio
async def test_request_on_the_server_side_is_a_protocol_error() -> None:
    # The server opens streams; an agent never may (no on_request handler).
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        await far.send(p.encode(FT.REQUEST, 2, p.RequestHead("GET", b"/", []).to_payload()))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "unexpected REQUEST" in result["reason"]


@pytest.mark.anyio
async def test_request_reusing_an_open_stream_is_a_protocol_error() -> None:
    opened: list[tuple[Stream, p.RequestHead]] = []
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        session.on_request = lambda stream, head: opened.append((stream, head))
        request = p.encode(FT.REQUEST, 5, p.RequestHead("GET", b"/x", [(b"a", b"b")]).to_payload())
        await far.send(request)
        await far.send(request)
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "reuses open stream 5" in result["reason"]
    assert [(s.id, h.target) for s, h in opened] == [(5, b"/x")]


@pytest.mark.anyio
async def test_malformed_response_head_on_a_stream_is_a_protocol_error() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        stream = session.open_stream()
        await far.send(p.encode(FT.RESPONSE, stream.id, {"s": "two hundred", "h": []}))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "malformed RESPONSE" in result["reason"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [{"code": "abc"}, {"code": [1]}, {"code": 2**64 - 1}, {"code": 999}, {"code": 5000}, {"code": True},
     {"code": 1000, "reason": b"\xff"}],
)
async def test_malformed_ws_close_is_a_protocol_error(payload: dict[str, Any]) -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, result):
        stream = session.open_stream()
        await far.send(p.encode(FT.WS_CLOSE, stream.id, payload))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    assert closed.code == 1002
    assert "WS_CLOSE" in result["reason"]


@pytest.mark.anyio
async def test_ws_close_ends_the_stream_with_its_code() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, _):
        stream = session.open_stream()
        await far.send(p.encode(FT.WS_CLOSE, stream.id, {"code": 4001, "reason": "bye"}))
        with anyio.fail_after(5):
            assert await stream.receive() is None
        assert stream.ws_close == (4001, "bye")


@pytest.mark.anyio
async def test_ping_is_answered_with_the_same_payload() -> None:
    async with ws_pair() as (near, far), running_session(near):
        await far.send(p.encode(FT.PING, 0, b"\x00token\xff"))
        with anyio.fail_after(5):
            assert await next_frames(far) == [p.Frame(FT.PONG, 0, 0, b"\x00token\xff")]


@pytest.mark.anyio
async def test_reset_from_peer_fails_the_stream_with_its_code() -> None:
    async with ws_pair() as (near, far), running_session(near) as (session, _):
        stream = session.open_stream()
        await far.send(p.encode_reset(stream.id, p.ResetCode.LOCAL_FAILED, "boom"))
        with anyio.fail_after(5), pytest.raises(StreamReset) as info:
            await stream.wait_head()
        assert (info.value.code, info.value.message) == (p.ResetCode.LOCAL_FAILED, "boom")
        assert stream.id not in session.streams
        assert session.closed is None


@pytest.mark.anyio
async def test_silent_peer_is_dropped_after_heartbeat_timeout() -> None:
    async with ws_pair() as (near, far), running_session(near, heartbeat_interval=0.1, heartbeat_timeout=0.4) as (
        session, result,
    ):
        started = anyio.current_time()
        await session.wait_closed()
        elapsed = anyio.current_time() - started
        closed, frames = await receive_until_closed(far)
    assert "heartbeat timeout" in result["reason"]
    assert 0.4 <= elapsed < 2.0
    assert any(f.type == FT.PING for f in frames)  # it did ask before giving up
    assert closed.code == 1006  # a dead peer gets no closing handshake


@pytest.mark.anyio
async def test_a_bug_in_a_handler_ends_only_that_session() -> None:
    def broken(stream: Stream, head: p.RequestHead) -> None:
        raise RuntimeError("handler bug")

    async with ws_pair() as (near, far), running_session(near) as (session, result):
        session.on_request = broken
        await far.send(p.encode(FT.REQUEST, 1, p.RequestHead("GET", b"/", []).to_payload()))
        closed, _ = await receive_until_closed(far)
        await session.wait_closed()
    # run() returned instead of raising into the caller's task group (the server's).
    assert closed.code == 1011
    assert "handler bug" in result["reason"]


@pytest.mark.anyio
async def test_on_event_tells_a_taskless_reader_once_per_message_and_reads_do_not_block() -> None:
    window = 65536
    async with ws_pair() as (near, far), running_session(near, window=window) as (session, _):
        stream = session.open_stream()
        seen: list[tuple[bool, bool, bool, int]] = []
        told = [anyio.Event(), anyio.Event()]

        def on_event() -> None:
            # What the reader sees once the message is handled (after every frame's update).
            seen.append((stream.head is not None, stream.buffered, stream.remote_ended, stream.credit))
            told[len(seen) - 1].set()

        stream.on_event = on_event
        assert stream.receive_nowait(1024) is None  # nothing buffered: no wait, no data
        credit = stream.credit
        head = p.ResponseHead(200, [(b"content-length", b"12")])
        await far.send(p.encode(FT.RESPONSE, stream.id, head.to_payload()) + p.encode_window(stream.id, 10))
        with anyio.fail_after(5):
            await told[0].wait()
        await far.send(p.encode_data(stream.id, b"hello ") + p.encode_data(stream.id, b"world!")
                       + p.encode(FT.END, stream.id))
        with anyio.fail_after(5):
            await told[1].wait()
        # One call per link message, not one per frame: a small response's head, body and end, one call.
        assert seen == [(True, False, False, credit + 10), (True, True, True, credit + 10)]
        assert stream.receive_nowait(8) == b"hello "  # joined only up to the limit
        assert stream.receive_nowait(1024) == b"world!"
        assert stream.receive_nowait(1024) is None and stream.drained_and_ended
        assert stream.reset_error is None

        other = session.open_stream()
        resets: list[StreamReset | None] = []
        reset_seen = anyio.Event()

        def on_reset() -> None:
            resets.append(other.reset_error)
            reset_seen.set()

        other.on_event = on_reset
        await far.send(p.encode_reset(other.id, p.ResetCode.CANCEL, "gone"))
        with anyio.fail_after(5):
            await reset_seen.wait()
        assert resets[0] is not None and resets[0].message == "gone"
        assert other.reset_error is resets[0]
        # The async API is untouched: a waiting receive still raises it.
        with pytest.raises(StreamReset):
            await other.receive()


@pytest.mark.anyio
async def test_an_on_event_that_raises_resets_its_stream_and_spares_the_session() -> None:
    # on_event runs inside the session's reader: a consumer's bug must end its own stream (its peer
    # told with a RESET), never the reader, and so never every other stream of the tunnel.
    async with ws_pair() as (near, far), running_session(near, window=65536) as (session, result):
        broken, healthy = session.open_stream(), session.open_stream()
        calls: list[int] = []

        def fail() -> None:
            calls.append(broken.id)
            raise RuntimeError("consumer bug")

        broken.on_event = fail
        await far.send(p.encode_data(broken.id, b"boom") + p.encode_data(healthy.id, b"fine")
                       + p.encode(FT.END, healthy.id))
        with anyio.fail_after(5):
            assert await healthy.receive() == (b"fine", 0)
            assert await healthy.receive() is None
            frames = await next_frames(far)
        assert "reason" not in result and session.closed is None  # the reader lives on
        assert calls == [broken.id]  # called once: the reset of its own making does not call it again
        assert broken.id not in session.streams and broken.reset_error is not None
        assert [(f.type, f.stream, f.payload[0]) for f in frames if f.type == FT.RESET] == [
            (FT.RESET, broken.id, p.ResetCode.INTERNAL)]
