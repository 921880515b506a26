"""Links between two nodes over a real nats-server: a plain comzy Session on each side.

Two NatsNodes in one process, each with its own NATS connection (as two processes would have):
node A opens links (an edge), node B accepts them and echoes every request body (a stand-in for
the control node's relay). Faults are made for real: forged link messages from a third NATS
client, a node's NATS connection closed, nats-server killed and restarted on its port and store.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import nats
import pytest

from comzy.core import protocol as p
from comzy.core.cluster.connection import BusDown, NatsNode
from comzy.core.cluster.link import LINK_HEADER, LinkKind, Links, decode_header, encode_header
from comzy.core.session import Session
from comzy.core.stream import Stream, StreamReset
from tests.cluster.conftest import NATS_SERVER, NatsServer, cluster_settings, wait_linkable
from tests.helpers import unavailable, wait_until

pytestmark = pytest.mark.anyio

WINDOW = 256 * 1024


@dataclass
class Pair:
    """Node A (opens links) and node B (accepts them and echoes request bodies)."""

    a: NatsNode
    a_links: Links
    b: NatsNode
    b_links: Links
    accepted: list[tuple[Session, str]] = field(default_factory=list)
    closed_a: list[tuple[str, str]] = field(default_factory=list)
    closed_b: list[tuple[str, str]] = field(default_factory=list)
    #: What B's echo saw: (bytes received, the most B's stream ever held beyond its window).
    echoed: list[tuple[int, int]] = field(default_factory=list)

    def link(self) -> Session:
        return self.a_links.get(self.b.node_id)


async def _echo(stream: Stream, head: p.RequestHead, pair: Pair) -> None:
    """B's side of a stream: answer 200 and send back every byte of the body, as it comes."""
    await stream.session.send(p.encode(p.FrameType.RESPONSE, stream.id, p.ResponseHead(
        200, [(b"x-method", head.method.encode())]).to_payload()))
    received, most = 0, -WINDOW
    try:
        while True:
            most = max(most, stream._buffered - stream._window)
            chunk = await stream.receive()
            if chunk is None:
                break
            received += len(chunk[0])
            await stream.send_data(chunk[0])
        stream.send_end()
    except StreamReset:
        pass
    pair.echoed.append((received, most))


@asynccontextmanager
async def pair_of_nodes(nats_server: NatsServer, **overrides: object) -> AsyncIterator[Pair]:
    a = NatsNode(cluster_settings(nats_server, node_name="edge", **overrides), "edge", max_request_head=65536)
    b = NatsNode(cluster_settings(nats_server, node_name="ctl", **overrides), "control", max_request_head=65536)
    link_timeout = float(overrides.get("cluster_link_timeout", 2.0))  # type: ignore[arg-type]
    a_links = Links(a, link_timeout=link_timeout, window=WINDOW)
    b_links = Links(b, link_timeout=link_timeout, window=WINDOW)
    pair = Pair(a, a_links, b, b_links)
    async with anyio.create_task_group() as tg:

        def accept(session: Session, peer: str) -> None:
            pair.accepted.append((session, peer))
            session.on_request = lambda stream, head: tg.start_soon(_echo, stream, head, pair)

        b_links.on_accept(accept)
        a_links.on_link_closed(lambda peer, reason: pair.closed_a.append((peer, reason)))
        b_links.on_link_closed(lambda peer, reason: pair.closed_b.append((peer, reason)))
        for node, links in ((a, a_links), (b, b_links)):
            await node.start(tg)
            await links.start(tg)
        await wait_linkable(a, b)
        try:
            yield pair
        finally:
            for node, links in ((a, a_links), (b, b_links)):
                await links.stop()
                await node.stop()
            tg.cancel_scope.cancel()


