"""The agent link driven by asyncio protocol callbacks (``Session`` attached to its WebSocket).

Both ends attach their link once the handshake is done: frames are dispatched from the loop's
read callback and written by a flush per loop turn (sooner once FLUSH_AT_FRAMES are queued), with
no reader or writer task. These tests pin what that must keep: real stacks attach on both ends,
a busy turn's first frames reach the peer before the turn ends, frames behind an async control
handler wait for it in order, a close flushes what was queued first, and a framing error from
the peer ends the session with the peer told why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest

from comzy.core import protocol as p
from comzy.core import wsframe
from comzy.core.server import ServerContext
from comzy.core.session import FLUSH_AT_FRAMES, Session
from comzy.core.stream import Stream
from comzy.core.websocket import Closed, WebSocket
from tests.conftest import RunningAgent
from tests.helpers import receive_until_closed, wait_until
from tests.test_protocol import next_frames, ws_pair

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: uvloop's transports (the processes' default) are not asyncio.Transport subclasses."""
    return request.param  # type: ignore[no-any-return]


async def test_both_ends_of_a_real_link_are_attached(server: ServerContext, tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        response = await client.get("/echo")
    assert response.status_code == 200
    entry = server.registry.get(tunnel.alias)
    assert entry is not None
    assert entry.session.attached, "the server's end of the agent link still runs reader/writer tasks"
    assert tunnel.agent.session is not None and tunnel.agent.session.attached, "the agent's end is not attached"


async def test_frames_after_a_control_frame_wait_for_its_handler_in_order() -> None:
    async with ws_pair() as (near, far):
        session = Session(near)
        seen: list[str] = []
        handler_done = anyio.Event()

        async def on_control(frame: p.Frame) -> None:
            seen.append(f"control {frame.type.name}")
            await anyio.sleep(0.2)  # a handler that awaits: the stream's DATA must not overtake it
            seen.append("control done")
            handler_done.set()

        session.on_control = on_control
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.run)
            await wait_until(lambda: session.attached, 10)
            stream = session.open_stream()
            # One message: a NOTICE, then DATA for the stream, then its END.
            await far.send(p.encode(p.FrameType.NOTICE, 0, {"level": "info", "message": "hello"})
                           + p.encode_data(stream.id, b"after the notice") + p.encode(p.FrameType.END, stream.id))
            with anyio.fail_after(10):
                chunk = await stream.receive()
                seen.append("data")
            assert chunk == (b"after the notice", 0)
            assert seen == ["control NOTICE", "control done", "data"]
            assert handler_done.is_set()
            with anyio.fail_after(10):
                assert await stream.receive() is None
            # Reading resumed after the handler: a PING is still answered.
            await far.send(p.encode(p.FrameType.PING, 0, b"12345678"))
            with anyio.fail_after(10):
                while True:
                    message = await far.receive()
                    assert isinstance(message, bytes)
                    if any(f.type == p.FrameType.PONG and f.payload == b"12345678" for f in p.decode_message(message)):
                        break
            await session.close()
            tg.cancel_scope.cancel()


