"""rate_limit (issue 14): the limiter with an injected clock, then a real server, agent and local app;
and policies as operators see them (describe_policy: /api/tunnels, the feed, the page), never secrets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.agent.cli import parse_args
from comzy.agent.client import Agent, AgentConfig, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.agent.policies import BASIC_AUTH, RATE_LIMIT, BasicAuth, RateLimit
from comzy.core.websocket import HandshakeRejected
from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin
from comzy.plugins.dashboard import Dashboard
from comzy.plugins.metrics import Metrics
from comzy.plugins.rate_limit import RateLimit as RateLimitPlugin
from comzy.plugins.rate_limit.limiter import Limiter, Rate, client_key
from comzy.plugins.rate_limit.plugin import parse_policy
from comzy.plugins.rate_limit.settings import RateLimitSettings
from tests.conftest import ROOT, RecordingReporter, admin_client, cli_env, start_agent, start_server
from tests.helpers import wait_until
from tests.stack import Stack, Stacks, stacks_fixture  # noqa: F401 (the stacks fixture: role all and a cluster)
from tests.test_large_transfers import popen, read_until
from tests.test_plugin_basic_auth import OTHER, PASSWORD, basic, open_ws
from tests.test_plugin_dashboard import next_event, open_feed
from tests.test_plugin_metrics import samples
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


class Clock:
    """A clock the test moves by hand (``now`` in seconds; the limiter reads nanoseconds): the
    limiter's tests never sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> int:
        return round(self.now * 1_000_000_000)


def owner(text: str) -> dict[str, Any]:
    """What the stock agent sends for ``--rate-limit TEXT``."""
    return {"plugin_data": {RATE_LIMIT: RateLimit.parse(text).plugin_data()}, "require": [RATE_LIMIT]}


async def control_in_sight(stack: Stack) -> None:
    """On a cluster, until the edge sees the control node live: before, its all_tunnels asks nobody."""
    if stack.public is not stack.control:
        cluster = stack.public.cluster
        assert cluster is not None
        await wait_until(lambda: stack.control.node in cluster.nats.live_nodes())


def plugin(per_minute: int | None = None, clock: Clock | None = None, max_clients: int = 50_000) -> RateLimitPlugin:
    settings = RateLimitSettings(_env_file=None, per_minute=per_minute, max_clients=max_clients)  # type: ignore[call-arg]
    return RateLimitPlugin(settings, Limiter(max_clients, clock) if clock is not None else None)


