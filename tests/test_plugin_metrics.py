"""metrics: /metrics in the Prometheus text format, with values checked after known traffic."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from comzy import __version__
from comzy.plugins.metrics import Metrics
from tests.conftest import ROOT, admin_client, start_agent, start_server
from tests.test_hooks import _register_and_expect_reject
from tests.test_websocket import open_ws
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (name, sorted labels), parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_after_known_traffic(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("metrics", Metrics())]) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.admin}") as anonymous:
            assert (await anonymous.get("/metrics")).status_code == 401
            wrong = await anonymous.get("/metrics", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
        await _register_and_expect_reject(server, subdomain="www")  # reserved: refused
        async with start_agent(server, upstream.port) as agent, agent.visitor() as client, \
                admin_client(server) as admin:
            for _ in range(3):
                assert (await client.get("/status/200")).status_code == 200
            assert (await client.get("/status/404")).status_code == 404
            assert (await client.post("/echo", content=b"x" * 1000)).status_code == 200
            async with open_ws(server, agent.alias, "/ws/mirror") as (ws, _):
                await ws.send("ping")
                await ws.receive()
                scrape = await admin.get("/metrics")
                assert scrape.status_code == 200
                assert scrape.headers["content-type"].startswith("text/plain")
                live = samples(scrape.text)
                assert live[("comzy_tunnels_active", ())] == 1
                assert live[("comzy_websocket_streams_open", ())] == 1
                assert live[("comzy_streams_open", ())] == 1  # the WebSocket (the scrape is no stream)
            # Let the edge finish the WebSocket exchange (after_response) before the next scrape.
            with anyio.fail_after(10):
                while samples((await admin.get("/metrics")).text)[  # noqa: ASYNC110 (polling a scrape)
                        ("comzy_websocket_streams_open", ())]:
                    await anyio.sleep(0.01)
            with anyio.fail_after(10):
                while (values := samples((await admin.get("/metrics")).text)).get(  # noqa: ASYNC110
                        ("comzy_requests_total", (("status_class", "1xx"),)), 0) < 1:
                    await anyio.sleep(0.01)
    assert values[("comzy_requests_total", (("status_class", "2xx"),))] == 4
    assert values[("comzy_requests_total", (("status_class", "4xx"),))] == 1
    assert values[("comzy_requests_total", (("status_class", "5xx"),))] == 0
    assert values[("comzy_request_duration_seconds_count", ())] == 6  # 5 requests and the WebSocket
    assert values[("comzy_request_duration_seconds_sum", ())] > 0
    assert values[("comzy_bytes_in_total", ())] >= 1000 + len("ping")
    assert values[("comzy_bytes_out_total", ())] >= len("status 200\n") * 3
    assert values[("comzy_registrations_total", (("reason", ""), ("result", "accepted")))] == 1
    assert values[("comzy_registrations_total", (("reason", "rejected"), ("result", "refused")))] == 1
    # Every refusal code the core uses is there from the start (counted from on_registration_refused).
    for code in ("protocol", "version", "throttled", "internal"):
        assert values[("comzy_registrations_total", (("reason", code), ("result", "refused")))] == 0
    assert values[("comzy_tunnels_active", ())] == 1
    assert values[("comzy_websocket_streams_open", ())] == 0
    assert ("comzy_build_info", (("version", __version__),)) in values


async def test_two_servers_in_one_process_keep_their_own_numbers(tmp_path: Path, upstream: Upstream) -> None:
    first, second = Metrics(), Metrics()
    async with start_server(tmp_path / "a", plugins=[("metrics", first)]) as a, \
            start_server(tmp_path / "b", plugins=[("metrics", second)]) as b, \
            start_agent(a, upstream.port) as agent, agent.visitor() as client:
        await client.get("/status/200")
        async with admin_client(a) as admin_a, admin_client(b) as admin_b:
            with anyio.fail_after(10):
                while samples((await admin_a.get("/metrics")).text).get(  # noqa: ASYNC110
                        ("comzy_requests_total", (("status_class", "2xx"),)), 0) < 1:
                    await anyio.sleep(0.01)
            other = samples((await admin_b.get("/metrics")).text)
    assert other[("comzy_requests_total", (("status_class", "2xx"),))] == 0
    assert other[("comzy_tunnels_active", ())] == 0


def test_metrics_read_only_documented_numbers() -> None:
    """Events and ``Tunnel``'s counts: no registry, no sessions, no counters named by string."""
    source = (ROOT / "comzy" / "plugins" / "metrics" / "plugin.py").read_text()
    for internal in ("comzy.core", "server.registry", ".session", "streams.values", "server.count",
                     "registrations_refused:"):
        assert internal not in source, internal