def _peek(sock: socket.socket) -> bytes:
    """What the kernel holds for ``sock`` to read, left there (never blocks)."""
    try:
        return sock.recv(1024 * 1024, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def _frames_in(data: bytes) -> list[p.Frame]:
    """The session frames in ``data``, whole WebSocket messages from a server end (unmasked)."""
    reader = wsframe.FrameReader(True, 4 * 1024 * 1024)
    reader.feed(data)
    frames: list[p.Frame] = []
    while (message := reader.next()) is not None:
        assert isinstance(message, bytes), message
        frames.extend(p.decode_message(message))
    return frames


@contextlib.asynccontextmanager
async def attached_session() -> AsyncIterator[tuple[Session, WebSocket, Stream]]:
    """A Session over a real WebSocket pair, running attached, with one stream open: the session,
    the peer's end of the link and the stream. Leaving stops the session's run."""
    async with ws_pair() as (near, far), anyio.create_task_group() as tg:
        session = Session(near)
        tg.start_soon(session.run)
        await wait_until(lambda: session.attached, 10)
        yield session, far, session.open_stream()
        tg.cancel_scope.cancel()


async def test_frames_queued_in_one_turn_reach_the_peer_before_the_turn_ends() -> None:
    """Under load one loop turn queues frames for dozens of requests: the peer must get the first
    ones while this side is still at work, not only when the turn ends (the two processes then
    took turns instead of working in parallel). Fewer than FLUSH_AT_FRAMES still wait for the
    turn's end: a write per frame costs far more CPU."""
    async with attached_session() as (session, far, stream):
        # A second descriptor of the peer's socket: asyncio's wrapper of it does not read.
        raw = far._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock = socket.socket(raw.family, raw.type, fileno=os.dup(raw.fileno()))
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()

        def one_turn() -> None:
            # One loop callback, never returning to the loop in between, as a busy turn is.
            for number in range(FLUSH_AT_FRAMES - 1):
                session.send_nowait(p.encode_data(stream.id, b"frame %d" % number))
            before = _peek(sock)
            session.send_nowait(p.encode_data(stream.id, b"frame %d" % (FLUSH_AT_FRAMES - 1)))
            seen.set_result((before, _peek(sock)))

        with sock:
            assert _peek(sock) == b""
            loop.call_soon(one_turn)
            with anyio.fail_after(10):
                before, during = await seen
        assert before == b"", "frames were written one by one, not batched within the turn"
        assert [frame.payload for frame in _frames_in(during)] == \
            [b"frame %d" % number for number in range(FLUSH_AT_FRAMES)], \
            "the peer could read nothing before the turn that queued the frames ended"
        # What a turn queues below the threshold still goes at the turn's end.
        session.send_nowait(p.encode(p.FrameType.END, stream.id))
        with anyio.fail_after(10):
            while True:
                frames = await next_frames(far)
                if frames[-1].type == p.FrameType.END:
                    break
        await session.close()


async def test_whole_answers_count_as_their_frames_and_are_never_split() -> None:
    """``Stream.send_answer_nowait`` queues an answer's RESPONSE, DATA and END as one piece: a flush
    never puts its head in one message and the rest in the next (with a piece per frame, the 16th
    frame of a busy turn, always a RESPONSE, was written alone at once), and its three frames count
    toward FLUSH_AT_FRAMES as before, so a busy turn still writes as soon."""
    answers = -(-FLUSH_AT_FRAMES // 3)  # the first whose frames reach FLUSH_AT_FRAMES
    async with attached_session() as (session, far, first):
        streams = [first] + [session.open_stream() for _ in range(answers)]
        raw = far._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock = socket.socket(raw.family, raw.type, fileno=os.dup(raw.fileno()))
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()

        def one_turn() -> None:
            for stream in streams[:answers - 1]:
                assert stream.send_answer_nowait(200, [(b"x-n", b"%d" % stream.id)], b"body %d" % stream.id)
            before = _peek(sock)
            assert streams[answers - 1].send_answer_nowait(200, [], b"")
            seen.set_result((before, _peek(sock)))

        with sock:
            loop.call_soon(one_turn)
            with anyio.fail_after(10):
                before, during = await seen
        assert before == b"", "fewer frames than FLUSH_AT_FRAMES were written before the turn's end"
        frames = _frames_in(during)
        expected = []
        for stream in streams[:answers - 1]:
            expected += [(p.FrameType.RESPONSE, stream.id), (p.FrameType.DATA, stream.id), (p.FrameType.END, stream.id)]
        expected += [(p.FrameType.RESPONSE, streams[answers - 1].id), (p.FrameType.END, streams[answers - 1].id)]
        assert [(frame.type, frame.stream) for frame in frames] == expected
        assert frames[1].payload == b"body %d" % first.id
        # An answer too large to copy behind its head, or a second one, is refused and queues nothing.
        last = streams[answers]
        assert not last.send_answer_nowait(200, [], bytes(last.credit + 1))
        assert not first.send_answer_nowait(200, [], b"again")
        assert session.queued == 0
        await session.close()


async def test_flush_and_close_delivers_everything_queued_before_the_close() -> None:
    async with attached_session() as (session, far, stream), anyio.create_task_group() as tg:
        chunk = p.encode_data(stream.id, bytes(p.MAX_DATA_FRAME))
        count = 3 * 1024 * 1024 // len(chunk)  # more than the transport and kernel buffers hold
        for _ in range(count):
            session.send_nowait(chunk)
        session.send_nowait(p.encode(p.FrameType.END, stream.id))
        tg.start_soon(session.flush_and_close, 1000, "done", 30.0)
        received, ended = 0, False
        with anyio.fail_after(30):
            while isinstance(message := await far.receive(), bytes):
                for frame in p.decode_message(message):
                    if frame.type == p.FrameType.DATA:
                        received += len(frame.payload)
                    elif frame.type == p.FrameType.END:
                        ended = True
        assert received == count * p.MAX_DATA_FRAME
        assert ended
        assert isinstance(message, Closed) and message.code == 1000 and message.reason == "done"


async def test_a_framing_error_on_an_attached_link_closes_it_with_1002() -> None:
    async with ws_pair() as (near, far):
        session = Session(near)
        result: dict[str, str] = {}

        async def run() -> None:
            result["reason"] = await session.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(lambda: session.attached, 10)
            stream = session.open_stream()
            # A frame with a reserved bit set (no extension was negotiated), masked as a client's.
            frame = bytearray(wsframe.encode_binary(p.encode(p.FrameType.END, stream.id), True))
            frame[0] |= 0x40
            await far._stream.send(bytes(frame))
            with anyio.fail_after(10):
                closed, _ = await receive_until_closed(far)
                await session.wait_closed()
        assert closed.code == 1002
        assert "1002" in result["reason"] and "reserved bits" in result["reason"], result
        assert session.streams == {}


def _response(stream_id: int, status: Any = 200) -> bytes:
    return p.encode(p.FrameType.RESPONSE, stream_id, {"s": status, "h": [[b"content-length", b"2"]], "sp": None})


#: Messages whose last frame is bad, after a whole small response on the stream (``{id}``): what the
#: session's own walk over a message must refuse exactly as ``decode_message`` does.
_BAD_TAILS = {
    "END with a payload": lambda sid: p.HEADER.pack(1, p.FrameType.END, 0, sid) + b"x",
    "DATA past MAX_DATA_FRAME": lambda sid: p.HEADER.pack(p.MAX_DATA_FRAME + 1, p.FrameType.DATA, 0, sid)
    + b"x" * (p.MAX_DATA_FRAME + 1),
    "DATA on stream 0": lambda sid: p.encode_data(0, b"x"),
    "RESPONSE on stream 0": lambda sid: p.HEADER.pack(1, p.FrameType.RESPONSE, 0, 0) + b"\x80",
    "END on stream 0": lambda sid: p.HEADER.pack(0, p.FrameType.END, 0, 0),
    "a truncated header": lambda sid: p.HEADER.pack(0, p.FrameType.END, 0, sid)[:7],
    "a truncated frame": lambda sid: p.HEADER.pack(5, p.FrameType.DATA, 0, sid) + b"xy",
    "a payload past MAX_FRAME_PAYLOAD": lambda sid: p.HEADER.pack(p.MAX_FRAME_PAYLOAD + 1, p.FrameType.DATA, 0, sid),
    "an unknown type": lambda sid: p.HEADER.pack(0, 99, 0, sid),
    "RESPONSE not msgpack": lambda sid: p.HEADER.pack(1, p.FrameType.RESPONSE, 0, sid) + b"\xc1",
    "RESPONSE not a map": lambda sid: p.HEADER.pack(1, p.FrameType.RESPONSE, 0, sid) + b"\x01",
    "WINDOW of 0": lambda sid: p.encode(p.FrameType.WINDOW, sid, b"\0\0\0\0"),
}


def _expected_error(message: bytes) -> str:
    """What decode_message, then the RESPONSE head's parsing, refuse in ``message`` (the old reader's path)."""
    try:
        for frame in p.decode_message(message):
            if frame.type == p.FrameType.RESPONSE:
                p.ResponseHead.from_payload(frame.payload)
    except p.ProtocolError as exc:
        return f"protocol error: {exc}"
    raise AssertionError("the message is valid")


@pytest.mark.parametrize("bad", list(_BAD_TAILS))
async def test_a_message_is_handled_frame_by_frame_and_refused_as_decode_message_refuses_it(bad: str) -> None:
    """The session walks a message's frames itself (a stream's DATA, END and RESPONSE handed over in
    line, no Frame made): the frames before a bad one reach their stream, in one event, and the bad
    one ends the session with decode_message's own reason."""
    async with ws_pair() as (near, far):
        session = Session(near)
        result: dict[str, str] = {}

        async def run() -> None:
            result["reason"] = await session.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(lambda: session.attached, 10)
            stream = session.open_stream()
            events: list[tuple[bool, bool, bool]] = []
            stream.on_event = lambda: events.append((stream.head is not None, stream.buffered, stream.remote_ended))
            message = (_response(stream.id) + p.encode_data(stream.id, b"ok") + p.encode(p.FrameType.END, stream.id)
                       + _BAD_TAILS[bad](stream.id))
            await far.send(message)
            with anyio.fail_after(10):
                closed, _ = await receive_until_closed(far)
                await session.wait_closed()
        assert events[0] == (True, True, True), events  # head, body and end: one event
        assert stream.head is not None and stream.receive_nowait(100) == b"ok"
        assert closed.code == 1002
        assert result["reason"] == _expected_error(message)


async def test_a_malformed_response_head_for_an_open_stream_is_a_protocol_error() -> None:
    async with attached_session() as (session, far, stream):
        await far.send(_response(stream.id, status=42))
        with anyio.fail_after(10):
            await session.wait_closed()
        assert session.closed is not None and "malformed RESPONSE head" in session.closed, session.closed


async def test_frames_for_unknown_streams_are_dropped_and_the_message_goes_on() -> None:
    """A stream the session no longer holds (reset, finished) gets nothing; the frames after it do."""
    async with attached_session() as (session, far, stream):
        gone = 99
        await far.send(_response(gone) + p.encode_data(gone, b"no") + p.encode(p.FrameType.END, gone)
                       + _response(stream.id) + p.encode_data(stream.id, b"ok") + p.encode(p.FrameType.END, stream.id))
        with anyio.fail_after(10):
            assert await stream.receive() == (b"ok", 0)
            assert await stream.receive() is None
        assert session.closed is None and stream.head is not None
