"""The control relay over a real link (docs/design/cluster.md 1.4-1.6).

The test plays the edge with a raw link opener: its own NatsNode and Links, a lookup on
``P.t.<alias>``, then a REQUEST with ``"al"``/``"ts"`` on the link session, exactly as the
contract says. The control node is an in-process ``run_server`` with role control and a real
agent in front of a real upstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from comzy.core import protocol as p
from comzy.core.cluster.link import Links
from comzy.core.server import ServerContext
from comzy.core.session import Session
from comzy.core.stream import Stream, StreamReset
from tests.cluster.conftest import NatsServer, control_node, nats_node, raw_hello, tunnel_request, wait_linkable
from tests.conftest import start_agent
from tests.helpers import receive_until_closed, wait_until
from tests.upstream import Upstream, pattern_block

pytestmark = pytest.mark.anyio

BIG = 3 * 1024 * 1024 + 123  # past every window, grown ones included (2 MiB at most)


class Edge:
    """A raw link opener: what an edge does, by hand."""

    def __init__(self, node: Any, link: Session) -> None:
        self.node = node
        self.link = link

    async def lookup(self, alias: str) -> dict[str, Any]:
        return await tunnel_request(self.node, alias, {"op": "lookup"})

    async def request(self, alias: str, method: str, target: bytes, body: bytes = b"",
                      session: int | None = None, websocket: bool = False) -> Stream:
        """Open a stream for ``alias`` (tunnel session from a lookup unless given), send the body."""
        found = await self.lookup(alias)
        stream = self.link.open_stream(window=found["sw"], credit=found["aw"])
        headers = [(b"host", f"{alias}.localhost".encode())]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        head = p.RequestHead(method, target, headers, "127.0.0.1", websocket=websocket, has_body=bool(body))
        payload = head.to_payload() | {"al": alias, "ts": found["session"] if session is None else session}
        self.link.send_nowait(p.encode(p.FrameType.REQUEST, stream.id, payload))
        if body:
            with anyio.fail_after(30):  # a relay that loses credit stalls here
                await stream.send_data(body)
        if not websocket:
            stream.send_end()
        return stream


async def read_body(stream: Stream, timeout: float = 30.0) -> bytes:
    """The response body up to END (a stalled relay fails the test instead of hanging it)."""
    parts = []
    with anyio.fail_after(timeout):
        while (chunk := await stream.receive()) is not None:
            parts.append(chunk[0])
    return b"".join(parts)


@asynccontextmanager
async def raw_edge(nats: NatsServer, control: ServerContext) -> AsyncIterator[Edge]:
    async with nats_node(nats, "edge") as node:
        links = Links(node, link_timeout=4.0)
        async with anyio.create_task_group() as tg:
            await links.start(tg)
            assert control.cluster is not None
            await wait_linkable(node, control.cluster)
            try:
                yield Edge(node, links.get(control.node))
            finally:
                await links.stop()
                tg.cancel_scope.cancel()


async def test_a_relayed_stream_carries_bodies_larger_than_the_window_both_ways(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="big"),
        raw_edge(nats_server, control) as edge,
    ):
        tunnel = control.tunnel("big")
        assert tunnel is not None
        upload = bytes(range(256)) * (BIG // 256) + b"tail"
        stream = await edge.request("big", "POST", b"/upload?x=1", upload)
        head = await stream.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 200
        info = json.loads(await read_body(stream))
        assert info["body_size"] == len(upload)
        assert info["body_sha256"] == hashlib.sha256(upload).hexdigest()
        assert info["raw_path"] == "/upload" and info["query_string"] == "x=1"
        stream.close()

        stream = await edge.request("big", "GET", f"/bytes/{BIG}".encode())
        head = await stream.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 200
        body = await read_body(stream)
        block = pattern_block()
        assert len(body) == BIG
        assert body == (block * (BIG // len(block) + 1))[:BIG]
        stream.close()
        # The control node counts what its relay saw, as a single node counts what its edge saw.
        await wait_until(lambda: tunnel.requests == 2 and tunnel.streams_open == 0)
        assert tunnel.bytes_in == len(upload) and tunnel.bytes_out >= BIG
        # Nothing left behind in either table.
        agent_session = control.registry.get("big").session
        assert not agent_session.streams and not edge.link.streams


async def test_a_wrong_tunnel_session_is_answered_moved(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="moved"),
        raw_edge(nats_server, control) as edge,
    ):
        tunnel = control.tunnel("moved")
        assert tunnel is not None
        stream = await edge.request("moved", "GET", b"/", session=tunnel.session + 1)
        with pytest.raises(StreamReset) as caught:
            await stream.wait_head(10)
        assert caught.value.code == p.ResetCode.MOVED
        assert f"session {tunnel.session + 1}" in caught.value.message and control.node in caught.value.message
        assert upstream.requests == []  # it never reached the agent: the edge may retry elsewhere
        assert tunnel.streams_open == 0 and tunnel.requests == 0
        # The right session works on the same link.
        stream = await edge.request("moved", "GET", b"/status/204")
        head = await stream.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 204


async def test_the_stream_limit_is_answered_refused_with_the_503_sentence(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a", max_streams_per_tunnel=1) as control,
        start_agent(control, upstream.port, subdomain="busy"),
        raw_edge(nats_server, control) as edge,
    ):
        tunnel = control.tunnel("busy")
        assert tunnel is not None
        first = await edge.request("busy", "GET", b"/hold/one")
        await upstream.gate("one-arrived").wait()
        assert tunnel.streams_open == 1
        second = await edge.request("busy", "GET", b"/")
        with pytest.raises(StreamReset) as caught:
            await second.wait_head(10)
        assert caught.value.code == p.ResetCode.REFUSED
        assert caught.value.message == "Tunnel busy is busy (1 requests in flight); retry shortly.\n"
        upstream.gate("one").set()
        head = await first.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 200
        assert await read_body(first) == b"released one\n"
        first.close()
        await wait_until(lambda: tunnel.streams_open == 0 and tunnel.requests == 1)


async def test_a_websocket_is_relayed_with_its_close_code(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="ws"),
        raw_edge(nats_server, control) as edge,
    ):
        tunnel = control.tunnel("ws")
        assert tunnel is not None
        stream = await edge.request("ws", "GET", b"/ws/mirror", websocket=True)
        head = await stream.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 101
        assert tunnel.websockets_open == 1 and tunnel.streams_open == 1
        await stream.send_data("héllo".encode(), p.FLAG_TEXT | p.FLAG_FIN)
        assert await stream.receive_message() == "héllo"
        await stream.send_data(b"\x00\x01", p.FLAG_FIN)
        assert await stream.receive_message() == b"\x00\x01"
        stream.close()
        await wait_until(lambda: tunnel.websockets_open == 0 and tunnel.streams_open == 0)

        stream = await edge.request("ws", "GET", b"/ws/close/4321", websocket=True)
        head = await stream.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 101
        assert await stream.receive_message() is None
        assert stream.ws_close == (4321, "upstream closes")
        stream.close()
        await wait_until(lambda: tunnel.websockets_open == 0 and tunnel.streams_open == 0)


async def test_the_end_of_either_session_resets_the_other_side(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="ends") as agent,
        raw_edge(nats_server, control) as edge,
    ):
        tunnel = control.tunnel("ends")
        assert tunnel is not None
        # The link ends: the agent's stream is cancelled (its local request is dropped).
        await edge.request("ends", "GET", b"/hold/a")
        await upstream.gate("a-arrived").wait()
        agent_session = control.registry.get("ends").session
        assert len(agent_session.streams) == 1
        edge.link.ws.fail("the test ends the link", tell_peer=True)  # type: ignore[attr-defined]
        await wait_until(lambda: tunnel.streams_open == 0 and not agent_session.streams)

    async with (
        control_node(nats_server, tmp_path / "b") as control,
        start_agent(control, upstream.port, subdomain="ends2") as agent,
        raw_edge(nats_server, control) as edge,
    ):
        # The agent's session ends: the edge's stream fails before a head, with the reason.
        stream = await edge.request("ends2", "GET", b"/hold/b")
        await upstream.gate("b-arrived").wait()
        await agent.agent.close()
        with pytest.raises(StreamReset) as caught:
            await stream.wait_head(10)
        assert caught.value.code == p.ResetCode.INTERNAL
        assert caught.value.message.startswith("tunnel session ended")


async def test_an_agent_overrunning_its_credit_ends_only_its_own_session(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a", stream_window=65536) as control,
        start_agent(control, upstream.port, subdomain="good"),
        raw_edge(nats_server, control) as edge,
    ):
        ws, welcome = await raw_hello(control, subdomain="bad")
        assert welcome.type == p.FrameType.WELCOME and welcome.payload["window"] == 65536
        stream = await edge.request("bad", "GET", b"/")
        request = None
        with anyio.fail_after(10):
            while request is None:
                message = await ws.receive()
                assert isinstance(message, bytes)
                request = next((f for f in p.decode_message(message) if f.type == p.FrameType.REQUEST), None)
        # The agent answers and sends one byte more than the window the edge (through the relay) gave.
        frames = [p.encode(p.FrameType.RESPONSE, request.stream, p.ResponseHead(200, []).to_payload())]
        frames += [p.encode_data(request.stream, b"x" * 16384) for _ in range(4)]
        frames.append(p.encode_data(request.stream, b"!"))
        await ws.send(b"".join(frames))
        closed, _ = await receive_until_closed(ws)
        assert closed.code == 1002  # a protocol error, as on a single node
        with pytest.raises(StreamReset) as caught:
            with anyio.fail_after(10):
                head = await stream.wait_head(10)
                assert isinstance(head, p.ResponseHead) and head.status == 200
                await read_body(stream)
        assert "tunnel session ended" in caught.value.message
        await wait_until(lambda: control.tunnel("bad") is None)
        # The link, shared with the other tunnel, is untouched.
        assert edge.link.closed is None
        other = await edge.request("good", "GET", b"/status/204")
        head = await other.wait_head(10)
        assert isinstance(head, p.ResponseHead) and head.status == 204
