"""Several tunnels on one session across control nodes: a takeover of one alias by an agent on
another node takes that tunnel only (docs/protocol.md, "Several tunnels on one session")."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from comzy.core import protocol as p
from comzy.core.control import GoAway, control_message
from tests.cluster.conftest import NatsServer, control_node, nats_node, raw_hello, read_record

pytestmark = pytest.mark.anyio

FT = p.FrameType


async def test_a_takeover_from_another_node_takes_one_tunnel_of_the_session(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        control_node(nats_server, tmp_path / "b") as two,
        nats_node(nats_server, "edge") as probe,
    ):
        old_ws, welcome = await raw_hello(one, tunnels=[{"name": "web", "port": 1, "subdomain": "stay-here"},
                                                        {"name": "api", "port": 2, "subdomain": "moving"}])
        assert welcome.type == FT.WELCOME
        api = next(t for t in welcome.payload["tunnels"] if t["name"] == "api")
        # Each tunnel has its own record in KV, held by node one.
        for alias in ("stay-here", "moving"):
            record = await read_record(probe, alias)
            assert record.live and record.node == one.node

        new_ws, again = await raw_hello(two, subdomain="moving",
                                        resume={"alias": "moving", "secret": api["resume_secret"]})
        assert again.type == FT.WELCOME and again.payload["alias"] == "moving"
        # The old session is told that api (only) went, and stays open for web.
        with anyio.fail_after(10):
            while True:
                message = await old_ws.receive()
                frames = [f for f in p.decode_message(message) if f.type == FT.GOAWAY]
                if frames:
                    break
        goaway = control_message(frames[0])
        assert isinstance(goaway, GoAway) and goaway.tunnel == "api" and not goaway.reconnect
        assert "took over moving" in goaway.reason
        assert one.tunnel("moving") is None and two.tunnel("moving") is not None
        assert one.tunnel("stay-here") is not None
        assert (await read_record(probe, "stay-here")).node == one.node
        assert (await read_record(probe, "moving")).node == two.node
        [entry] = one.registry.entries()
        assert entry.session.closed is None
        await old_ws.aclose()
        await new_ws.aclose()
