"""The control node's side of the cluster's data plane: per-alias answers and the stream relay.

docs/design/cluster.md 1.2 and 1.4-1.6. For every alias it holds, a control node answers
requests on ``P.t.<alias>`` (every holder hears them; the first answer counts): ``lookup`` (what
an edge needs to open streams), ``close`` and ``notify``. Each REQUEST an edge opens on a link is handed to the
tunnel's agent session through a pair of ``RelayEnd``s, one in each session's stream table,
which renumber the stream and forward its frames. Credit is end to end (edge <-> agent); the
relay keeps its own count of it in both directions so that a misbehaving agent only kills its
own session, and a misbehaving edge only its stream, never a link shared by many tunnels.
The relay has no task and no buffer of its own per stream.
"""

from __future__ import annotations

import functools
import logging
import struct
from typing import TYPE_CHECKING, Any, cast

import msgpack
import nats.errors
from nats.aio.msg import Msg

from comzy.core import protocol as p
from comzy.core.control import GoAway, Notice
from comzy.core.logs import RateLimitedLog
from comzy.core.session import Session
from comzy.core.stream import MAX_EMPTY_MESSAGES, StreamReset
from comzy.core.types import Tunnel

if TYPE_CHECKING:
    from comzy.core.cluster.node import ClusterNode
    from comzy.core.cluster.ownership import ClusterDirectory
    from comzy.core.registry import Entry

log = logging.getLogger("comzy.cluster")

#: The keys an edge adds to a REQUEST on a link (alias, tunnel session); the agent never sees them.
LINK_HEAD_KEYS = ("al", "ts")
#: Seconds an edge is told to wait before it asks again about an alias this node is re-checking
#: (a reconcile reads 32 records at a time: about 0.25 ms each, design/cluster.md).
RETRY_AFTER = 0.05


def busy_reason(session: Session, tunnel: Tunnel, max_streams: int) -> str | None:
    """Why a new stream to ``tunnel``'s agent ``session`` is refused with 503 (None: it may open).
    The same sentences as the single node's."""
    if len(session.streams) >= max_streams:
        return f"Tunnel {tunnel.alias} is busy ({max_streams} requests in flight); retry shortly.\n"
    if session.congested:
        return (f"Tunnel {tunnel.alias} is not keeping up: its agent has not read the "
                f"{session.queued} bytes already sent to it; retry shortly.\n")
    return None


class _Relay:
    """One relayed stream: its two ends, the credit each way, and the tunnel it counts on."""

    __slots__ = ("agent", "bytes_in", "bytes_out", "edge", "empty", "finished", "head_limit", "to_agent",
                 "to_edge", "tunnel", "websocket")

    def __init__(self, tunnel: Tunnel, link: Session, link_id: int, agent: Session, agent_id: int,
                 websocket: bool, head_limit: int) -> None:
        self.tunnel = tunnel
        self.websocket = websocket
        self.head_limit = head_limit
        self.edge = RelayEnd(self, link, link_id, from_agent=False)
        self.agent = RelayEnd(self, agent, agent_id, from_agent=True)
        self.edge.other, self.agent.other = self.agent, self.edge
        # What each side may still send: the window the other side announced (the agent's HELLO
        # window; the control node's stream window, which the edge opened with) plus its WINDOWs.
        self.to_agent = agent.peer_window
        self.to_edge = agent.window
        self.empty = 0  # empty messages relayed since the last non-empty DATA or WINDOW
        self.finished = False
        self.bytes_in = 0
        self.bytes_out = 0

    def reset(self, code: p.ResetCode, edge_message: str, agent_code: p.ResetCode | None = None,
              agent_message: str | None = None) -> None:
        """Abort the stream on both sides."""
        for end, end_code, message in ((self.edge, code, edge_message),
                                       (self.agent, agent_code if agent_code is not None else code,
                                        agent_message if agent_message is not None else edge_message)):
            end.session.send_nowait(p.encode_reset(end.id, end_code, message))
        self.finish()

    def finish(self) -> None:
        """Drop both ends from their tables and count the exchange (once)."""
        if self.finished:
            return
        self.finished = True
        self.edge.session.forget(self.edge.id)
        self.agent.session.forget(self.agent.id)
        self.tunnel.stream_finished(self.websocket, self.bytes_in, self.bytes_out)


