"""The agent's server list (COMZY_WS_SERVER="a,b"): after losing its session it tries the others first.

A server that hangs (a stopped process: the kernel still accepts TCP, nobody answers the upgrade)
would otherwise cost the agent the whole connect timeout on every reconnect, since the agent
started each attempt with the server that had worked last (found by the cluster failover tests).
"""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from tests.conftest import RecordingReporter, start_server
from tests.helpers import wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


async def test_after_a_lost_session_the_agent_tries_the_next_server_first(tmp_path: Path, upstream: Upstream) -> None:
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", upstream.port)
    accepted: list[socket.socket] = []
    async with start_server(tmp_path / "two") as second, anyio.create_task_group() as tg:
        first = await tg.start(_first_server, tmp_path / "one")
        port, stop = first
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}", f"ws://127.0.0.1:{second.ports.ws}"],
                                  port=upstream.port), forwarder, reporter)
        tg.start_soon(agent.run)
        await reporter.wait_connected()
        assert second.tunnel(agent.alias or "") is None  # on the first server
        # The first server goes, and a hung one takes its port: it accepts, and never answers.
        stop.set()
        await wait_until(lambda: reporter.reconnects)
        hung = socket.socket()
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", port))
        hung.listen(8)
        hung.setblocking(False)
        try:
            async def keep_accepting() -> None:
                while True:
                    await anyio.wait_readable(hung)
                    accepted.append(hung.accept()[0])

            tg.start_soon(keep_accepting)
            await reporter.wait_connected()
            # Back on the second server, without having waited on the hung one first.
            assert second.tunnel(agent.alias or "") is not None
            assert accepted == []
        finally:
            tg.cancel_scope.cancel()
            for sock in accepted:
                sock.close()
            hung.close()
    await forwarder.aclose()


async def _first_server(data_dir: Path, *, task_status: anyio.abc.TaskStatus[tuple[int, anyio.Event]]) -> None:
    stop = anyio.Event()
    async with start_server(data_dir, shutdown_grace=0) as server:
        task_status.started((server.ports.ws, stop))
        await stop.wait()
