"""One operator view across nodes: all_tunnels, the dashboard's feed and API, through server.bus.

Nodes are in-process ``run_server`` contexts in roles control and edge, on the test's own
nats-server; the agent is a real in-process agent registered on the control node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from comzy import ServerContext
from comzy.plugins.dashboard import Dashboard
from tests.cluster.conftest import NatsServer, cluster_settings
from tests.conftest import admin_client, make_settings, start_agent
from tests.helpers import wait_until
from tests.test_plugin_dashboard import next_event, open_feed
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def node(data_dir: Path, nats: NatsServer, role: str, name: str,
               plugins: Any = ()) -> AsyncIterator[ServerContext]:
    """A cluster node ``name`` in ``role``, in this process, on ``nats``, with its data in ``data_dir``."""
    from comzy.core.server import run_server

    settings = make_settings(data_dir, role=role, public_url="http://{alias}.localhost:8080")
    async with run_server(settings, plugins, cluster_settings(nats, node_name=name)) as server:
        yield server


async def test_all_tunnels_and_the_dashboard_show_the_control_nodes_tunnels_on_an_edge(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with node(tmp_path / "ctl", nats_server, "control", "ctl", [("dashboard", Dashboard())]) as ctl, \
            node(tmp_path / "edge", nats_server, "edge", "edge", [("dashboard", Dashboard())]) as edge:
        await wait_until(lambda: ctl.node in edge.cluster.nats.live_nodes())  # type: ignore[union-attr]
        assert await edge.all_tunnels() == []
        feed = await open_feed(edge)
        try:
            snapshot = await next_event(feed, "snapshot")
            assert snapshot["tunnels"] == [] and snapshot["server"]["node"] == edge.node
            async with start_agent(ctl, upstream.port) as agent:
                # The control node's on_connect reaches the edge's feed over the bus.
                registered = await next_event(feed, "tunnel_registered")
                assert registered["tunnel"]["alias"] == agent.alias and registered["node"] == ctl.node
                tunnels = await edge.all_tunnels()
                assert [(t.alias, t.node, t.session) for t in tunnels] == [
                    (agent.alias, ctl.node, ctl.tunnels()[0].session)]
                async with admin_client(edge) as admin:
                    listed = (await admin.get("/api/tunnels")).json()["tunnels"]
                    assert [(t["alias"], t["node"]) for t in listed] == [(agent.alias, ctl.node)]
                    # No node holds this alias: the close request gets no responders.
                    gone = await admin.delete("/api/tunnels/nobody-here")
                    assert gone.status_code == 404, gone.text
                    # The edge holds no tunnel, yet DELETE closes it on the control node that does.
                    closing = await admin.delete(f"/api/tunnels/{agent.alias}")
                    assert closing.status_code == 200 and closing.json() == {"closed": agent.alias}, closing.text
                    closed = await next_event(feed, "tunnel_closed")
                    assert closed["alias"] == agent.alias and closed["node"] == ctl.node
                    assert closed["reason"] == "closed by the server's operator (admin dashboard)"
                    await wait_until(lambda: ctl.tunnel(agent.alias) is None)
                    assert await edge.all_tunnels() == []
        finally:
            await feed.aclose()


async def test_role_all_all_tunnels_is_tunnels_and_the_bus_is_local(tmp_path: Path, upstream: Upstream) -> None:
    from comzy.core.cluster.bus import LocalBus
    from tests.conftest import start_server

    async with start_server(tmp_path / "data") as server, start_agent(server, upstream.port) as agent:
        assert isinstance(server.bus, LocalBus) and server.bus.nodes() == [""]
        assert [t.alias for t in await server.all_tunnels()] == [agent.alias]
        assert (await server.all_tunnels())[0] is server.tunnels()[0]  # no copy in role all


async def test_auth_token_claims_and_releases_reach_the_other_nodes_at_once(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    """Two control nodes on one database, refreshing it only hourly: a claim made on one is known
    on the other through the bus (alias_owner, which custom_domains and the registration rules ask)."""
    from comzy.core import db
    from comzy.plugins.auth_token import AuthToken, AuthTokenSettings
    from comzy.plugins.auth_token.models import SCHEMA
    from comzy.plugins.auth_token.store import create_user, find_user, hash_token

    data = tmp_path / "shared"
    engine = await db.prepare_database(make_settings(data), SCHEMA)
    try:
        token = await create_user(engine, "ana")
        user = await find_user(engine, hash_token(token))
    finally:
        await engine.dispose()
    assert user is not None
    one, two = (AuthToken(AuthTokenSettings(_env_file=None, refresh_seconds=3600)) for _ in range(2))
    async with node(data, nats_server, "control", "ctl1", [("auth_token", one)]) as ctl1, \
            node(data, nats_server, "control", "ctl2", [("auth_token", two)]):
        async with start_agent(ctl1, upstream.port, token=token) as agent:
            alias = agent.alias
            assert one.alias_owner(alias) == "ana"
            await wait_until(lambda: two.alias_owner(alias) == "ana")
        assert await one.release(user, alias)
        await wait_until(lambda: two.alias_owner(alias) is None)
        assert one.refreshes == two.refreshes == 1  # the start-up read only: the bus told node two


async def test_metrics_on_any_node_show_every_nodes_samples_with_a_node_label(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    from comzy.plugins.metrics import Metrics
    from tests.cluster.conftest import nats_node
    from tests.test_plugin_metrics import samples

    async with node(tmp_path / "ctl", nats_server, "control", "ctl", [("metrics", Metrics())]) as ctl, \
            node(tmp_path / "edge", nats_server, "edge", "edge", [("metrics", Metrics())]) as edge, \
            start_agent(ctl, upstream.port), admin_client(edge) as admin:
        await wait_until(lambda: ctl.node in edge.cluster.nats.live_nodes())  # type: ignore[union-attr]
        scrape = await admin.get("/metrics")
        assert scrape.status_code == 200, scrape.text
        values = samples(scrape.text)
        assert values[("comzy_tunnels_active", (("node", ctl.node),))] == 1
        assert values[("comzy_tunnels_active", (("node", edge.node),))] == 0
        accepted = (("node", ctl.node), ("reason", ""), ("result", "accepted"))
        assert values[("comzy_registrations_total", accepted)] == 1
        assert values[("comzy_cluster_nodes_missing", ())] == 0
        own = samples((await admin.get("/metrics", params={"scope": "node"})).text)
        assert own[("comzy_tunnels_active", ())] == 0  # this node alone, unlabelled
        # A live node that does not answer: the scrape says so rather than hiding it.
        async with nats_node(nats_server) as silent:
            await wait_until(lambda: silent.node_id in edge.bus.nodes())
            values = samples((await admin.get("/metrics")).text)
            assert values[("comzy_cluster_nodes_missing", ())] == 1
            assert values[("comzy_tunnels_active", (("node", ctl.node),))] == 1


async def test_an_anonymous_alias_keeps_its_deadline_on_another_control_node(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    """Anonymous tunnels last COMZY_ANONYMOUS_TIMEOUT_SECONDS whatever node the agent comes back to."""
    from comzy.plugins.anonymous_timeout import AnonymousTimeout, AnonymousTimeoutSettings

    one, two = (AnonymousTimeout(AnonymousTimeoutSettings(_env_file=None, seconds=600)) for _ in range(2))
    async with node(tmp_path / "ctl1", nats_server, "control", "ctl1", [("anonymous_timeout", one)]) as ctl1, \
            node(tmp_path / "ctl2", nats_server, "control", "ctl2", [("anonymous_timeout", two)]) as ctl2:
        async with start_agent(ctl1, upstream.port) as first:
            alias = first.alias
            first_tunnel = ctl1.tunnel(alias)
            assert first_tunnel is not None and first_tunnel.expires_at is not None
            deadline = first_tunnel.expires_at
            await wait_until(lambda: two._deadlines.get(alias) == deadline)

        async def released_for_ctl2() -> bool:
            return (await ctl2.directory.holders([alias])).holder(alias) is None

        # ctl1 drops the session from its registry before it marks the KV record released: until
        # then the record is live on a live node, and ctl2 rightly refuses the alias to an agent
        # without its resume secret. Wait for what ctl2's registration reads, not ctl1's registry.
        await wait_until(released_for_ctl2)
        # The same alias, later, on the other node: registered with a fresh lifetime, then held to the first.
        async with start_agent(ctl2, upstream.port, subdomain=alias) as second:
            assert second.alias == alias and second.reporter.welcomes[-1]["expires_at"] > deadline
            again = ctl2.tunnel(alias)
            assert again is not None
            await wait_until(lambda: again.expires_at == deadline)


async def test_a_request_through_one_edge_shows_on_every_nodes_feed(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    """Edge one serves a request; edge two's feed, recent list and /api/requests show it (node: edge one)."""
    import msgpack
    import nats.errors

    from tests.cluster.conftest import wait_linkable
    from tests.conftest import visitor

    async with node(tmp_path / "ctl", nats_server, "control", "ctl", [("dashboard", Dashboard())]) as ctl, \
            node(tmp_path / "e1", nats_server, "edge", "e1", [("dashboard", Dashboard())]) as edge1, \
            node(tmp_path / "e2", nats_server, "edge", "e2", [("dashboard", Dashboard())]) as edge2, \
            start_agent(ctl, upstream.port) as agent:
        assert edge1.cluster is not None and ctl.cluster is not None
        await wait_linkable(edge1.cluster.nats, ctl.cluster.nats)
        subject = edge1.cluster.nats.subjects.tunnel(agent.alias)
        with anyio.fail_after(10):  # until edge one sees the lookup subject (conftest.wait_linkable's race)
            while True:
                try:
                    await edge1.cluster.nats.nc.request(subject, msgpack.packb({"op": "lookup"}), timeout=1)
                    break
                except nats.errors.NoRespondersError:
                    continue
        feed = await open_feed(edge2)
        try:
            await next_event(feed, "snapshot")
            async with visitor(edge1, agent.alias) as client:
                assert (await client.get("/status/201")).status_code == 201
            event = await next_event(feed, "request")
            assert (event["alias"], event["path"], event["status"], event["node"]) == (
                agent.alias, "/status/201", 201, edge1.node)
        finally:
            await feed.aclose()
        async with admin_client(edge2) as admin:
            logged = (await admin.get("/api/requests")).json()
            assert logged["source"] == "memory"
            assert [(r["path"], r["node"]) for r in logged["requests"]] == [("/status/201", edge1.node)]
        # The control node that served it counted it; every node's list shows that count.
        await wait_until(lambda: ctl.tunnels()[0].requests == 1)
        [listed] = await edge2.all_tunnels()
        assert (listed.alias, listed.requests, listed.node) == (agent.alias, 1, ctl.node)


