"""The edge role over a real nats-server: route lookups, the route cache, and streams over links.

The edge is a real in-process ``comzy-server`` in role edge (public listener, ClusterNode, EdgeRouter)
and visitors are real HTTP clients. The control side is a small stand-in of this module: a NatsNode
with Links that answers lookups on ``P.t.<alias>`` (queue group ``own``) with the reply the design
specifies, checks the REQUEST's ``al``/``ts`` like the relay does (RESET MOVED, RESET REFUSED) and
serves the streams itself. It tests the edge's side of the contract (docs/design/cluster.md 1.2, 1.4,
1.6) independently of the control node's relay.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import msgpack
import nats
import nats.errors
import pytest

from comzy.core import protocol as p
from comzy.core.cluster.connection import NatsNode
from comzy.core.cluster.edge_router import EdgeRouter
from comzy.core.cluster.link import Links
from comzy.core.server import ServerContext, run_server
from comzy.core.session import Session
from comzy.core.stream import Stream, StreamReset
from comzy.core.websocket import Closed, WebSocket, client_handshake
from tests.cluster.conftest import NatsServer, cluster_settings, control_node, wait_linkable
from tests.conftest import RunningAgent, make_settings, start_agent, visitor
from tests.helpers import wait_until
from tests.test_direct_http import request_tasks
from tests.upstream import Upstream, pattern_block

pytestmark = pytest.mark.anyio

#: The stand-in's windows: the edge's streams must start with them (credit end to end).
AGENT_WINDOW = 128 * 1024
STREAM_WINDOW = 192 * 1024
MIB = 1024 * 1024
#: How an aborted visitor connection shows in httpx.
TRANSPORT_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


@dataclass
class FakeControl:
    """A control node stand-in: holds aliases, answers lookups and serves link streams itself."""

    node: NatsNode
    links: Links
    tg: anyio.abc.TaskGroup
    #: alias -> the tunnel session it is held under.
    held: dict[str, int] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    #: Every REQUEST payload that reached this node, as sent.
    requests: list[dict[str, Any]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    #: alias -> how many of its next REQUESTs are answered RESET MOVED.
    moves: dict[str, int] = field(default_factory=dict)
    #: Aliases whose next REQUEST ends the whole link.
    drop_link_next: set[str] = field(default_factory=set)
    #: alias -> how many of its next REQUESTs end the whole link.
    link_drops: dict[str, int] = field(default_factory=dict)
    #: /hold/<name> answers once gates[name] is set (gates[name + "-arrived"] is set on arrival).
    gates: dict[str, anyio.Event] = field(default_factory=dict)
    #: What the stand-in saw of each upload: (bytes received, the most it ever held beyond its window).
    uploads: list[tuple[int, int]] = field(default_factory=list)
    subscriptions: dict[str, Any] = field(default_factory=dict)
    #: Set by a test once its visitor has the head of /abort: the stand-in then drops the link.
    abort_now: anyio.Event = field(default_factory=anyio.Event)
    #: The edge's NATS connection, to probe that it sees a new subscription (see ``hold``).
    prober: Any = None
    #: When set, lookups are answered only once it is set too.
    answer_lookups: anyio.Event | None = None
    #: alias -> how many of its next lookups are answered "retry" (what a re-checking holder says),
    #: and the value sent with them.
    retries: dict[str, int] = field(default_factory=dict)
    retry_value: Any = 0.05

    async def hold(self, alias: str, session: int) -> None:
        """Take ``alias`` under tunnel session ``session`` and answer its lookups."""
        self.held[alias] = session
        if alias not in self.subscriptions:
            subject = self.node.subjects.tunnel(alias)
            self.subscriptions[alias] = await self.node.nc.subscribe(subject, queue="own", cb=self._on_request)
            await self.node.nc.flush()
            if self.prober is not None:
                # As a real edge would, long after a registration: it reaches the new subscription.
                await wait_subscribed(self.prober, subject)

    def gate(self, name: str) -> anyio.Event:
        return self.gates.setdefault(name, anyio.Event())

    async def announce(self, op: str, alias: str, session: int, node: str | None = None) -> None:
        """Publish a tunnel event, as the control role does."""
        event = {"op": op, "alias": alias, "node": node or self.node.node_id, "session": session}
        await self.node.nc.publish(self.node.subjects.tunnel_events, msgpack.packb(event))
        await self.node.nc.flush()

    async def _on_request(self, msg: Any) -> None:
        alias = msg.subject.rpartition(".")[2]
        request = msgpack.unpackb(msg.data)
        if request == {"op": "probe"}:
            await msg.respond(b"")
            return
        assert request == {"op": "lookup"}
        self.lookups.append(alias)
        if self.answer_lookups is not None:
            await self.answer_lookups.wait()
        if self.retries.get(alias, 0) > 0:
            self.retries[alias] -= 1
            await msg.respond(msgpack.packb({"retry": self.retry_value}))
            return
        view = {"alias": alias, "url": f"http://{alias}.localhost", "port": 8000, "client": "10.0.0.9",
                "user": "ann", "since": 1700000000.0, "expires_at": None, "metadata": {"p": {"k": 1}}}
        await msg.respond(msgpack.packb({"node": self.node.node_id, "session": self.held[alias], "tunnel": view,
                                         "aw": AGENT_WINDOW, "sw": STREAM_WINDOW}))

    def accept(self, session: Session, peer: str) -> None:
        session.accept_stream = lambda stream_id, payload: self._stream(session, stream_id, payload)

    def _stream(self, session: Session, stream_id: int, payload: dict[str, Any]) -> Stream | None:
        self.requests.append(payload)
        alias, ts = payload.get("al"), payload.get("ts")
        if self.moves.get(alias, 0) > 0 or self.held.get(alias) != ts:  # type: ignore[arg-type]
            if self.moves.get(alias, 0) > 0:  # type: ignore[arg-type]
                self.moves[alias] -= 1  # type: ignore[index]
            session.send_nowait(p.encode_reset(stream_id, p.ResetCode.MOVED, f"{alias} is not on this node"))
            return None
        if alias in self.refuse:
            session.send_nowait(p.encode_reset(stream_id, p.ResetCode.REFUSED,
                                               f"Tunnel {alias} is busy (2 requests in flight); retry shortly."))
            return None
        if alias in self.drop_link_next or self.link_drops.get(alias, 0) > 0:  # type: ignore[arg-type]
            self.drop_link_next.discard(alias)  # type: ignore[arg-type]
            if self.link_drops.get(alias, 0) > 0:  # type: ignore[arg-type]
                self.link_drops[alias] -= 1  # type: ignore[index]
            self.tg.start_soon(session.close, 1000, "the test dropped the link")
            return None
        # The edge's windows are this node's window (what it may send here) and the agent's (credit).
        stream = Stream(session, stream_id, STREAM_WINDOW, credit=AGENT_WINDOW)
        self.tg.start_soon(self._serve, stream, p.RequestHead.from_payload(payload))
        return stream

    async def _serve(self, stream: Stream, head: p.RequestHead) -> None:
        path = head.target.decode()
        try:
            if path == "/echo":
                await self._respond(stream, 200)
                received, most = 0, -STREAM_WINDOW
                while True:
                    most = max(most, stream._buffered - stream._window)
                    chunk = await stream.receive()
                    if chunk is None:
                        break
                    received += len(chunk[0])
                    await stream.send_data(chunk[0])
                self.uploads.append((received, most))
                stream.send_end()
            elif path.startswith("/bytes/"):
                await self._respond(stream, 200)
                await stream.send_data(os.urandom(int(path.rpartition("/")[2])))
                stream.send_end()
            elif path.startswith("/hold/"):
                name = path.rpartition("/")[2]
                self.gate(f"{name}-arrived").set()
                await self.gate(name).wait()
                await self._respond(stream, 200)
                await stream.send_data(f"released {name}".encode())
                stream.send_end()
            elif path == "/abort":
                # Half a response, then the link is gone: the visitor must not get a clean end.
                await self._respond(stream, 200, [(b"content-type", b"text/plain")])
                await stream.send_data(b"partial ")
                await self.abort_now.wait()
                await stream.session.close(1000, "the test dropped the link mid-response")
            else:
                await self._respond(stream, 200)
                while await stream.receive() is not None:
                    pass
                await stream.send_data(f"{head.method} {path} via {self.node.node_id}".encode())
                stream.send_end()
        except StreamReset:
            pass

    @staticmethod
    async def _respond(stream: Stream, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id,
                                           p.ResponseHead(status, headers or []).to_payload()))


@asynccontextmanager
async def fake_control(nats_server: NatsServer) -> AsyncIterator[FakeControl]:
    node = NatsNode(cluster_settings(nats_server, node_name="ctl"), "control", max_request_head=65536)
    links = Links(node, link_timeout=2.0, window=STREAM_WINDOW)
    async with anyio.create_task_group() as tg:
        control = FakeControl(node, links, tg)
        links.on_accept(control.accept)
        await node.start(tg)
        await links.start(tg)
        try:
            yield control
        finally:
            await links.stop()
            await node.stop()
            tg.cancel_scope.cancel()


@asynccontextmanager
async def edge_node(tmp_path: Path, nats_server: NatsServer, http_server: str | None = None,
                    **cluster: Any) -> AsyncIterator[ServerContext]:
    """An edge node (``http_server``: its public listener, else the suite's)."""
    overrides = {"http_server": http_server} if http_server else {}
    settings = make_settings(tmp_path / "edge", role="edge", **overrides)
    async with run_server(settings, (), cluster_settings(nats_server, node_name="edge", **cluster)) as server:
        yield server


async def wait_subscribed(nc: Any, subject: str) -> None:
    """Wait until ``nc`` reaches a subscription on ``subject`` that another connection just made (the
    nats-server race of conftest.wait_linkable): a probe that is answered or times out got there."""
    with anyio.fail_after(10):
        while True:
            try:
                await nc.request(subject, msgpack.packb({"op": "probe"}), timeout=0.2)
            except nats.errors.NoRespondersError:
                continue
            except nats.errors.TimeoutError:
                return
            return


def router(server: ServerContext) -> EdgeRouter:
    assert isinstance(server.router, EdgeRouter)
    return server.router


@asynccontextmanager
async def edge_and_control(tmp_path: Path, nats_server: NatsServer, http_server: str | None = None,
                           **cluster: Any) -> AsyncIterator[tuple[ServerContext, FakeControl]]:
    async with fake_control(nats_server) as control, \
            edge_node(tmp_path, nats_server, http_server, **cluster) as edge:
        assert edge.cluster is not None
        await wait_linkable(edge.cluster.nats, control.node)
        control.prober = edge.cluster.nats.nc
        yield edge, control


async def test_no_control_node_holds_the_alias_404(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_node(tmp_path, nats_server) as edge, visitor(edge, "nobody") as client:
        assert edge.ports.ws == 0 and edge.registry.entries() == []  # an edge holds no tunnels
        response = await client.get("/")
        assert response.status_code == 404
        assert "Tunnel Not Active" in response.text and "nobody.localhost" in response.text
        # Negative cache: the next visitor of the unknown host gets 404 without asking NATS.
        assert "nobody" in router(edge)._negative
        assert (await client.get("/again")).status_code == 404


async def test_nats_down_at_the_edge_502_with_the_reason(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_node(tmp_path, nats_server) as edge, visitor(edge, "demo") as client:
        assert edge.cluster is not None
        nats_server.kill9()
        await wait_until(lambda: not edge.cluster.nats.connected)  # type: ignore[union-attr]
        response = await client.get("/")
        assert response.status_code == 502
        assert response.text == "This edge cannot reach the cluster's message bus (NATS).\n"
        upgrade = {"connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                   "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
        ws = await client.get("/", headers=upgrade)
        assert ws.status_code == 502 and "message bus" in ws.text
        # NATS back: the edge answers again by itself.
        nats_server.start()
        await wait_until(lambda: edge.cluster.nats.connected)  # type: ignore[union-attr]
        assert (await client.get("/")).status_code == 404


async def test_a_lookup_nobody_answers_in_time_504(tmp_path: Path, nats_server: NatsServer) -> None:
    silent = await nats.connect(nats_server.url)
    try:
        async def ignore(msg: Any) -> None:
            """A holder that never answers (hung, or overloaded)."""

        async with edge_node(tmp_path, nats_server, cluster_lookup_timeout=0.3) as edge:
            assert edge.cluster is not None
            await silent.subscribe(edge.cluster.nats.subjects.tunnel("slow"), queue="own", cb=ignore)
            await silent.flush()
            await wait_subscribed(edge.cluster.nats.nc, edge.cluster.nats.subjects.tunnel("slow"))
            async with visitor(edge, "slow") as client:
                response = await client.get("/")
            assert response.status_code == 504
            assert response.text == "The control node holding slow did not answer the lookup within 0.3 s.\n"
            assert router(edge).cached("slow") is None and "slow" not in router(edge)._negative
    finally:
        await silent.close()


async def test_a_malformed_lookup_reply_is_a_502_naming_it(tmp_path: Path, nats_server: NatsServer) -> None:
    odd = await nats.connect(nats_server.url)
    try:
        async def answer(msg: Any) -> None:
            """A holder of another protocol version: its reply lacks the windows."""
            await msg.respond(msgpack.packb({"node": "ctl-x", "session": 3, "tunnel": {"alias": "odd"}}))

        async with edge_node(tmp_path, nats_server) as edge:
            assert edge.cluster is not None
            await odd.subscribe(edge.cluster.nats.subjects.tunnel("odd"), queue="own", cb=answer)
            await odd.flush()
            await wait_subscribed(edge.cluster.nats.nc, edge.cluster.nats.subjects.tunnel("odd"))
            async with visitor(edge, "odd") as client:
                response = await client.get("/")
            assert response.status_code == 502
            assert response.text == ("The control node holding odd answered the lookup with a malformed reply "
                                     "(KeyError: 'aw').\n")
            assert router(edge).cached("odd") is None
    finally:
        await odd.close()


async def test_a_request_goes_over_the_link_with_the_lookup_windows(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 41)
        response = await client.get("/hello?x=1")
        assert response.status_code == 200
        assert response.text == f"GET /hello?x=1 via {control.node.node_id}"
        assert control.requests[-1]["al"] == "demo" and control.requests[-1]["ts"] == 41
        # The route is cached: more requests, no more lookups.
        for _ in range(3):
            assert (await client.get("/hello")).status_code == 200
        assert control.lookups == ["demo"]
        entry = router(edge).cached("demo")
        assert entry is not None and entry.node == control.node.node_id
        assert (entry.peer_window, entry.stream_window) == (AGENT_WINDOW, STREAM_WINDOW)
        # server.tunnel on an edge answers from the cache: the control node's snapshot.
        tunnel = edge.tunnel("demo")
        assert tunnel is not None and tunnel.session == 41 and tunnel.user == "ann"
        assert tunnel.node == control.node.node_id
        assert tunnel.metadata == {"p": {"k": 1}} and tunnel.client_address == "10.0.0.9"
        assert edge.tunnel("other") is None


async def test_bodies_larger_than_the_window_stream_both_ways(tmp_path: Path, nats_server: NatsServer) -> None:
    body = os.urandom(3 * 1024 * 1024 + 7)
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), 100_000):
                yield body[offset:offset + 100_000]

        response = await client.post("/echo", content=chunks())
        assert response.status_code == 200
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()
        # Credit held end to end: the far side never had more than its window waiting.
        assert control.uploads == [(len(body), control.uploads[0][1])] and control.uploads[0][1] <= 0
        download = await client.get(f"/bytes/{5 * 1024 * 1024}")
        assert download.status_code == 200 and len(download.content) == 5 * 1024 * 1024


async def test_refused_by_the_control_node_503_with_retry_after(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        control.refuse.add("demo")
        response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.text == "Tunnel demo is busy (2 requests in flight); retry shortly.\n"


async def test_moved_drops_the_route_and_retries_once(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200
        # The tunnel came back under a new session the edge has not heard of (a lost event).
        control.held["demo"] = 8
        response = await client.post("/", content=b"")
        assert response.status_code == 200, response.text
        assert [r["ts"] for r in control.requests] == [7, 7, 8]
        assert control.lookups == ["demo", "demo"]
        # MOVED twice in a row: one retry only, then 502 with the reason.
        control.moves["demo"] = 2
        response = await client.get("/")
        assert response.status_code == 502
        assert response.text == "The tunnel moved to another node during the request; retry.\n"


async def test_a_request_whose_body_was_sent_is_not_retried_after_moved(tmp_path: Path,
                                                                        nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200
        control.held["demo"] = 8
        # The body goes out with the head (no wait for credit): it was consumed, so no retry.
        response = await client.post("/", content=b"x" * 1000)
        assert response.status_code == 502
        assert "moved to another node" in response.text
        assert router(edge).cached("demo") is None  # MOVED dropped the route all the same
        assert (await client.post("/", content=b"x")).status_code == 200


async def test_link_lost_before_the_head_retries_only_safe_requests(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200
        first_link = router(edge).cached("demo").session  # type: ignore[union-attr]
        control.drop_link_next.add("demo")
        response = await client.get("/again")
        assert response.status_code == 200, response.text  # a GET without a body: retried on a new link
        assert first_link.closed is not None
        assert router(edge).cached("demo").session is not first_link  # type: ignore[union-attr]
        await wait_linkable(edge.cluster.nats, control.node)  # type: ignore[union-attr]
        control.drop_link_next.add("demo")
        response = await client.post("/", content=b"payload")
        assert response.status_code == 502
        assert response.text.startswith("The tunnel failed before a response: tunnel session ended: ")
        assert "the test dropped the link" in response.text


async def test_the_link_lost_after_the_head_aborts_the_visitor(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        async with client.stream("GET", "/abort") as response:
            assert response.status_code == 200  # the head went out before the link died
            control.abort_now.set()
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # never a clean, truncated 200
                await response.aread()


async def test_tunnel_events_invalidate_routes_and_the_negative_cache(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        routes = router(edge)
        assert (await client.get("/")).status_code == 404
        assert "demo" in routes._negative
        # The alias comes up: the event clears the negative entry at once (no 2 s of 404s).
        await control.hold("demo", 7)
        await control.announce("up", "demo", 7)
        await wait_until(lambda: "demo" not in routes._negative)
        assert (await client.get("/")).status_code == 200
        # Our own route announced again: kept. Another session's down: kept. Ours down: dropped.
        await control.announce("up", "demo", 7)
        await control.announce("down", "demo", 6)
        assert (await client.get("/")).status_code == 200
        assert control.lookups == ["demo"]
        await control.announce("down", "demo", 7)
        await wait_until(lambda: routes.cached("demo") is None)
        # Up on another node: the cached route goes too.
        assert (await client.get("/")).status_code == 200
        await control.announce("up", "demo", 12, node="ctl-elsewhere")
        await wait_until(lambda: routes.cached("demo") is None)


async def test_a_dead_link_drops_its_routes(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "a") as a:
        await control.hold("a", 1)
        await control.hold("b", 2)
        assert (await a.get("/")).status_code == 200
        async with visitor(edge, "b") as b:
            assert (await b.get("/")).status_code == 200
        routes = router(edge)
        assert routes.cached("a") is not None and routes.cached("b") is not None
        link = routes.cached("a").session  # type: ignore[union-attr]
        await link.close(1000, "test")
        await wait_until(lambda: len(routes) == 0 and not routes._by_node)


async def test_the_route_cache_is_bounded(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control):
        routes = router(edge)
        routes.cache_size, routes.negative_size = 2, 2
        for index, alias in enumerate(("a", "b", "c")):
            await control.hold(alias, index)
            assert await routes.lookup(alias) is not None
        assert list(routes._routes) == ["b", "c"] and routes._by_node == {control.node.node_id: {"b", "c"}}
        for alias in ("x", "y", "z"):
            assert await routes.lookup(alias) is None
        assert list(routes._negative) == ["y", "z"]


async def test_concurrent_visitors_of_a_cold_alias_share_one_lookup(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await client.get("/")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        assert statuses == [200] * 8
        assert control.lookups == ["demo"]


# -- end to end: edge -> NATS -> real control node (relay) -> real agent -> real upstream ----------

@dataclass
class Stack:
    """An edge and a control node in this process, an agent on the control node, its upstream."""

    edge: ServerContext
    control: ServerContext
    agent: RunningAgent
    upstream: Upstream

    def visitor(self, **kwargs: Any) -> httpx.AsyncClient:
        return visitor(self.edge, self.agent.alias, **kwargs)


@asynccontextmanager
async def stack(tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> AsyncIterator[Stack]:
    async with (control_node(nats_server, tmp_path / "ctl") as control,
                edge_node(tmp_path, nats_server) as edge):
        assert edge.cluster is not None and control.cluster is not None
        await wait_linkable(edge.cluster.nats, control.cluster.nats)
        async with start_agent(control, upstream.port) as agent:
            # The lookup subject exists once the agent has its WELCOME; wait until the edge's
            # connection reaches it (the nats-server race of conftest.wait_linkable).
            await wait_subscribed(edge.cluster.nats.nc, edge.cluster.nats.subjects.tunnel(agent.alias))
            yield Stack(edge, control, agent, upstream)


def digest_of_pattern(total: int) -> str:
    """sha256 of the first ``total`` bytes of the upstream's download pattern."""
    block, digest, left = pattern_block(), hashlib.sha256(), total
    while left:
        digest.update(block[:min(len(block), left)])
        left -= min(len(block), left)
    return digest.hexdigest()


async def test_end_to_end_requests_through_an_edge(tmp_path: Path, nats_server: NatsServer,
                                                   upstream: Upstream) -> None:
    async with stack(tmp_path, nats_server, upstream) as s, s.visitor() as client:
        response = await client.get("/some/path?q=1", headers={"x-test": "yes"})
        assert response.status_code == 200, response.text
        info = response.json()
        assert (info["method"], info["raw_path"], info["query_string"]) == ("GET", "/some/path", "q=1")
        assert ["x-test", "yes"] in info["headers"]
        posted = (await client.post("/form", content=b"a=1&b=2")).json()
        assert posted["body_size"] == 7 and posted["body_sha256"] == hashlib.sha256(b"a=1&b=2").hexdigest()
        # The edge serves it from its route cache; the control node counts the exchanges.
        assert s.edge.registry.entries() == []
        snapshot = s.edge.tunnel(s.agent.alias)
        held = s.control.tunnel(s.agent.alias)
        assert snapshot is not None and held is not None
        assert (snapshot.session, snapshot.node) == (held.session, s.control.node)
        await wait_until(lambda: held.requests == 2 and held.streams_open == 0)


async def test_end_to_end_bodies_larger_than_the_window_both_ways(tmp_path: Path, nats_server: NatsServer,
                                                                  upstream: Upstream) -> None:
    body = os.urandom(6 * MIB + 3)
    async with stack(tmp_path, nats_server, upstream) as s, s.visitor() as client:

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), 256 * 1024):
                yield body[offset:offset + 256 * 1024]

        info = (await client.post("/upload", content=chunks())).json()
        assert info["body_size"] == len(body) and info["body_sha256"] == hashlib.sha256(body).hexdigest()
        total = 24 * MIB
        digest, received = hashlib.sha256(), 0
        async with client.stream("GET", f"/bytes/{total}") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
        assert received == total and digest.hexdigest() == digest_of_pattern(total)


async def test_end_to_end_sse_arrives_event_by_event(tmp_path: Path, nats_server: NatsServer,
                                                     upstream: Upstream) -> None:
    async with (stack(tmp_path, nats_server, upstream) as s, s.visitor() as client,
                client.stream("GET", "/sse") as response):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.aiter_lines()
        for i in range(3):
            upstream.gate(f"sse{i}").set()  # the next event exists only after the previous one arrived
            with anyio.fail_after(10):
                assert await anext(lines) == f"data: event {i}"
                assert await anext(lines) == ""


async def test_end_to_end_websocket_echo_and_close_code(tmp_path: Path, nats_server: NatsServer,
                                                        upstream: Upstream) -> None:
    async with stack(tmp_path, nats_server, upstream) as s:
        tcp = await anyio.connect_tcp("127.0.0.1", s.edge.ports.http)
        ws: WebSocket
        ws, accept = await client_handshake(tcp, f"{s.agent.alias}.{s.edge.settings.base_domain}", "/ws",
                                            4 * MIB, subprotocols=["chat"])
        try:
            assert accept.subprotocol == "chat"
            big = os.urandom(MIB)
            with anyio.fail_after(20):
                for message, answer in (("hello", "echo:hello"), (b"\x00\xff", b"echo:\x00\xff"), ("", "echo:"),
                                        (big, b"echo:" + big)):
                    await ws.send(message)
                    assert await ws.receive() == answer
                await ws.send("close:4001")
                closed = await ws.receive()
            assert isinstance(closed, Closed) and (closed.code, closed.reason) == (4001, "asked")
        finally:
            await ws.aclose()


async def test_end_to_end_agent_lost_mid_response_aborts_the_visitor(tmp_path: Path, nats_server: NatsServer,
                                                                      upstream: Upstream) -> None:
    async with stack(tmp_path, nats_server, upstream) as s, s.visitor() as client:
        session = s.agent.agent.session
        assert session is not None
        received = 0
        async with client.stream("GET", f"/bytes/{512 * MIB}") as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            while received < MIB:
                received += len(await anext(chunks))
            await session.ws.aclose()  # the agent's connection drops without a goodbye
            with pytest.raises(TRANSPORT_ERRORS):  # never a clean, truncated 200
                async for chunk in chunks:
                    received += len(chunk)
        assert received < 512 * MIB


async def test_end_to_end_the_control_nodes_stream_limit_is_a_503(tmp_path: Path, nats_server: NatsServer,
                                                                  upstream: Upstream) -> None:
    async with (control_node(nats_server, tmp_path / "ctl", max_streams_per_tunnel=1) as control,
                edge_node(tmp_path, nats_server) as edge):
        assert edge.cluster is not None and control.cluster is not None
        await wait_linkable(edge.cluster.nats, control.cluster.nats)
        async with start_agent(control, upstream.port) as agent, visitor(edge, agent.alias) as client:
            await wait_until(lambda: control.tunnel(agent.alias) is not None)
            results: list[httpx.Response] = []

            async def held() -> None:
                results.append(await client.get("/hold/first"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(held)
                with anyio.fail_after(20):
                    await upstream.gate("first-arrived").wait()
                busy = await client.get("/second")
                assert busy.status_code == 503
                assert busy.headers["retry-after"] == "1"
                assert busy.text == f"Tunnel {agent.alias} is busy (1 requests in flight); retry shortly.\n"
                upstream.gate("first").set()
            assert results[0].status_code == 200 and results[0].text == "released first\n"


async def test_end_to_end_the_edge_follows_a_tunnel_to_its_new_session(tmp_path: Path, nats_server: NatsServer,
                                                                       upstream: Upstream) -> None:
    async with stack(tmp_path, nats_server, upstream) as s, s.visitor() as client:
        assert (await client.get("/before")).status_code == 200
        old = s.edge.tunnel(s.agent.alias)
        assert old is not None
        session = s.agent.agent.session
        assert session is not None
        await session.ws.aclose()  # the agent's connection drops; it comes back with its resume secret
        await wait_until(lambda: (t := s.control.tunnel(s.agent.alias)) is not None and t.session != old.session)
        # The registry has the new session a moment before the control node's new subscription
        # is seen by the edge's connection (the nats-server race of conftest.wait_linkable); a
        # loaded machine widened that moment into a 404 here.
        assert s.edge.cluster is not None
        await wait_subscribed(s.edge.cluster.nats.nc, s.edge.cluster.nats.subjects.tunnel(s.agent.alias))
        response = await client.get("/after")
        assert response.status_code == 200, response.text
        new = s.edge.tunnel(s.agent.alias)
        assert new is not None and new.session == s.control.tunnel(s.agent.alias).session  # type: ignore[union-attr]


async def test_a_visitor_who_leaves_does_not_cancel_the_shared_lookup(tmp_path: Path,
                                                                      nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control):
        await control.hold("demo", 7)
        control.answer_lookups = anyio.Event()
        routes = router(edge)
        results: list[Any] = []
        leaves = anyio.CancelScope()

        async def starter() -> None:
            with leaves:
                await routes.lookup("demo")
            results.append("left")

        async def stays() -> None:
            results.append("joined")
            results.append(await routes.lookup("demo"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(starter)
            await wait_until(lambda: control.lookups == ["demo"])
            tg.start_soon(stays)
            await wait_until(lambda: "joined" in results)
            leaves.cancel()  # the visitor whose request started the lookup goes away
            await wait_until(lambda: "left" in results)
            control.answer_lookups.set()
        entry = results[-1]
        assert entry is not None and entry.tunnel.session == 7
        assert control.lookups == ["demo"] and routes.cached("demo") is entry


async def test_a_holder_that_says_retry_is_asked_again_within_the_timeout(tmp_path: Path,
                                                                           nats_server: NatsServer) -> None:
    """A control node re-checking its claim answers "retry": the edge asks again shortly and serves
    the visitor, instead of waiting out its lookup timeout as for a silent node (504)."""
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        control.retries["demo"] = 3
        response = await client.get("/")
        assert response.status_code == 200, response.text
        assert control.lookups == ["demo"] * 4


async def test_a_holder_that_keeps_saying_retry_ends_in_504_at_the_timeout(tmp_path: Path,
                                                                          nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server, cluster_lookup_timeout=0.5) as (edge, control), \
            visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        control.retries["demo"] = 1_000
        response = await client.get("/")
        assert response.status_code == 504
        assert "did not answer the lookup within 0.5 s" in response.text
        assert 2 <= len(control.lookups) <= 60  # asked again, at most every MIN_RETRY


@pytest.mark.parametrize("value", ["soon", True, None])
async def test_a_malformed_retry_is_a_502_naming_it(tmp_path: Path, nats_server: NatsServer, value: Any) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        control.retries["demo"], control.retry_value = 1, value
        response = await client.get("/")
        assert response.status_code == 502
        assert "malformed reply" in response.text


# -- the same contract on the edge's plain path (uvicorn-direct: no ASGI, no task per request) -------

async def test_a_plain_request_sent_again_after_moved_waits_without_a_task(tmp_path: Path,
                                                                          nats_server: NatsServer) -> None:
    # The taskless path is uvicorn-direct's: pinned, whatever listener the suite runs on.
    async with edge_and_control(tmp_path, nats_server, http_server="uvicorn-direct") as (edge, control), \
            visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200  # looked up (the ASGI path): the route is cached
        control.held["demo"] = 8  # a new session the edge has not heard of: RESET MOVED
        async with anyio.create_task_group() as tg:
            answers: list[httpx.Response] = []

            async def visit() -> None:
                answers.append(await client.get("/hold/moved"))

            tg.start_soon(visit)
            with anyio.fail_after(10):
                await control.gate("moved-arrived").wait()
            assert request_tasks() == []  # the lookup after MOVED ran in a task; the wait for the head does not
            control.gate("moved").set()
        assert answers[0].status_code == 200 and answers[0].text == "released moved"
        assert [r["ts"] for r in control.requests] == [7, 7, 8]
        assert control.lookups == ["demo", "demo"]


async def test_a_plain_get_whose_link_is_lost_twice_is_502_after_one_retry(tmp_path: Path,
                                                                           nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200
        control.link_drops["demo"] = 2
        response = await client.get("/twice")
        assert response.status_code == 502
        assert response.text.startswith("The tunnel failed before a response: tunnel session ended: ")
        assert "the test dropped the link" in response.text
        assert [r["ts"] for r in control.requests] == [7, 7, 7]  # sent twice, not three times
        assert control.lookups == ["demo", "demo"]


async def test_a_plain_request_refused_by_the_control_node_is_503(tmp_path: Path, nats_server: NatsServer) -> None:
    async with edge_and_control(tmp_path, nats_server) as (edge, control), visitor(edge, "demo") as client:
        await control.hold("demo", 7)
        assert (await client.get("/")).status_code == 200
        control.refuse.add("demo")
        response = await client.head("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
        assert response.headers["content-length"] == str(len("Tunnel demo is busy (2 requests in flight); "
                                                              "retry shortly.\n"))
        assert control.lookups == ["demo"]  # refused by the node holding it: no new lookup