# -- the algorithm ---------------------------------------------------------------------------------
def test_a_full_bucket_then_one_per_interval_and_the_exact_wait() -> None:
    clock = Clock()
    limiter = Limiter(10, clock)
    three = [Rate(3, 60)]
    assert [limiter.check("a", three) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.check("a", three) == pytest.approx(20.0)  # a slot frees every 60/3 s
    clock.now += 5
    assert limiter.check("a", three) == pytest.approx(15.0)  # a refusal took no slot
    clock.now += 15
    assert limiter.check("a", three) == 0.0
    assert limiter.check("a", three) == pytest.approx(20.0)
    clock.now += 60  # a quiet minute refills the bucket: three again, no more
    assert [limiter.check("a", three) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert limiter.check("b", three) == 0.0  # another key counts apart


def test_every_rate_applies_and_the_longest_wait_is_given() -> None:
    clock = Clock()
    limiter = Limiter(10, clock)
    rates = [Rate(3, 60), Rate(2, 1)]  # say, the operator's 3/min and an owner's 2/s
    assert [limiter.check("k", rates) for _ in range(2)] == [0.0, 0.0]
    assert limiter.check("k", rates) == pytest.approx(0.5)  # the 2/s bucket is empty
    clock.now += 1
    assert limiter.check("k", rates) == 0.0
    assert limiter.check("k", rates) == pytest.approx(19.0)  # the 3/min one: 60 s after the first, less 1


def test_a_large_burst_is_admitted_whole_despite_float_rounding() -> None:
    limiter = Limiter(10, Clock())
    rate = [Rate(100_000, 60)]
    admitted = sum(limiter.check("k", rate) == 0.0 for _ in range(100_001))
    assert admitted == 100_000


def test_the_table_is_bounded_and_full_buckets_go_first() -> None:
    clock = Clock()
    limiter = Limiter(100, clock)
    rate = [Rate(1, 60)]
    assert limiter.check("victim", rate) == 0.0
    assert limiter.check("victim", rate) > 0  # the victim is being limited
    for n in range(99):  # a full table of other active clients
        limiter.check(f"other{n}", rate)
    assert len(limiter) == 100 and limiter.evicted == 0
    clock.now += 61  # every one of them has a full bucket again: forgetting them changes nothing
    limiter.check("victim", rate)
    assert limiter.check("victim", rate) > 0
    for n in range(60):
        limiter.check(f"attacker{n}", rate)
    # The expired keys made room: the victim, still counting, was kept.
    assert limiter.evicted == 0 and limiter.check("victim", rate) > 0
    for n in range(60, 1000):
        limiter.check(f"attacker{n}", rate)
        assert len(limiter) <= 100
    # Then 100 newer active keys pushed it out: resetting one visitor's count takes the table's size
    # in other addresses, all active within one period.
    assert limiter.evicted > 0
    assert limiter.check("victim", rate) == 0.0


def test_a_client_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    # A dual-stack listener's IPv4 visitors: each its own, not all in ::/64.
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("::ffff:203.0.113.8") != client_key("::ffff:203.0.113.7")
    assert client_key("") == ""


def test_owner_data_is_validated() -> None:
    assert parse_policy({"requests": 10, "seconds": 60}) == {"requests": 10, "seconds": 60}
    for bad, words in [([], "map"), ({"requests": 10}, "exactly"), ({"requests": 0, "seconds": 60}, "1 to"),
                       ({"requests": True, "seconds": 60}, "whole"), ({"requests": 10**9, "seconds": 60}, "1 to"),
                       ({"requests": 1, "seconds": 7}, "1, 60 or 3600"),
                       ({"requests": 1, "seconds": 60, "x": 1}, "exactly")]:
        with pytest.raises(ValueError, match=words):
            parse_policy(bad)


def test_the_command_line_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["3000", "--rate-limit", "30/min"])
    assert args.rate_limit == RateLimit(30, 60)
    assert args.rate_limit.plugin_data() == {"requests": 30, "seconds": 60}
    assert args.rate_limit.describe() == "rate limit 30/min per client address (over it: 429 Too Many Requests)"
    assert parse_args(["3000"]).rate_limit is None
    for text, parsed in [("5/s", (5, 1)), ("5/sec", (5, 1)), ("100/h", (100, 3600)), ("2 / minute", (2, 60)),
                         ("7/hours", (7, 3600)), ("1/m", (1, 60))]:
        assert (RateLimit.parse(text).requests, RateLimit.parse(text).seconds) == parsed
    for text, words in [("0/min", "1 to 1,000,000"), ("5/day", "N/s, N/min or N/h"), ("5", "N/s"), ("5/ms", "N/s"),
                        ("x/min", "N/s")]:
        with pytest.raises(SystemExit) as exited:
            parse_args(["3000", "--rate-limit", text])
        assert exited.value.code == 2
        assert words in capsys.readouterr().err


# -- through a real server, agent and local app ---------------------------------------------------------
async def test_over_the_owner_s_limit_visitors_get_429_with_the_exact_retry_after(tmp_path: Path,
                                                                                    upstream: Upstream) -> None:
    clock = Clock()
    async with start_server(tmp_path, plugins=[(RATE_LIMIT, plugin(clock=clock))]) as server, \
            start_agent(server, upstream.port, **owner("3/min")) as tunnel, tunnel.visitor() as client:
        assert tunnel.reporter.welcomes[0]["enforced"] == [RATE_LIMIT]
        assert [(await client.get("/status/200")).status_code for _ in range(3)] == [200, 200, 200]
        refused = await client.get("/status/200")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "20"
        assert "limit 3/min" in refused.text and "retry in 20 s" in refused.text
        assert len(upstream.requests) == 3  # the 429 never reached the agent
        clock.now += 19.5
        assert (await client.get("/status/200")).headers["retry-after"] == "1"  # rounded up, never 0
        clock.now += 0.5
        assert (await client.get("/status/200")).status_code == 200
    assert len(upstream.requests) == 4


async def test_each_client_address_has_its_own_count(tmp_path: Path, upstream: Upstream) -> None:
    """Behind a trusted proxy the address is the one it names (X-Forwarded-For); from anyone else
    the header is ignored, so a visitor cannot escape the limit by inventing addresses."""
    async with start_server(tmp_path, plugins=[(RATE_LIMIT, plugin(clock=Clock()))],
                            trusted_proxies="127.0.0.1/32") as server, \
            start_agent(server, upstream.port, **owner("2/min")) as tunnel, tunnel.visitor() as client:
        def status_for(address: str) -> Any:
            return client.get("/status/200", headers={"x-forwarded-for": address})

        assert [(await status_for("203.0.113.1")).status_code for _ in range(3)] == [200, 200, 429]
        assert [(await status_for("203.0.113.2")).status_code for _ in range(3)] == [200, 200, 429]
        assert (await status_for("2001:db8::1")).status_code == 200
        assert (await status_for("2001:db8::2")).status_code == 200  # the same /64
        assert (await status_for("2001:db8::3")).status_code == 429
    async with start_server(tmp_path / "untrusted", plugins=[(RATE_LIMIT, plugin(clock=Clock()))]) as server, \
            start_agent(server, upstream.port, **owner("2/min")) as tunnel, tunnel.visitor() as client:
        codes = [(await client.get("/", headers={"x-forwarded-for": f"198.51.100.{n}"})).status_code
                 for n in range(3)]
        assert codes[2] == 429  # all of them are 127.0.0.1


@pytest.mark.parametrize(("operator", "asked", "allowed"), [(5, "10/min", 5), (5, "2/min", 2), (3, None, 3)])
async def test_the_operator_s_limit_holds_and_an_owner_can_only_lower_it(
        tmp_path: Path, upstream: Upstream, operator: int, asked: str | None, allowed: int) -> None:
    config = owner(asked) if asked else {}
    async with start_server(tmp_path, plugins=[(RATE_LIMIT, plugin(per_minute=operator, clock=Clock()))]) as server, \
            start_agent(server, upstream.port, **config) as tunnel, tunnel.visitor() as client:
        codes = [(await client.get("/status/200")).status_code for _ in range(allowed + 1)]
        notices = tunnel.reporter.welcomes[0].get("notices", [])
    assert codes == [200] * allowed + [429]
    if asked == "10/min":  # the owner is told that the server's lower limit applies too
        assert any("5/min per client address, below the 10/min asked for" in line for line in notices)


async def test_websocket_upgrades_are_limited_before_the_agent(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[(RATE_LIMIT, plugin(clock=Clock()))]) as server, \
            start_agent(server, upstream.port, **owner("1/h")) as tunnel:
        ws = await open_ws(server, tunnel.alias, {})
        await ws.aclose()
        with pytest.raises(HandshakeRejected) as caught:
            await open_ws(server, tunnel.alias, {})
        assert caught.value.status == 429
        assert (b"retry-after", b"3600") in [(name.lower(), value) for name, value in caught.value.headers]
    assert [scope["type"] for scope in upstream.requests] == ["websocket"]


async def test_refusals_are_counted_in_metrics_and_shown_in_the_feed(tmp_path: Path, upstream: Upstream) -> None:
    plugins = [("metrics", Metrics()), ("dashboard", Dashboard()), (RATE_LIMIT, plugin(clock=Clock()))]
    async with start_server(tmp_path, plugins=plugins) as server, \
            start_agent(server, upstream.port, **owner("1/min")) as tunnel, tunnel.visitor() as client, \
            admin_client(server) as admin:
        feed = await open_feed(server)
        try:
            await next_event(feed, "snapshot")
            assert (await client.get("/status/200")).status_code == 200
            assert (await client.get("/limited")).status_code == 429
            events = [await next_event(feed, "request"), await next_event(feed, "request")]
        finally:
            await feed.aclose()
        scrape = samples((await admin.get("/metrics")).text)
        listed = (await admin.get("/api/tunnels")).json()["tunnels"]
    refused = next(event for event in events if event["status"] == 429)
    assert refused["refused_by"] == RATE_LIMIT and refused["path"] == "/limited"
    assert refused["error"] == "refused by rate_limit" and refused["bytes_out"] == 0
    assert scrape[("comzy_requests_refused_total", (("plugin", "rate_limit"), ("status", "429")))] == 1
    assert scrape[("comzy_requests_total", (("status_class", "2xx"),))] == 1  # only what reached the agent
    [view] = listed
    assert view["requests"] == 1  # the tunnel's totals count only what reached it
    assert view["policies"] == {RATE_LIMIT: {"per": "client address", "operator": None, "owner": "1/min"}}


# -- fail closed ----------------------------------------------------------------------------------------
async def test_a_server_without_the_plugin_refuses_the_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path) as server:  # COMZY_PLUGINS=none
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port,
                                  **owner("10/min")), LocalForwarder("127.0.0.1", upstream.port), RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(10):
            await agent.run()
        assert server.tunnels() == []
    assert "this server does not enforce rate_limit: ask its operator to enable the rate_limit plugin" in str(
        caught.value)