class RelayEnd:
    """One end of a relayed stream, in a session's stream table in place of a ``Stream``: what
    its session's reader hands it goes to the other end's session, renumbered."""

    __slots__ = ("ended", "from_agent", "grown", "id", "other", "relay", "session", "ws_close")

    def __init__(self, relay: _Relay, session: Session, stream_id: int, *, from_agent: bool) -> None:
        self.relay = relay
        self.session = session
        self.id = stream_id
        self.from_agent = from_agent
        self.ended = False
        self.ws_close: tuple[int, str] | None = None
        self.grown = 0  # a relay never grows a window: the edge's Stream does, end to end
        #: The end in the other session (set by _Relay: an attribute, not a property read per frame).
        self.other: RelayEnd = self

    def _on_data(self, data: bytes | memoryview, flags: int) -> None:
        relay = self.relay
        if relay.finished:
            return
        if self.ended:
            if self.from_agent:
                raise p.ProtocolError(f"DATA after END on stream {self.id}")
            relay.reset(p.ResetCode.FLOW_CONTROL, "DATA after END", p.ResetCode.CANCEL, "the edge broke the stream")
            return
        size = len(data)
        if not size:
            if not flags & p.FLAG_FIN:
                return  # an empty piece of a body or message carries nothing
            relay.empty += 1
            if relay.empty > MAX_EMPTY_MESSAGES:
                relay.reset(p.ResetCode.FLOW_CONTROL, f"more than {MAX_EMPTY_MESSAGES} empty messages waiting")
                return
        else:
            relay.empty = 0
        if self.from_agent:
            relay.to_edge -= size
            if relay.to_edge < 0:
                # The agent's own session ends (1002), as on a single node; the link is not touched.
                raise p.ProtocolError(f"peer overran the window of stream {self.id}")
            relay.bytes_out += size
        else:
            relay.to_agent -= size
            if relay.to_agent < 0:
                relay.reset(p.ResetCode.FLOW_CONTROL, "the edge overran the agent's window",
                            p.ResetCode.CANCEL, "the edge broke the stream")
                return
            relay.bytes_in += size
        other = self.other
        other.session.send_nowait(p.encode_data(other.id, data, flags))

    def _on_credit(self, increment: int) -> None:
        relay = self.relay
        if relay.finished:
            return
        relay.empty = 0
        if self.from_agent:
            relay.to_agent += increment
        else:
            relay.to_edge += increment
        other = self.other
        other.session.send_nowait(p.encode_window(other.id, increment))

    def _on_end(self) -> None:
        relay = self.relay
        if relay.finished or self.ended:
            return
        self.ended = True
        other = self.other
        if self.ws_close is not None:
            code, reason = self.ws_close
            other.session.send_nowait(p.encode(p.FrameType.WS_CLOSE, other.id, {"code": code, "reason": reason}))
        else:
            other.session.send_nowait(_PACK_HEADER(0, _END, 0, other.id))
        if other.ended:
            relay.finish()

    def _on_head(self, head: object) -> None:
        if not self.from_agent or not isinstance(head, p.ResponseHead):
            return  # only an agent answers a stream
        self._send_head(p.encode(p.FrameType.RESPONSE, self.relay.edge.id, head.to_payload()))

    def _send_head(self, frame: bytes) -> None:
        """Relay the agent's RESPONSE frame (renumbered for the link) to the edge."""
        relay = self.relay
        if relay.finished:
            return
        if len(frame) > relay.head_limit:
            relay.reset(p.ResetCode.INTERNAL, "response head too large for the cluster link",
                        p.ResetCode.CANCEL, "response head too large for the cluster link")
            return
        relay.edge.session.send_nowait(frame)

    def _fail(self, error: StreamReset) -> None:
        # This side's session already dropped this end (a RESET it read, or its end).
        relay = self.relay
        if relay.finished:
            return
        # The peer's code is passed on as it came (a newer peer's code is not ours to judge).
        code = cast(p.ResetCode, error.code)
        if not self.from_agent and self.session.closed is not None:
            code = p.ResetCode.CANCEL  # the link ended: for the agent, the visitor went away
        other = self.other
        other.session.send_nowait(p.encode_reset(other.id, code, error.message))
        relay.finish()


_pack = msgpack.Packer(use_bin_type=True).pack  # as protocol.encode packs maps (one C call, no callback)
_HEADER_SIZE = p.HEADER_SIZE
_UNPACK_HEADER = p.HEADER.unpack_from
_PACK_HEADER = p.HEADER.pack
_INCREMENT = _CODE = struct.Struct(">I")  # WINDOW's payload; the start of RESET's
_DATA, _END, _WINDOW, _RESET, _RESPONSE, _REQUEST = (int(kind) for kind in (
    p.FrameType.DATA, p.FrameType.END, p.FrameType.WINDOW, p.FrameType.RESET, p.FrameType.RESPONSE,
    p.FrameType.REQUEST))
