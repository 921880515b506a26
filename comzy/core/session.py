"""Multiplexed streams with credit flow control over one WebSocket.

Both ends use this module: the server opens a stream per visitor request, the agent
answers on it. The reader task never waits on a stream consumer, so a slow stream can
never stall the others: each stream buffers at most its window, which the sender must
respect (a sender that overruns it is a protocol error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc

from comzy.core import protocol as p
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import Closed, WebSocket, WebSocketError

log = logging.getLogger("comzy.session")

_unpack_header = p.HEADER.unpack_from
_DATA, _END, _RESPONSE = int(p.FrameType.DATA), int(p.FrameType.END), int(p.FrameType.RESPONSE)
# The frame types as globals: reading a member off the Enum class goes through EnumType.__getattr__
# on CPython 3.11 (about 1k instructions a read, _handle made up to ten per frame).
(_T_DATA, _T_WINDOW, _T_END, _T_RESET, _T_RESPONSE, _T_WS_CLOSE, _T_REQUEST, _T_PING, _T_PONG, _T_GOAWAY) = (
    p.FrameType.DATA, p.FrameType.WINDOW, p.FrameType.END, p.FrameType.RESET, p.FrameType.RESPONSE,
    p.FrameType.WS_CLOSE, p.FrameType.REQUEST, p.FrameType.PING, p.FrameType.PONG, p.FrameType.GOAWAY)

#: Frames queued for the writer beyond which senders of DATA wait.
WRITE_HIGH_WATER = 1024 * 1024
#: The most a session queues for its peer, control frames included. DATA alone never passes
#: WRITE_HIGH_WATER by more than a frame, so only a peer that stops reading fills the rest:
#: past it, new streams are refused (the edge answers 503) and the reader stops reading from
#: the peer (TCP backpressure) until the writer catches up.
SEND_BUDGET = 4 * 1024 * 1024
#: Largest WebSocket message the writer builds by coalescing queued frames.
COALESCE_LIMIT = 512 * 1024
#: Frames queued in one loop turn after which an attached link writes at once instead of at the
#: turn's end: under load a turn handles dozens of requests, and holding every frame until the
#: last one leaves the peer idle meanwhile (the two processes then take turns instead of working
#: in parallel: +20-35% req/s at 50 connections with this, bench.cpu, 2026-12-07).
FLUSH_AT_FRAMES = 16


class SessionClosed(Exception):
    """The session is gone; no new streams."""


ControlHandler = Callable[[p.Frame], Awaitable[None]]


class Heartbeats:
    """Heartbeats for many sessions from one task, instead of a sleeping task per session.

    Every ``tick`` seconds it PINGs each session whose interval has passed and ends each one
    whose peer has been silent past its timeout. The server keeps one for all its tunnels, so
    an idle tunnel costs no task or timer of its own; a session given none runs its own.
    """

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._sessions: set[Session] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        """Start heartbeating ``session`` (its run() does this)."""
        self._sessions.add(session)

    def discard(self, session: Session) -> None:
        """Stop heartbeating ``session``."""
        self._sessions.discard(session)

    async def run(self) -> None:
        """Sweep every ``tick`` seconds, forever (run it in a task group that outlives the sessions)."""
        while True:
            await anyio.sleep(self.tick)
            now = time.monotonic()
            for session in list(self._sessions):
                try:
                    session._beat(now)
                except Exception:  # one session's bug must not stop the heartbeats of all the others
                    log.exception("%s: heartbeat failed", session.name)


class Session:
    """The multiplexer on one side of an agent WebSocket."""

    def __init__(
        self,
        ws: WebSocket,
        *,
        window: int = p.DEFAULT_WINDOW,
        peer_window: int = p.DEFAULT_WINDOW,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 30.0,
        name: str = "session",
        heartbeats: Heartbeats | None = None,
        coalesce_limit: int = COALESCE_LIMIT,
    ) -> None:
        self.ws = ws
        # Writes a message given as pieces (``WebSocket.write_pieces``), where the link can: large
        # DATA frames then go out without being joined (see protocol.DataFrame).
        self._write_pieces: Callable[[list[bytes | memoryview], int], None] | None = getattr(ws, "write_pieces", None)
        #: Largest message the writer builds from queued frames (a cluster link's is bounded by
        #: NATS's max_payload).
        self.coalesce_limit = coalesce_limit
        self.window = window
        self.peer_window = peer_window
        #: Window growth left for fast streams (see Stream._grow); returned when they end.
        self.window_budget = p.SESSION_WINDOW_BUDGET
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.name = name
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._out: list[p.Queued] = []
        self._out_bytes = 0
        self._out_event = anyio.Event()
        # Events nobody may ever wait on are made on first wait: thousands of idle tunnels
        # should not each hold several (an event and its waiter queue are ~800 bytes).
        self._drained: anyio.Event | None = None
        self._last_seen = time.monotonic()
        self._next_ping = self._last_seen + heartbeat_interval
        self.closed: str | None = None
        self._idle: anyio.Event | None = None
        self._closed_event: anyio.Event | None = None
        self.on_request: Callable[[Stream, p.RequestHead], None] | None = None
        #: While a link message is handled from the loop's read callback: the streams whose
        #: ``on_event`` is due once it is, each once (None otherwise: called at once). A small
        #: response's RESPONSE, DATA and END come in one message: its consumer is called once, with
        #: all three there, instead of once per frame.
        self.events_due: list[Stream] | None = None
        self.on_control: ControlHandler | None = None
        #: Takes over REQUEST frames when set (a control node relays a link's streams to agents):
        #: returns what goes into the stream table, or None when it answered the stream itself
        #: (a RESET). Without it, REQUESTs open a Stream and go to ``on_request``.
        self.accept_stream: Callable[[int, dict[str, Any]], Stream | None] | None = None
        #: Sees each message from the peer before it is decoded, when set (a control node's relay
        #: forwards its streams' frames from their bytes): handles the message's leading frames
        #: that it can and returns the rest, which the session decodes and handles as usual.
        self.take_frames: Callable[[bytes], bytes] | None = None
        self._heartbeats = heartbeats
        self._task_group: anyio.abc.TaskGroup | None = None
        self._timed_out: str | None = None
        # The PONG owed to the peer's latest PING: one at most, however many PINGs arrive
        # before the writer runs (a peer that pings and never reads must not grow the queue).
        self._pong: bytes | None = None
        # Our PINGs not yet answered, as (payload, sent at), and since when the oldest waits: a
        # PONG proves the peer reads what we send, where any message only proves it writes (a
        # peer that floods and never reads). The payloads are random, so a PONG sent blindly
        # cannot fake the proof; every PING the timeout spans is kept, so a late answer counts.
        self._pings: deque[tuple[bytes, float]] = deque(
            maxlen=min(64, int(heartbeat_timeout / heartbeat_interval) + 2))
        self._unanswered_since: float | None = None
        #: Seconds between our latest answered PING and its PONG (None before the first): the
        #: agent's status screen shows it as the latency to the server.
        self.round_trip: float | None = None
        # Our next PING, sent ahead of whatever is queued: its round trip must measure the peer,
        # not how much we had queued for it.
        self._ping: bytes | None = None
        #: True while the reader waits for the writer (the peer is not reading what we send).
        self.reading_paused = False
        # Attached mode (see _attach): no reader or writer task. Frames are dispatched from the
        # loop's read callback and written by a flush scheduled once per loop turn; _ended is
        # done (with the exception that ends run) when the link goes; _write_paused is the
        # transport's pause_writing; _backlog holds frames behind one an async handler awaits.
        self._attached = False
        self._flush_pending = False
        # Frames queued beyond one per piece of ``_out`` (send_frames_nowait), until the next flush.
        self._out_extra = 0
        self._write_paused = False
        self._ended: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by _attach; used only once attached
        self._backlog: deque[p.Frame] | None = None
        self._backlog_task: asyncio.Task[None] | None = None

    # -- streams ---------------------------------------------------------------
    def open_stream(self, window: int | None = None, credit: int | None = None) -> Stream:
        """A new locally-opened stream (the server side opens them). ``window`` (what we let the
        peer send) and ``credit`` (what the peer lets us send) default to the session's; an edge
        uses the windows of the agent at the far end of a cluster link."""
        if self.closed is not None:
            raise SessionClosed(self.closed)
        stream_id = self._next_id
        self._next_id += 1
        stream = Stream(self, stream_id, self.window if window is None else window, credit)
        self.streams[stream_id] = stream
        return stream

    def next_stream_id(self) -> int:
        """Take a new locally-opened stream id without making a Stream: a control node's relay
        installs its own end in ``streams`` under it."""
        stream_id = self._next_id
        self._next_id += 1
        return stream_id

    def forget(self, stream_id: int) -> None:
        """Drop a finished stream from the table (and return its window growth to the budget)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.grown:
            self.window_budget += stream.grown
            stream.grown = 0
        if not self.streams and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no stream is open (or the session ended)."""
        while self.streams and self.closed is None:
            self._idle = anyio.Event()
            await self._idle.wait()

    # -- writing ---------------------------------------------------------------
    def send_nowait(self, frame: p.Queued) -> None:
        """Queue a frame for the writer (control frames; never blocks)."""
        if self.closed is not None:
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._attached:
            if len(self._out) + self._out_extra >= FLUSH_AT_FRAMES:
                self._flush()
            elif not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)
        else:
            self._out_event.set()

    def send_frames_nowait(self, frames: bytes, count: int) -> None:
        """``send_nowait`` for ``count`` frames encoded back to back (``Stream.send_answer_nowait``):
        queued as one piece, so no flush comes between them (the peer gets the whole answer in one
        message), and counted as ``count`` frames toward FLUSH_AT_FRAMES, as apart."""
        if self.closed is not None:
            return
        self._out_extra += count - 1  # before send_nowait's count (only an attached session reads it)
        self.send_nowait(frames)

    def _wake_writer(self) -> None:
        """Have the writer (or, attached, a flush) look at the queue and the PING/PONG owed."""
        if not self._attached:
            self._out_event.set()
        elif not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    @property
    def queued(self) -> int:
        """Bytes queued for the peer and not yet handed to the socket."""
        return self._out_bytes

    @property
    def attached(self) -> bool:
        """Whether run() drives the link from the loop's callbacks (no reader or writer task; see
        ``WebSocket.attach``, ``LinkTransport.attach``): a plain TCP link on asyncio, or a cluster link
        over plain TCP to NATS. TLS links keep the tasks."""
        return self._attached

    @property
    def congested(self) -> bool:
        """True while the queue for the peer is past ``SEND_BUDGET``: the peer is not reading,
        so new streams must be refused rather than queued."""
        return self._out_bytes > SEND_BUDGET

    async def send(self, frame: p.Queued) -> None:
        """Queue a frame, waiting while the writer is far behind (bounds memory)."""
        if self.closed is not None:
            raise SessionClosed(self.closed)
        while self._out_bytes > WRITE_HIGH_WATER:
            # Many streams may wait here at once: share the pending event, never replace it
            # under another waiter (that waiter would never be woken).
            if self._drained is None or self._drained.is_set():
                self._drained = anyio.Event()
            await self._drained.wait()
            if self.closed is not None:
                raise SessionClosed(self.closed)
        self.send_nowait(frame)

    async def _writer(self) -> None:
        while True:
            if not self._out and self._pong is None and self._ping is None:
                self._out_event = anyio.Event()
                await self._out_event.wait()
                continue
            if self._ping is not None:
                self._out.insert(0, p.encode(p.FrameType.PING, 0, self._ping))
                self._out_bytes += p.HEADER_SIZE + len(self._ping)
                self._ping = None
            if self._pong is not None:
                # The owed PONG goes first: it answers a PING that arrived before what is queued.
                self._out.insert(0, p.encode(p.FrameType.PONG, 0, self._pong))
                self._out_bytes += p.HEADER_SIZE + len(self._pong)
                self._pong = None
            # Coalesce queued frames into one WebSocket message: fewer syscalls and
            # masking passes for many small frames.
            take, size = 0, 0
            for frame in self._out:
                if take and size + len(frame) > self.coalesce_limit:
                    break
                take += 1
                size += len(frame)
            batch = self._out[:take]
            del self._out[:take]
            self._out_bytes -= size
            if self._drained is not None:
                self._drained.set()
            message = batch[0] if take == 1 and type(batch[0]) is bytes else p.join_frames(batch)
            await self.ws.send(message)

    def _flush(self) -> None:
        """Attached mode's writer: coalesce the queue into messages for the transport, until it
        is empty or the transport's buffer passes its high-water mark (then _link_writable
        calls again). Runs once per loop turn in which frames were queued: a loop callback, not
        a task wakeup per frame."""
        self._flush_pending = False
        out, ws = self._out, self.ws
        if self._write_paused or ws.closed is not None:
            return
        if self._ping is not None:
            out.insert(0, p.encode(p.FrameType.PING, 0, self._ping))
            self._out_bytes += p.HEADER_SIZE + len(self._ping)
            self._ping = None
        if self._pong is not None:
            out.insert(0, p.encode(p.FrameType.PONG, 0, self._pong))
            self._out_bytes += p.HEADER_SIZE + len(self._pong)
            self._pong = None
        limit = self.coalesce_limit
        write_pieces = self._write_pieces
        while out and not self._write_paused:
            if len(out) == 1 and type(out[0]) is bytes:
                message = out.pop()
                self._out_bytes -= len(message)
                ws.write_message(message)  # may call _link_writable(False) at once
                continue
            take, size, whole = 0, 0, True
            for frame in out:
                if take and size + len(frame) > limit:
                    break
                take += 1
                size += len(frame)
                if type(frame) is not bytes:
                    whole = False
            batch = out[:take]
            del out[:take]
            self._out_bytes -= size
            if whole:
                ws.write_message(batch[0] if take == 1 else b"".join(batch))  # type: ignore[arg-type]
            elif write_pieces is not None:
                # Large DATA frames: header and payload go to the socket unjoined, in one writev.
                write_pieces(p.frame_pieces(batch), size)
            else:
                ws.write_message(p.join_frames(batch))
        if not out:
            self._out_extra = 0
        if self._drained is not None:
            self._drained.set()
        if self.reading_paused and self._out_bytes <= SEND_BUDGET and self._backlog is None:
            self.reading_paused = False
            ws.resume_reading()

    # -- attached mode: called by the WebSocket from the loop's callbacks ----------------------
    def _attach(self) -> bool:
        """Take the link over from the loop's callbacks if the WebSocket can (see
        ``WebSocket.attach`` and, for a cluster link, ``LinkTransport.attach``)."""
        attach = getattr(self.ws, "attach", None)
        if attach is None:
            return False
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self._attached = True
        if not attach(self):
            self._attached, self._ended = False, None
            return False
        if self._out or self._ping is not None or self._pong is not None:
            self._wake_writer()
        return True

    def _link_message(self, message: bytes | str) -> None:
        """One message from the peer, dispatched now (from the loop's read callback)."""
        ended = self._ended
        if ended is None or ended.done():
            return
        try:
            if isinstance(message, str):
                raise p.ProtocolError("text message on the agent link")
            self._last_seen = time.monotonic()
            backlog = self._backlog
            if backlog is not None:
                backlog.extend(p.decode_message(message))  # bounded: reading is paused meanwhile
                return
            due: list[Stream] = []
            self.events_due = due
            try:
                waiting = self._dispatch_message(message)
                if waiting is not None:
                    # An async handler (on_control): it and every frame after it wait in order
                    # for a task, and reading pauses until the task has caught up.
                    frame, rest = waiting
                    self._backlog = deque((frame,))
                    if rest:
                        self._backlog.extend(p.decode_message(rest))
                    self.ws.pause_reading()
                    self._backlog_task = self._loop.create_task(self._drain_backlog())
                    return
            finally:
                self.events_due = None
                for stream in due:
                    stream._event()
            if self._out_bytes > SEND_BUDGET and not self.reading_paused:
                # See _wait_writer_caught_up: the flush resumes reading once the queue drains.
                self.reading_paused = True
                self.ws.pause_reading()
        except Exception as exc:
            self._end_with(exc)

    def _dispatch_message(self, message: bytes) -> tuple[p.Frame, bytes | memoryview] | None:
        """Decode and handle the frames of one message (those ``take_frames`` leaves, if set), in
        order, as ``_frames`` and ``_handle`` would (the same checks, the same errors, each frame
        handled before the next is decoded), with a stream's DATA, END and RESPONSE handed to it in
        line: no Frame, generator step or ``_handle`` call for each (a small response's three frames
        cost about 10k instructions of the server's request that way, callgrind). Returns the frame
        for ``on_control`` and the message's bytes after it when an async handler must take over
        (see ``_link_message``)."""
        if self.take_frames is not None and message:
            message = self.take_frames(message)
            if not message:
                return None
        source: Any = message if type(message) is bytes else memoryview(message)
        end = len(message)
        if end == 0:
            raise p.ProtocolError("empty message")
        streams = self.streams
        offset = 0
        while offset < end:
            if end - offset < p.HEADER_SIZE:
                raise p.ProtocolError(f"truncated frame header ({end - offset} bytes)")
            length, code, flags, stream_id = _unpack_header(source, offset)
            offset += p.HEADER_SIZE
            if length > p.MAX_FRAME_PAYLOAD:
                raise p.ProtocolError(f"frame payload of {length} bytes exceeds {p.MAX_FRAME_PAYLOAD}")
            if end - offset < length:
                raise p.ProtocolError(f"truncated frame: {length} bytes announced, {end - offset} left")
            body = source[offset : offset + length]
            if type(body) is not bytes:
                body = bytes(body)
            offset += length
            if stream_id:  # a stream's frame (on stream 0, decode_frame refuses these types)
                if code == _DATA:
                    if length > p.MAX_DATA_FRAME:
                        raise p.ProtocolError(f"DATA frame of {length} bytes exceeds {p.MAX_DATA_FRAME}")
                    stream = streams.get(stream_id)
                    if stream is not None:
                        stream._on_data(body, flags)
                    continue
                if code == _END and not length:  # END with a payload: decode_frame's error
                    stream = streams.get(stream_id)
                    if stream is not None:
                        stream._on_end()
                    continue
                if code == _RESPONSE:
                    payload = p.decode_map(_T_RESPONSE, body)
                    stream = streams.get(stream_id)
                    if stream is not None:
                        stream._on_head(p.ResponseHead.from_payload(payload))
                    continue
            frame = p.decode_frame(code, flags, stream_id, body)
            if self._handle(frame):
                return frame, source[offset:]
        return None

    def _frames(self, message: bytes) -> Iterator[p.Frame]:
        """The frames of ``message`` to decode and handle: those ``take_frames`` (if set) left."""
        if self.take_frames is not None and message:
            message = self.take_frames(message)
            if not message:
                return iter(())
        return p.decode_message(message)

    async def _drain_backlog(self) -> None:
        try:
            backlog = self._backlog
            while backlog:
                frame = backlog.popleft()
                if self._handle(frame):
                    assert self.on_control is not None
                    await self.on_control(frame)
            self._backlog = None
            if self._out_bytes > SEND_BUDGET:
                self.reading_paused = True
            else:
                self.ws.resume_reading()
        except Exception as exc:
            self._end_with(exc)

    def _end_with(self, error: BaseException) -> None:
        """End run() with ``error`` (attached mode), reading nothing more."""
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(error)
            self.ws.pause_reading()

    def _link_lost(self, closed: Closed) -> None:
        self._end_with(SessionClosed(f"connection closed ({closed.code} {closed.reason})".strip()))

    def _link_writable(self, writable: bool) -> None:
        self._write_paused = not writable
        if writable and (self._out or self._ping is not None or self._pong is not None):
            self._wake_writer()

    # -- reading ---------------------------------------------------------------
    async def _reader(self) -> None:
        while True:
            message = await self.ws.receive()
            if isinstance(message, Closed):
                raise SessionClosed(f"connection closed ({message.code} {message.reason})".strip())
            if isinstance(message, str):
                raise p.ProtocolError("text message on the agent link")
            self._last_seen = time.monotonic()
            for frame in self._frames(message):
                await self._dispatch(frame)
            if self._out_bytes > SEND_BUDGET:
                await self._wait_writer_caught_up()

    async def _wait_writer_caught_up(self) -> None:
        """Stop reading from the peer until the queue for it is back under ``SEND_BUDGET``.

        What the peer sends next then waits in the kernel's buffers and, once they are full,
        on the peer's side (TCP backpressure): a peer that does not read cannot make this side
        hold more. A peer that stays like this answers no PING, and _beat ends the session.
        """
        self.reading_paused = True
        try:
            while self._out_bytes > SEND_BUDGET and self.closed is None:
                if self._drained is None or self._drained.is_set():
                    self._drained = anyio.Event()
                await self._drained.wait()
        finally:
            self.reading_paused = False

    async def _dispatch(self, frame: p.Frame) -> None:
        if self._handle(frame):
            assert self.on_control is not None
            await self.on_control(frame)

    def _handle(self, frame: p.Frame) -> bool:
        """Act on one frame from the peer; True when it is for ``on_control`` (async: the
        caller awaits it, in order)."""
        kind = frame.type
        if kind == _T_DATA:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._on_data(frame.payload, frame.flags)
        elif kind == _T_WINDOW:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._on_credit(frame.payload)
        elif kind == _T_END:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._on_end()
        elif kind == _T_RESET:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                self.forget(frame.stream)
                code, message = frame.payload
                stream._fail(StreamReset(code, message))
        elif kind == _T_RESPONSE:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._on_head(p.ResponseHead.from_payload(frame.payload))
        elif kind == _T_WS_CLOSE:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                code, reason = frame.payload.get("code", 1000), frame.payload.get("reason", "")
                if type(code) is not int or not 1000 <= code <= 4999 or not isinstance(reason, str):
                    raise p.ProtocolError(f"malformed WS_CLOSE payload on stream {frame.stream}")
                stream.ws_close = (code, reason)
                stream._on_end()
        elif kind == _T_REQUEST:
            if frame.stream in self.streams:
                raise p.ProtocolError(f"REQUEST reuses open stream {frame.stream}")
            if self.accept_stream is not None:
                accepted = self.accept_stream(frame.stream, frame.payload)
                if accepted is not None:
                    self.streams[frame.stream] = accepted
                return False
            if self.on_request is None:
                raise p.ProtocolError("unexpected REQUEST frame")
            head = p.RequestHead.from_payload(frame.payload)
            stream = Stream(self, frame.stream, self.window)
            self.streams[frame.stream] = stream
            self.on_request(stream, head)
        elif kind == _T_PING:
            # Coalesced: answering the latest PING is enough for the peer's liveness check.
            if self.closed is None:
                self._pong = frame.payload
                self._wake_writer()
        elif kind == _T_PONG:
            self._on_pong(frame.payload)
        elif self.on_control is not None:
            return True
        elif kind == _T_GOAWAY:
            pass  # a peer going away needs no answer; its connection ends the session
        else:
            raise p.ProtocolError(f"unexpected {kind.name} frame")
        return False

    # -- heartbeats (driven by a Heartbeats sweeper) -----------------------------
    def _beat(self, now: float) -> None:
        """End the session if the peer has been silent, or has not answered a PING (so does not
        read what we send), for longer than the timeout; else PING it when due."""
        silent = now - self._last_seen
        deaf = 0.0 if self._unanswered_since is None else now - self._unanswered_since
        if silent > self.heartbeat_timeout or deaf > self.heartbeat_timeout:
            if self._timed_out is None and self._task_group is not None:
                self._timed_out = (f"peer silent for {silent:.1f} s (heartbeat timeout)"
                                   if silent > self.heartbeat_timeout else
                                   f"peer not reading: no PONG for {deaf:.1f} s, {self._out_bytes} bytes "
                                   "queued for it (heartbeat timeout)")
                self._task_group.cancel_scope.cancel()
        elif now >= self._next_ping:
            self._next_ping = now + self.heartbeat_interval
            self.ping(now)

    def ping(self, now: float | None = None) -> None:
        """Send a PING ahead of anything queued; its PONG proves the peer reads and sets ``round_trip``.

        The heartbeat calls it every interval; the agent also calls it once on connecting, so its
        latency is known at once rather than an interval later (a peer answers any PING).
        """
        now = time.monotonic() if now is None else now
        payload = os.urandom(p.MAX_PING_PAYLOAD)
        self._pings.append((payload, now))
        if self._unanswered_since is None:
            self._unanswered_since = now
        if self.closed is None:
            self._ping = payload
            self._wake_writer()

    def _on_pong(self, payload: bytes) -> None:
        """The peer answered one of our PINGs: it, and every one before it, is settled."""
        for index, (sent, at) in enumerate(self._pings):
            if sent == payload:
                self.round_trip = time.monotonic() - at
                for _ in range(index + 1):
                    self._pings.popleft()
                # The deaf-peer clock now runs from the oldest PING still unanswered.
                self._unanswered_since = self._pings[0][1] if self._pings else None
                return

    async def run(self) -> str:
        """Serve the session until it ends; returns why it ended. Never raises."""
        reason = "closed"
        heartbeats = self._heartbeats
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                attached = self._attach()
                if not attached:
                    tg.start_soon(self._writer)
                if heartbeats is None:  # a lone session (the agent's) beats in a task of its own
                    heartbeats = Heartbeats(self.heartbeat_interval / 10)
                    tg.start_soon(heartbeats.run)
                heartbeats.add(self)
                if attached:
                    assert self._ended is not None
                    await self._ended  # raises what ended the link
                else:
                    await self._reader()
            # The reader only ever ends by raising: the task group was cancelled by _beat.
            reason = self._timed_out or reason
        except* SessionClosed as group:
            reason = str(group.exceptions[0])
        except* p.ProtocolError as group:
            reason = f"protocol error: {group.exceptions[0]}"
            log.warning("%s: %s; closing the session", self.name, reason)
            await self.ws.close(1002, "protocol error")
        except* WebSocketError as group:
            reason = str(group.exceptions[0])
        except* Exception as group:
            # A bug met by one session must end that session only, never the server's task group.
            reason = f"internal error: {group.exceptions[0]!r}"
            log.error("%s: %s; closing the session", self.name, reason, exc_info=group.exceptions[0])
            await self.ws.close(1011, "internal error")
        finally:
            if heartbeats is not None:
                heartbeats.discard(self)
            self._task_group = None
            if self._ended is not None:
                if not self._ended.done():
                    self._ended.cancel()
                elif not self._ended.cancelled():
                    self._ended.exception()  # retrieved: asyncio would log it as never retrieved
            if self._backlog_task is not None:
                self._backlog_task.cancel()
            self._shutdown(reason)
            await self.ws.aclose()
        # If close() was called first, its reason (not the resulting socket close) is the real one.
        return self.closed or reason

    def _shutdown(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        error = StreamReset(p.ResetCode.INTERNAL, f"tunnel session ended: {reason}")
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        for event in (self._idle, self._drained, self._closed_event):
            if event is not None:
                event.set()

    async def close(self, code: int = 1000, reason: str = "closing") -> None:
        """Close the WebSocket; run() then returns."""
        self._shutdown(reason)
        await self.ws.close(code, reason)

    async def flush_and_close(self, code: int = 1000, reason: str = "closing", grace: float = 2.0) -> None:
        """Give the writer a moment to send queued frames, then close."""
        with anyio.move_on_after(grace):
            while self._out and self.closed is None:
                if self._drained is None or self._drained.is_set():
                    self._drained = anyio.Event()
                await self._drained.wait()
        await self.close(code, reason)

    async def wait_closed(self) -> None:
        """Wait until the session has ended."""
        if self.closed is None:
            if self._closed_event is None:
                self._closed_event = anyio.Event()
            await self._closed_event.wait()
