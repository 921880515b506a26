"""Receiving WebSocket frames: the parser (property tests) and WebSocket.receive() on real sockets.

The peer in the socket tests is raw: frames are built here byte by byte (masked with an
independent XOR) and what our end sends back is read with wsproto, a second implementation.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.abc import SocketAttribute
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Pong
from wsproto.utilities import generate_accept_token

from comzy.core import wsframe
from comzy.core.websocket import Closed, WebSocket, client_handshake, server_handshake

pytestmark = pytest.mark.anyio

MAX_MESSAGE = 1024 * 1024
KEY = b"\x37\xfa\x21\x3d"
UPGRADE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def xor(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3 masking, done with big integers (independent of the C apply_mask)."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True, rsv: int = 0,
          announce: int | None = None, width: int | None = None, key: bytes = KEY) -> bytes:
    """One frame as a peer would send it; ``announce``/``width`` forge the length field."""
    length = len(payload) if announce is None else announce
    if width is None:
        width = 7 if length < 126 else 16 if length < 65536 else 64
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if width == 7:
        header = bytes([first, mask_bit | length])
    elif width == 16:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    return header + key + xor(payload, key) if masked else header + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def parse_all(reader: wsframe.FrameReader, *chunks: bytes) -> list[Any]:
    """Everything ``reader`` yields when fed ``chunks`` one after the other."""
    out: list[Any] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (item := reader.next()) is not None:
            out.append(item)
    return out


# -- the parser on its own ----------------------------------------------------------------------
def sample_stream(masked: bool) -> tuple[bytes, list[Any], int]:
    """Frames of every kind and length form, what the reader must make of them, and where the
    payload of the one big frame starts."""
    big = bytes(range(256)) * 300  # 76800 bytes: the 64-bit length form
    medium = os.urandom(300)  # the 16-bit length form
    before_big = [
        frame(BINARY, b"", masked=masked),
        frame(BINARY, b"small", masked=masked),
        frame(TEXT, "héllo ✓".encode(), masked=masked),
        frame(BINARY, medium[:100], fin=False, masked=masked),
        frame(PING, b"p1", masked=masked),
        frame(CONT, medium[100:], fin=False, masked=masked),
        frame(PONG, b"ignored", masked=masked),
        frame(CONT, b"", masked=masked),
        frame(TEXT, "雪".encode()[:2], fin=False, masked=masked),  # a character split across fragments
        frame(CONT, "雪".encode()[2:] + b"!", masked=masked),
    ]
    after_big = [
        frame(PING, b"", masked=masked),
        frame(CLOSE, close_payload(4001, "bye ✓".encode()), masked=masked),
    ]
    big_start = sum(map(len, before_big)) + (14 if masked else 10)
    data = b"".join([*before_big, frame(BINARY, big, masked=masked), *after_big])
    expected = [b"", b"small", "héllo ✓", wsframe.Ping(b"p1"), medium, "雪!", big, wsframe.Ping(b""),
                wsframe.CloseFrame(4001, "bye ✓")]
    return data, expected, big_start


@pytest.mark.parametrize("client", [False, True], ids=["server-receives-masked", "client-receives-unmasked"])
def test_every_split_into_two_reads_gives_the_same_messages(client: bool) -> None:
    data, expected, big_start = sample_stream(masked=not client)
    assert parse_all(wsframe.FrameReader(client, MAX_MESSAGE), data) == expected
    for split in range(len(data) + 1):
        if big_start + 16 < split < big_start + 76800 - 16 and split % 499:
            continue  # deep inside the big payload every split is alike: a sample is enough
        reader = wsframe.FrameReader(client, MAX_MESSAGE)
        assert parse_all(reader, data[:split], data[split:]) == expected, split


def test_one_byte_per_read_gives_the_same_messages() -> None:
    data, expected, _ = sample_stream(masked=True)
    reader = wsframe.FrameReader(False, MAX_MESSAGE)
    assert parse_all(reader, *(data[i : i + 1] for i in range(len(data)))) == expected


def _single_frames(masked: bool) -> list[bytes]:
    """Reads of one frame each, of every kind, length form and masking, and some that are not one
    whole frame: what ``whole_message`` must either take as ``feed`` and ``next`` would or leave."""
    reads = [frame(BINARY, os.urandom(n), masked=masked) for n in (0, 1, 125, 126, 127, 300, 65535, 65536)]
    reads += [frame(BINARY, b"zero key", masked=masked, key=wsframe.ZERO_KEY if masked else KEY),
              frame(TEXT, b"text", masked=masked), frame(PING, b"p", masked=masked),
              frame(CLOSE, close_payload(1000), masked=masked), frame(BINARY, b"first", fin=False, masked=masked),
              frame(CONT, b"stray", masked=masked), frame(BINARY, b"rsv", rsv=0x40, masked=masked),
              frame(BINARY, b"wrong side", masked=not masked), frame(BINARY, b"x" * 10, announce=126, width=16,
                                                                      masked=masked)[:-3],
              frame(BINARY, b"long form", width=16, masked=masked), frame(BINARY, b"two", masked=masked) * 2,
              frame(BINARY, b"cut", masked=masked)[:-1], b"\x82"]
    return reads


def _outcome(reader: wsframe.FrameReader, *chunks: bytes) -> list[Any] | tuple[int, str]:
    try:
        return parse_all(reader, *chunks)
    except wsframe.FrameError as exc:
        return exc.code, exc.reason


@pytest.mark.parametrize("client", [False, True], ids=["server-receives-masked", "client-receives-unmasked"])
def test_a_read_of_one_whole_binary_frame_is_taken_in_one_step_as_feed_and_next_would(client: bool) -> None:
    """``whole_message`` (the attached link's usual read) gives what ``feed`` and ``next`` give for a
    read that is one whole final binary frame, and takes nothing from any other read: fed after
    it, that read comes out (or is refused) as it would have."""
    taken = 0
    for read in _single_frames(masked=not client):
        for before in (b"", frame(BINARY, b"", fin=False, masked=not client)[:1]):  # idle, or a header pending
            reader, reference = wsframe.FrameReader(client, MAX_MESSAGE), wsframe.FrameReader(client, MAX_MESSAGE)
            if before:
                reader.feed(before)
                reference.feed(before)
            expected = _outcome(reference, read)
            message = reader.whole_message(read)
            if message is None:
                assert _outcome(reader, read) == expected, read[:20]
            else:
                taken += 1
                assert not before and [message] == expected, read[:20]
                assert reader.next() is None and reader.missing == 0
    assert taken == 8  # the binary frames of 0 to 65535 bytes and the one with the zero key


def test_the_binary_headers_written_without_a_call_are_encode_binarys() -> None:
    """WebSocket.write_message's headers (a table below 126 bytes, the 16-bit form below 64 KiB)."""
    for size in (0, 1, 125, 126, 127, 1000, 65535, 65536, 70000):
        payload = os.urandom(size)
        for masked in (False, True):
            if size < 126:
                header = (wsframe.ZERO_KEY_HEADERS if masked else wsframe.BINARY_HEADERS)[size]
            elif size < 65536:
                header = (wsframe.zero_key_header_16(size, wsframe.ZERO_KEY) if masked
                          else wsframe.binary_header_16(size))
            else:
                header = wsframe.binary_header(size, masked)
            assert header + payload == wsframe.encode_binary(payload, masked, zero_key=True), (size, masked)
            assert wsframe.binary_header(size, masked) == header


messages = st.lists(st.one_of(st.binary(max_size=70000), st.text(max_size=300)), max_size=8)


@settings(max_examples=60, deadline=None)
@given(messages=messages, data=st.data())
def test_fragmented_interleaved_and_split_messages_come_out_whole(messages: list[bytes | str],
                                                                  data: st.DataObject) -> None:
    stream = b""
    for message in messages:
        payload = message.encode() if isinstance(message, str) else message
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            opcode = (TEXT if isinstance(message, str) else BINARY) if i == 0 else CONT
            stream += frame(opcode, piece, fin=i == len(pieces) - 1, key=os.urandom(4))
            if data.draw(st.booleans()):
                stream += frame(data.draw(st.sampled_from([PING, PONG])), b"ctl", key=os.urandom(4))
    reads = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *reads], [*reads, len(stream)], strict=True)]
    received = [m for m in parse_all(wsframe.FrameReader(False, MAX_MESSAGE), *chunks)
                if not isinstance(m, wsframe.Ping)]
    assert received == messages