# Enum members read once: reading one off its class costs ~100 ns each time on CPython 3.11.
_T_RESPONSE, _T_REQUEST = p.FrameType.RESPONSE, p.FrameType.REQUEST


def _agent_head(payload: dict[str, Any], body: bytes | None, name: str | None) -> bytes:
    """The REQUEST payload the agent gets: the edge's without the link keys, naming the tunnel
    by this node's word (``name``), never the edge's.

    An edge appends the link keys to the head's map (edge.py ``_open``), so when ``body`` ends with
    exactly them, the agent's map is ``body`` cut before them with its count mended, plus ``tn``:
    the same map as the decoded one re-encoded, without re-encoding it. Anything else (an older
    edge's order, a ``tn`` from the edge, a map past 15 keys) is re-encoded."""
    last = reversed(payload)
    if body is not None and next(last, None) == "ts" and next(last, None) == "al" and "tn" not in payload:
        # The last two entries are the link keys (one entry per key: the count matches) and the
        # body ends with their shortest encoding, which msgpack writes and no other encoding of
        # theirs ends with: the cut falls exactly before them.
        tail = b"".join((b"\xa2al", _pack(payload["al"]), b"\xa2ts", _pack(payload["ts"])))
        count = len(payload) - len(LINK_HEAD_KEYS) + (name is not None)
        if body[0] == 0x80 | len(payload) and count <= 15 and body.endswith(tail):
            cut = bytes((0x80 | count,)) + body[1:-len(tail)]
            return cut if name is None else cut + b"\xa2tn" + _pack(name)
    head = {key: value for key, value in payload.items() if key not in LINK_HEAD_KEYS}
    head.pop("tn", None)
    if name is not None:
        head["tn"] = name
    return _pack(head)  # type: ignore[no-any-return]


def _whole_answer(agent: RelayEnd, body: bytes, message: bytes | memoryview, offset: int, size: int,
                  stream_id: int) -> int:
    """The agent's whole small answer to a relayed stream, from its RESPONSE frame (``body``, checked)
    and the frames at ``offset`` of ``message``: when they are one DATA (not empty, no flags) or
    none, then END, all on ``stream_id``, they go to the edge in one piece (counted as that many
    frames, ``Session.send_frames_nowait``), byte for byte what ``_send_head``, ``_on_data`` and
    ``_on_end`` would queue one by one; returns where the END ends. 0 (nothing done) for any other
    shape, or whenever one of them would not simply forward (a finished relay, a head too large
    for the link, the agent past its window): then each frame takes its own path."""
    relay = agent.relay
    if relay.finished or agent.ended or _HEADER_SIZE + len(body) > relay.head_limit or size - offset < _HEADER_SIZE:
        return 0
    length, kind, flags, frame_stream = _UNPACK_HEADER(message, offset)
    data_at = offset + _HEADER_SIZE
    data_size = 0
    if kind == _DATA:
        if frame_stream != stream_id or flags or not 0 < length <= p.MAX_DATA_FRAME or length > relay.to_edge:
            return 0
        data_size = length
        offset = data_at + length
        if size - offset < _HEADER_SIZE:
            return 0
        length, kind, flags, frame_stream = _UNPACK_HEADER(message, offset)
    if kind != _END or frame_stream != stream_id or length or flags:
        return 0
    edge = relay.edge
    edge_id = edge.id
    head = _PACK_HEADER(len(body), _RESPONSE, 0, edge_id)
    if data_size:
        relay.empty = 0
        relay.to_edge -= data_size
        relay.bytes_out += data_size
        answer = b"".join((head, body, _PACK_HEADER(data_size, _DATA, 0, edge_id), message[data_at:data_at + data_size],
                           _PACK_HEADER(0, _END, 0, edge_id)))
    else:
        answer = b"".join((head, body, _PACK_HEADER(0, _END, 0, edge_id)))
    agent.ended = True
    edge.session.send_frames_nowait(answer, 3 if data_size else 2)
    if edge.ended:
        relay.finish()
    return offset + _HEADER_SIZE