async def roundtrip(session: Session, body: bytes, chunk: int = 64 * 1024) -> bytes:
    """POST ``body`` on a new stream of ``session`` and read the echo back, concurrently."""
    stream = session.open_stream(window=WINDOW, credit=WINDOW)
    head = p.RequestHead("POST", b"/echo", [], has_body=bool(body))
    await session.send(p.encode(p.FrameType.REQUEST, stream.id, head.to_payload()))
    echoed = bytearray()

    async def upload() -> None:
        for offset in range(0, len(body), chunk):
            await stream.send_data(body[offset:offset + chunk])
        stream.send_end()

    async with anyio.create_task_group() as tg:
        tg.start_soon(upload)
        response = await stream.wait_head(timeout=10)
        assert isinstance(response, p.ResponseHead) and response.status == 200
        while (piece := await stream.receive()) is not None:
            echoed += piece[0]
    stream.close()
    return bytes(echoed)


async def test_a_body_flows_both_ways_through_sessions_over_nats(nats_server: NatsServer) -> None:
    body = os.urandom(3 * 512 * 1024 + 12345)  # ~1.5 MiB: six windows each way
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert pair.a_links.get(pair.b.node_id) is link  # one link per peer, opened on demand
        with anyio.fail_after(20):
            echoed = await roundtrip(link, body)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
            # Both directions at once on one link: the streams do not wait on each other.
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(roundtrip, link, body[:300_000])
        assert [peer for _, peer in pair.accepted] == [pair.a.node_id]
        # Credit flow control held across NATS: B never had more than its window buffered.
        assert pair.echoed and all(received in (len(body), 300_000) and most <= 0
                                   for received, most in pair.echoed), pair.echoed
        # Coalesced link messages stay under NATS's max_payload (1 MiB by default).
        assert pair.a_links.coalesce_limit <= pair.a.max_payload - LINK_HEADER.size
        assert not pair.closed_a and not pair.closed_b