async def test_an_edge_without_the_plugin_refuses_a_limited_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    stacks = Stacks("cluster", tmp_path)
    try:
        async with stacks.start(plugins=[(RATE_LIMIT, plugin())], edge_plugins=()) as stack, \
                stack.agent(upstream.port, **owner("100/min")) as tunnel, stack.visitor(tunnel.alias) as client:
            refused = await client.get("/status/200")
            assert refused.status_code == 502
            assert "the rate_limit plugin is not enabled" in refused.text
    finally:
        stacks.close()
    assert upstream.requests == []


async def test_an_edge_counts_its_own_visitors(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start(plugins=[(RATE_LIMIT, plugin(clock=Clock()))]) as stack, \
            stack.agent(upstream.port, **owner("2/min")) as tunnel, stack.visitor(tunnel.alias) as client:
        assert [(await client.get("/status/200")).status_code for _ in range(3)] == [200, 200, 429]
    assert len(upstream.requests) == 2


# -- what operators see -------------------------------------------------------------------------------
async def test_operators_see_each_policy_and_never_a_password_hash(stacks: Stacks, upstream: Upstream) -> None:
    """GET /api/tunnels, the feed (snapshot and tunnel_registered) and the page show each tunnel's
    policies as the plugins summarise them; the salts and hashes basic_auth keeps never leave the
    nodes that enforce them (in a cluster: not in the edge's gathered view either)."""
    credentials = BasicAuth.parse([f"ana:{PASSWORD}", f"bob:{OTHER}"], False).plugin_data()
    secrets = [entry[key] for entry in credentials["credentials"] for key in ("salt", "hash")]
    config = {"plugin_data": {BASIC_AUTH: credentials, RATE_LIMIT: {"requests": 30, "seconds": 60}},
              "require": [BASIC_AUTH, RATE_LIMIT]}
    plugins = [("dashboard", Dashboard()), (BASIC_AUTH, BasicAuthPlugin()), (RATE_LIMIT, plugin(per_minute=600))]
    async with stacks.start(plugins=plugins) as stack:
        admin_node = stack.public  # on a cluster, the edge: it gathers the control node's view
        await control_in_sight(stack)
        feed = await open_feed(admin_node)
        try:
            await next_event(feed, "snapshot")
            async with stack.agent(upstream.port, **config) as tunnel, stack.visitor(tunnel.alias) as client:
                registered = await next_event(feed, "tunnel_registered")
                assert (await client.get("/", headers=basic("ana", PASSWORD))).status_code == 200
                late = await open_feed(admin_node)
                try:
                    snapshot = await next_event(late, "snapshot")
                finally:
                    await late.aclose()
                async with admin_client(admin_node) as admin:
                    api = await admin.get("/api/tunnels")
                    page = await admin.get("/")
                    script = await admin.get("/static/app.js")
        finally:
            await feed.aclose()
    expected = {BASIC_AUTH: {"users": ["ana", "bob"], "forward": False},
                RATE_LIMIT: {"per": "client address", "operator": "600/min", "owner": "30/min"}}
    [view] = api.json()["tunnels"]
    assert view["policies"] == expected
    assert registered["tunnel"]["policies"] == expected
    assert [t["policies"] for t in snapshot["tunnels"]] == [expected]
    assert "Policy" in page.text and "policyText" in script.text  # the page renders them
    everything = "\n".join([api.text, json.dumps(registered), json.dumps(snapshot), page.text])
    for secret in secrets:
        assert secret not in everything
    assert "metadata" not in view and "metadata" not in registered["tunnel"]


async def test_a_cluster_view_for_operators_carries_no_metadata(stacks: Stacks, upstream: Upstream) -> None:
    """all_tunnels: on a cluster node the control node's answer leaves plugin metadata behind (the
    edge's lookup keeps it: the edge enforces with it)."""
    config = {"plugin_data": {BASIC_AUTH: BasicAuth.parse([f"ana:{PASSWORD}"], True).plugin_data()},
              "require": [BASIC_AUTH]}
    async with stacks.start(plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as stack, \
            stack.agent(upstream.port, **config) as tunnel, stack.visitor(tunnel.alias) as client:
        assert (await client.get("/", headers=basic("ana", PASSWORD))).status_code == 200  # enforced at the edge
        await control_in_sight(stack)
        [seen] = await stack.public.all_tunnels()
    assert stack.public.describe_policies(seen) == {BASIC_AUTH: {"users": ["ana"], "forward": True}}
    if stacks.kind == "cluster":
        assert seen.metadata == {} and seen.policy_summary is not None


def test_it_is_a_builtin_plugin_and_documents_its_settings() -> None:
    from comzy.core.hooks import builtin_names

    assert RATE_LIMIT in builtin_names()
    text = (ROOT / "comzy" / "plugins" / "rate_limit" / "README.md").read_text()
    for name in RateLimitSettings.model_fields:
        assert f"`COMZY_RATE_LIMIT_{name.upper()}`" in text, name


async def test_the_limit_comes_before_basic_auth(tmp_path: Path, upstream: Upstream) -> None:
    """rate_limit's check runs first (tryfirst): a password guesser is limited before the server
    computes any hash for it, whichever order COMZY_PLUGINS names them in."""
    plugins = [(RATE_LIMIT, plugin(clock=Clock())), (BASIC_AUTH, BasicAuthPlugin())]  # basic_auth's would run first
    config = {"plugin_data": {BASIC_AUTH: BasicAuth.parse([f"ana:{PASSWORD}"], False).plugin_data(),
                              RATE_LIMIT: {"requests": 2, "seconds": 60}}, "require": [BASIC_AUTH, RATE_LIMIT]}
    async with start_server(tmp_path, plugins=plugins) as server, \
            start_agent(server, upstream.port, **config) as tunnel, tunnel.visitor() as client:
        assert sorted(tunnel.reporter.welcomes[0]["enforced"]) == [BASIC_AUTH, RATE_LIMIT]
        codes = [(await client.get("/", headers=basic("ana", guess))).status_code
                 for guess in ("guess-one", "guess-two", PASSWORD)]
    assert codes == [401, 401, 429]


async def test_the_agent_asks_for_it_and_prints_it_under_the_url(tmp_path: Path, upstream: Upstream) -> None:
    """The real `comzy` command: --rate-limit reaches the server's plugin, which confirms it, and the
    agent prints it under the public URL; a visitor past it gets 429."""
    command = [sys.executable, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1", "--log",
               "--rate-limit", "2/min"]
    async with start_server(tmp_path / "data", plugins=[(RATE_LIMIT, plugin())]) as server:
        env = cli_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{server.ports.ws}", HOME=str(tmp_path))
        with popen(command, env) as agent:
            url = (await read_until(agent, r"Public URL: (\S+)"))[1]
            policy_line = (await read_until(agent, r"Policy: .*"))[0]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.http}", timeout=30,
                                         headers={"host": url.split("//", 1)[1]}) as client:
                codes = [(await client.get("/status/200")).status_code for _ in range(3)]
            agent.terminate()
    assert policy_line == "Policy: rate limit 2/min per client address (over it: 429 Too Many Requests)"
    assert codes == [200, 200, 429]


