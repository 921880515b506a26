"""LinkClient frames NATS's bytes as the loop reads them (``_Framer``).

A message for a direct subscription (a link's) goes to its handler in the socket's read callback,
not through nats-py's read loop task and parser; every other protocol unit still reaches nats-py,
whole and in order. These tests pin both halves: with a real nats-server on both event loops
(messages of every size, split over many reads, mixed with other subscriptions, headers and
PINGs, and across a NATS restart), and the framer alone fed one stream cut at every kind of
boundary.

The first test was once reverted for "lost" messages: nats-server had never sent them. nats-py's
``flush`` could return before the server had the subscription (tests/cluster/test_nats_flush.py),
so the first publishes of the other connection found no subscriber; ``LinkClient`` fixes that.
"""

from __future__ import annotations

import asyncio
import os
import random

import nats
import nats.aio.msg
import pytest

from tests.cluster.conftest import NatsServer
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: uvloop's transports (the node processes' default) are not asyncio's."""
    return request.param  # type: ignore[no-any-return]


async def test_direct_messages_are_handled_in_the_read_callback_in_order(nats_server: NatsServer) -> None:
    """Every message of a direct subscription reaches its handler whole and in publishing order,
    from the socket's read callback (no task: nats-py's read loop task did not run it), whatever
    its size (up to nats-server's max_payload, so over many reads); messages for other
    subscriptions, with headers, and nats-py's own PING/PONG (flush) keep working around them."""
    from comzy.core.cluster.nats_client import LinkClient

    sender, receiver = LinkClient(), LinkClient()
    await sender.connect(servers=[nats_server.url], allow_reconnect=False)
    await receiver.connect(servers=[nats_server.url], allow_reconnect=False)
    try:
        seen: list[bytes] = []
        in_task: list[bytes] = []
        other: list[bytes] = []

        def on_direct(subject: bytes, data: bytes) -> None:
            seen.append(data)
            if asyncio.current_task() is not None:
                in_task.append(data[:16])

        async def unused(msg: nats.aio.msg.Msg) -> None:  # nats-py's path: must not be taken
            other.append(b"wrong:" + msg.data[:16])

        async def on_other(msg: nats.aio.msg.Msg) -> None:
            other.append(msg.data)

        link = await receiver.subscribe("h6.link.*", cb=unused)
        receiver.direct(link, on_direct)
        await receiver.subscribe("h6.other", cb=on_other)
        await receiver.flush()
        rng = random.Random(6)
        limit = receiver.max_payload - 64
        sizes = [0, 1, 2, 100, 4095, 4096, 65_536, 300_000, limit, *(rng.randrange(0, 70_000) for _ in range(60))]
        sent: list[bytes] = []
        for number, size in enumerate(sizes):
            body = b"%06d:" % number + os.urandom(max(size - 7, 0))
            sent.append(body)
            if number % 5 == 4:
                await sender.publish("h6.link.a", body, headers={"X-N": str(number)})
            else:
                await sender.publish_now("h6.link.b", "h6.reply", b"", body)
            if number % 7 == 0:
                await sender.publish("h6.other", b"other %d" % number)
            if number % 11 == 0:
                await sender.flush()
        await sender.flush()
        await wait_until(lambda: len(seen) == len(sent), timeout=20)
        await receiver.flush()  # a PING answered after all of that: nats-py still parses its units
        assert [len(data) for data in seen] == [len(data) for data in sent]
        assert seen == sent
        assert not in_task, f"handled from a task (nats-py's read loop): {in_task[:3]}"
        await wait_until(lambda: len(other) == len(range(0, len(sizes), 7)), timeout=10)
        assert other == [b"other %d" % number for number in range(0, len(sizes), 7)]
        assert receiver.stats["in_msgs"] >= len(sent) + len(other)
    finally:
        await sender.close()
        await receiver.close()


