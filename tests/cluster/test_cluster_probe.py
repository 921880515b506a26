"""bench.cluster_probe reads each node's NATS messages and bytes from nats-server's monitoring port."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster_probe import connections
from bench.tools import free_port
from tests.cluster.conftest import NATS_SERVER, NatsServer, nats_node
from tests.helpers import unavailable

pytestmark = pytest.mark.anyio


async def test_connections_counts_what_each_node_sent_and_received(tmp_path: Path) -> None:
    if not NATS_SERVER.is_file():
        unavailable(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    monitor = free_port()
    nats = NatsServer(tmp_path / "nats", "-m", str(monitor))
    nats.start()
    try:
        async with nats_node(nats, "edge") as edge, nats_node(nats, "control") as control:
            subscription = await control.nc.subscribe("probe.x")
            await control.nc.flush()
            before = connections(monitor)
            for _ in range(3):
                await edge.nc.publish("probe.x", b"12345")
            await edge.nc.flush()
            for _ in range(3):
                assert (await subscription.next_msg(timeout=10)).data == b"12345"
            after = connections(monitor)
            await subscription.unsubscribe()
    finally:
        nats.kill9()
    assert set(after) == {"edge", "control"}
    assert after["edge"]["in_msgs"] - before["edge"]["in_msgs"] == 3
    assert after["edge"]["in_bytes"] - before["edge"]["in_bytes"] == 15
    assert after["control"]["out_msgs"] - before["control"]["out_msgs"] == 3
