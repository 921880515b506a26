"""Cluster links run attached (``LinkTransport.attach``): no reader or writer task per link.

Each link message is handed to its session from nats-py's read loop and each send is written to
the NATS socket in the caller's call. These tests pin what that must keep, on both event loops
(the node processes run uvloop): both ends attach, order holds when a write has to queue behind
nats-py's buffer, a session that pauses reading gets nothing until it resumes and its inbox stays
bounded, and a NATS that stops reading stops the session's flushing until it drains.
"""

from __future__ import annotations

import os
import signal

import pytest

from comzy.core import protocol as p
from tests.cluster.conftest import NatsServer
from tests.cluster.test_link import WINDOW, pair_of_nodes, roundtrip
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: uvloop's transports (the node processes' default) are not asyncio's."""
    return request.param  # type: ignore[no-any-return]


async def test_link_sessions_run_attached_on_both_ends(nats_server: NatsServer) -> None:
    """Over plain TCP to NATS both ends of a link run attached (no reader or writer task): each
    link message is handed to the session from nats-py's read loop, each send written at once."""
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        body = os.urandom(3 * WINDOW + 17)
        assert await roundtrip(link, body) == body
        b_session = pair.accepted[0][0]
        assert link.attached, "the opening end of the link still runs reader/writer tasks"
        assert b_session.attached, "the accepting end of the link still runs reader/writer tasks"
        for side in (pair.a_links._links[pair.b.node_id], pair.b_links._links[pair.a.node_id]):
            assert side.transport.attached and not side.transport._inbox


async def test_an_attached_link_writes_behind_what_nats_py_holds_in_order(nats_server: NatsServer) -> None:
    """A link message nats-py's client would write after something it still holds takes the
    queued path (a task hands it to nats-py), and the next ones wait behind it: the peer sees
    the sequence in order (else it would end the link: "arrived twice or out of order")."""
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"first") == b"first"
        transport = pair.a_links._links[pair.b.node_id].transport
        await pair.a.nc.publish("h9.unrelated", b"held by nats-py until its flusher runs")
        assert pair.a.nc._pending
        pings = [os.urandom(p.MAX_PING_PAYLOAD) for _ in range(3)]
        for payload in pings:
            transport.write_message(p.encode(p.FrameType.PING, 0, payload))
        assert transport._publisher is not None and len(transport._unsent) == 3  # none written at once
        await wait_until(lambda: not transport._unsent and transport._publisher is None, timeout=10)
        assert await roundtrip(link, b"after") == b"after"
        assert not pair.closed_a and not pair.closed_b


async def test_a_paused_link_holds_messages_in_its_inbox_bounded(nats_server: NatsServer) -> None:
    """A link session that pauses reading gets nothing until it resumes (the NATS socket is every
    link's, so the link buffers what arrives); past inbox_limit the link ends, as an unattached
    link's inbox does."""
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"x") == b"x"
        b_transport = pair.b_links._links[pair.a.node_id].transport
        b_transport.inbox_limit = 64 * 1024
        # Paused: A's PING waits in B's inbox unanswered; resumed, it is read and answered.
        b_transport.pause_reading()
        answered = link.round_trip
        link.ping()
        await wait_until(lambda: b_transport._inbox, timeout=10)
        assert link.round_trip == answered
        b_transport.resume_reading()
        await wait_until(lambda: link.round_trip != answered, timeout=10)
        assert not b_transport._inbox and b_transport._inbox_bytes == 0
        # Paused again: DATA (for no stream: B drops it when read) piles up to the bound, then the link ends.
        b_transport.pause_reading()
        chunk = p.encode_data(999, bytes(24 * 1024))
        held = []
        while b_transport.reason is None:
            before = b_transport._recv_seq
            link.send_nowait(chunk)
            await wait_until(lambda: b_transport._recv_seq > before, timeout=10)  # noqa: B023
            held.append(b_transport._inbox_bytes)
        assert held[:-1] == [len(chunk) * n for n in range(1, len(held))]  # nothing read while paused
        assert len(chunk) * len(held) > 64 * 1024 >= len(chunk) * (len(held) - 1)
        await wait_until(lambda: pair.closed_b and pair.closed_a, timeout=10)
        assert "ignored flow control: more than 65536 bytes waiting on the link" in pair.closed_b[0][1]
        assert "ignored flow control" in pair.closed_a[0][1]
        assert b_transport._inbox_bytes == 0


async def test_an_attached_link_stops_writing_while_nats_does_not_read_and_resumes_in_order(
        nats_server: NatsServer) -> None:
    """Backpressure of an attached link: with nats-server stopped (SIGSTOP), what the link writes
    piles up in the socket's buffer; past PENDING_SIZE the session stops flushing (its queue holds
    the rest, bounded by the session's own limits) and, once nats-server reads again, it goes on
    where it stopped: every message arrives, in order (else B ends the link)."""
    from comzy.core.cluster.connection import PENDING_SIZE

    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        assert await roundtrip(link, b"x") == b"x"
        transport = pair.a_links._links[pair.b.node_id].transport
        assert nats_server.process is not None
        chunk = p.encode_data(999, bytes(p.MAX_DATA_FRAME))  # no such stream on B: read and dropped
        count = 4 * (PENDING_SIZE + 8 * 1024 * 1024) // len(chunk)  # well past the kernel's buffers too
        sent_before = transport._send_seq
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(count):
                link.send_nowait(chunk)
            await wait_until(lambda: link._write_paused, timeout=10)
            assert transport._blocked and pair.a.nc.unsent() > PENDING_SIZE
            assert link.queued > 0  # the rest waits in the session's queue, not in the transport
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        await wait_until(lambda: not link._write_paused and not link.queued, timeout=30)
        await wait_until(lambda: pair.b_links._links[pair.a.node_id].transport._recv_seq == transport._send_seq,
                         timeout=30)
        assert transport._send_seq > sent_before
        assert await roundtrip(link, b"after") == b"after"
        assert not pair.closed_a and not pair.closed_b


async def test_a_link_that_cannot_attach_keeps_its_tasks_and_works(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where attach declines (TLS to NATS: nats-py's transport is not plain TCP, nothing can be
    written at once), the link session runs its reader and writer tasks over send/receive, as
    before: a body still flows both ways, and the links end cleanly."""
    from comzy.core.cluster.link import LinkTransport

    monkeypatch.setattr(LinkTransport, "attach", lambda self, sink: False)
    async with pair_of_nodes(nats_server) as pair:
        link = pair.link()
        body = os.urandom(2 * WINDOW + 5)
        assert await roundtrip(link, body) == body
        assert not link.attached and not pair.accepted[0][0].attached
        assert not pair.closed_a and not pair.closed_b
