"""The agent link is bounded: nothing a hostile agent sends, or refuses to read, grows the server.

Each test replays an attack from issue 10 against a real server: a PING flood from an agent that
never reads (RSS went 103 -> 607 MiB in 2 s), and visitors' request heads queued for a stalled
agent (140 -> 248 MiB for 2,000 heads of 60 KB).

The server tests run on role ``all`` and through an edge of a cluster (tests/stack.py): there the
hostile agent is on the control node, and the heads reach it from the edge over a link and the relay.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest

from comzy.core import protocol as p
from comzy.core.server import ServerContext
from comzy.core.session import SEND_BUDGET, Session
from comzy.core.websocket import WebSocket, WebSocketError, client_handshake
from tests.conftest import visitor
from tests.helpers import DisconnectWatcher, receive_until_closed, wait_until
from tests.stack import Stack, Stacks, reachable, stacks_fixture  # noqa: F401 (both kinds)
from tests.test_protocol import ws_pair
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

FT = p.FrameType
LINK_MESSAGE = 4 * 1024 * 1024
#: A receive buffer this small makes an agent that does not read stall the server's sends at once.
SMALL_RCVBUF = 4096


@asynccontextmanager
async def hostile_agent(server: ServerContext) -> AsyncIterator[tuple[WebSocket, str]]:
    """A protocol agent with a tiny receive buffer: HELLO, WELCOME, then whatever the test does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)  # before connect: the window follows it
    sock.connect(("127.0.0.1", server.ports.ws))  # loopback with a listening server: immediate
    sock.setblocking(False)
    stream = await anyio.abc.SocketStream.from_socket(sock)
    ws, _ = await client_handshake(stream, f"127.0.0.1:{server.ports.ws}", "/", LINK_MESSAGE)
    try:
        await ws.send(p.encode(FT.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "hostile/1", "port": 1}))
        welcome = await ws.receive()
        assert isinstance(welcome, bytes)
        [frame] = p.decode_message(welcome)
        assert frame.type == FT.WELCOME
        yield ws, frame.payload["alias"]
    finally:
        await ws.aclose()