def test_a_consumed_read_is_released() -> None:
    """An idle reader keeps no buffer: what it parsed is not held for the life of the link."""
    reader = wsframe.FrameReader(False, MAX_MESSAGE)
    payload = os.urandom(200_000)
    data = frame(BINARY, payload) + frame(BINARY, b"next")
    assert parse_all(reader, data[:150_000], data[150_000:]) == [payload, b"next"]
    assert reader._buffer == b"" and reader._pending is None


def test_tiny_reads_and_fragments_cannot_outgrow_the_message() -> None:
    """A byte per read, or an empty fragment at a time, costs no more memory than the bytes."""
    payload = os.urandom(20_000)
    one_frame = frame(BINARY, payload)
    empty_fragments = frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=False) * 20_000
    reads = [one_frame[i : i + 1] for i in range(len(one_frame))]
    reads += [empty_fragments[i : i + 4096] for i in range(0, len(empty_fragments), 4096)]
    reader = wsframe.FrameReader(False, MAX_MESSAGE)
    out = []
    tracemalloc.start()
    try:
        for data in reads:
            reader.feed(data)
            while (item := reader.next()) is not None:
                out.append(item)
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == [payload]
    assert held < 4 * len(payload), held  # a list entry per read or fragment would be 8-40 bytes each