async def test_all_tunnels_names_a_control_node_that_did_not_answer(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    from tests.cluster.conftest import nats_node

    async with node(tmp_path / "ctl", nats_server, "control", "ctl") as ctl, \
            node(tmp_path / "edge", nats_server, "edge", "edge") as edge, start_agent(ctl, upstream.port) as agent, \
            nats_node(nats_server, role="control") as silent:  # a lease, and no bus: it never answers
        await wait_until(lambda: silent.node_id in edge.bus.nodes())
        assert [t.alias for t in await edge.all_tunnels()] == [agent.alias]  # the answers that came, at the timeout
        assert f"the tunnel list lacks control node(s) {silent.node_id}" in caplog.text


async def test_a_node_cut_off_from_nats_says_so_instead_of_listing_nothing(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with node(tmp_path / "edge", nats_server, "edge", "edge", [("dashboard", Dashboard())]) as edge, \
            admin_client(edge) as admin:
        assert (await admin.get("/api/tunnels")).json() == {"tunnels": []}
        nats_server.kill9()
        await wait_until(lambda: not edge.cluster.nats.connected)  # type: ignore[union-attr]
        listed = await admin.get("/api/tunnels")
        assert listed.status_code == 503
        assert "cannot reach the cluster's message bus" in listed.json()["error"]
        closing = await admin.delete("/api/tunnels/some-alias")
        assert closing.status_code == 503 and "'some-alias' cannot be closed right now" in closing.json()["error"]
        nats_server.start()  # so that the node stops cleanly
        await wait_until(lambda: edge.cluster.nats.connected)  # type: ignore[union-attr]
