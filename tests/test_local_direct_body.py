"""Large Content-Length bodies read straight into buffers of the agent's own (``_DirectBody``).

From ``DIRECT_FROM`` bytes still to read, the local client switches the connection's protocol to a
buffered one: the loop reads into a fresh buffer, never past the body's last byte, and the body
comes out as read-only views of those buffers (no bytes copy of each read). These tests pin that
the bytes are the body, in order, on both event loops; that the connection serves the next
request afterwards (the protocol was switched back); that bytes after such a body still make the
connection unusable; and that a body cut short is still an error.
"""

from __future__ import annotations

import os

import pytest

from comzy.agent.local_http import DIRECT_FROM, LocalError
from tests.test_local_http import Script, fetch, scripted

pytestmark = pytest.mark.anyio

BODY = os.urandom(3 * DIRECT_FROM + 12_345)


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: they switch protocols and call a buffered protocol differently."""
    return request.param  # type: ignore[no-any-return]


def large(body: bytes = BODY, after: bytes = b"") -> Script:
    """A 200 with ``body`` (Content-Length) in pieces of odd sizes, then ``after``."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    pieces = [head + body[:1000]]
    sizes = [70_001, 3, 300_000, 1, 65_536, 900_000]
    offset = 1000
    while offset < len(body):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(body[offset : offset + size])
        offset += size
    pieces[-1] += after  # with the body's end, as test_local_http's smuggling tests send it
    return lambda head_: list(pieces)


async def test_a_large_body_comes_as_views_of_its_own_buffers_and_the_connection_is_reused() -> None:
    async with scripted(large()) as (client, server):
        for _ in range(2):
            response = await client.request("GET", b"/", [(b"host", b"local")], None)
            chunks = [chunk async for chunk in response.body()]
            await client.release(response.connection)
            assert b"".join(chunks) == BODY
            direct = [c for c in chunks if isinstance(c, memoryview)]
            assert direct, "no read of the body came straight into a buffer of the client's"
            assert all(c.readonly and isinstance(c.obj, bytearray) for c in direct)
            # Most of the body went that way (only what was read with the head, and short reads, did not).
            assert sum(map(len, direct)) > len(BODY) // 2
        assert server.connections == 1
        # And a small exchange after it, on the same connection, reads as usual.
        _, data = await fetch(client)
        assert data == BODY
        assert server.connections == 1


async def test_bytes_after_a_large_body_make_the_connection_unusable() -> None:
    async with scripted(large(after=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")) as (client, server):
        _, data = await fetch(client)
        assert data == BODY
        _, data = await fetch(client)
        assert data == BODY
        assert server.connections == 2


async def test_a_large_body_cut_short_is_an_error() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(BODY) + 1)
    async with scripted(lambda head_: [head + BODY[:10], BODY[10:]], close_after=True) as (client, _):
        with pytest.raises(LocalError, match="before the end of the response body"):
            await fetch(client)