def test_close_reasons_sent_are_cut_to_fit_a_control_frame() -> None:
    encoded = wsframe.encode_close(4000, "a" + "✓" * 100, masked=False)  # 301 bytes of UTF-8
    # 123 bytes would end inside a 3-byte character: that character goes too.
    assert encoded[1] == 2 + 1 + 40 * 3
    [close] = parse_all(wsframe.FrameReader(True, MAX_MESSAGE), encoded)
    assert close == wsframe.CloseFrame(4000, "a" + "✓" * 40)
    assert wsframe.encode_close(None, "", masked=False) == b"\x88\x00"  # the answer to a close with no code
    # The codes that only describe a close locally never go on the wire.
    for code in (1005, 1006, 1015):
        assert wsframe.encode_close(code, "x", masked=False) == b"\x88\x03\x03\xe8x"


# -- WebSocket.receive() on real sockets ----------------------------------------------------------
class ReadSizes(anyio.abc.ByteStream):
    """A socket stream that records the size of every read, to show how frames were split."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.sizes: list[int] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.stream.receive(max_bytes)
        self.sizes.append(len(data))
        return data

    async def send(self, item: bytes) -> None:
        await self.stream.send(item)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def raw_client(max_message: int = MAX_MESSAGE, first: bytes = b"", reads: list[ReadSizes] | None = None
                     ) -> AsyncIterator[tuple[anyio.abc.SocketStream, WebSocket]]:
    """Our server-side WebSocket and a raw client stream to it; ``first`` rides with the upgrade.

    ``reads`` (if given) gets the server's stream, wrapped to record the size of each read.
    """
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with multi:
        listener = multi.listeners[0]
        assert isinstance(listener, anyio.abc.SocketListener)
        raw = await anyio.connect_tcp("127.0.0.1", listener.extra(SocketAttribute.local_port))
        async with raw:
            await raw.send(UPGRADE + first)
            with anyio.fail_after(5):
                accepted: anyio.abc.ByteStream = await listener.accept()
                if reads is not None:
                    reads.append(ReadSizes(accepted))
                    accepted = reads[-1]
                ws, _ = await server_handshake(accepted, max_message)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await raw.receive()
            assert head.startswith(b"HTTP/1.1 101 ") and head.endswith(b"\r\n\r\n")
            try:
                yield raw, ws
            finally:
                await ws.aclose()


@asynccontextmanager
async def raw_server(first: bytes = b"") -> AsyncIterator[tuple[anyio.abc.SocketStream, WebSocket]]:
    """Our client-side WebSocket and the raw server stream it opened; ``first`` rides with the 101."""
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with multi:
        listener = multi.listeners[0]
        assert isinstance(listener, anyio.abc.SocketListener)
        port = listener.extra(SocketAttribute.local_port)
        sides: dict[str, Any] = {}

        async def serve() -> None:
            stream = await listener.accept()
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            await stream.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n" + first)
            sides["raw"] = stream

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                stream = await anyio.connect_tcp("127.0.0.1", port)
                sides["ws"], _ = await client_handshake(stream, f"127.0.0.1:{port}", "/", MAX_MESSAGE)
        async with sides["raw"]:
            try:
                yield sides["raw"], sides["ws"]
            finally:
                await sides["ws"].aclose()


async def received(ws: WebSocket, count: int) -> list[bytes | str | Closed]:
    with anyio.fail_after(5):
        return [await ws.receive() for _ in range(count)]


async def peer_reads_until_eof(raw: anyio.abc.SocketStream, our_side: ConnectionType) -> list[Event]:
    """What our end sent before hanging up, parsed by wsproto as the peer's side."""
    peer = Connection(ConnectionType.CLIENT if our_side is ConnectionType.SERVER else ConnectionType.SERVER)
    with anyio.fail_after(5):
        while True:
            try:
                data = await raw.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return list(peer.events())
            peer.receive_data(data)


