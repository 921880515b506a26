"""nats-py's client with a shorter path for the cluster's link messages (``LinkClient``).

Kept apart from connection.py (the node's connection, subjects and lease): this is where
Comzy reaches into nats-py's private parts (its pending queue, its socket's reader and writer),
each place saying why and what happens should a release change it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport

log = logging.getLogger("comzy.cluster")

#: Bytes nats-py buffers for sending before a publish waits for its flusher: the link's backpressure.
PENDING_SIZE = 2 * 1024 * 1024
#: A handler ``LinkClient.direct`` calls with each message's subject and payload, as the socket is read.
DirectHandler = Callable[[bytes, bytes], None]
_CRLF = b"\r\n"
#: The longest control line (MSG, INFO...) the framer waits for, as nats-server's own default limit.
MAX_CONTROL_LINE = 4096


def pub_prefix(subject: str, reply: str) -> bytes:
    """The start of a PUB command's line for ``subject`` with ``reply`` (the size follows)."""
    return b"PUB %s %s " % (subject.encode(), reply.encode())


class LinkClient(Client):
    """nats-py's client with a shorter path for link messages, the cluster's per-request traffic.

    nats-py hands every message to a subscription's queue, read by a task of its own, and every
    publish to its flusher task: two task hand-offs (two event-loop iterations) per message on each
    node, on top of the link session's own. Here, a subscription marked with ``direct`` has its
    messages handled by a plain function as they arrive, and ``publish_now`` writes to the socket in
    the caller's call when nothing is queued before it (docs/benchmarks.md, "Fewer hand-offs on the
    link"). A publish that cannot be written at once (a reconnect under way, a transport other than
    TCP, bytes still queued in nats-py) takes nats-py's own path, in order.

    Over TCP the socket's bytes are framed as the loop reads them (``_Framer``): a message for a
    direct subscription goes to its handler in that call, without waking nats-py's read loop task
    or its parser; everything else reaches that task as before, whole and in order
    (docs/benchmarks.md, "Link messages framed as they arrive").

    ``flush`` also means what it says here: its PING leaves after every command made before it
    (``_send_ping``), so a subscription flushed exists on the server when ``flush`` returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}
        self._framer: _Framer | None = None
        # The socket's StreamWriter and its transport, read once per connection rather than
        # through the writer's property twice per link message (write_now, unsent).
        self._writer: asyncio.StreamWriter | None = None
        self._socket: Any = None  # asyncio.WriteTransport, once a writer has been seen

    async def _process_connect_init(self) -> None:
        await super()._process_connect_init()
        # Connected (again): nats-py's read loop task was just created and has not read anything yet.
        transport = self._transport
        self._framer = None
        # nats-py's private reader: should a release rename it, links take nats-py's own path (slower,
        # still correct) and tests/cluster/test_link_framer.py fails to say so.
        reader = getattr(transport, "_io_reader", None) if type(transport) is TcpTransport else None
        if isinstance(reader, asyncio.StreamReader) and isinstance(getattr(reader, "_buffer", None), bytearray):
            self._framer = _Framer(self, reader)

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        # nats-py (2.16) writes the PING of flush() straight to the socket, ahead of commands still
        # queued for its flusher task, such as the SUB of a subscribe() just made: the PONG then
        # came before the server read the SUB, and another connection's publishes in between were
        # not delivered (a lost first link message; tests/cluster/test_nats_flush.py). Writing the
        # queue first keeps the protocol's order: the flusher's own writes were all made before it
        # emptied the queue, so nothing is overtaken.
        if self._pending and self.is_connected and self._transport is not None:
            self._transport.writelines(self._pending[:])
            self._pending = []
            self._pending_data_size = 0
        await super()._send_ping(future)

    def direct(self, subscription: Subscription, handler: DirectHandler) -> None:
        """Handle every message of ``subscription`` with ``handler(subject, payload)`` as it is
        parsed, in order, instead of its callback (headers are dropped: links send none). The
        handler must not block; the subscription's pending limits no longer apply, so it bounds
        what it keeps itself."""
        self._direct[subscription._id] = handler

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        handler = self._direct.get(sid)
        if handler is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            handler(subject, data)
        except Exception:  # as nats-py does with a callback's error: logged, the connection goes on
            log.exception("cluster: a link message handler failed")

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    def write_now(self, subject: str, reply: str, head: bytes, body: bytes) -> bool:
        """Write a PUB of ``head + body`` on ``subject`` (with ``reply``) to the socket now, when
        that keeps order and limits: connected over plain TCP, nothing queued in nats-py before it,
        within max_payload. False (and nothing written) otherwise. Subjects are not validated
        (ours are built from checked names)."""
        return self.write_pub(pub_prefix(subject, reply), head, body)

    def write_pub(self, prefix: bytes, head: bytes, body: bytes) -> bool:
        """``write_now`` with its subjects given as ``pub_prefix(subject, reply)``: a link makes it
        once, not once per message."""
        transport = self._transport
        if type(transport) is not TcpTransport or self._status != Client.CONNECTED or self._pending:
            return False
        writer = transport._io_writer
        if writer is None:
            return False
        socket = self._socket if writer is self._writer else self._socket_of(writer)
        size = len(head) + len(body)
        if size > self._max_payload or socket.is_closing():
            return False
        # Nothing is pending, so every earlier write is in the transport already: order holds.
        # (StreamWriter.writelines is this call.)
        socket.writelines((b"%s%d\r\n%s" % (prefix, size, head), body, _CRLF))
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += size
        return True

    def _socket_of(self, writer: asyncio.StreamWriter) -> Any:
        self._writer = writer
        self._socket = writer.transport
        return self._socket

    def unsent(self) -> int:
        """Bytes the socket has not taken yet of what was written to it (0 over another transport)."""
        transport = self._transport
        if type(transport) is not TcpTransport:
            return 0
        writer = transport._io_writer
        if writer is None:
            return 0
        socket = self._socket if writer is self._writer else self._socket_of(writer)
        return socket.get_write_buffer_size()

    async def drain_unsent(self) -> None:
        """Wait until ``unsent()`` is back under PENDING_SIZE; raises ConnectionClosedError if the
        connection broke meanwhile (nats-py's read loop reconnects)."""
        while self.unsent() > PENDING_SIZE:
            transport = self._transport
            assert type(transport) is TcpTransport and transport._io_writer is not None
            try:
                await transport._io_writer.drain()
            except (OSError, RuntimeError) as exc:
                raise nats.errors.ConnectionClosedError() from exc

    async def publish_now(self, subject: str, reply: str, head: bytes, body: bytes) -> None:
        """Publish ``head + body``: ``write_now``, else nats-py's ``publish`` (its buffer while
        reconnecting, its backpressure and errors). Past PENDING_SIZE bytes the kernel has not
        taken yet, it waits for the socket to drain: the link's backpressure."""
        if not self.write_now(subject, reply, head, body):
            await self.publish(subject, head + body, reply=reply)
            return
        writer = self._transport._io_writer
        if writer.transport.get_write_buffer_size() > PENDING_SIZE:
            try:
                await writer.drain()
            except (OSError, RuntimeError) as exc:  # the connection broke: nats-py's read loop reconnects
                raise nats.errors.ConnectionClosedError() from exc


class _Framer:
    """Splits the bytes nats-server sends a ``LinkClient`` into protocol units as the loop reads them.

    It takes the place of ``feed_data`` on nats-py's ``StreamReader`` (the socket protocol's
    ``data_received`` calls it): a MSG or HMSG for a direct subscription goes to its handler there
    and then; every other unit (PING, PONG, INFO, +OK, -ERR, other subscriptions' messages) goes to
    the reader whole and in order, and nats-py's read loop task parses it as before. nats-py's
    parser thus only ever sees whole units, its state between them is its own; a direct message
    whose bytes arrive over several reads is kept here until it is whole (nats-server bounds it by
    max_payload). Saved per link message: the wakeup of the read loop task (one loop turn) and
    nats-py's regex parser with its copies of the payload.
    """

    __slots__ = ("client", "forward", "forwarding", "have", "line", "parts", "unit")

    def __init__(self, client: LinkClient, reader: asyncio.StreamReader) -> None:
        self.client = client
        self.forward: Callable[[bytes], None] = reader.feed_data
        #: The start of a control line still incomplete.
        self.line = b""
        #: Bytes still to come of a unit for nats-py (passed on as they arrive).
        self.forwarding = 0
        #: A direct message still incomplete: (handler, subject, header bytes, bytes in all with
        #: the closing CRLF), and its bytes so far.
        self.unit: tuple[DirectHandler, bytes, int, int] | None = None
        self.parts: list[bytes] = []
        self.have = 0
        pending: bytearray = reader._buffer  # type: ignore[attr-defined]  # StreamReader's own
        buffered = bytes(pending)  # anything read before nats-py's read loop started
        pending.clear()
        reader.feed_data = self.feed  # type: ignore[method-assign,assignment]
        if buffered:
            self.feed(buffered)

    def feed(self, data: bytes) -> None:
        """What the socket read (called by the reader's protocol, in the loop's read callback)."""
        if self.client._framer is not self:  # a reconnect replaced it; this reader's socket is gone
            self.forward(data)
            return
        # The framing and its guard in one function: it runs once per read on every node.
        try:
            pos, size = 0, len(data)
            if self.forwarding:
                pos = min(self.forwarding, size)
                self.forward(data if pos == size else data[:pos])
                self.forwarding -= pos
            elif self.unit is not None:
                handler, subject, header, total = self.unit
                need = total - self.have
                if size < need:
                    self.parts.append(data)
                    self.have += size
                    return
                self.parts.append(data if need == size else data[:need])
                body = b"".join(self.parts)
                self.unit, self.parts, self.have = None, [], 0
                self._hand(handler, subject, body[header:-2])
                pos = need
            if self.line:
                data = self.line + data[pos:]
                pos, size = 0, len(data)
                self.line = b""
            direct, subs = self.client._direct, self.client._subs
            while pos < size:
                eol = data.find(_CRLF, pos, pos + MAX_CONTROL_LINE)
                if eol < 0:
                    if size - pos >= MAX_CONTROL_LINE:  # not NATS's protocol: nats-py's parser says so
                        self.client._framer = None
                        self.forward(data[pos:])
                    else:
                        self.line = data[pos:]
                    return
                if data.startswith(b"MSG ", pos):
                    args = data[pos + 4:eol].split()
                    header = 0
                    if len(args) not in (3, 4):
                        self._give_up(data, pos)
                        return
                elif data.startswith(b"HMSG ", pos):
                    args = data[pos + 5:eol].split()
                    if len(args) not in (4, 5) or not args[-2].isdigit():
                        self._give_up(data, pos)
                        return
                    header = int(args[-2])
                else:  # PING, PONG, +OK, -ERR, INFO: nats-py's
                    self.forward(data[pos:eol + 2])
                    pos = eol + 2
                    continue
                if not (args[1].isdigit() and args[-1].isdigit()):
                    self._give_up(data, pos)
                    return
                sid, total = int(args[1]), int(args[-1]) + 2  # the payload and its CRLF
                start = eol + 2
                end = start + total
                target = direct.get(sid) if sid in subs else None
                if target is None:
                    if end <= size:
                        self.forward(data[pos:end])
                        pos = end
                        continue
                    self.forward(data[pos:])
                    self.forwarding = end - size
                    return
                if end <= size:
                    # _hand's, in line: the usual case (a link message whole in one read)
                    payload = data[start + header:end - 2]
                    stats = self.client.stats
                    stats["in_msgs"] += 1
                    stats["in_bytes"] += len(payload)
                    try:
                        target(args[0], payload)
                    except Exception:  # as nats-py does with a callback's error: logged, the connection goes on
                        log.exception("cluster: a link message handler failed")
                    pos = end
                    continue
                self.unit = (target, args[0], header, total)
                self.parts = [data[start:]]
                self.have = size - start
                return
        except Exception as exc:  # a bug here must not end in a stream out of step: reconnect
            log.exception("cluster: framing NATS's messages failed; reconnecting")
            self.client._framer = None
            asyncio.get_running_loop().create_task(self.client._process_op_err(exc))

    def _give_up(self, data: bytes, pos: int) -> None:
        """A control line that is not what NATS sends: nats-py takes everything from here (its
        parser raises, and it reconnects)."""
        self.client._framer = None
        self.forward(data[pos:])

    def _hand(self, handler: DirectHandler, subject: bytes, payload: bytes) -> None:
        stats = self.client.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(payload)
        try:
            handler(subject, payload)
        except Exception:  # as nats-py does with a callback's error: logged, the connection goes on
            log.exception("cluster: a link message handler failed")