class QueueSampler:
    """Records the largest send queue a session reaches while the attack runs."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.largest = 0

    async def run(self) -> None:
        # Sampling, not waiting for readiness: the attack's outcome is checked by the caller.
        while True:
            self.largest = max(self.largest, self.session.queued)
            await anyio.sleep(0.002)


async def check_tunnel(stack: Stack, alias: str) -> None:
    async with visitor(stack.public, alias, timeout=10) as client:
        response = await client.get("/still-serving")
    assert response.status_code == 200, response.text


async def test_ping_flood_from_an_agent_that_never_reads_stays_bounded_and_is_closed(
        stacks: Stacks, upstream: Upstream) -> None:
    watcher = DisconnectWatcher()
    timeout = 1.5
    async with (
        stacks.start([("watcher", watcher)], heartbeat_interval=0.2, heartbeat_timeout=timeout) as stack,
        stack.agent(upstream.port) as healthy,
        hostile_agent(stack.control) as (ws, alias),
        anyio.create_task_group() as tg,
    ):
        sampler = QueueSampler(stack.control.registry.get(alias).session)  # type: ignore[union-attr]
        tg.start_soon(sampler.run)
        flood = p.encode(FT.PING, 0, b"\xff" * p.MAX_PING_PAYLOAD) * 4096  # 72 KiB of PINGs per message
        sent = 0
        started = anyio.current_time()
        # The flood never stops on our side: only the server can end it.
        with anyio.fail_after(timeout + 10):
            while alias not in watcher.ended:
                try:
                    await ws.send(flood)
                except WebSocketError:
                    break
                sent += 4096
            (reason,) = await watcher.wait_for(alias)
        elapsed = anyio.current_time() - started
        tg.cancel_scope.cancel()
        assert sent > 4096 * 10, "the flood hardly started"
        # One PONG owed at a time, however many PINGs: before, each was queued (18 bytes each, unread).
        assert sampler.largest < 1024, f"{sampler.largest} bytes queued for a flooding agent"
        # The flood kept the link busy, yet an agent that answers none of our PINGs is not alive.
        assert "not reading" in reason and "heartbeat timeout" in reason, reason
        assert elapsed < timeout + 5
        await check_tunnel(stack, healthy.alias)


async def test_ping_payload_beyond_8_bytes_closes_the_session(stacks: Stacks, upstream: Upstream) -> None:
    watcher = DisconnectWatcher()
    async with (
        stacks.start([("watcher", watcher)]) as stack,
        stack.agent(upstream.port) as healthy,
        hostile_agent(stack.control) as (ws, alias),
    ):
        await ws.send(p.encode(FT.PING, 0, bytes(1024 * 1024)))  # 1 MiB: it would have been echoed
        closed, frames = await receive_until_closed(ws)
        assert closed.code == 1002
        assert not any(frame.type == FT.PONG for frame in frames)
        with anyio.fail_after(5):
            (reason,) = await watcher.wait_for(alias)
        assert "PING payload of 1048576 bytes exceeds 8" in reason
        await check_tunnel(stack, healthy.alias)


async def test_request_heads_for_a_stalled_agent_are_bounded_then_refused_with_503(
        stacks: Stacks, upstream: Upstream) -> None:
    watcher = DisconnectWatcher()
    timeout = 30.0  # long: the checks must finish before the server gives up on the agent
    requests = 200
    # 200 heads of 200 KB are 40 MB: more than the send budget and the kernel's socket buffers
    # together (loopback's absorbed about 11 MB here), and under the stream limit, so only the
    # budget can refuse them.
    head_limit = 256 * 1024
    big = "x" * 200_000
    async with (
        stacks.start([("watcher", watcher)], heartbeat_interval=0.5, heartbeat_timeout=timeout,
                     max_request_head=head_limit, max_streams_per_tunnel=requests + 10) as stack,
        stack.agent(upstream.port) as healthy,
        hostile_agent(stack.control) as (ws, alias),
        anyio.create_task_group() as tg,
    ):
        session = stack.control.registry.get(alias).session  # type: ignore[union-attr]
        sampler = QueueSampler(session)
        tg.start_soon(sampler.run)
        link_sampler = None
        if stack.public.cluster is not None:
            await reachable(stack.public, alias)
            link_sampler = QueueSampler(stack.public.cluster.links.get(stack.control.node))
            tg.start_soon(link_sampler.run)
        statuses: list[int] = []
        refusals: list[str] = []
        limits = httpx.Limits(max_connections=requests)
        async with visitor(stack.public, alias, timeout=timeout + 10, limits=limits) as client:

            async def one(index: int) -> None:
                try:
                    response = await client.get(f"/heads/{index}", headers={"x-big": big})
                except httpx.HTTPError:
                    statuses.append(0)  # the session ended under it: the connection was aborted
                    return
                statuses.append(response.status_code)
                if response.status_code == 503:
                    refusals.append(response.text)

            async with anyio.create_task_group() as visitors:
                for index in range(requests):
                    visitors.start_soon(one, index)
                await wait_until(lambda: bool(refusals), timeout)
                # The tunnel's own refusal (on a cluster, the control node's, relayed as it is).
                # Through an edge, the burst of heads first fills the edge's queue for the link
                # (the same budget, in front of the agent's): those visitors get the edge's 503.
                tunnel_busy = f"Tunnel {alias} is not keeping up: its agent has not read"
                link_busy = f"The cluster link to node {stack.control.node} is not keeping up"
                assert all(text.startswith(tunnel_busy) or (stack.kind == "cluster" and text.startswith(link_busy))
                           for text in refusals), set(refusals)
                # Heads wait in the server only up to the budget (plus the one admitted last, and
                # small frames); on an edge, in its queue for the link too.
                assert sampler.largest <= SEND_BUDGET + head_limit + 16 * 1024, sampler.largest
                if link_sampler is not None:
                    assert link_sampler.largest <= SEND_BUDGET + head_limit + 16 * 1024, link_sampler.largest
                # The agent goes away (the heartbeat would end it too, later: the flood test shows
                # that): every admitted visitor is answered, none is left hanging.
                await ws.aclose()
        tg.cancel_scope.cancel()
        assert len(statuses) == requests
        # 503: refused; 502 or aborted: admitted, then the agent left; 404: arrived after it left.
        assert set(statuses) <= {503, 502, 404, 0}, statuses
        with anyio.fail_after(10):
            await watcher.wait_for(alias)
        await check_tunnel(stack, healthy.alias)


# The two tests below are Session unit tests (no server): agent links and cluster links are the same
# Session, so they run once.

async def test_reader_stops_reading_while_the_peer_leaves_the_send_budget_unread() -> None:
    async with ws_pair() as (near, far):
        session = Session(near)
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.run)
            stream = session.open_stream()
            # Far more than the kernel's socket buffers can absorb, queued while `far` reads nothing.
            chunk = p.encode_data(stream.id, bytes(p.MAX_DATA_FRAME))
            for _ in range(40 * 1024 * 1024 // len(chunk)):
                session.send_nowait(chunk)
            with anyio.fail_after(10):
                while not session.reading_paused:
                    # Nothing reads `far`, so the queue stays past the budget: the reader pauses
                    # after the next message it reads.
                    await far.send(p.encode(FT.PONG, 0, b"nudge"))
                    await anyio.sleep(0.01)
            await far.send(p.encode_reset(stream.id, p.ResetCode.CANCEL, "while paused"))
            await anyio.sleep(0.3)  # an observation window: a reader that kept reading would see it
            assert not stream.finished, "the reader kept reading past the send budget"

            async def drain() -> None:
                while isinstance(await far.receive(), bytes):
                    pass

            # The peer reads again: the queue drains, the reader resumes and sees the RESET.
            tg.start_soon(drain)
            await wait_until(lambda: stream.finished, 20)
            assert session.closed is None
            assert not session.reading_paused
            await session.close()


async def test_a_peer_that_answers_every_ping_late_but_in_time_is_kept() -> None:
    """PONGs arriving several intervals late (a slow link) still prove the peer reads: every PING
    the timeout spans is remembered, and a late answer settles the ones before it."""
    interval, timeout, delay = 0.05, 1.0, 0.3  # each answer comes 6 intervals after its PING
    async with ws_pair() as (near, far):
        session = Session(near, heartbeat_interval=interval, heartbeat_timeout=timeout)
        answered = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.run)

            async def answer_late(payload: bytes) -> None:
                nonlocal answered
                await anyio.sleep(delay)
                await far.send(p.encode(FT.PONG, 0, payload))
                answered += 1

            async def peer() -> None:
                while isinstance(message := await far.receive(), bytes):
                    for frame in p.decode_message(message):
                        if frame.type == FT.PING:
                            tg.start_soon(answer_late, frame.payload)

            tg.start_soon(peer)
            await anyio.sleep(timeout * 2.5)  # the run under test: it must outlive the timeout
            assert session.closed is None, session.closed
            assert answered >= 20
            await session.close()
            tg.cancel_scope.cancel()