async def test_frames_split_at_every_byte_over_a_socket() -> None:
    data, expected, big_start = sample_stream(masked=True)
    head, tail = data[: big_start + 8], data[-40:]  # every frame header, and the start of the big payload
    reads: list[ReadSizes] = []
    async with raw_client(reads=reads) as (raw, ws):
        results: list[Any] = []

        async def collect() -> None:
            while not isinstance(message := await ws.receive(), Closed):
                results.append(message)
            results.append(message)

        async def send_bytewise(part: bytes) -> None:
            for i in range(len(part)):
                await raw.send(part[i : i + 1])
                for _ in range(5):  # loopback delivers at once: a few turns of the loop to read it
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            await send_bytewise(head)
            await raw.send(data[len(head) : -40])
            await send_bytewise(tail)
        assert results[:-1] == [m for m in expected if not isinstance(m, (wsframe.Ping, wsframe.CloseFrame))]
        assert results[-1] == Closed(4001, "bye ✓")
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    # The premise: the bytes sent one by one were read one by one (a split at every byte).
    assert reads[0].sizes.count(1) >= 0.95 * (len(head) + len(tail)), reads[0].sizes
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"p1", b""]
    assert [(e.code, e.reason) for e in events if isinstance(e, CloseConnection)] == [(4001, "bye ✓")]


async def test_many_frames_in_one_read() -> None:
    payloads = [os.urandom(i % 300) for i in range(2000)]
    async with raw_client() as (raw, ws), anyio.create_task_group() as tg:
        tg.start_soon(raw.send, b"".join(frame(BINARY, payload) for payload in payloads))
        assert await received(ws, len(payloads)) == payloads


async def test_fragmented_messages_with_pings_between_fragments() -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(TEXT, b"frag", fin=False) + frame(PING, b"one") + frame(CONT, "mented ✓".encode())
                       + frame(BINARY, b"\x00" * 70000, fin=False) + frame(PING, b"two")
                       + frame(CONT, b"\x01" * 10, fin=False) + frame(PONG, b"x") + frame(CONT, b"\x02"))
        assert await received(ws, 2) == ["fragmented ✓", b"\x00" * 70000 + b"\x01" * 10 + b"\x02"]
        await raw.send(frame(CLOSE, close_payload(1000)))
        assert await received(ws, 1) == [Closed(1000, "")]
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"one", b"two"]