def test_a_bad_setting_is_named_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from comzy.core.hooks import PluginError, available_plugins, load_plugin

    monkeypatch.setenv("COMZY_RATE_LIMIT_PER_MINUTE", "0")
    with pytest.raises(PluginError, match="COMZY_RATE_LIMIT_PER_MINUTE"):
        load_plugin(RATE_LIMIT, available_plugins()[RATE_LIMIT])
    monkeypatch.setenv("COMZY_RATE_LIMIT_PER_MINUTE", "120")
    loaded = load_plugin(RATE_LIMIT, available_plugins()[RATE_LIMIT])
    assert isinstance(loaded, RateLimitPlugin) and loaded.operator == Rate(120, 60)


async def test_refusals_at_an_edge_reach_metrics_and_the_feed(stacks: Stacks, upstream: Upstream) -> None:
    """In a cluster the edge refuses (on_request_refused runs there): its count is in the cluster's
    /metrics and its event in every node's feed (both roles: ``all`` too)."""
    def node_plugins() -> list[tuple[str, object]]:  # each node its own (a metrics registry is per server)
        return [("metrics", Metrics()), ("dashboard", Dashboard()), (RATE_LIMIT, plugin(clock=Clock()))]

    async with stacks.start(plugins=node_plugins(), edge_plugins=node_plugins()) as stack, \
            stack.agent(upstream.port, **owner("1/min")) as tunnel, stack.visitor(tunnel.alias) as client:
        await control_in_sight(stack)
        feed = await open_feed(stack.control)  # the control node's feed: the edge's events cross the bus
        try:
            await next_event(feed, "snapshot")
            assert (await client.get("/status/200")).status_code == 200
            assert (await client.get("/limited")).status_code == 429
            refused = await next_event(feed, "request")
            while refused["status"] != 429:
                refused = await next_event(feed, "request")
        finally:
            await feed.aclose()
        async with admin_client(stack.public) as admin:
            scrape = (await admin.get("/metrics")).text
    assert (refused["refused_by"], refused["path"]) == (RATE_LIMIT, "/limited")
    counted = {tuple(sorted((k, v) for k, v in labels if k != "node")): value
               for (name, labels), value in samples(scrape).items() if name == "comzy_requests_refused_total"}
    assert counted == {(("plugin", "rate_limit"), ("status", "429")): 1}
