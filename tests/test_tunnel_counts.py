"""``Tunnel.streams_open`` and ``Tunnel.websockets_open``: the core's live counts plugins read.

They go up while a visitor's request or WebSocket is in flight and back down however it ends:
answered, closed by either side, refused by a plugin (never counted), or cut by the agent leaving.
Both tests run on role ``all`` and through an edge of a cluster (tests/stack.py), where the counts
are the control node's (its relay opens and ends the streams) and the edge's plugins refuse.
"""

from __future__ import annotations

import anyio
import pytest

from comzy import ForwardRequest, Reject, Tunnel, hookimpl
from tests.helpers import wait_until
from tests.stack import Stacks, stacks_fixture  # noqa: F401 (both kinds)
from tests.test_websocket import exchange, open_ws
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

WAIT = 10.0


def counts(tunnel: Tunnel) -> tuple[int, int]:
    return tunnel.streams_open, tunnel.websockets_open


class RefusesPrivate:
    """Answers requests for /private itself: they never reach the agent."""

    @hookimpl
    def before_forward(self, request: ForwardRequest) -> None:
        if request.path.startswith("/private"):
            raise Reject("private", status=403)


async def test_counts_go_up_while_in_flight_and_back_down(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start(plugins=[("private", RefusesPrivate())]) as stack, \
            stack.agent(upstream.port) as agent, agent.visitor() as client:
        tunnel = stack.control.tunnel(agent.alias)
        assert tunnel is not None and counts(tunnel) == (0, 0)
        async with anyio.create_task_group() as tg:
            answers: list[int] = []

            async def slow_request() -> None:
                answers.append((await client.get("/hold/slow")).status_code)

            tg.start_soon(slow_request)
            with anyio.fail_after(WAIT):
                await upstream.gate("slow-arrived").wait()
            assert counts(tunnel) == (1, 0)  # a slow request in flight
            async with open_ws(stack.public, agent.alias) as (ws, _):
                assert await exchange(ws, "hi") == "echo:hi"
                assert counts(tunnel) == (2, 1)  # and a WebSocket open
                assert (await client.get("/private")).status_code == 403  # refused: never a stream
                assert counts(tunnel) == (2, 1)
            await wait_until(lambda: counts(tunnel) == (1, 0), WAIT)  # the visitor closed the WebSocket
            upstream.gate("slow").set()
        assert answers == [200]
        assert counts(tunnel) == (0, 0)
        # A WebSocket the local service closes, and a finished request, leave nothing counted.
        async with open_ws(stack.public, agent.alias, "/ws/close/4001") as (ws, _):
            await ws.receive()
        assert (await client.get("/status/204")).status_code == 204
        await wait_until(lambda: counts(tunnel) == (0, 0), WAIT)
        assert tunnel.requests == 4


async def test_counts_come_down_when_the_agent_leaves_mid_request(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start() as stack, stack.agent(upstream.port) as agent, agent.visitor() as client:
        tunnel = stack.control.tunnel(agent.alias)
        assert tunnel is not None
        async with anyio.create_task_group() as tg:
            answers: list[int] = []

            async def hanging_request() -> None:
                answers.append((await client.get("/hold/never")).status_code)

            tg.start_soon(hanging_request)
            async with open_ws(stack.public, agent.alias) as (ws, _):
                assert await exchange(ws, "hi") == "echo:hi"
                with anyio.fail_after(WAIT):
                    await upstream.gate("never-arrived").wait()
                assert counts(tunnel) == (2, 1)
                # From the public side: on a cluster the edge asks the control node holding it.
                assert await stack.public.close_tunnel(agent.alias, "test: the agent goes")
                await wait_until(lambda: counts(tunnel) == (0, 0), WAIT)
        assert answers == [502]
