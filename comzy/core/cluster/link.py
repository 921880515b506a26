"""Links: a plain comzy ``Session`` between two nodes, carried by NATS instead of a WebSocket.

Each link message is published on ``P.n.<dst>.l.<src>`` with the reply subject
``P.n.<src>.nr.<dst>.<epoch>`` and carries a 16-byte link header, then whole comzy frames::

    magic "CZ" (2) | version u8 = 1 | kind u8 (0 FRAMES, 1 BYE) | epoch u32 | seq u64

The opener (an edge) picks a random epoch for every link it opens; the acceptor (a control node)
starts a link when sequence 0 of an epoch it does not know arrives. A sequence gap, a BYE, the 503
nats-server sends when the peer has no subscription left (it died), a heartbeat timeout or the loss
of NATS each end the link, and the Session fails its streams with the reason
(docs/design/cluster.md 1.3, docs/protocol.md "Cluster links").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import nats.errors
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport

from comzy.core import protocol as p
from comzy.core.cluster.connection import PENDING_SIZE, BusDown, NatsNode
from comzy.core.cluster.nats_client import pub_prefix
from comzy.core.logs import RateLimitedLog
from comzy.core.session import COALESCE_LIMIT, Heartbeats, Session
from comzy.core.websocket import WebSocketError

if TYPE_CHECKING:
    from comzy.core.websocket import Closed

log = logging.getLogger("comzy.cluster")

LINK_HEADER = struct.Struct(">2sBBIQ")
LINK_MAGIC = b"CZ"
LINK_VERSION = 1
#: Bytes a link inbox may hold. Credit bounds what a correct peer sends (each stream's window),
#: so past this the peer ignores flow control and the link ends.
INBOX_LIMIT = 64 * 1024 * 1024
#: Window growth a link session may hand out over all its streams: one link carries the streams
#: of many tunnels, so it gets more than an agent session's 16 MiB.
LINK_WINDOW_BUDGET = 64 * 1024 * 1024
#: nats-py's limits on what the link subscription's queue holds before it drops messages (slow
#: consumer). LinkClient.direct hands link messages over without that queue, so they bound only
#: what a client without the direct path would queue; the inboxes bound the rest.
PENDING_MSGS_LIMIT = 100_000
PENDING_BYTES_LIMIT = 64 * 1024 * 1024
#: Stray epochs remembered, so each gets one BYE, not one per message.
STRAY_MEMORY = 1024
#: Longest BYE reason sent.
MAX_BYE_REASON = 200


class LinkKind(enum.IntEnum):
    """What a link message carries."""

    FRAMES = 0  #: comzy frames (docs/protocol.md)
    BYE = 1  #: the sender ended the link; the body is the reason (UTF-8)


_LINK_HEADER_SIZE = LINK_HEADER.size
_UNPACK_LINK_HEADER = LINK_HEADER.unpack_from
_PACK_LINK_HEADER = LINK_HEADER.pack
_FRAMES = int(LinkKind.FRAMES)


def encode_header(kind: LinkKind, epoch: int, seq: int) -> bytes:
    """A link header."""
    return LINK_HEADER.pack(LINK_MAGIC, LINK_VERSION, kind, epoch, seq)


def decode_header(payload: bytes) -> tuple[LinkKind, int, int] | None:
    """``(kind, epoch, seq)`` of a link message, or None if it is not one of ours."""
    if len(payload) < LINK_HEADER.size:
        return None
    magic, version, kind, epoch, seq = LINK_HEADER.unpack_from(payload)
    if magic != LINK_MAGIC or version != LINK_VERSION or kind not in (LinkKind.FRAMES, LinkKind.BYE):
        return None
    return LinkKind(kind), epoch, seq


class LinkTransport:
    """What a link ``Session`` uses as its ``ws``.

    Attached (``attach``, the usual way): each link message goes straight from the NATS socket's
    read callback (``LinkClient``'s framer) to the session (``_link_message``) and
    ``write_message`` writes to the NATS socket in the caller's call, with no reader or writer
    task (docs/benchmarks.md, "The cluster link attached").
    Otherwise ``send`` and ``receive`` serve the session's tasks; ``receive`` never returns
    ``Closed``: once the link has failed it raises WebSocketError with the reason, so the session
    and its streams end with that reason as it is (attached, the session ends with that error too).
    """

    def __init__(self, links: Links, peer: str, epoch: int, inbox_limit: int = INBOX_LIMIT) -> None:
        self.links = links
        self.peer = peer
        self.epoch = epoch
        subjects = links.nats.subjects
        me = links.nats.node_id
        self.subject = subjects.link(peer, me)
        self.reply = subjects.no_responders(me, peer, epoch)
        self._pub = pub_prefix(self.subject, self.reply)
        self.inbox_limit = inbox_limit
        self._send_seq = 0
        self._recv_seq = 0
        # Messages the session has not taken yet: before it attaches, while it pauses reading
        # (the NATS socket is every link's, so a link cannot stop reading it: it buffers here,
        # bounded by inbox_limit), and, unattached, until its reader task runs.
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        # A plain asyncio event, cleared and reused: links run on asyncio only (nats-py), and an
        # anyio.Event made per wait costs a backend lookup each time, on every message.
        self._event = asyncio.Event()
        #: Why the link ended (None while it works).
        self.reason: str | None = None
        # Attached mode: the session, whether it paused reading, whether it has been told the
        # link ended, whether it was told to stop writing; messages nats-py must take in order
        # (write_now declined) and the task that hands them over; the task waiting for the
        # socket to drain past PENDING_SIZE.
        self._sink: Session | None = None
        self._paused = False
        self._told = False
        #: Why the link ended, once the attached session has been told (None until then: it may
        #: still be reading the messages that came before a BYE). An attribute: the session reads
        #: it at every flush.
        self.closed: str | None = None
        self._blocked = False
        self._unsent: deque[tuple[bytes, bytes]] = deque()
        self._unsent_bytes = 0
        self._publisher: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None

    # -- the Session's side, attached ------------------------------------------------------------
    def attach(self, sink: Session) -> bool:
        """Hand every link message to ``sink._link_message`` as the NATS socket is read, and take
        ``write_message`` calls, from now on. What arrived before goes first, in order. False
        (nothing changes: the session keeps its tasks) over a NATS transport other than plain
        TCP, where no write can be made at once."""
        if type(self.links.nats.nc._transport) is not TcpTransport:
            return False
        self._sink = sink
        self._pump()
        return True

    @property
    def attached(self) -> bool:
        """Whether a session took the link with ``attach``."""
        return self._sink is not None

    def write_message(self, message: bytes) -> None:
        """Publish ``message`` (whole frames) as the next link message, without waiting (attached).

        Written to the socket now when nothing waits before it; else queued behind nats-py's
        own buffer, in order. Past PENDING_SIZE unsent bytes the session hears
        ``_link_writable(False)``, and ``True`` once they have drained: the link's backpressure."""
        if self.reason is not None:
            return  # the session is ending with the reason; nothing more reaches the peer
        header = _PACK_LINK_HEADER(LINK_MAGIC, LINK_VERSION, _FRAMES, self.epoch, self._send_seq)
        self._send_seq += 1
        nc = self.links.nats.nc
        if self._publisher is None and nc.write_pub(self._pub, header, message):
            if self._drainer is None and nc.unsent() > PENDING_SIZE:
                self._block()
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            return
        self._unsent.append((header, message))
        self._unsent_bytes += len(message)
        if self._unsent_bytes > PENDING_SIZE:
            self._block()
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_unsent())

    def pause_reading(self) -> None:
        """Hand the session no message until ``resume_reading``; what arrives meanwhile waits in
        the inbox (at most inbox_limit bytes: past it the link ends)."""
        self._paused = True

    def resume_reading(self) -> None:
        """Hand messages over again; those in the inbox first, from the next loop turn."""
        if self._paused:
            self._paused = False
            if self._inbox or self.reason is not None:
                asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Hand the inbox to the session while it reads; once the link has ended and nothing
        from before the end is left, end the session with the reason."""
        sink = self._sink
        if sink is None:
            return
        inbox = self._inbox
        while inbox and not self._paused:
            body = inbox.popleft()
            self._inbox_bytes -= len(body)
            sink._link_message(body)
        if self.reason is not None and not inbox and not self._told:
            self._told = True
            self.closed = self.reason
            sink._end_with(WebSocketError(self.reason))

    def _block(self) -> None:
        if not self._blocked:
            self._blocked = True
            if self._sink is not None:
                self._sink._link_writable(False)

    def _unblock(self) -> None:
        if self._blocked and self._publisher is None and self._drainer is None and self.reason is None:
            self._blocked = False
            if self._sink is not None:
                self._sink._link_writable(True)

    async def _drain(self) -> None:
        """Wait until the NATS socket has taken what write_now left in its buffer."""
        try:
            await self.links.nats.nc.drain_unsent()
        except Exception as exc:  # the connection broke (nats-py reconnects), or worse: the link cannot send
            self.fail(f"cannot send to node {self.peer}: {exc or type(exc).__name__}", tell_peer=False)
        finally:
            self._drainer = None
        self._unblock()

    async def _publish_unsent(self) -> None:
        """Hand the queued messages to nats-py in order (its buffer while reconnecting, its errors)."""
        nc = self.links.nats.nc
        try:
            while self._unsent and self.reason is None:
                # Taken off before the await: nats-py holds it (or wrote it) by the time anything
                # else runs, and what write_message adds meanwhile waits behind it (_publisher is set).
                header, message = self._unsent.popleft()
                self._unsent_bytes -= len(message)
                await nc.publish_now(self.subject, self.reply, header, message)
        except Exception as exc:  # nats-py's errors, or the socket's: either way the link cannot send
            self.fail(f"cannot send to node {self.peer}: {exc or type(exc).__name__}", tell_peer=False)
        finally:
            self._publisher = None
        self._unblock()

    # -- the Session's side, with its tasks ---------------------------------------------------
    async def send(self, message: bytes) -> None:
        """Publish ``message`` (whole frames) as the next link message."""
        if self.reason is not None:
            raise WebSocketError(self.reason)
        header = _PACK_LINK_HEADER(LINK_MAGIC, LINK_VERSION, _FRAMES, self.epoch, self._send_seq)
        self._send_seq += 1
        try:
            # Written now (no hand-off to nats-py's flusher); it waits past PENDING_SIZE unsent
            # bytes: the link's backpressure.
            await self.links.nats.nc.publish_now(self.subject, self.reply, header, message)
        except nats.errors.Error as exc:
            self.fail(f"cannot send to node {self.peer}: {exc}", tell_peer=False)
            raise WebSocketError(self.reason or str(exc)) from None

    async def receive(self) -> bytes | str | Closed:
        """The next link message's frames; raises WebSocketError once the link has ended."""
        while not self._inbox:
            if self.reason is not None:
                raise WebSocketError(self.reason)
            self._event.clear()
            await self._event.wait()
        body = self._inbox.popleft()
        self._inbox_bytes -= len(body)
        return body

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the link and tell the peer (a BYE with the reason)."""
        self.fail(reason or f"closed ({code})", tell_peer=True)

    async def aclose(self) -> None:
        """The session has finished: nothing to release (Links ends the link with the session's
        reason, which this call does not know)."""

    # -- the node's side ----------------------------------------------------------------------
    def deliver(self, seq: int, body: bytes) -> None:
        """A FRAMES message of this link's epoch arrived (from the subscription callback: no await)."""
        if self.reason is not None:
            return
        if seq != self._recv_seq:
            if seq > self._recv_seq:
                self.fail(f"lost {seq - self._recv_seq} link messages from node {self.peer} "
                          "(slow consumer or NATS reconnect)", tell_peer=True)
            else:
                self.fail(f"link message {seq} from node {self.peer} arrived twice or out of order "
                          f"(expected {self._recv_seq})", tell_peer=True)
            return
        self._recv_seq += 1
        sink = self._sink
        if sink is not None and not self._paused and not self._inbox:
            sink._link_message(body)  # attached and reading: no queue, no task wakeup
            return
        if self._inbox_bytes + len(body) > self.inbox_limit:
            self.fail(f"node {self.peer} ignored flow control: more than {self.inbox_limit} bytes waiting "
                      "on the link", tell_peer=True)
            return
        self._inbox.append(body)
        self._inbox_bytes += len(body)
        if sink is None:
            self._event.set()

    def fail(self, reason: str, *, tell_peer: bool, keep_queued: bool = False) -> None:
        """End the link with ``reason`` (the first reason wins); a BYE tells the peer if asked.

        With ``keep_queued`` (the peer said BYE) the session still reads the messages that arrived
        before the end, in order, as it reads a WebSocket's last messages before its close; any
        other end drops them (after a gap or an overflow they cannot be trusted to be whole)."""
        if self.reason is not None:
            return
        self.reason = reason
        if not keep_queued:
            self._inbox.clear()
            self._inbox_bytes = 0
        self._unsent.clear()
        self._unsent_bytes = 0
        self._event.set()
        if tell_peer:
            self.links.send_bye(self.peer, self.epoch, reason)
        if self._sink is not None:
            # Told now, unless it paused reading with messages from before a BYE still to read:
            # then once it has read them (resume_reading).
            self._pump()


