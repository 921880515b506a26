"""COMZY_MAX_TUNNELS_PER_ADDRESS: agents at one address hold at most that many live tunnels on a
server, so an anonymous client cannot open tunnels until the server runs out of memory or
descriptors. Real server, raw agent connections; the agents' addresses come from X-Forwarded-For
through a trusted proxy (127.0.0.1), since every test connection is itself loopback, which is not
counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from comzy.core import control as c
from comzy.core import protocol as p
from comzy.core.server import ServerContext
from comzy.core.websocket import WebSocket, connect
from tests.conftest import start_server
from tests.helpers import receive_until_closed, wait_until

pytestmark = pytest.mark.anyio

HELLO = {"v": 1, "agent": "test", "port": 1}
LIMIT_REASON = "the most one address may (COMZY_MAX_TUNNELS_PER_ADDRESS=2)"


@asynccontextmanager
async def limited(tmp_path: Path, limit: int = 2) -> AsyncIterator[ServerContext]:
    async with start_server(tmp_path, trusted_proxies="127.0.0.1/32", max_tunnels_per_address=limit) as server:
        yield server


async def hello(server: ServerContext, payload: dict[str, Any], address: str | None,
                stack: AsyncExitStack) -> tuple[c.ControlMessage, WebSocket]:
    """Send one HELLO as an agent at ``address`` (through the trusted proxy); its answer, and the
    connection, kept open by ``stack`` (an accepted tunnel lives as long as it)."""
    headers = [(b"x-forwarded-for", address.encode())] if address else []
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 << 20, headers=headers)
    stack.push_async_callback(ws.aclose)
    await ws.send(p.encode(p.FrameType.HELLO, 0, payload))
    message = await ws.receive()
    assert isinstance(message, bytes)
    return c.control_message(next(iter(p.decode_message(message)))), ws


async def test_an_address_holds_at_most_the_limit(tmp_path: Path) -> None:
    async with limited(tmp_path) as server, AsyncExitStack() as stack:
        first, _ = await hello(server, HELLO, "203.0.113.7", stack)
        second, second_ws = await hello(server, HELLO, "203.0.113.7", stack)
        assert isinstance(first, c.Welcome) and isinstance(second, c.Welcome)
        assert server.registry.count_from("203.0.113.7") == 2
        third, third_ws = await hello(server, HELLO, "203.0.113.7", stack)
        assert isinstance(third, c.Refusal) and third.code == "rejected"
        assert third.reason == (f"203.0.113.7 already holds 2 tunnels on this server, {LIMIT_REASON}; stop one of "
                                "them, or ask the server's operator to raise the limit")
        closed, _ = await receive_until_closed(third_ws)
        assert closed.code == 1008
        # Another address is not held back by this one's.
        other, _ = await hello(server, HELLO, "203.0.113.8", stack)
        assert isinstance(other, c.Welcome)
        # A tunnel that ends gives its place back.
        await second_ws.aclose()
        await wait_until(lambda: server.registry.count_from("203.0.113.7") == 1)
        again, _ = await hello(server, HELLO, "203.0.113.7", stack)
        assert isinstance(again, c.Welcome)
        assert len(server.registry) == 3


async def test_a_reconnect_at_the_limit_takes_its_own_tunnel_back(tmp_path: Path) -> None:
    # The agent lost its connection and comes back before the server noticed: its resume secret
    # replaces its own tunnel, which must not count against it.
    async with limited(tmp_path) as server, AsyncExitStack() as stack:
        first, _ = await hello(server, HELLO, "203.0.113.7", stack)
        second, _ = await hello(server, HELLO, "203.0.113.7", stack)
        assert isinstance(first, c.Welcome) and isinstance(second, c.Welcome)
        resumed, _ = await hello(server, {**HELLO, "resume": {"alias": second.alias, "secret": second.resume_secret}},
                                 "203.0.113.7", stack)
        assert isinstance(resumed, c.Welcome) and resumed.alias == second.alias
        assert server.registry.count_from("203.0.113.7") == 2
        # A wrong secret is no reconnect: one more tunnel, refused.
        stranger, _ = await hello(server, {**HELLO, "resume": {"alias": first.alias, "secret": "not-it"}},
                                  "203.0.113.7", stack)
        assert isinstance(stranger, c.Refusal) and LIMIT_REASON in stranger.reason


async def test_several_tunnels_on_one_connection_count_one_by_one(tmp_path: Path) -> None:
    async with limited(tmp_path) as server, AsyncExitStack() as stack:
        tunnels = [{"name": name, "port": port} for name, port in (("web", 1), ("api", 2), ("db", 3))]
        refused, _ = await hello(server, {**HELLO, "tunnels": tunnels}, "203.0.113.9", stack)
        assert isinstance(refused, c.Refusal)
        assert refused.reason.startswith("tunnel 'db': 203.0.113.9 already holds 2 tunnels") and \
            LIMIT_REASON in refused.reason
        await wait_until(lambda: server.registry.count_from("203.0.113.9") == 0)  # all or nothing
        two, _ = await hello(server, {**HELLO, "tunnels": tunnels[:2]}, "203.0.113.9", stack)
        assert isinstance(two, c.Welcome) and len(two.tunnels) == 2


async def test_loopback_agents_and_a_zero_limit_are_not_counted(tmp_path: Path) -> None:
    # Loopback: the server's own host, or a proxy on it that COMZY_TRUSTED_PROXIES does not name
    # (every agent would then be one address, and the limit would refuse them all).
    async with limited(tmp_path, limit=1) as server, AsyncExitStack() as stack:
        for _ in range(3):
            answer, _ = await hello(server, HELLO, None, stack)
            assert isinstance(answer, c.Welcome)
        for _ in range(2):
            answer, _ = await hello(server, HELLO, "::ffff:127.0.0.1", stack)
            assert isinstance(answer, c.Welcome)
    async with limited(tmp_path / "unlimited", limit=0) as server, AsyncExitStack() as stack:
        for _ in range(3):
            answer, _ = await hello(server, HELLO, "203.0.113.7", stack)
            assert isinstance(answer, c.Welcome)
