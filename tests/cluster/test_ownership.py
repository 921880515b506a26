"""Alias ownership across control nodes (docs/design/cluster.md 2): one owner per alias in KV,
the per-alias answers (lookup, close, notify), release on disconnect, a KV outage.

Two control nodes run in this process against the test's own nats-server; agents are real
(``start_agent``) or raw protocol connections where the test reads exactly what is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgpack
import nats.errors
import pytest

from comzy import Tunnel
from comzy.core import protocol as p
from tests.cluster.conftest import (
    NatsServer,
    control_node,
    nats_node,
    raw_hello,
    read_record,
    tunnel_request,
    wait_record,
)
from tests.conftest import start_agent
from tests.helpers import receive_until_closed, wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

FT = p.FrameType


async def request(node: Any, alias: str, op: dict[str, Any]) -> dict[str, Any]:
    """An op on ``P.t.<alias>`` from the test's own client; its msgpack answer."""
    return await tunnel_request(node, alias, op)


async def test_agents_racing_for_one_subdomain_get_it_exactly_once(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        control_node(nats_server, tmp_path / "b") as two,
        nats_node(nats_server, "edge") as probe,
    ):
        for round_ in range(12):
            name = f"race{round_}"
            results: dict[str, tuple[Any, Any]] = {}

            async def hello(server: Any, key: str, name: str = name, results: dict[str, Any] = results) -> None:
                results[key] = await raw_hello(server, subdomain=name)

            # Two nodes, and (every other round) two agents on one node: its claim in flight is
            # held already, so the other registration's read cannot take it for stale.
            first, second = (one, two) if round_ % 2 else (one, one)
            async with anyio.create_task_group() as tg:
                tg.start_soon(hello, first, "one")
                tg.start_soon(hello, second, "two")
            kinds = sorted(frame.type.name for _, frame in results.values())
            assert kinds == ["REJECT", "WELCOME"], kinds
            [winner_key] = [k for k, v in results.items() if v[1].type == FT.WELCOME]
            [(_, refused)] = [v for v in results.values() if v[1].type == FT.REJECT]
            assert "in use by another agent" in refused.payload["reason"]
            winner = first if winner_key == "one" else second
            record = await read_record(probe, name)
            assert record is not None and record.live and record.node == winner.node
            assert record.session == winner.tunnel(name).session
            if first is not second:
                assert (one if winner is two else two).tunnel(name) is None
            for ws, _ in results.values():
                await ws.aclose()


async def test_lookup_answers_what_an_edge_needs(tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a", stream_window=128 * 1024) as control,
        start_agent(control, upstream.port, subdomain="shape", window=96 * 1024),
        nats_node(nats_server, "edge") as probe,
    ):
        tunnel = control.tunnel("shape")
        assert tunnel is not None and tunnel.node == control.node
        answer = await request(probe, "shape", {"op": "lookup"})
        assert answer["node"] == control.node
        assert answer["session"] == tunnel.session
        assert answer["aw"] == 96 * 1024  # the agent's HELLO window: the edge's credit
        assert answer["sw"] == 128 * 1024  # the control node's window, as the agent was told
        view = answer["tunnel"]
        assert set(view) == {"alias", "url", "port", "client", "user", "since", "expires_at", "metadata", "session",
                             "requests", "bytes_in", "bytes_out", "streams_open", "websockets_open", "policies"}
        assert view["policies"] == []  # no policy plugin enforces this tunnel (an edge checks it has each)
        # What the edge rebuilds is the control node's tunnel, field for field.
        assert Tunnel.from_view(view, control.node) == tunnel
        assert view["alias"] == "shape" and view["url"] == "http://shape.localhost"
        assert view["port"] == upstream.port and view["client"] == "127.0.0.1"
        assert view["since"] == tunnel.created_at
        # Nobody holds an unknown alias: NATS itself says so at once (the edge's 404).
        with pytest.raises(nats.errors.NoRespondersError):
            await probe.nc.request(probe.subjects.tunnel("nobody"), msgpack.packb({"op": "lookup"}), timeout=5)