async def test_open_stream_takes_the_far_end_windows(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        stream = link.open_stream(window=128 * 1024, credit=1024 * 1024)
        assert (stream._window, stream._credit) == (128 * 1024, 1024 * 1024)
        default = link.open_stream()
        assert (default._window, default._credit) == (WINDOW, WINDOW)


async def forge(nats_server: NatsServer, subject: str, payload: bytes, listen: str | None = None) -> list[bytes]:
    """Publish ``payload`` on ``subject`` from a third NATS client; returns the list that
    collects what arrives on ``listen`` (kept open until the test's nats-server stops)."""
    client = await nats.connect(nats_server.url)
    received: list[bytes] = []
    if listen is not None:
        async def collect(msg: nats.aio.msg.Msg) -> None:
            received.append(msg.data)

        await client.subscribe(listen, cb=collect)
        await client.flush()
    await client.publish(subject, payload)
    await client.flush()
    _FORGERS.append(client)
    return received


_FORGERS: list[nats.aio.client.Client] = []


@pytest.fixture(autouse=True)
async def _close_forgers() -> AsyncIterator[None]:
    yield
    while _FORGERS:
        await _FORGERS.pop().close()


async def test_a_sequence_gap_closes_the_link_with_the_reason(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"hello") == b"hello"
        transport = pair.a_links._links[pair.b.node_id].transport
        subjects = pair.a.subjects
        # Five of A's link messages "lost": the next one B sees is five ahead.
        forged = encode_header(LinkKind.FRAMES, transport.epoch, transport._send_seq + 5)
        await forge(nats_server, subjects.link(pair.b.node_id, pair.a.node_id),
                    forged + p.encode(p.FrameType.PING, 0, b"12345678"))
        await wait_until(lambda: pair.closed_b and pair.closed_a, timeout=10)
        assert pair.closed_b[0][0] == pair.a.node_id
        assert "lost 5 link messages" in pair.closed_b[0][1]
        # B told A (BYE), so A's side ended at once too, with B's reason.
        assert "ended the link: lost 5 link messages" in pair.closed_a[0][1]
        assert link.closed is not None
        # The next use opens a new link (a new epoch) that works.
        fresh = pair.link()
        assert fresh is not link
        assert await roundtrip(fresh, b"again") == b"again"


async def test_a_stray_epoch_is_answered_with_one_bye(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        subjects = pair.b.subjects
        ghost = "ghost-0badf00d"
        to_b = subjects.link(pair.b.node_id, ghost)
        frames = p.encode(p.FrameType.PING, 0, b"12345678")
        byes = await forge(nats_server, to_b, encode_header(LinkKind.FRAMES, 77, 3) + frames,
                           listen=subjects.link(ghost, pair.b.node_id))
        await forge(nats_server, to_b, encode_header(LinkKind.FRAMES, 77, 4) + frames)  # same epoch: no 2nd BYE
        await forge(nats_server, to_b, encode_header(LinkKind.FRAMES, 78, 9) + frames)
        await wait_until(lambda: len(byes) >= 2, timeout=10)
        headers = [decode_header(bye) for bye in byes]
        assert headers[:2] == [(LinkKind.BYE, 77, 0), (LinkKind.BYE, 78, 0)], headers
        assert byes[0][LINK_HEADER.size:] == b"unknown link epoch"
        assert not pair.accepted  # a stray message opens nothing
        # A node that only opens links answers any inbound one with a BYE.
        to_a = subjects.link(pair.a.node_id, ghost)
        refused = await forge(nats_server, to_a, encode_header(LinkKind.FRAMES, 5, 0) + frames,
                              listen=subjects.link(ghost, pair.a.node_id))
        await wait_until(lambda: refused, timeout=10)
        assert refused[0][LINK_HEADER.size:] == b"this node opens links, it accepts none"


async def test_a_dead_peer_closes_the_link_at_once_via_no_responders(nats_server: NatsServer) -> None:
    # A long link timeout: only NATS's 503 can end the link within the bound below.
    async with pair_of_nodes(nats_server, cluster_link_timeout=30.0) as pair:
        link = pair.link()
        assert await roundtrip(link, b"x") == b"x"
        await pair.b.nc.close()  # B's process "dies": its subscriptions vanish from nats-server
        # Once nats-server has seen the close (a message sent before that is lost with B, and only
        # the next PING would find out: the bound is then a quarter of the link timeout).
        probe = await nats.connect(nats_server.url)
        _FORGERS.append(probe)

        async def b_is_gone() -> bool:
            try:
                await probe.request(pair.a.subjects.links_to(pair.b.node_id).replace("*", "probe"), b"", timeout=1)
            except nats.errors.NoRespondersError:
                return True
            return False

        await wait_until(b_is_gone, timeout=10)
        stream = link.open_stream()
        started = time.monotonic()
        await link.send(p.encode(p.FrameType.REQUEST, stream.id, p.RequestHead("GET", b"/", []).to_payload()))
        with pytest.raises(StreamReset) as reset:
            await stream.wait_head(timeout=10)
        elapsed = time.monotonic() - started
        assert "no responders" in reset.value.message
        assert elapsed < 1.0, elapsed
        await wait_until(lambda: pair.closed_a, timeout=5)
        assert pair.closed_a[0] == (pair.b.node_id, f"node {pair.b.node_id} is gone (no responders on NATS)")


async def test_a_silent_peer_is_caught_by_the_link_heartbeat(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server, cluster_link_timeout=1.0) as pair:
        link = pair.link()
        assert await roundtrip(link, b"x") == b"x"
        # B hangs (as a SIGSTOPped process would): it reads nothing and says nothing, but its
        # subscriptions stay, so NATS sends no 503 and only A's heartbeat can tell.
        b_side = pair.b_links._links[pair.a.node_id]
        b_side.transport.deliver = lambda seq, body: None  # type: ignore[method-assign]
        b_side.session.heartbeat_timeout = 3600.0
        started = time.monotonic()
        await wait_until(lambda: pair.closed_a, timeout=10)
        assert "heartbeat timeout" in pair.closed_a[0][1]
        assert time.monotonic() - started < 1.0 + 1.0  # the timeout plus a sweep or so


async def test_losing_nats_closes_every_link_and_they_come_back_after_a_restart(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"before") == b"before"
        nats_server.kill9()
        await wait_until(lambda: pair.closed_a and pair.closed_b, timeout=10)
        assert pair.closed_a[0][1] == "lost the cluster's message bus (NATS)"
        assert pair.closed_b[0][1] == "lost the cluster's message bus (NATS)"
        assert not pair.a.connected
        with pytest.raises(BusDown):
            pair.link()  # no link opens while NATS is away: an edge answers 502 at once
        nats_server.restart()
        await wait_until(lambda: pair.a.connected and pair.b.connected, timeout=20)
        # nats-py reports connected before the server has B's replayed subscriptions (its flush
        # comes after): a link opened before that gets "no responders" and ends. Both reconnected
        # at once, so wait both ways.
        await wait_linkable(pair.a, pair.b)
        await wait_linkable(pair.b, pair.a)
        fresh = pair.link()
        assert fresh is not link
        assert await roundtrip(fresh, b"after") == b"after"


async def test_the_lease_is_seen_by_other_nodes_and_expires_after_the_ttl(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        a, b = pair.a, pair.b
        await wait_until(lambda: b.node_id in a.live_nodes() and a.node_id in b.live_nodes(), timeout=10)
        info = a.live_nodes()[b.node_id]
        assert (info.role, info.name) == ("control", "ctl")
        assert b.node_id.startswith("ctl-") and len(b.node_id) == len("ctl-") + 8
        # B crashes: its lease is not deleted, so it lasts until the bucket's TTL (1 s) ends it.
        await b.nc.close()
        crashed = time.monotonic()
        await wait_until(lambda: b.node_id not in a.live_nodes(), timeout=10)
        gone_after = time.monotonic() - crashed
        assert 0.3 < gone_after < 5, gone_after


async def test_a_node_that_stops_deletes_its_lease(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server, cluster_node_ttl=30.0) as pair:
        a, b = pair.a, pair.b
        kv = await a.kv_nodes()
        assert (await kv.get(b.node_id)).value
        await b.stop()
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(b.node_id)


async def test_accept_stream_takes_over_requests_on_the_accepting_side(nats_server: NatsServer) -> None:
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"first") == b"first"
        b_session = pair.accepted[0][0]
        seen: list[dict[str, object]] = []

        def moved(stream_id: int, payload: dict[str, object]) -> None:
            seen.append(payload)
            b_session.send_nowait(p.encode_reset(stream_id, p.ResetCode.MOVED, "not here"))

        b_session.accept_stream = moved  # type: ignore[assignment]
        stream = link.open_stream()
        payload = p.RequestHead("GET", b"/x", []).to_payload() | {"al": "demo", "ts": 7}
        await link.send(p.encode(p.FrameType.REQUEST, stream.id, payload))
        with pytest.raises(StreamReset) as reset:
            await stream.wait_head(timeout=10)
        assert (reset.value.code, reset.value.message) == (p.ResetCode.MOVED, "not here")
        assert seen[0]["al"] == "demo" and seen[0]["ts"] == 7  # unknown keys reach the hook as sent
        assert stream.id not in b_session.streams  # None: the hook answered, nothing was opened


async def test_link_messages_fit_a_small_nats_max_payload(tmp_path: Path) -> None:
    if not NATS_SERVER.is_file():
        unavailable(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 262144\n")
    small = NatsServer(tmp_path / "nats-small", "-c", str(conf))
    small.start()
    try:
        async with pair_of_nodes(small) as pair:
            assert pair.a.max_payload == 262144
            sizes: list[int] = []
            spy = await nats.connect(small.url)
            _FORGERS.append(spy)

            async def measure(msg: nats.aio.msg.Msg) -> None:
                sizes.append(len(msg.data))

            await spy.subscribe(pair.a.subjects.link(pair.b.node_id, pair.a.node_id), cb=measure)
            await spy.flush()
            await wait_linkable(pair.a, pair.b)
            body = os.urandom(2 * 1024 * 1024)
            # Several streams at once fill the writer's queue with more than a message may carry.
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(roundtrip, pair.link(), body)
            assert not pair.closed_a, pair.closed_a
            assert sizes and max(sizes) <= 262144, max(sizes)
            assert max(sizes) > 128 * 1024  # frames were still coalesced, up to the limit
    finally:
        small.kill9()


async def test_frames_sent_just_before_a_bye_are_still_read(nats_server: NatsServer) -> None:
    """A peer that sends its last frames and ends the link at once (a BYE right behind them): the
    frames already on the link reach the session before the end does, as on a WebSocket whose
    close follows its last message."""
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"first") == b"first"
        b_session = pair.accepted[0][0]
        seen: list[dict[str, object]] = []

        def take(stream_id: int, payload: dict[str, object]) -> None:
            seen.append(payload)
            b_session.send_nowait(p.encode_reset(stream_id, p.ResetCode.CANCEL, "seen"))

        b_session.accept_stream = take  # type: ignore[assignment]
        transport = pair.a_links._links[pair.b.node_id].transport
        subject = pair.a.subjects.link(pair.b.node_id, pair.a.node_id)
        last = p.encode(p.FrameType.REQUEST, 99, p.RequestHead("GET", b"/last", []).to_payload())
        # One client publishes both, so NATS delivers them in this order and in one burst.
        client = await nats.connect(nats_server.url)
        try:
            await client.publish(subject, encode_header(LinkKind.FRAMES, transport.epoch, transport._send_seq) + last)
            await client.publish(subject, encode_header(LinkKind.BYE, transport.epoch, 0) + b"done")
            await client.flush()
            await wait_until(lambda: pair.closed_b, timeout=10)
        finally:
            await client.close()
        await wait_until(lambda: seen, timeout=10)
        assert seen[0]["t"] == b"/last"


async def test_link_client_hands_messages_over_in_order_and_writes_behind_what_nats_py_queued(
        nats_server: NatsServer) -> None:
    """LinkClient's short path (no subscription task, no flusher task) keeps NATS's order: a direct
    subscription sees every message as published, headers or not, and a write_now never overtakes
    a publish nats-py still holds (it declines, and publish_now queues behind it)."""
    from comzy.core.cluster.connection import LinkClient

    sender, receiver = LinkClient(), LinkClient()
    await sender.connect(servers=[nats_server.url], allow_reconnect=False)
    await receiver.connect(servers=[nats_server.url], allow_reconnect=False)
    try:
        seen: list[tuple[bytes, bytes]] = []
        queued: list[bytes] = []

        async def callback(msg: nats.aio.msg.Msg) -> None:  # nats-py's path: must not be taken
            queued.append(msg.data)

        subscription = await receiver.subscribe("h7.direct.*", cb=callback)
        receiver.direct(subscription, lambda subject, data: seen.append((subject, data)))
        await receiver.flush()
        for number in range(200):
            await sender.publish_now(f"h7.direct.{number % 3}", "", b"%d:" % number, os.urandom(number))
        await sender.publish("h7.direct.h", b"200:", headers={"X-Test": "1"})
        # nats-py holds this one until its flusher runs; what follows must not be written before it.
        await sender.publish("h7.direct.0", b"201:")
        assert sender._pending
        assert not sender.write_now("h7.direct.0", "", b"202:", b"")
        await sender.publish_now("h7.direct.0", "", b"202:", b"")
        await sender.flush()
        await wait_until(lambda: len(seen) == 203, timeout=10)
        assert [int(data.split(b":")[0]) for _, data in seen] == list(range(203))
        assert [subject for subject, _ in seen[:3]] == [b"h7.direct.0", b"h7.direct.1", b"h7.direct.2"]
        assert all(len(data) == len(b"%d:" % n) + n for n, (_, data) in enumerate(seen[:200]))
        assert not queued
        # Closed: nothing is written at once, and publish_now raises nats-py's error (a link ends on it).
        await sender.close()
        assert not sender.write_now("h7.direct.0", "", b"x", b"")
        with pytest.raises(nats.errors.ConnectionClosedError):
            await sender.publish_now("h7.direct.0", "", b"x", b"")
    finally:
        await receiver.close()
        if not sender.is_closed:
            await sender.close()