def take_frames(session: Session, relay: ControlRelay | None, message: bytes) -> bytes:
    """``Session.take_frames`` for a control node's link and agent sessions: the relay's frames
    handled from their bytes; returns the rest of ``message``.

    Each leading frame that is DATA, END, WINDOW or RESET of a relayed stream, a RESPONSE from the
    agent, or (on a link) a REQUEST goes to its ``RelayEnd`` (or to the relay's ``accept``) as the session's
    own path would hand it over, after the same checks, but without a ``Frame`` per frame, and the
    agent's RESPONSE is forwarded as it came (checked, renumbered) instead of re-encoded
    (docs/benchmarks.md, "The relay from the frames' bytes"). From the first frame it does not take
    (another type or stream, anything malformed: the session raises the error) the rest is the
    session's, in order.
    """
    streams = session.streams
    end = len(message)
    offset = 0
    view = memoryview(message) if type(message) is bytes else None  # slices of bytes need no copy
    while end - offset >= _HEADER_SIZE:
        length, kind, flags, stream_id = _UNPACK_HEADER(message, offset)
        start = offset + _HEADER_SIZE
        stop = start + length
        if stop > end:
            break
        target = streams.get(stream_id) if stream_id else None
        if kind == _DATA:
            if type(target) is not RelayEnd or length > p.MAX_DATA_FRAME:
                break
            target._on_data(view[start:stop] if view is not None else bytes(message[start:stop]), flags)
        elif kind == _END:
            if type(target) is not RelayEnd or length:
                break
            target._on_end()
        elif kind == _WINDOW:
            if type(target) is not RelayEnd or length != _INCREMENT.size:
                break
            (increment,) = _INCREMENT.unpack_from(message, start)
            if not increment:
                break
            target._on_credit(increment)
        elif kind == _RESET:
            if type(target) is not RelayEnd or length < _CODE.size:
                break
            (code,) = _CODE.unpack_from(message, start)
            session.forget(stream_id)
            target._fail(StreamReset(code, bytes(message[start + _CODE.size:stop]).decode("utf-8", "replace")))
        elif kind == _RESPONSE:
            if type(target) is not RelayEnd or not target.from_agent:
                break
            body = bytes(message[start:stop])
            # Checked as the edge will check it (a bad head must end this agent's session, never
            # the link that many tunnels share), then sent on as it is.
            p.ResponseHead.from_payload(p.decode_map(_T_RESPONSE, body))
            after = _whole_answer(target, body, view if view is not None else message, stop, end, stream_id)
            if after:
                offset = after
                continue
            target._send_head(_PACK_HEADER(length, _RESPONSE, 0, target.relay.edge.id) + body)
        elif kind == _REQUEST:
            if relay is None or target is not None or not stream_id:
                break
            body = bytes(message[start:stop])
            # A request without a body comes with its END in the same message (edge.py): both go
            # to the agent in one piece, and the END is taken here.
            ended = (end - stop >= _HEADER_SIZE and _UNPACK_HEADER(message, stop) == (0, _END, 0, stream_id))
            accepted = relay.accept(session, stream_id, p.decode_map(_T_REQUEST, body), body, ended)
            if accepted is not None:
                streams[stream_id] = accepted  # type: ignore[assignment]  # duck-typed like Stream
            if ended:
                stop += _HEADER_SIZE  # answered with a RESET instead, the END goes where the session sends it: nowhere
        else:
            break
        offset = stop
    return message[offset:] if offset else message


