"""Large DATA frames written as pieces, and the agent link's masking key.

A body's large DATA frames are queued as their header and a view of the body (``p.DataFrame``)
and leave in one ``writelines`` with the rest of their WebSocket message: nothing joins them.
The agent masks that message with the all-zero key where no intermediary can read the link (TLS,
loopback), which makes masking and unmasking free, and with a random key everywhere else. These
tests pin that the pieces arrive as the bytes they stand for, however they are masked, that the
payload is not copied on its way to the queue, and which key the agent's ``connect`` chooses.
"""

from __future__ import annotations

import os
import socket
import struct

import anyio
import anyio.abc
import pytest

from comzy.core import protocol as p
from comzy.core import wsframe
from comzy.core.session import Session
from comzy.core.websocket import WebSocket, connect, server_handshake
from tests.helpers import wait_until
from tests.test_protocol import ws_pair

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: uvloop's writelines is a writev of the pieces, asyncio's joins them."""
    return request.param  # type: ignore[no-any-return]


def xor(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3 masking with big integers (independent of the C apply_mask)."""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big") if n else b""


def parse_one_frame(data: bytes) -> tuple[int, bytes | None, bytes]:
    """A whole client frame, parsed here: its first byte, its masking key (None: unmasked) and
    its payload as sent (still masked)."""
    first, second = data[0], data[1]
    length, offset = second & 0x7F, 2
    if length == 126:
        (length,), offset = struct.unpack_from("!H", data, 2), 4
    elif length == 127:
        (length,), offset = struct.unpack_from("!Q", data, 2), 10
    key = None
    if second & 0x80:
        key, offset = data[offset : offset + 4], offset + 4
    payload = data[offset:]
    assert len(payload) == length
    return first, key, payload


@pytest.mark.parametrize("masking", ["random", "zero", "none"])
def test_pieces_make_the_frame_their_joined_payload_would(masking: str) -> None:
    # Odd sizes, so that most pieces start at an offset that is not a multiple of 4: each piece is
    # masked with the key turned to where it starts.
    pieces: list[bytes | memoryview] = [os.urandom(n) for n in (1, 10, 65_537, 3, 0, 70_001, 2)]
    pieces.append(memoryview(os.urandom(1000))[3:999])
    payload = b"".join(pieces)
    encoded = b"".join(wsframe.encode_pieces(pieces, len(payload), masking != "none", masking == "zero"))
    first, key, sent = parse_one_frame(encoded)
    assert first == 0x80 | wsframe.OP_BINARY
    if masking == "none":
        assert key is None and sent == payload
    else:
        assert key is not None
        assert (key == wsframe.ZERO_KEY) == (masking == "zero")
        assert xor(sent, key) == payload
        # And the server's reader takes it as any client's frame.
        reader = wsframe.FrameReader(client=False, max_message=1 << 20)
        reader.feed(encoded)
        assert reader.next() == payload


def test_a_zero_key_frame_split_across_reads_is_read_whole() -> None:
    payload = os.urandom(200_000)
    encoded = wsframe.encode_binary(payload, masked=True, zero_key=True)
    assert encoded[10:14] == wsframe.ZERO_KEY
    reader = wsframe.FrameReader(client=False, max_message=1 << 20)
    got = []
    for start in range(0, len(encoded), 65_000):
        reader.feed(encoded[start : start + 65_000])
        while (message := reader.next()) is not None:
            got.append(message)
    assert got == [payload]


def test_a_large_data_frame_keeps_a_view_of_the_body_not_a_copy() -> None:
    body = os.urandom(200_000)
    chunk = memoryview(body)[1000 : 1000 + p.MAX_DATA_FRAME]
    frame = p.data_frame(7, chunk, p.FLAG_FIN)
    assert isinstance(frame, p.DataFrame)
    assert isinstance(frame.payload, memoryview) and frame.payload.obj is body
    assert len(frame) == p.HEADER_SIZE + p.MAX_DATA_FRAME
    assert bytes(frame) == p.encode_data(7, chunk, p.FLAG_FIN)
    # Small payloads, and any buffer that may still change, are copied into one bytes frame.
    assert type(p.data_frame(7, body[: p.PIECES_FROM - 1])) is bytes
    assert type(p.data_frame(7, chunk, immutable=False)) is bytes


@pytest.mark.parametrize("zero_key", [False, True], ids=["random-key", "zero-key"])
async def test_a_body_sent_in_pieces_arrives_whole_and_in_order(zero_key: bool) -> None:
    body = os.urandom(3 * 1024 * 1024 + 12_345)
    async with ws_pair() as (server_end, client_end), anyio.create_task_group() as tg:
        client_end.zero_key = zero_key
        session = Session(client_end, peer_window=p.MAX_WINDOW)  # the masking end: as the agent's
        tg.start_soon(session.run)
        await wait_until(lambda: session.attached, 10)
        stream = session.open_stream()
        received = bytearray()
        ends = 0

        async def read() -> None:
            nonlocal ends
            while ends < 2:
                message = await server_end.receive()
                assert isinstance(message, bytes), message
                for frame in p.decode_message(message):
                    assert frame.stream == stream.id
                    if frame.type == p.FrameType.DATA:
                        received.extend(frame.payload)
                    else:
                        assert frame.type == p.FrameType.END
                        ends += 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as readers:
                readers.start_soon(read)
                await stream.send_data(body[:1_000_001])
                await stream.send_data(b"a small piece, copied")
                await stream.send_data(body[1_000_001:])
                stream.send_end()
                # A second END would be a protocol error: a raw one marks where the writes ended.
                session.send_nowait(p.encode(p.FrameType.END, stream.id))
        assert bytes(received) == body[:1_000_001] + b"a small piece, copied" + body[1_000_001:]
        await session.close()
        tg.cancel_scope.cancel()


async def _raw_frame_via_connect(host: str) -> bytes:
    """Listen on ``host``, ``connect`` to it as the agent does, send one binary message, and
    return the frame as it came off the socket."""
    multi = await anyio.create_tcp_listener(local_host=host, local_port=0)
    listener = multi.listeners[0]
    assert isinstance(listener, anyio.abc.SocketListener)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted: dict[str, anyio.abc.SocketStream] = {}
    ends: list[WebSocket] = []
    payload = b"x" * 1000
    async with multi:

        async def accept() -> None:
            stream = await listener.accept()
            accepted["stream"] = stream
            ws, _ = await server_handshake(stream, 1 << 20)
            ends.append(ws)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept)
                client = await connect(f"ws://{host}:{port}/", 1 << 20)
            try:
                await client.send(payload)
                data = b""
                while len(data) < 1008:
                    data += await accepted["stream"].receive()
            finally:
                await client.aclose()
                for ws in ends:
                    await ws.aclose()
    _first, key, sent = parse_one_frame(data)
    assert key is not None and xor(sent, key) == payload
    return key


async def test_the_agent_masks_with_the_zero_key_on_loopback() -> None:
    assert await _raw_frame_via_connect("127.0.0.1") == wsframe.ZERO_KEY


def _non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else str(address)


async def test_the_agent_masks_with_random_keys_across_a_network() -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    keys = {await _raw_frame_via_connect(address) for _ in range(3)}
    assert wsframe.ZERO_KEY not in keys and len(keys) == 3