async def test_messages_at_the_size_bound_pass() -> None:
    async with raw_client(max_message=100_000) as (raw, ws), anyio.create_task_group() as tg:
        tg.start_soon(raw.send, frame(BINARY, b"a" * 100_000) + frame(BINARY, b"b" * 60_000, fin=False)
                       + frame(CONT, b"c" * 40_000) + frame(TEXT, "é".encode() * 50_000))
        assert await received(ws, 3) == [b"a" * 100_000, b"b" * 60_000 + b"c" * 40_000, "é" * 50_000]


async def test_a_huge_announced_frame_is_refused_before_its_payload_arrives() -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(BINARY, announce=2**30, key=KEY))  # the header of 1 GiB, and nothing more
        with anyio.fail_after(2):
            closed = await ws.receive()
        assert closed == Closed(1009, f"message larger than {MAX_MESSAGE} bytes")
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    assert [(e.code, e.reason) for e in events if isinstance(e, CloseConnection)] == [(1009, "message too big")]


async def test_a_fragment_past_the_bound_is_refused_at_its_header() -> None:
    async with raw_client() as (raw, ws), anyio.create_task_group() as tg:
        tg.start_soon(raw.send, frame(BINARY, b"x" * 600_000, fin=False) + frame(CONT, announce=600_000))
        assert await received(ws, 1) == [Closed(1009, f"message larger than {MAX_MESSAGE} bytes")]


# (what a client sends, the close code our server answers with)
REFUSALS = {
    "rsv1": (frame(BINARY, b"x", rsv=0x40), 1002),
    "rsv2": (frame(BINARY, b"x", rsv=0x20), 1002),
    "rsv3": (frame(TEXT, b"x", rsv=0x10), 1002),
    "rsv-on-control": (frame(PING, b"x", rsv=0x40), 1002),
    **{f"opcode-{op:#x}": (frame(op, b"x"), 1002) for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)},
    "control-126-bytes": (frame(PING, b"p" * 126), 1002),
    "control-16-bit-length": (frame(PING, b"p" * 5, width=16), 1002),
    "fragmented-ping": (frame(PING, b"p", fin=False), 1002),
    "fragmented-close": (frame(CLOSE, close_payload(1000), fin=False), 1002),
    "unmasked-from-client": (frame(BINARY, b"x", masked=False), 1002),
    "64-bit-length-high-bit": (frame(BINARY, announce=2**63 + 5, width=64), 1002),
    "16-bit-length-not-minimal": (frame(BINARY, b"x" * 10, width=16), 1002),
    "64-bit-length-not-minimal": (frame(BINARY, b"x" * 1000, width=64), 1002),
    "continuation-of-nothing": (frame(CONT, b"x"), 1002),
    "new-message-inside-fragmented": (frame(BINARY, b"x", fin=False) + frame(TEXT, b"y"), 1002),
    "invalid-utf8-text": (frame(TEXT, b"ok \xff"), 1007),
    "truncated-utf8-text": (frame(TEXT, "✓".encode()[:2]), 1007),
    "utf8-surrogate-text": (frame(TEXT, b"\xed\xa0\x80"), 1007),
    "close-1-byte": (frame(CLOSE, b"\x03"), 1002),
    **{f"close-code-{code}": (frame(CLOSE, close_payload(code)), 1002)
       for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)},
    "close-reason-not-utf8": (frame(CLOSE, close_payload(1000, b"\xc3")), 1007),
}


@pytest.mark.parametrize("sent", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_broken_frame_closes_with_its_code(sent: tuple[bytes, int]) -> None:
    data, code = sent
    async with raw_client() as (raw, ws):
        await raw.send(frame(BINARY, b"before") + data + frame(BINARY, b"never delivered"))
        messages = await received(ws, 2)
        assert messages[0] == b"before"
        assert isinstance(messages[1], Closed) and messages[1].code == code
        assert await received(ws, 1) == [messages[1]]  # and it stays closed
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [code]


async def test_invalid_text_is_refused_at_the_first_bad_fragment() -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(TEXT, b"fine, then \xc0\xaf", fin=False))  # the final fragment never comes
        [closed] = await received(ws, 1)
    assert isinstance(closed, Closed) and closed.code == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 1013, 3000, 4999])