async def test_notify_and_close_reach_the_agent_from_any_node(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        start_agent(control, upstream.port, subdomain="ops") as agent,
        nats_node(nats_server, "edge") as probe,
    ):
        assert await request(probe, "ops", {"op": "notify", "message": "hello from afar", "level": "warning"}) == {
            "ok": True}
        await wait_until(lambda: ("warning", "hello from afar") in agent.reporter.notices)
        assert await request(probe, "ops", {"op": "close", "reason": "closed by the operator"}) == {"closed": True}
        await wait_until(lambda: control.tunnel("ops") is None)
        # Released in KV: the close went through the directory like any disconnect.
        await wait_record(probe, "ops", lambda record: record is not None and not record.live)


async def test_disconnect_releases_the_alias_and_announces_it(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as control,
        nats_node(nats_server, "edge") as probe,
    ):
        events: list[dict[str, Any]] = []

        async def on_event(msg: Any) -> None:
            events.append(msgpack.unpackb(msg.data))

        await probe.nc.subscribe(probe.subjects.tunnel_events, cb=on_event)
        await probe.nc.flush()
        ws, welcome = await raw_hello(control, subdomain="gone")
        assert welcome.type == FT.WELCOME
        session = control.tunnel("gone").session
        await wait_until(lambda: len(events) == 1)
        assert events[0] == {"op": "up", "alias": "gone", "node": control.node, "session": session}
        record = await read_record(probe, "gone")
        assert record is not None and record.live and record.node == control.node and record.session == session
        await ws.close(1000, "bye")
        await wait_until(lambda: len(events) == 2)
        assert events[1] == {"op": "down", "alias": "gone", "node": control.node, "session": session}
        record = await read_record(probe, "gone")
        assert record is not None and not record.live
        with pytest.raises(nats.errors.NoRespondersError):
            await probe.nc.request(probe.subjects.tunnel("gone"), msgpack.packb({"op": "lookup"}), timeout=5)
        # Released: another agent (no secret) may have it at once, on this node or another.
        ws, again = await raw_hello(control, subdomain="gone")
        assert again.type == FT.WELCOME
        await ws.aclose()


async def test_an_unreachable_alias_registry_refuses_as_throttled(tmp_path: Path, nats_server: NatsServer) -> None:
    async with control_node(nats_server, tmp_path / "a") as control:
        nats_server.kill9()
        await wait_until(lambda: not control.cluster.nats.connected)
        ws, frame = await raw_hello(control, subdomain="later")
        assert frame.type == FT.REJECT
        assert frame.payload["code"] == "throttled"
        assert frame.payload["retry_after"] == 2
        assert "alias registry is unreachable" in frame.payload["reason"]
        closed, _ = await receive_until_closed(ws)
        assert closed.code == 1008
        assert control.tunnel("later") is None
        nats_server.start()
        await wait_until(lambda: control.cluster.nats.connected)
        ws, frame = await raw_hello(control, subdomain="later")
        assert frame.type == FT.WELCOME  # and the agent's retry then succeeds
        await ws.aclose()


async def test_a_release_during_a_nats_outage_is_made_once_nats_is_back(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with control_node(nats_server, tmp_path / "a") as control:
        ws, welcome = await raw_hello(control, subdomain="outage")
        assert welcome.type == FT.WELCOME
        nats_server.kill9()
        await wait_until(lambda: not control.cluster.nats.connected)
        await ws.close(1000, "bye")  # its release cannot reach KV now
        await wait_until(lambda: control.tunnel("outage") is None)
        nats_server.start()
        async with nats_node(nats_server, "edge") as probe:
            # Without the retry the record would stay live while this node's lease lives on, and
            # every other node would refuse the alias to anyone without its secret.
            record = await wait_record(probe, "outage", lambda r: r is not None and not r.live)
            assert record.node == control.node
