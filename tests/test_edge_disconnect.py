"""A visitor who goes away: the edge releases the stream and tells the agent, on both public listeners.

The edge pumps the request body in a task beside the response, or, for a request without a body
on uvicorn, is called back by the HTTP protocol (http_servers.DisconnectWatch); when the visitor
disconnects before the response is complete, either resets the stream, which ends the exchange. Each test
runs on role ``all`` and through an edge of a cluster (tests/stack.py), where the RESET crosses the
link and the control node's relay (whose stream table ``server_streams`` then reads).
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from comzy.core.stream import Stream
from tests.conftest import RunningAgent
from tests.helpers import wait_until
from tests.stack import stack_fixture, stacks_fixture, tunnel_fixture  # noqa: F401 (both kinds)
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


def server_streams(tunnel: RunningAgent) -> dict[int, Stream]:
    """The server side's open streams of this tunnel (on a cluster, the control node's relayed ones)."""
    entry = tunnel.server.registry.get(tunnel.alias)
    assert entry is not None
    return entry.session.streams


async def test_visitor_gone_before_the_head(tunnel: RunningAgent, upstream: Upstream) -> None:
    async with tunnel.visitor() as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/hold/gone")
        with anyio.fail_after(5):
            await upstream.gate("gone-arrived").wait()
        assert len(server_streams(tunnel)) == 1
        tg.cancel_scope.cancel()  # the visitor hangs up while the local app still thinks
    await wait_until(lambda: not server_streams(tunnel))
    # The agent learns of it (RESET) and reports the exchange as failed once the app answers.
    upstream.gate("gone").set()
    await wait_until(lambda: tunnel.reporter.served)
    assert tunnel.reporter.served[-1].error is not None
    # The tunnel is unharmed.
    async with tunnel.visitor() as client:
        assert (await client.get("/status/200")).status_code == 200


async def test_visitor_with_a_body_gone_before_the_head(tunnel: RunningAgent, upstream: Upstream) -> None:
    # A request with a body keeps the pump task on both servers: its disconnect resets the stream too.
    async with tunnel.visitor() as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.post("/hold/gone-post", content=b"body " * 1000))
        with anyio.fail_after(5):
            await upstream.gate("gone-post-arrived").wait()
        assert len(server_streams(tunnel)) == 1
        tg.cancel_scope.cancel()
    await wait_until(lambda: not server_streams(tunnel))
    upstream.gate("gone-post").set()
    await wait_until(lambda: tunnel.reporter.served)
    assert tunnel.reporter.served[-1].error is not None


async def test_visitor_gone_mid_response(tunnel: RunningAgent, upstream: Upstream) -> None:
    async with tunnel.visitor() as client:
        with anyio.fail_after(5):
            async with client.stream("GET", "/sse") as response:
                upstream.gate("sse0").set()
                chunks = response.aiter_raw()
                assert await anext(chunks) == b"data: event 0\n\n"
                # Leaving the block with the body unread closes the connection.
    await wait_until(lambda: not server_streams(tunnel))
    upstream.gate("sse1").set()
    upstream.gate("sse2").set()
    await wait_until(lambda: tunnel.reporter.served)
    served = tunnel.reporter.served[-1]
    assert served.status == 200
    assert served.error is not None and "reset" in served.error


async def test_completed_exchanges_leave_no_stream_or_task_behind(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        for _ in range(20):
            assert (await client.get("/status/200")).status_code == 200
        assert (await client.post("/echo", content=b"x" * 100_000)).status_code == 200
        # While the visitor's connection is still open (kept alive), no request pump waits on.
        await wait_until(lambda: not server_streams(tunnel))
        await wait_until(lambda: not any("_pump_request" in repr(task.get_coro()) for task in asyncio.all_tasks()))
