"""``LinkClient.flush`` sends its PING after every command made before it.

nats-py 2.16 writes the PING of ``flush()`` straight to the socket while a SUB just made still
waits for its flusher task: the server answers PONG before it has read the SUB, so a subscription
"flushed" may not exist yet, and another connection's publishes in that moment are dropped by
nats-server (no subscriber). Under load that lost the first link messages of
tests/cluster/test_link_framer.py and tests/cluster/test_link.py about once in a hundred runs.
A NATS server of a few lines on a real socket records the order the client's commands arrive in.
"""

from __future__ import annotations

import anyio
import anyio.abc
import nats.aio.client
import pytest

from tests.helpers import serve_tcp

pytestmark = pytest.mark.anyio

INFO = b'INFO {"server_id":"t","version":"2.9.10","max_payload":1048576,"headers":true,"proto":1}\r\n'


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: uvloop's transports (the node processes' default) are not asyncio's."""
    return request.param  # type: ignore[no-any-return]


async def commands_of_subscribe_and_flush(client: nats.aio.client.Client) -> list[bytes]:
    """The verbs (SUB, PING...) ``client`` sends a server for ``subscribe`` then ``flush``, in the
    order the server reads them (the connect handshake left out)."""
    verbs: list[bytes] = []

    async def server(stream: anyio.abc.SocketStream) -> None:
        await stream.send(INFO)
        buffered = b""
        async with stream:
            while True:
                try:
                    buffered += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                *lines, buffered = buffered.split(b"\r\n")
                for line in lines:
                    verbs.append(line.split(b" ", 1)[0])
                    if line == b"PING":
                        await stream.send(b"PONG\r\n")

    async with serve_tcp(server) as port:
        await client.connect(servers=[f"nats://127.0.0.1:{port}"], allow_reconnect=False)
        try:
            assert verbs == [b"CONNECT", b"PING"]  # the handshake
            del verbs[:]
            await client.subscribe("just.made", cb=_ignore)
            await client.flush()
            return list(verbs)
        finally:
            await client.close()


async def _ignore(msg: object) -> None:
    """A subscription's callback (no message is sent in these tests)."""


async def test_link_client_flush_pings_after_the_subscription_it_made() -> None:
    """The PONG that ends ``flush()`` answers a PING the server read after the SUB: the
    subscription exists when ``flush`` returns. Fails without ``LinkClient._send_ping``."""
    from comzy.core.cluster.nats_client import LinkClient

    assert await commands_of_subscribe_and_flush(LinkClient()) == [b"SUB", b"PING"]


async def test_nats_py_flush_still_pings_ahead_of_a_subscription() -> None:
    """The nats-py bug ``LinkClient._send_ping`` works around, still there: stock ``flush()``
    writes its PING before the SUB of the ``subscribe()`` just made. When this fails, nats-py has
    fixed it and the override can go."""
    assert await commands_of_subscribe_and_flush(nats.aio.client.Client()) == [b"PING", b"SUB"]