class ControlRelay:
    """A control node's answers on ``P.t.<alias>`` and its link streams (a ``ClusterNode`` component)."""

    def __init__(self, cluster: ClusterNode, directory: ClusterDirectory) -> None:
        self.cluster = cluster
        self.server = cluster.server
        self.directory = directory
        self.node_id = cluster.node_id
        self._tunnel_prefix = cluster.nats.subjects.tunnel("")
        self._noise = RateLimitedLog(log, interval=10.0)
        directory.responder = self.respond
        cluster.links.on_accept(self._accept_link)

    async def start(self) -> None:
        """Nothing to open: subscriptions come and go with the directory's claims."""

    async def stop(self) -> None:
        """Nothing to release: the links and the directory end their own."""

    # -- links ---------------------------------------------------------------------------
    def _accept_link(self, link: Session, peer: str) -> None:
        # A RelayEnd stands in the stream table where a Stream would (duck-typed, see Session.accept_stream).
        link.accept_stream = lambda stream_id, payload: self.accept(link, stream_id, payload)  # type: ignore[assignment,return-value]
        link.take_frames = functools.partial(take_frames, link, self)

    def accept(self, link: Session, stream_id: int, payload: dict[str, Any],
               body: bytes | None = None, ended: bool = False) -> RelayEnd | None:
        """A REQUEST from an edge (``payload``, decoded from ``body`` when given): relay it to the
        tunnel's agent, or answer RESET MOVED/REFUSED. ``ended``: the edge's END came with it (the
        caller has taken that frame), and goes to the agent in the same piece as the REQUEST."""
        alias, session_number = payload.get("al"), payload.get("ts")
        entry: Entry | None = self.server.registry.get(alias) if isinstance(alias, str) else None
        if (entry is None or entry.tunnel.session != session_number or entry.session.closed is not None
                or self.directory.verifying(entry.tunnel.alias)):
            # Never reached an agent: the edge may look the alias up again and retry.
            link.send_nowait(p.encode_reset(stream_id, p.ResetCode.MOVED,
                                            f"tunnel {alias} (session {session_number}) is not on node {self.node_id}"))
            return None
        tunnel, agent = entry.tunnel, entry.session
        busy = busy_reason(agent, tunnel, self.server.settings.max_streams_per_tunnel)
        if busy is not None:
            link.send_nowait(p.encode_reset(stream_id, p.ResetCode.REFUSED, busy))
            return None
        websocket = bool(payload.get("w"))
        if agent.take_frames is None:
            agent.take_frames = functools.partial(take_frames, agent, None)
        agent_id = agent.next_stream_id()
        relay = _Relay(tunnel, link, stream_id, agent, agent_id, websocket, link.coalesce_limit)
        agent.streams[agent_id] = relay.agent  # type: ignore[assignment]  # duck-typed like Stream
        head = _agent_head(payload, body, tunnel.name)
        if ended:
            relay.edge.ended = True
            agent.send_frames_nowait(b"".join((_PACK_HEADER(len(head), _REQUEST, 0, agent_id), head,
                                               _PACK_HEADER(0, _END, 0, agent_id))), 2)
        else:
            agent.send_nowait(_PACK_HEADER(len(head), _REQUEST, 0, agent_id) + head)
        tunnel.stream_opened(websocket)  # back down in _Relay.finish
        return relay.edge  # type: ignore[return-value]

    # -- P.t.<alias> ------------------------------------------------------------------------------
    async def respond(self, msg: Msg) -> None:
        """Answer a request on ``P.t.<alias>``: lookup, close or notify (docs/design/cluster.md 6)."""
        alias = msg.subject[len(self._tunnel_prefix):]
        entry = self.server.registry.get(alias)
        if entry is None or not msg.reply:
            return  # not ours: the asker finds the holder, or times out
        if self.directory.verifying(alias):
            # Held here, but not surely ours until the reconcile has read its record (after a NATS
            # reconnect or a lost lease): an edge asked to retry looks again at once instead of
            # waiting out its lookup timeout; a node that holds it surely may answer first.
            await self._answer(msg, alias, {"retry": RETRY_AFTER})
            return
        try:
            request = msgpack.unpackb(msg.data)
            op = request["op"]
        except Exception:
            self._noise("cluster: dropped a malformed request for tunnel %s", alias)
            return
        if op == "lookup":
            answer: dict[str, Any] = {"node": self.node_id, "session": entry.tunnel.session,
                                      "tunnel": entry.tunnel.to_view(), "aw": entry.session.peer_window,
                                      "sw": self.server.settings.stream_window}
        elif op == "close":
            reason = str(request.get("reason") or "closed by the server")
            entry.session.send_nowait(GoAway(reason, reconnect=False).encode())
            self.server.task_group.start_soon(entry.session.flush_and_close, 1000, reason)
            answer = {"closed": True}
        elif op == "notify":
            entry.session.send_nowait(Notice(str(request.get("message", "")),
                                             str(request.get("level") or "info")).encode())
            answer = {"ok": True}
        else:
            answer = {"error": f"unknown op {op!r}"}
        await self._answer(msg, alias, answer)

    async def _answer(self, msg: Msg, alias: str, answer: dict[str, Any]) -> None:
        try:
            await msg.respond(msgpack.packb(answer, default=str))
        except nats.errors.Error as exc:
            self._noise("cluster: could not answer a request for tunnel %s: %s", alias, exc)


def attach_control(cluster: ClusterNode) -> None:
    """Give a control node its components: alias ownership (``server.directory``) and the relay."""
    from comzy.core.cluster.ownership import ClusterDirectory

    directory = ClusterDirectory(cluster)
    cluster.server.directory = directory
    cluster.register(directory)
    cluster.register(ControlRelay(cluster, directory))