class Link:
    """One link in the table: its transport and session."""

    __slots__ = ("session", "transport")

    def __init__(self, transport: LinkTransport, session: Session) -> None:
        self.transport = transport
        self.session = session


AcceptHandler = Callable[[Session, str], None]
ClosedHandler = Callable[[str, str], None]


class Links:
    """A node's links, one per peer node: its subscriptions, heartbeats and table.

    An edge calls ``get(peer)`` (opens on demand); a control node registers ``on_accept`` and
    gets a callback with each new inbound link session before its first frame is read.
    """

    def __init__(self, node: NatsNode, *, link_timeout: float, window: int = p.DEFAULT_WINDOW) -> None:
        self.nats = node
        self.link_timeout = link_timeout
        self.window = window
        self._links: dict[str, Link] = {}
        self._accept: AcceptHandler | None = None
        self._closed_handlers: list[ClosedHandler] = []
        self._heartbeats = Heartbeats(tick=link_timeout / 16)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._strays: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._subscriptions: list[object] = []
        self._noise = RateLimitedLog(log, interval=10.0)
        node.on_disconnect(self._nats_lost)
        node.on_slow_consumer(self._slow_consumer)

    def __len__(self) -> int:
        return len(self._links)

    def on_accept(self, handler: AcceptHandler) -> None:
        """Accept inbound links: ``handler(session, peer)`` runs before the session reads a frame
        (set ``accept_stream``/``on_request`` there). Without it inbound links get a BYE."""
        self._accept = handler

    def on_link_closed(self, handler: ClosedHandler) -> None:
        """Call ``handler(peer, reason)`` whenever a link ends."""
        self._closed_handlers.append(handler)

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Subscribe to this node's link and no-responders subjects; start the heartbeats."""
        self._task_group = task_group
        subjects, me, nc = self.nats.subjects, self.nats.node_id, self.nats.nc
        links = await nc.subscribe(subjects.links_to(me), cb=self._on_message,
                                   pending_msgs_limit=PENDING_MSGS_LIMIT, pending_bytes_limit=PENDING_BYTES_LIMIT)
        # Link messages are handled as nats-py parses them (no hand-off to the subscription's task);
        # what they leave waiting is bounded per link by its inbox (INBOX_LIMIT bytes).
        nc.direct(links, self._on_link_message)
        self._subscriptions = [
            links,
            await nc.subscribe(subjects.no_responders_to(me), cb=self._on_no_responders),
        ]
        # The server has our subscriptions once it answers a PING after them: before that, a peer's
        # first link message would get a 503 and end the link it opens to this node.
        await nc.flush()
        task_group.start_soon(self._heartbeats.run)

    def close_all(self, reason: str) -> None:
        """End every link with ``reason``; peers are told when NATS is still there."""
        tell = self.nats.connected
        for link in list(self._links.values()):
            link.transport.fail(reason, tell_peer=tell)

    def session(self, peer: str) -> Session | None:
        """The live link session to ``peer``, without opening one."""
        link = self._links.get(peer)
        if link is None or link.transport.reason is not None:
            return None
        return link.session

    def get(self, peer: str) -> Session:
        """The link session to ``peer``, opened now if there is none. Raises BusDown while this
        node is not connected to NATS (a link opened then would only buffer)."""
        session = self.session(peer)
        if session is not None:
            return session
        if not self.nats.connected or self._task_group is None:
            raise BusDown()
        if peer == self.nats.node_id:
            raise ValueError("a node does not link to itself")
        epoch = secrets.randbits(32) or 1
        return self._open(peer, epoch)

    def _open(self, peer: str, epoch: int) -> Session:
        assert self._task_group is not None
        transport = LinkTransport(self, peer, epoch)
        interval = self.link_timeout / 4
        session = Session(transport, window=self.window, peer_window=self.window,  # type: ignore[arg-type]
                          heartbeat_interval=interval, heartbeat_timeout=self.link_timeout,
                          name=f"link {peer}", heartbeats=self._heartbeats, coalesce_limit=self.coalesce_limit)
        session.window_budget = LINK_WINDOW_BUDGET
        link = Link(transport, session)
        self._links[peer] = link
        self._task_group.start_soon(self._run, peer, link)
        return session

    @property
    def coalesce_limit(self) -> int:
        """Largest link message the session builds: NATS's max_payload minus the link header and slack."""
        room = self.nats.max_payload - LINK_HEADER.size - 1024
        return max(p.MAX_DATA_FRAME + p.HEADER_SIZE, min(COALESCE_LIMIT, room))

    async def _run(self, peer: str, link: Link) -> None:
        result = await link.session.run()
        # Tell the peer why, unless the link ended from its side (BYE, 503) or with NATS.
        link.transport.fail(result, tell_peer=True)
        reason = link.transport.reason or result
        if self._links.get(peer) is link:
            del self._links[peer]
        log.info("cluster: link with node %s (epoch %08x) ended: %s", peer, link.transport.epoch, reason)
        for handler in list(self._closed_handlers):
            try:
                handler(peer, reason)
            except Exception:  # one component's bug must not hide the end of the link from the others
                log.exception("cluster: a link-closed handler failed")

    # -- NATS callbacks (never await anything slow: one callback serves every link) ---------
    async def _on_message(self, msg: Msg) -> None:
        # The subscription's callback, which nats-py requires; LinkClient.direct hands every
        # message to _on_link_message instead, as the socket is read.
        self._on_link_message(msg.subject.encode(), msg.data)

    def _on_link_message(self, subject: bytes, data: bytes) -> None:
        """A message on ``P.n.<me>.l.<peer>``, handled as the NATS socket is read (never blocks)."""
        peer = subject.rpartition(b".")[2].decode("ascii", "replace")
        link = self._links.get(peer)
        if link is not None and len(data) >= _LINK_HEADER_SIZE:
            # The common case, checked as decode_header checks it, in line: the frames of a link
            # we have, once per message on each node (no LinkKind made per message).
            magic, version, kind, epoch, seq = _UNPACK_LINK_HEADER(data)
            if kind == _FRAMES and magic == LINK_MAGIC and version == LINK_VERSION and link.transport.epoch == epoch:
                link.transport.deliver(seq, data[_LINK_HEADER_SIZE:])
                return
        header = decode_header(data)
        if header is None:
            self._noise("cluster: dropped a malformed link message from %s", peer)
            return
        kind, epoch, seq = header
        link = self._links.get(peer)
        if link is not None and link.transport.epoch == epoch:
            if kind == LinkKind.BYE:
                reason = data[LINK_HEADER.size:].decode("utf-8", "replace")
                link.transport.fail(f"node {peer} ended the link: {reason}", tell_peer=False, keep_queued=True)
            else:
                link.transport.deliver(seq, data[LINK_HEADER.size:])
            return
        if kind == LinkKind.BYE:
            return  # the end of a link we no longer have
        if seq == 0 and self._accept is not None:
            self._accepted(peer, epoch).transport.deliver(seq, data[LINK_HEADER.size:])
            return
        if (peer, epoch) not in self._strays:
            self._strays[(peer, epoch)] = None
            if len(self._strays) > STRAY_MEMORY:
                self._strays.popitem(last=False)
            why = "this node opens links, it accepts none" if self._accept is None else "unknown link epoch"
            self.send_bye(peer, epoch, why)

    def _accepted(self, peer: str, epoch: int) -> Link:
        old = self._links.get(peer)
        if old is not None:
            # The peer opened a new link, so it gave up the old one: its streams end here too.
            old.transport.fail(f"node {peer} opened a new link", tell_peer=False)
        self._open(peer, epoch)
        link = self._links[peer]
        assert self._accept is not None
        try:
            self._accept(link.session, peer)
        except Exception:
            log.exception("cluster: accepting a link from %s failed", peer)
            link.transport.fail("the node could not accept the link", tell_peer=True)
        return link

    async def _on_no_responders(self, msg: Msg) -> None:
        if not msg.headers or msg.headers.get("Status") != "503":
            return
        tokens = msg.subject.split(".")
        peer, epoch_text = tokens[-2], tokens[-1]
        link = self._links.get(peer)
        if link is not None and str(link.transport.epoch) == epoch_text:
            link.transport.fail(f"node {peer} is gone (no responders on NATS)", tell_peer=False)

    def _nats_lost(self) -> None:
        # Messages in flight may be lost and buffered ones would arrive late: no link survives this.
        for link in list(self._links.values()):
            link.transport.fail("lost the cluster's message bus (NATS)", tell_peer=False)

    def _slow_consumer(self, subject: str) -> None:
        if ".l." in subject:
            link = self._links.get(subject.rpartition(".")[2])
            if link is not None:
                link.transport.fail("this node fell behind on link messages (NATS slow consumer)",
                                    tell_peer=True)

    def send_bye(self, peer: str, epoch: int, reason: str) -> None:
        """Tell ``peer`` that the link of ``epoch`` has ended (best effort, in the background)."""
        if self._task_group is None or not self.nats.connected:
            return
        body = encode_header(LinkKind.BYE, epoch, 0) + reason.encode("utf-8")[:MAX_BYE_REASON]
        self._task_group.start_soon(self._publish, self.nats.subjects.link(peer, self.nats.node_id), body)

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self.nats.nc.publish(subject, body)
        except nats.errors.Error as exc:  # the peer learns it from its heartbeat instead
            self._noise("cluster: could not send a BYE: %s", exc)

    async def stop(self, reason: str = "node stopping") -> None:
        """End every link and the subscriptions."""
        self.close_all(reason)
        for subscription in self._subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()  # type: ignore[attr-defined]
        self._subscriptions = []