async def test_the_framer_splits_a_stream_cut_anywhere() -> None:
    """The same bytes, cut into pieces of every size (1 byte up): direct messages reach the handler
    whole, in order, headers dropped; every other unit reaches nats-py's reader byte for byte."""
    from comzy.core.cluster.nats_client import LinkClient, _Framer

    rng = random.Random(12)
    stream: list[bytes] = []
    expected_direct: list[bytes] = []
    expected_rest: list[bytes] = []
    for _ in range(300):
        kind = rng.randrange(6)
        body = os.urandom(rng.choice((0, 1, 3, 50, 2000, 9000)))
        if kind == 0:
            unit = b"MSG p.n.me.l.peer 7 %d\r\n%s\r\n" % (len(body), body)
            expected_direct.append(body)
        elif kind == 1:
            unit = b"MSG p.n.me.l.peer 7 p.n.peer.nr.me.1 %d\r\n%s\r\n" % (len(body), body)
            expected_direct.append(body)
        elif kind == 2:
            headers = b"NATS/1.0\r\nX-A: b\r\n\r\n"
            unit = b"HMSG p.n.me.l.peer 7 %d %d\r\n%s%s\r\n" % (len(headers), len(headers) + len(body), headers, body)
            expected_direct.append(body)
        elif kind == 3:
            unit = b"MSG other 9 _INBOX.x %d\r\n%s\r\n" % (len(body), body)
            expected_rest.append(unit)
        elif kind == 4:
            unit = rng.choice((b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'Slow Consumer'\r\n",
                               b'INFO {"server_id":"x","max_payload":1048576}\r\n'))
            expected_rest.append(unit)
        else:
            unit = b"MSG gone 8 %d\r\n%s\r\n" % (len(body), body)  # an unsubscribed sid: nats-py drops it
            expected_rest.append(unit)
        stream.append(unit)
    data = b"".join(stream)
    for cut in (1, 2, 5, 17, 4096, 65_536, None):
        client = LinkClient()
        client._subs[7] = object()  # type: ignore[assignment]
        client._subs[9] = object()  # type: ignore[assignment]
        got: list[bytes] = []
        client._direct[7] = lambda subject, payload, got=got: got.append(payload)
        reader = asyncio.StreamReader(limit=2 ** 30)
        framer = _Framer(client, reader)
        client._framer = framer
        pos = 0
        while pos < len(data):
            size = cut or rng.randrange(1, 30_000)
            reader.feed_data(data[pos:pos + size])
            pos += size
        assert got == expected_direct, f"cut {cut}"
        assert bytes(reader._buffer) == b"".join(expected_rest), f"cut {cut}"


async def test_the_framer_leaves_what_is_not_nats_to_nats_py() -> None:
    """A control line the framer does not know how to read goes to nats-py's reader from there on,
    as it came (nats-py's parser then raises and its client reconnects), and nothing after it is
    handed to a direct handler."""
    from comzy.core.cluster.nats_client import MAX_CONTROL_LINE, LinkClient, _Framer

    for garbage in (b"MSG a 7 x y z\r\nMSG p 7 1\r\nx\r\n", b"MSG a 7 -1\r\n", b"HMSG a 7 b 3\r\nabc\r\n",
                    b"X" * MAX_CONTROL_LINE):
        client = LinkClient()
        client._subs[7] = object()  # type: ignore[assignment]
        got: list[bytes] = []
        client._direct[7] = lambda subject, payload, got=got: got.append(payload)
        reader = asyncio.StreamReader(limit=2 ** 30)
        client._framer = _Framer(client, reader)
        reader.feed_data(b"MSG p 7 2\r\nok\r\n" + garbage)
        reader.feed_data(b"MSG p 7 4\r\nlate\r\n")
        assert got == [b"ok"]
        assert bytes(reader._buffer) == garbage + b"MSG p 7 4\r\nlate\r\n"
        assert client._framer is None


async def test_a_reconnect_frames_the_new_socket_and_leaves_the_old_one(nats_server: NatsServer) -> None:
    """After NATS restarts, nats-py's new socket gets a framer of its own (direct messages are
    again handled outside any task), and the old socket's framer no longer hands anything over."""
    from comzy.core.cluster.nats_client import LinkClient

    options = {"servers": [nats_server.url], "reconnect_time_wait": 0.1, "max_reconnect_attempts": -1}
    sender, receiver = LinkClient(), LinkClient()
    await sender.connect(**options)
    await receiver.connect(**options)
    try:
        seen: list[bytes] = []
        in_task: list[bytes] = []

        def on_direct(subject: bytes, data: bytes) -> None:
            seen.append(data)
            if asyncio.current_task() is not None:
                in_task.append(data)

        link = await receiver.subscribe("h4.link.*", cb=_unused)
        receiver.direct(link, on_direct)
        await receiver.flush()
        first = receiver._framer
        assert first is not None
        await sender.publish_now("h4.link.a", "", b"", b"before")
        await sender.flush()
        await wait_until(lambda: seen == [b"before"], timeout=10)

        nats_server.restart()
        await wait_until(lambda: receiver.stats["reconnects"] == 1 == sender.stats["reconnects"]
                         and receiver.is_connected and sender.is_connected, timeout=20)
        assert receiver._framer is not None and receiver._framer is not first
        await receiver.flush()  # the replayed SUB is on the server (it went before this PING)
        await sender.publish_now("h4.link.a", "", b"", b"after")
        await sender.flush()
        await wait_until(lambda: len(seen) == 2, timeout=10)
        assert seen == [b"before", b"after"]
        assert not in_task
    finally:
        await sender.close()
        await receiver.close()


async def _unused(msg: nats.aio.msg.Msg) -> None:
    """The callback nats-py requires of a subscription that ``direct`` takes over."""
    raise AssertionError(f"a direct message reached nats-py's callback: {msg.data[:16]!r}")
