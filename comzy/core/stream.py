"""One stream inside a session: a request/response exchange or a proxied WebSocket.

A stream buffers at most its window of DATA from the peer and sends only as much as the
peer's credit allows; the session's reader feeds it through the ``_on_*`` methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from comzy.core import protocol as p

if TYPE_CHECKING:
    from comzy.core.session import Session

log = logging.getLogger("comzy.session")


_END = int(p.FrameType.END)

#: How far a stream's receive window may grow while its reader keeps waiting for data.
MAX_GROWN_WINDOW = 2 * 1024 * 1024
#: Empty WebSocket messages a stream buffers at most: they use no credit, so without a bound a
#: peer could queue them without end while the reader is slow.
MAX_EMPTY_MESSAGES = 1024


class StreamReset(Exception):
    """The stream was aborted by the peer or because the session ended."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"stream reset ({code}): {message}")
        self.code = code
        self.message = message


class Stream:
    """One request/response exchange (or one proxied WebSocket) inside a session."""

    def __init__(self, session: Session, stream_id: int, window: int, credit: int | None = None) -> None:
        self.session = session
        self.id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._buffered = 0
        # What a waiter awaits: a bare loop future, made when someone waits (most streams of a
        # small exchange never wait on some of them), and resolved by _wake. Not an anyio.Event:
        # its wait and set cost several times a future's, on every proxied request (profiled).
        self._readable: asyncio.Future[None] | None = None
        #: Whether the peer's END (or WS_CLOSE) has arrived (buffered DATA may remain). Set by the
        #: reader only; an attribute, not a property: read once per response by the edge's plain path.
        self.remote_ended = False
        self._reset: StreamReset | None = None
        self._unacked = 0
        self._window = window
        # Window growth: taken from the session's budget while the reader outpaces the sender.
        self._starved = False
        self.grown = 0
        self._empty = 0  # empty messages buffered (see MAX_EMPTY_MESSAGES)
        # What the peer lets us send before its first WINDOW: its announced window, unless the
        # opener knows better (an edge: the agent's, across a cluster link).
        self._credit = session.peer_window if credit is None else credit
        self._credit_event: asyncio.Future[None] | None = None
        self._local_ended = False
        self.head: object | None = None  # RESPONSE head (server side), set by the reader
        self._head_event: asyncio.Future[None] | None = None
        self._head_late = False
        self.ws_close: tuple[int, str] | None = None
        #: Whether the stream carries a visitor's WebSocket (set by the edge; for metrics).
        self.websocket = False
        #: Called (no arguments) after the reader's state update for a RESPONSE head, DATA, END,
        #: credit or a reset (the peer's, the session's end, or this side's own ``reset``): a
        #: consumer without a task reads what changed with the ``*_nowait`` methods below. What one
        #: link message brings is told once, after the whole message (a small response's head, DATA
        #: and END: one call, see ``Session.events_due``). It runs inside the session reader, so it
        #: must not await anything; should it raise, the error is logged and this stream reset
        #: (INTERNAL), the reader and the other streams untouched.
        self.on_event: Callable[[], None] | None = None
        self._event_due = False  # in the session's events_due

    # -- reading ---------------------------------------------------------------
    async def receive(self) -> tuple[bytes, int] | None:
        """The next DATA payload and its flags, or None after the peer's END."""
        while not self._chunks:
            # END (or WS_CLOSE) first: a RESET that follows a complete read takes nothing away
            # (the edge resets a WebSocket stream right after passing on the visitor's close).
            if self.remote_ended:
                return None
            if self._reset is not None:
                raise self._reset
            self._starved = True
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        return self._take()

    def receive_nowait(self, limit: int) -> bytes | None:
        """Non-blocking ``receive_coalesced`` for body bytes: the DATA already buffered, joined up
        to ``limit`` bytes (at least one chunk); None when nothing is buffered (then see
        ``remote_ended`` and ``reset_error``). Flags are not returned: for HTTP bodies, not
        WebSocket messages. A reader that found nothing counts as starved (window growth), as an
        awaiting ``receive`` does."""
        if not self._chunks:
            self._starved = True
            return None
        data = self._take()[0]
        if not self._chunks or len(data) + len(self._chunks[0][0]) > limit:
            return data
        parts = [data]
        size = len(data)
        while self._chunks and size + len(self._chunks[0][0]) <= limit:
            more = self._take()[0]
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def _take(self) -> tuple[bytes, int]:
        """Pop the first buffered chunk and account for it (window re-opening and growth)."""
        data, flags = self._chunks.popleft()
        if not data:
            self._empty -= 1
        self._buffered -= len(data)
        self._unacked += len(data)
        # Re-open the window once half of it is consumed: the sender keeps the pipe full
        # without one WINDOW frame per DATA frame.
        # Nothing more for a reset stream (its buffered data is still handed out): it has left
        # the session's table, so credit, and growth, would never be given back.
        if self._unacked >= self._window // 2 and not self.remote_ended and self._reset is None:
            increment = self._unacked
            if self._starved and self._window < MAX_GROWN_WINDOW:
                increment += self._grow()
            self._starved = False
            self.session.send_nowait(p.encode_window(self.id, increment))
            self._unacked = 0
        return data, flags

    @property
    def reset_error(self) -> StreamReset | None:
        """Why the stream was reset (by the peer, the session's end, or this side); None if not."""
        return self._reset

    @property
    def buffered(self) -> bool:
        """Whether DATA is buffered, waiting to be read."""
        return bool(self._chunks)

    @property
    def credit(self) -> int:
        """Bytes the peer lets this side send now."""
        return self._credit

    def _grow(self) -> int:
        """Double the window (within MAX_GROWN_WINDOW and the session's budget); the growth.

        Called when the reader had to wait for data during the last half window: the pipe ran
        dry, so a bigger window lets the sender keep more in flight (a 1 GiB download went from
        211 to 414 MiB/s on a 2-core machine, docs/benchmarks.md). A reader that falls behind never
        waits, so never grows: slow visitors keep the small window, and the session's budget
        bounds what fast streams that later stall can hold.
        """
        growth = min(self._window, MAX_GROWN_WINDOW - self._window, self.session.window_budget)
        if growth <= 0:
            return 0
        self.session.window_budget -= growth
        self._window += growth
        self.grown += growth
        return growth

    async def receive_coalesced(self, limit: int) -> tuple[bytes, int] | None:
        """Like ``receive`` but joins DATA already buffered (same flags) up to ``limit``
        bytes: one write downstream instead of several small ones."""
        first = await self.receive()
        if first is None or not self._chunks:
            return first
        data, flags = first
        parts = [data]
        size = len(data)
        while self._chunks and size + len(self._chunks[0][0]) <= limit and self._chunks[0][1] == flags:
            more = await self.receive()
            assert more is not None  # a chunk is buffered, so receive returns it at once
            parts.append(more[0])
            size += len(more[0])
        return b"".join(parts), flags

    async def receive_message(self) -> bytes | str | None:
        """The next whole WebSocket message (DATA frames up to FIN; TEXT decoded), or None
        once the peer closed (see ``ws_close``)."""
        parts: list[bytes] = []
        while True:
            chunk = await self.receive()
            if chunk is None:
                return None
            data, flags = chunk
            parts.append(data)
            if flags & p.FLAG_FIN:
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                return payload.decode("utf-8", "replace") if flags & p.FLAG_TEXT else payload

    async def wait_head(self, timeout: float | None = None) -> object | None:
        """Wait for the peer's RESPONSE head; None if ``timeout`` seconds pass first.

        The timeout is a plain loop timer, not a cancel scope: this runs once per proxied
        request, and entering and leaving a scope cost more than the rest of this method.
        """
        if self.head is not None:
            return self.head
        timer = None
        if timeout is not None:
            # Runs on asyncio (both comzy processes do); call_later is a heap push, cancel O(1).
            timer = asyncio.get_running_loop().call_later(timeout, self._head_timed_out)
        try:
            while self.head is None:
                if self._reset is not None:
                    raise self._reset
                if self._head_late:
                    return None
                if self._head_event is None or self._head_event.done():
                    self._head_event = asyncio.get_running_loop().create_future()
                await self._head_event
        finally:
            if timer is not None:
                timer.cancel()
        return self.head

    def _head_timed_out(self) -> None:
        self._head_late = True
        _wake(self._head_event)

    # -- writing ---------------------------------------------------------------
    async def send_data(self, data: bytes, flags: int = 0) -> None:
        """Send body bytes, split into frames and paced by the peer's credit.

        ``flags`` (FIN/TEXT, for WebSocket messages) go on the last frame only.
        """
        view = memoryview(data)
        # Large frames may keep a view of bytes, or of a buffer its owner passed on read-only
        # (p.DataFrame: the agent's direct body reads), instead of a copy.
        immutable = type(data) is bytes or (type(data) is memoryview and data.readonly)
        total = len(view)
        offset = 0
        while True:
            if self._reset is not None:
                raise self._reset
            if self._credit <= 0:
                self._credit_event = asyncio.get_running_loop().create_future()
                await self._credit_event
                continue
            size = min(total - offset, self._credit, p.MAX_DATA_FRAME)
            last = offset + size == total
            chunk = view[offset : offset + size]
            self._credit -= size
            offset += size
            await self.session.send(p.data_frame(self.id, chunk, flags if last else flags & p.FLAG_TEXT, immutable))
            if last:
                return

    def send_data_nowait(self, data: bytes) -> bool:
        """``send_data`` without waiting, for a sender without a task: all of ``data`` is queued
        at once if ``credit`` covers it (True), else none of it (False). Unlike ``send_data`` it
        does not wait for the session's queue to drain: the caller checks ``session.queued``."""
        size = len(data)
        if self._reset is not None or size > self._credit:
            return False
        self._credit -= size
        immutable = type(data) is bytes  # as in send_data: large frames may keep a view of it
        if size <= p.MAX_DATA_FRAME:
            self.session.send_nowait(p.data_frame(self.id, data, 0, immutable))
        else:
            view = memoryview(data)
            for offset in range(0, size, p.MAX_DATA_FRAME):
                self.session.send_nowait(p.data_frame(self.id, view[offset : offset + p.MAX_DATA_FRAME], 0, immutable))
        return True

    def send_answer_nowait(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A whole small answer from a sender without a task (the agent's): RESPONSE, ``body`` and
        END queued as one piece (``Session.send_frames_nowait``), so they reach the peer in one
        message, and a head never waits alone for a flush that takes its body later. True when
        done; False, queueing nothing, when ``body`` is not small (PIECES_FROM or more: it would be
        copied) or the credit does not cover it, the stream was reset or has already ended."""
        size = len(body)
        if size >= p.PIECES_FROM or size > self._credit or self._reset is not None or self._local_ended:
            return False
        self._credit -= size
        self._local_ended = True
        self.session.send_frames_nowait(p.encode_answer(self.id, status, headers, body), 3 if size else 2)
        return True

    def send_end(self) -> None:
        """Half-close: no more DATA from this side."""
        if not self._local_ended and self._reset is None:
            self._local_ended = True
            self.session.send_nowait(p.HEADER.pack(0, _END, 0, self.id))  # encode(END): no Enum read, no call

    def send_request_ended(self, frame: bytes) -> None:
        """Queue ``frame``, this stream's REQUEST with its END behind it
        (``protocol.encode_bodyless_request``): the half-close ``send_end`` would send after it,
        in the same piece of the session's queue (counted as two frames, ``Session.send_frames_nowait``)."""
        self._local_ended = True
        self.session.send_frames_nowait(frame, 2)

    def reset(self, code: p.ResetCode, message: str = "") -> None:
        """Abort the stream and tell the peer (if it is not already gone)."""
        if self._reset is None:
            self._fail(StreamReset(code, message))
            self.session.send_nowait(p.encode_reset(self.id, code, message))
        self.session.forget(self.id)

    def close(self) -> None:
        """Release the stream: a clean finish if both sides ended, otherwise a RESET."""
        if self._reset is None and not (self._local_ended and self.remote_ended):
            self.reset(p.ResetCode.CANCEL, "closed")
        self.session.forget(self.id)

    @property
    def drained_and_ended(self) -> bool:
        """True when the peer's END has arrived and every DATA before it was read."""
        return self.remote_ended and not self._chunks and self._reset is None

    @property
    def finished(self) -> bool:
        """True once the peer has ended or reset the stream."""
        return self.remote_ended or self._reset is not None

    # -- called by the session reader -------------------------------------------
    def _on_data(self, data: bytes, flags: int) -> None:
        if self.remote_ended:
            raise p.ProtocolError(f"DATA after END on stream {self.id}")
        if not data:
            if not flags & p.FLAG_FIN:
                return  # an empty piece of a body or message carries nothing
            self._empty += 1
            if self._empty > MAX_EMPTY_MESSAGES:
                # Only this stream: its peer may be relaying a flood it did not make.
                self.reset(p.ResetCode.FLOW_CONTROL, f"more than {MAX_EMPTY_MESSAGES} empty messages waiting")
                return
        self._buffered += len(data)
        if self._buffered > self._window:
            raise p.ProtocolError(f"peer overran the window of stream {self.id}")
        self._chunks.append((data, flags))
        # _wake and _notify in line here and below: the reader calls these for every frame, and a
        # small response's head, DATA and END made six calls of them per request.
        waiter = self._readable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_event is not None:
            due = self.session.events_due
            if due is None:
                self._event()
            elif not self._event_due:
                self._event_due = True
                due.append(self)

    def _on_end(self) -> None:
        self.remote_ended = True
        waiter = self._readable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_event is not None:
            due = self.session.events_due
            if due is None:
                self._event()
            elif not self._event_due:
                self._event_due = True
                due.append(self)

    def _on_credit(self, increment: int) -> None:
        self._credit += increment
        _wake(self._credit_event)
        if self.on_event is not None:
            self._notify()

    def _on_head(self, head: object) -> None:
        self.head = head
        waiter = self._head_event
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_event is not None:
            due = self.session.events_due
            if due is None:
                self._event()
            elif not self._event_due:
                self._event_due = True
                due.append(self)

    def _fail(self, error: StreamReset) -> None:
        if self._reset is None:
            self._reset = error
        _wake(self._readable)
        _wake(self._credit_event)
        _wake(self._head_event)
        if self.on_event is not None:
            self._notify()

    def _notify(self) -> None:
        """Call ``on_event``, or while the session's reader handles a link message, once it has
        (``Session.events_due``)."""
        due = self.session.events_due
        if due is None:
            self._event()
        elif not self._event_due:
            self._event_due = True
            due.append(self)

    def _event(self) -> None:
        """Call ``on_event`` now. Its failure (a bug) ends this stream only: raised into the session's
        reader it would end the session, and with it every other stream of the tunnel."""
        self._event_due = False
        if self.on_event is None:
            return  # unset since the event was due
        try:
            self.on_event()
        except Exception:
            log.exception("%s: stream %d: its event handler failed; resetting the stream", self.session.name, self.id)
            self.on_event = None  # the reset below must not call it again
            self.reset(p.ResetCode.INTERNAL, "internal error")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Resolve a waiter's future, unless there is none or it is done (set, or its waiter cancelled)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
