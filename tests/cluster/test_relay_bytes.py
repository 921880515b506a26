"""The control relay forwards its streams' frames from their bytes (control_relay.take_frames).

Over a real link (a raw edge on the test's nats-server) and raw agents, each test checks that the
agent and the edge get what the session's own path would have given them: the edge's request head
without the link keys and with this node's tunnel name, whatever order the edge wrote its keys in;
a malformed response head from an agent still ends only that agent's session, never the link. A
last test, in process, feeds the same messages to a relay with and without ``take_frames`` and
compares every byte each session queues and every error.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import msgpack
import pytest

from comzy.core import protocol as p
from comzy.core.cluster import control_relay
from comzy.core.session import Session
from comzy.core.stream import StreamReset
from comzy.core.types import Tunnel
from tests.cluster.conftest import NatsServer, control_node, raw_hello
from tests.cluster.test_relay import raw_edge, read_body
from tests.conftest import start_agent
from tests.helpers import receive_until_closed, wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

HEADERS = [(b"host", b"x.localhost"), (b"x-forwarded-for", b"127.0.0.1"), (b"accept", b"*/*")]


async def next_request(ws: Any) -> tuple[int, bytes]:
    """The stream id and the raw payload of the next REQUEST a raw agent receives."""
    with anyio.fail_after(10):
        while True:
            message = await ws.receive()
            assert isinstance(message, bytes)
            offset = 0
            while offset < len(message):
                length, kind, _, stream = p.HEADER.unpack_from(message, offset)
                body = message[offset + p.HEADER_SIZE:offset + p.HEADER_SIZE + length]
                offset += p.HEADER_SIZE + length
                if kind == p.FrameType.REQUEST:
                    return stream, body


async def test_the_agent_gets_the_edges_head_without_the_link_keys_in_any_order(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with control_node(nats_server, tmp_path / "a") as control, raw_edge(nats_server, control) as edge:
        single, welcome = await raw_hello(control, subdomain="single")
        assert welcome.type == p.FrameType.WELCOME
        several, welcome = await raw_hello(control, tunnels=[{"name": "web", "port": 1, "subdomain": "sweb"},
                                                             {"name": "api", "port": 2, "subdomain": "sapi"}])
        assert welcome.type == p.FrameType.WELCOME
        head = p.RequestHead("GET", b"/a?b=c", HEADERS, "127.0.0.1").to_payload()
        for alias, ws, name in (("single", single, None), ("sapi", several, "api"), ("sweb", several, "web")):
            found = await edge.lookup(alias)
            keys = {"al": alias, "ts": found["session"]}
            # What the agent must get: the edge's head in its order, no link keys, this node's name.
            expected = dict(head) | ({"tn": name} if name is not None else {})
            variants = [
                head | keys,  # as an edge writes it (edge.py _open): the link keys last
                keys | head,  # another order: re-encoded
                head | {"tn": "web" if name != "web" else "api"} | keys,  # an edge naming a tunnel: never taken
            ]
            for payload in variants:
                stream = edge.link.open_stream(window=found["sw"], credit=found["aw"])
                edge.link.send_nowait(p.encode(p.FrameType.REQUEST, stream.id, payload))
                stream.send_end()
                _, body = await next_request(ws)
                assert msgpack.unpackb(body) == expected
                assert body == msgpack.packb(expected, use_bin_type=True), payload
                stream.close()
        await single.aclose()
        await several.aclose()


async def test_a_malformed_response_head_ends_only_its_agents_session_never_the_link(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    malformed = {
        "status out of range": msgpack.packb({"s": 42, "h": []}),
        "header value not bytes": msgpack.packb({"s": 200, "h": [[b"x-a", "text"]]}),
        "not a map": msgpack.packb([200, []]),
        "not msgpack": b"\xc1",
    }
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="good"),
        raw_edge(nats_server, control) as edge,
    ):
        for number, (why, payload) in enumerate(malformed.items()):
            alias = f"bad{number}"
            ws, welcome = await raw_hello(control, subdomain=alias)
            assert welcome.type == p.FrameType.WELCOME
            stream = await edge.request(alias, "GET", b"/")
            agent_id, _ = await next_request(ws)
            header = p.HEADER.pack(len(payload), p.FrameType.RESPONSE, 0, agent_id)
            await ws.send(header + payload + p.encode_data(agent_id, b"body") + p.encode(p.FrameType.END, agent_id))
            closed, _ = await receive_until_closed(ws)
            assert closed.code == 1002, why  # a protocol error ends the agent's session, as on a single node
            with pytest.raises(StreamReset) as caught:
                await stream.wait_head(10)
            assert "tunnel session ended: protocol error: malformed RESPONSE head" in caught.value.message or (
                "RESPONSE payload is not" in caught.value.message), why
            await wait_until(lambda alias=alias: control.tunnel(alias) is None)
            # The link that the other tunnel shares is untouched and serves it.
            assert edge.link.closed is None, why
            other = await edge.request("good", "GET", b"/status/204")
            answer = await other.wait_head(10)
            assert isinstance(answer, p.ResponseHead) and answer.status == 204
            await read_body(other)
            other.close()


# -- in process: the same messages with and without take_frames -------------------------------------
class Recorder:
    """An attached transport that keeps what its session writes (for the comparison only)."""

    closed = None

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def attach(self, sink: Session) -> bool:
        return True

    def write_message(self, message: bytes) -> None:
        self.written.append(message)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Relay:
    """A link session and an agent session joined by a ControlRelay, as on a control node."""

    def __init__(self, take: bool, window: int = 65536) -> None:
        self.link_ws, self.agent_ws = Recorder(), Recorder()
        self.link = Session(self.link_ws, window=window, peer_window=window, name="link")  # type: ignore[arg-type]
        self.agent = Session(self.agent_ws, window=window, peer_window=window, name="agent")  # type: ignore[arg-type]
        for session in (self.link, self.agent):
            assert session._attach()
        tunnel = Tunnel(alias="t", public_url="http://t.localhost", port=80, client_address="127.0.0.1", session=7)
        relay = control_relay.ControlRelay.__new__(control_relay.ControlRelay)
        relay.server = SimpleNamespace(registry={"t": SimpleNamespace(tunnel=tunnel, session=self.agent)},
                                       settings=SimpleNamespace(max_streams_per_tunnel=4))
        relay.directory = SimpleNamespace(verifying=lambda alias: False)
        relay.node_id = "control-1"
        relay._accept_link(self.link, "edge-1")
        if not take:
            self.link.take_frames = None
        self.take = take

    def feed(self, side: str, message: bytes) -> list[Any]:
        """One message from the edge or the agent; what each session then wrote, and how it ended."""
        session = self.link if side == "edge" else self.agent
        if not self.take:
            self.agent.take_frames = None  # set by the relay's first accept
        session._link_message(message)
        for each in (self.link, self.agent):
            each._flush()
        written = [self.link_ws.written[:], self.agent_ws.written[:], sorted(self.link.streams),
                   sorted(self.agent.streams)]
        self.link_ws.written.clear()
        self.agent_ws.written.clear()
        for each in (self.link, self.agent):
            ended = each._ended
            written.append(repr(ended.exception()) if ended is not None and ended.done() else None)
        return written


def request(stream: int, session: int = 7, **extra: Any) -> bytes:
    head = p.RequestHead("POST", b"/", HEADERS, "127.0.0.1", has_body=True).to_payload() | {"al": "t", "ts": session}
    return p.encode(p.FrameType.REQUEST, stream, head | extra)


def frame(kind: p.FrameType, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return p.HEADER.pack(len(payload), kind, flags, stream) + payload


def data(stream: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(p.FrameType.DATA, stream, payload, flags)


END_1 = frame(p.FrameType.END, 1)
RESPONSE = p.encode(p.FrameType.RESPONSE, 1, p.ResponseHead(200, [(b"a", b"b")]).to_payload())
WINDOW = frame(p.FrameType.WINDOW, 1, b"\x00\x00\x10\x00")
#: Conversations: (side, message) in order; every one starts with stream 1 opened by the edge.
CONVERSATIONS: dict[str, list[tuple[str, bytes]]] = {
    "exchange": [("edge", frame(p.FrameType.DATA, 1, b"up") + frame(p.FrameType.END, 1)),
                 ("agent", RESPONSE + frame(p.FrameType.DATA, 1, b"x" * 5000) + WINDOW),
                 ("edge", WINDOW), ("agent", frame(p.FrameType.DATA, 1, b"", p.FLAG_FIN) + frame(p.FrameType.END, 1))],
    "websocket close": [("agent", RESPONSE + p.encode(p.FrameType.WS_CLOSE, 1, {"code": 4000, "reason": "r"})),
                        ("edge", frame(p.FrameType.END, 1))],
    "resets": [("agent", RESPONSE), ("edge", p.encode_reset(1, p.ResetCode.CANCEL, "gone"))],
    "agent reset": [("agent", p.encode_reset(1, p.ResetCode.LOCAL_FAILED, "refused"))],
    "ping first": [("agent", p.encode(p.FrameType.PING, 0, b"12345678") + RESPONSE + frame(p.FrameType.END, 1))],
    "a second request and a wrong session": [("edge", request(3) + request(5, session=8) + frame(p.FrameType.END, 3))],
    "a request reusing its stream": [("edge", request(1))],
    "an edge naming its own tunnel": [("edge", request(3, tn="x"))],
    "end with a payload": [("edge", frame(p.FrameType.END, 1, b"x"))],
    "window of 0": [("agent", frame(p.FrameType.WINDOW, 1, b"\x00\x00\x00\x00"))],
    "window of 3 bytes": [("edge", frame(p.FrameType.WINDOW, 1, b"\x00\x00\x01"))],
    "data too large": [("agent", RESPONSE + frame(p.FrameType.DATA, 1, b"x" * (p.MAX_DATA_FRAME + 1)))],
    "data on stream 0": [("edge", frame(p.FrameType.DATA, 0, b"x"))],
    "unknown streams": [("agent", frame(p.FrameType.DATA, 9, b"x") + RESPONSE), ("edge", frame(p.FrameType.END, 9))],
    "truncated": [("agent", RESPONSE + frame(p.FrameType.DATA, 1, b"xyz")[:-1])],
    "unknown type": [("agent", RESPONSE + p.HEADER.pack(0, 99, 0, 1))],
    "response not msgpack": [("agent", frame(p.FrameType.RESPONSE, 1, b"\xc1"))],
    "response out of range": [("agent", p.encode(p.FrameType.RESPONSE, 1, {"s": 1000, "h": []}))],
    "response from the edge": [("edge", RESPONSE + frame(p.FrameType.END, 1))],
    "agent overrun": [("agent", RESPONSE + frame(p.FrameType.DATA, 1, b"x" * 60000)
                       + frame(p.FrameType.DATA, 1, b"y" * 6000))],
    "edge overrun": [("edge", frame(p.FrameType.DATA, 1, b"x" * 60000) + frame(p.FrameType.DATA, 1, b"y" * 6000))],
    "data after end": [("edge", frame(p.FrameType.END, 1) + frame(p.FrameType.DATA, 1, b"x"))],
    "empty messages": [("agent", RESPONSE + frame(p.FrameType.DATA, 1, b"", p.FLAG_FIN) * 40)],
    "empty": [("edge", b"")],
    # A small answer in one message (RESPONSE, DATA, END: forwarded in one piece), and the shapes
    # that must take the frames' own paths instead.
    "a whole answer": [("edge", END_1), ("agent", RESPONSE + data(1, b"x" * 1024) + END_1)],
    "a whole answer without a body": [("edge", END_1), ("agent", RESPONSE + END_1)],
    "a whole answer before the request's end": [("agent", RESPONSE + data(1, b"x" * 10) + END_1 + WINDOW),
                                                ("edge", data(1, b"up") + END_1)],
    "a whole answer, then data": [("edge", END_1), ("agent", RESPONSE + data(1, b"x") + END_1 + data(1, b"late"))],
    "a whole answer, then another": [("agent", RESPONSE + END_1 + RESPONSE + END_1)],
    "a whole answer past the window": [("agent", RESPONSE + data(1, b"x" * 60000)),
                                       ("agent", RESPONSE + data(1, b"y" * 6000) + END_1)],
    "a whole answer with flags": [("agent", RESPONSE + data(1, b"x", p.FLAG_FIN) + END_1)],
    "a whole answer with an empty body frame": [("agent", RESPONSE + data(1, b"") + END_1)],
    "a whole answer with an end of its own": [("agent", RESPONSE + data(1, b"x") + frame(p.FrameType.END, 1, b"!"))],
    "a whole answer on two streams": [("agent", RESPONSE + data(1, b"x") + frame(p.FrameType.END, 3))],
    "a whole answer, truncated": [("agent", RESPONSE + data(1, b"x") + END_1[:-1])],
    "a whole answer after the edge left": [("edge", p.encode_reset(1, p.ResetCode.CANCEL, "gone")),
                                           ("agent", RESPONSE + data(1, b"x") + END_1)],
    "a whole answer with a head too large for the link": [
        ("agent", p.encode(p.FrameType.RESPONSE, 1, p.ResponseHead(200, [(b"a", b"b" * 600_000)]).to_payload())
         + data(1, b"x") + END_1)],
    # A request without a body with its END in the same message (the END goes with the REQUEST).
    "a bodyless request": [("edge", request(3) + frame(p.FrameType.END, 3)),
                           ("agent", p.encode(p.FrameType.RESPONSE, 2, p.ResponseHead(204, []).to_payload())
                            + frame(p.FrameType.END, 2))],
    "a bodyless request, then data": [("edge", request(3) + frame(p.FrameType.END, 3) + data(3, b"x"))],
    "a bodyless request for a wrong session": [("edge", request(3, session=8) + frame(p.FrameType.END, 3)
                                                + request(5) + frame(p.FrameType.END, 5))],
    "a request with the end of another stream": [("edge", request(3) + frame(p.FrameType.END, 5))],
    "a request with an end carrying flags": [("edge", request(3) + frame(p.FrameType.END, 3, flags=p.FLAG_FIN))],
    "a request reusing its stream, with its end": [("edge", request(1) + END_1)],
    "a request on stream 0 with its end": [("edge", request(0) + frame(p.FrameType.END, 0))],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_take_frames_does_what_the_sessions_own_path_does(name: str) -> None:
    relays = [Relay(take=True), Relay(take=False)]
    results: list[list[Any]] = [[], []]
    for relay, result in zip(relays, results, strict=True):
        result.append(relay.feed("edge", request(1)))
        for side, message in CONVERSATIONS[name]:
            result.append(relay.feed(side, message))
    assert results[0] == results[1]
