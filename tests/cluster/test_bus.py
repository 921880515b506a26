"""server.bus: LocalBus in role all, ClusterBus between nodes over a real nats-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import pytest

from comzy.core.cluster.bus import QUEUE_LIMIT, LocalBus
from tests.cluster.conftest import NatsServer, nats_node
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


# -- LocalBus (role all) ----------------------------------------------------------------------
async def test_local_bus_delivers_at_once_and_gathers_from_this_process() -> None:
    bus = LocalBus()
    seen: list[tuple[str, dict[str, Any]]] = []
    bus.subscribe("demo.events", lambda node, event: seen.append((node, event)))
    bus.publish("demo.events", {"n": 1})
    bus.publish("other.topic", {"n": 2})  # nobody listens: nothing happens
    assert seen == [("", {"n": 1})]  # before publish returned: one code path for plugins

    assert await bus.gather("demo.count") == {}  # no answerer
    bus.answer("demo.count", lambda request: {"got": request})
    assert await bus.gather("demo.count", [1, 2]) == {"": {"got": [1, 2]}}

    async def slow(request: Any) -> int:
        return 7

    bus.answer("demo.async", slow)
    assert await bus.gather("demo.async") == {"": 7}
    assert bus.nodes() == [""]


async def test_local_bus_refuses_what_a_cluster_would_refuse() -> None:
    bus = LocalBus()
    with pytest.raises(ValueError, match="bus topic 'bad topic' is not valid"):
        bus.publish("bad topic", {})
    with pytest.raises(ValueError, match="not valid"):
        bus.subscribe("a..b", lambda node, event: None)
    bus.answer("t", lambda request: 1)
    with pytest.raises(ValueError, match="already has an answerer"):
        bus.answer("t", lambda request: 2)
    with pytest.raises(TypeError):  # a request a cluster could not send
        await bus.gather("t", object())


async def test_local_bus_leaves_out_a_failing_answer_as_a_cluster_does(caplog: pytest.LogCaptureFixture) -> None:
    bus = LocalBus()
    bus.answer("odd", lambda request: object())  # an answer msgpack cannot carry
    assert await bus.gather("odd") == {}
    assert "the answerer of odd failed; this node's answer is left out" in caplog.text


async def test_local_bus_subscriber_failure_spares_the_publisher_and_the_others() -> None:
    bus = LocalBus()
    seen: list[dict[str, Any]] = []

    def broken(node: str, event: dict[str, Any]) -> None:
        raise RuntimeError("bug")

    bus.subscribe("t", broken)
    bus.subscribe("t", lambda node, event: seen.append(event))
    bus.publish("t", {"x": 1})
    assert seen == [{"x": 1}]


# -- ClusterBus -----------------------------------------------------------------------------
@asynccontextmanager
async def bus_node(nats: NatsServer, **overrides: Any) -> AsyncIterator[Any]:
    """A NatsNode with a started ClusterBus (the ClusterNode parts the bus uses: nats, task_group)."""
    from comzy.core.cluster.bus import ClusterBus

    async with nats_node(nats, **overrides) as node, anyio.create_task_group() as tg:
        bus = ClusterBus(SimpleNamespace(nats=node, task_group=tg))  # type: ignore[arg-type]
        await bus.start()
        try:
            yield bus
        finally:
            await bus.stop()
            tg.cancel_scope.cancel()


async def test_events_reach_every_node_in_order_in_one_message_per_batch(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a, bus_node(nats_server) as b:
        got_a: list[tuple[str, dict[str, Any]]] = []
        got_b: list[tuple[str, dict[str, Any]]] = []
        a.subscribe("demo.events", lambda node, event: got_a.append((node, event)))
        b.subscribe("demo.events", lambda node, event: got_b.append((node, event)))
        messages: list[bytes] = []

        async def count(msg: Any) -> None:
            messages.append(msg.data)

        watcher = await b.nats.nc.subscribe(b.nats.subjects.bus("demo.events"), cb=count)
        await b.nats.nc.flush()
        for n in range(100):
            a.publish("demo.events", {"n": n})
        expected = [(a.node, {"n": n}) for n in range(100)]
        await wait_until(lambda: len(got_a) == 100 and len(got_b) == 100)
        assert got_a == expected and got_b == expected  # this node's own subscribers too
        assert len(messages) == 1  # batched: 100 publishes, one NATS message
        await watcher.unsubscribe()
        assert a.dropped == 0


async def test_gather_waits_for_live_nodes_only_until_the_timeout(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a, bus_node(nats_server) as b:
        a.answer("demo.who", lambda request: {"me": "a", "asked": request})

        async def answer_b(request: Any) -> dict[str, Any]:
            await anyio.lowlevel.checkpoint()  # an async answerer, really awaited
            return {"me": "b", "asked": request}

        b.answer("demo.who", answer_b)
        await wait_until(lambda: b.node in a.nats.live_nodes())
        started = time.monotonic()
        answers = await a.gather("demo.who", "hi", timeout=10.0)
        assert answers == {a.node: {"me": "a", "asked": "hi"}, b.node: {"me": "b", "asked": "hi"}}
        assert time.monotonic() - started < 5.0  # returned once all live nodes answered, not at the timeout
        # A node without an answerer says so: the gather does not wait for it either.
        started = time.monotonic()
        assert await b.gather("demo.only-b", None, timeout=10.0) == {}
        assert time.monotonic() - started < 5.0
        assert a.nodes() == sorted([a.node, b.node])

        # A live node that stays silent (its lease is there, its bus is not): the answers that came.
        async with nats_node(nats_server) as silent:
            await wait_until(lambda: silent.node_id in a.nats.live_nodes())
            started = time.monotonic()
            answers = await a.gather("demo.who", "again", timeout=0.5)
            assert time.monotonic() - started >= 0.5
            assert set(answers) == {a.node, b.node}


async def test_answers_larger_than_max_payload_are_chunked(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a, bus_node(nats_server) as b:
        big = {"blob": bytes(range(256)) * (3 * 1024 * 1024 // 256 + 7)}  # over 3 MiB: 4+ NATS messages
        assert len(msgpack.packb(big)) > 3 * b.nats.max_payload
        b.answer("demo.big", lambda request: big)
        await wait_until(lambda: b.node in a.nats.live_nodes())
        answers = await a.gather("demo.big", timeout=10.0)
        assert answers == {b.node: big}


async def test_a_full_queue_drops_and_subscribers_are_told(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a, bus_node(nats_server) as b:
        got: list[dict[str, Any]] = []
        b.subscribe("demo.flood", lambda node, event: got.append(event))
        for n in range(QUEUE_LIMIT + 25):  # all in one tick: the flusher has not run yet
            a.publish("demo.flood", {"n": n})
        assert a.dropped == 25
        await wait_until(lambda: len(got) == QUEUE_LIMIT + 1)
        assert got[0] == {"type": "lagged", "dropped": 25}
        assert [event["n"] for event in got[1:]] == list(range(QUEUE_LIMIT))


async def test_an_event_larger_than_a_bus_message_is_dropped_and_counted(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a:
        got: list[dict[str, Any]] = []
        a.subscribe("demo.big", lambda node, event: got.append(event))
        a.publish("demo.big", {"blob": b"x" * (a.nats.max_payload + 1)})
        a.publish("demo.big", {"small": 1})
        await wait_until(lambda: len(got) == 2)
        assert got == [{"type": "lagged", "dropped": 1}, {"small": 1}]
        assert a.dropped == 1


async def test_events_published_while_nats_is_away_are_sent_after_the_reconnect(nats_server: NatsServer) -> None:
    async with bus_node(nats_server) as a, bus_node(nats_server) as b:
        got: list[dict[str, Any]] = []
        b.subscribe("demo.later", lambda node, event: got.append(event))
        nats_server.kill9()
        await wait_until(lambda: not a.nats.connected and not b.nats.connected)
        a.publish("demo.later", {"n": 1})  # never blocks, even now
        from comzy.core.cluster.connection import BusDown

        with pytest.raises(BusDown, match="cannot reach the cluster's message bus"):
            await a.gather("demo.anything")
        nats_server.start()
        await wait_until(lambda: got == [{"n": 1}])
        assert a.dropped == 0