async def test_a_valid_close_is_answered_with_its_code(code: int) -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(CLOSE, close_payload(code, "reason ✓".encode())))
        assert await received(ws, 1) == [Closed(code, "reason ✓")]
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    assert [(e.code, e.reason) for e in events if isinstance(e, CloseConnection)] == [(code, "reason ✓")]


async def test_a_close_without_a_code_is_1005_and_answered_without_one() -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(CLOSE))
        assert await received(ws, 1) == [Closed(1005, "")]
        answer = b""
        with anyio.fail_after(5):
            while len(answer) < 2:
                answer += await raw.receive()
    assert answer == b"\x88\x00"


async def test_ping_is_answered_with_the_same_payload() -> None:
    async with raw_client() as (raw, ws):
        await raw.send(frame(PING, bytes(range(125))) + frame(BINARY, b"after"))
        assert await received(ws, 1) == [b"after"]
        await ws.close()
        events = await peer_reads_until_eof(raw, ConnectionType.SERVER)
    assert [e.payload for e in events if isinstance(e, Pong)] == [bytes(range(125))]


async def test_frames_sent_with_the_upgrade_are_kept() -> None:
    first = frame(BINARY, b"early") + frame(TEXT, b"bird") + frame(BINARY, b"partial")[:5]
    async with raw_client(first=first) as (raw, ws):
        assert await received(ws, 2) == [b"early", "bird"]
        await raw.send(frame(BINARY, b"partial")[5:])
        assert await received(ws, 1) == [b"partial"]


async def test_the_client_receives_unmasked_frames_and_those_sent_with_the_101() -> None:
    first = frame(TEXT, b"welcome", masked=False) + frame(BINARY, b"\x00" * 70000, masked=False)[:9]
    async with raw_server(first=first) as (raw, ws):
        assert await received(ws, 1) == ["welcome"]
        await raw.send(frame(BINARY, b"\x00" * 70000, masked=False)[9:] + frame(PING, b"hi", masked=False))
        assert await received(ws, 1) == [b"\x00" * 70000]
        await ws.send(b"reply")
        await raw.send(frame(CLOSE, close_payload(1001, b"away"), masked=False))
        assert await received(ws, 1) == [Closed(1001, "away")]
        peer = Connection(ConnectionType.SERVER)  # wsproto checks that what our client sent is masked
        with anyio.fail_after(5):
            while True:
                try:
                    peer.receive_data(await raw.receive())
                except anyio.EndOfStream:
                    break
        events = list(peer.events())
    assert [type(e).__name__ for e in events] == ["BytesMessage", "Pong", "CloseConnection"]


async def test_a_masked_frame_from_a_server_is_refused() -> None:
    async with raw_server() as (raw, ws):
        await raw.send(frame(BINARY, b"masked"))
        [closed] = await received(ws, 1)
    assert isinstance(closed, Closed) and closed.code == 1002


async def test_receiving_a_large_message_leaves_no_buffer_behind() -> None:
    """An idle tunnel must stay small: after a big message, the link holds no read or payload."""
    # The last read ends with a small frame: the read is parsed in place, then must be let go.
    data = b"".join(frame(BINARY, os.urandom(500_000)) for _ in range(4)) + frame(BINARY, b"tail")
    async with raw_client() as (raw, ws):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with anyio.create_task_group() as tg:
                tg.start_soon(raw.send, data)
                assert [len(m) for m in await received(ws, 5)] == [500_000] * 4 + [4]  # type: ignore[arg-type]
            async with anyio.create_task_group() as tg:
                tg.start_soon(ws.receive)  # waiting for more, as an idle link's reader does
                await anyio.wait_all_tasks_blocked()
                held = tracemalloc.get_traced_memory()[0] - before
                await raw.send(frame(CLOSE))
        finally:
            tracemalloc.stop()
    assert held < 64 * 1024, held
