"""ip_filter (issue 14): --cidr-allow / --cidr-deny, enforced by a real server before the agent."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.agent.cli import parse_args
from comzy.agent.client import Agent, AgentConfig, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.agent.policies import IP_FILTER, MAX_CIDRS, IpFilter
from comzy.core.server import ServerContext
from comzy.core.websocket import HandshakeRejected
from comzy.plugins.ip_filter import IpFilter as IpFilterPlugin
from comzy.plugins.ip_filter.plugin import COMPILED_TUNNELS, REFUSED, admitted, compile_rules, parse_policy
from tests.conftest import RecordingReporter, RunningAgent, cli_env, start_agent, start_server
from tests.stack import Stacks, stacks_fixture  # noqa: F401 (the stacks fixture: role all and a cluster)
from tests.test_large_transfers import popen, read_until
from tests.test_plugin_basic_auth import open_ws
from tests.test_plugin_rate_limit import control_in_sight
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


def policy(allow: list[str] = [], deny: list[str] = []) -> dict[str, Any]:  # noqa: B006 (read only)
    """What the stock agent sends for ``--cidr-allow ... --cidr-deny ...``."""
    return {"plugin_data": {IP_FILTER: IpFilter.parse(allow, deny).plugin_data()}, "require": [IP_FILTER]}


def plugins() -> list[tuple[str, object]]:
    return [(IP_FILTER, IpFilterPlugin())]


async def status(tunnel: RunningAgent, **headers: str) -> int:
    async with tunnel.visitor() as client:
        return (await client.get("/status/200", headers=headers)).status_code


async def test_allow_and_deny_ipv4(tmp_path: Path, upstream: Upstream) -> None:
    """ngrok's semantics on the visitor's address (127.0.0.1 here): deny wins; with any allowed
    network only those pass; a deny list alone lets the rest through."""
    cases = [([], ["10.0.0.0/8"], 200), (["127.0.0.0/8"], [], 200), (["10.0.0.0/8"], [], 403),
             (["10.0.0.0/8", "127.0.0.1"], [], 200), (["127.0.0.0/8"], ["127.0.0.1/32"], 403),
             ([], ["127.0.0.0/24", "10.0.0.0/8"], 403), (["::/0"], [], 403)]
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        for allow, deny, expected in cases:
            async with start_agent(server, upstream.port, **policy(allow, deny)) as tunnel:
                assert tunnel.reporter.welcomes[0]["enforced"] == [IP_FILTER]
                async with tunnel.visitor() as client:
                    answer = await client.get("/status/200")
                assert (allow, deny, answer.status_code) == (allow, deny, expected)
                if expected == 403:
                    assert answer.text == REFUSED and "127.0.0.1" not in answer.text
    assert len(upstream.requests) == sum(1 for *_, expected in cases if expected == 200)


@asynccontextmanager
async def agent_on(server: ServerContext, host: str, port: int, **config: Any) -> AsyncIterator[Agent]:
    """An agent connecting to ``server`` at ``host`` (conftest's start_agent knows only 127.0.0.1)."""
    reporter = RecordingReporter()
    agent = Agent(AgentConfig(servers=[f"ws://{host}:{server.ports.ws}"], port=port, **config),
                  LocalForwarder("127.0.0.1", port), reporter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        await reporter.wait_connected()
        yield agent
        await agent.close()
        tg.cancel_scope.cancel()


async def test_allow_and_deny_ipv6(tmp_path: Path, upstream: Upstream) -> None:
    """A visitor connecting over IPv6 (::1) is matched against the IPv6 networks only."""
    cases = [(["::1"], [], 200), (["2001:db8::/32"], [], 403), (["127.0.0.0/8"], [], 403),
             (["::/0"], ["::1/128"], 403), ([], ["2001:db8::/32"], 200)]
    async with start_server(tmp_path / "data", plugins=plugins(), host="::1") as server:
        for allow, deny, expected in cases:
            async with agent_on(server, "[::1]", upstream.port, **policy(allow, deny)) as agent, \
                    httpx.AsyncClient(base_url=f"http://[::1]:{server.ports.http}", timeout=30) as client:
                answer = await client.get("/status/200", headers={"host": f"{agent.alias}.localhost"})
                assert (allow, deny, answer.status_code) == (allow, deny, expected)
    assert [scope["client"][0] for scope in upstream.requests] == ["127.0.0.1"] * 2  # the agent's own hop


async def test_x_forwarded_for_counts_only_from_trusted_proxies(tmp_path: Path, upstream: Upstream) -> None:
    rules = policy(["203.0.113.0/24", "2001:db8::/32"], ["203.0.113.66"])
    async with start_server(tmp_path / "trusting", plugins=plugins(), trusted_proxies="127.0.0.1/32") as server, \
            start_agent(server, upstream.port, **rules) as tunnel:
        assert await status(tunnel, **{"x-forwarded-for": "203.0.113.9"}) == 200
        assert await status(tunnel, **{"x-forwarded-for": "2001:db8::5"}) == 200
        # The client is the rightmost address that is not a trusted proxy: a visitor's own entries
        # to its left (here 203.0.113.9) are not believed.
        assert await status(tunnel, **{"x-forwarded-for": "203.0.113.9, 198.51.100.1"}) == 403
        assert await status(tunnel, **{"x-forwarded-for": "203.0.113.66"}) == 403  # denied
        assert await status(tunnel) == 403  # the proxy itself (127.0.0.1) is not allowed
        assert await status(tunnel, forwarded="for=203.0.113.7") == 200  # RFC 7239 from the proxy, too
    async with start_server(tmp_path / "direct", plugins=plugins()) as server, \
            start_agent(server, upstream.port, **rules) as tunnel:
        # No trusted proxy: a visitor's X-Forwarded-For is its own claim, never believed.
        assert await status(tunnel, **{"x-forwarded-for": "203.0.113.9"}) == 403
        assert await status(tunnel, **{"x-real-ip": "203.0.113.9"}) == 403
    assert len(upstream.requests) == 3


async def test_websocket_upgrades_are_refused_too(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        async with start_agent(server, upstream.port, **policy(["10.0.0.0/8"])) as tunnel:
            with pytest.raises(HandshakeRejected) as caught:
                await open_ws(tunnel.public, tunnel.alias, {})
            assert caught.value.status == 403
            assert upstream.requests == []
        async with start_agent(server, upstream.port, **policy(["127.0.0.1/32"])) as tunnel:
            ws = await open_ws(tunnel.public, tunnel.alias, {})
            try:
                await ws.send("hi")
                with anyio.fail_after(10):
                    assert await ws.receive() == "echo:hi"
            finally:
                await ws.aclose()
    assert [scope["type"] for scope in upstream.requests] == ["websocket"]


async def test_a_refused_address_is_refused_before_the_login(tmp_path: Path, upstream: Upstream) -> None:
    """ip_filter runs first of the policies: a denied address gets 403 whatever it sends, and
    costs basic_auth no password hash (a 401 would mean the login was checked first)."""
    from comzy.agent.policies import BASIC_AUTH, BasicAuth
    from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin

    config = {"plugin_data": {BASIC_AUTH: BasicAuth.parse(["ana:a long password"], False).plugin_data(),
                              IP_FILTER: IpFilter.parse([], ["127.0.0.0/8"]).plugin_data()},
              "require": [BASIC_AUTH, IP_FILTER]}
    # ip_filter named first in COMZY_PLUGINS: pluggy would call it last, but for its tryfirst.
    enabled = [(IP_FILTER, IpFilterPlugin()), (BASIC_AUTH, BasicAuthPlugin())]
    async with start_server(tmp_path / "data", plugins=enabled) as server, \
            start_agent(server, upstream.port, **config) as tunnel:
        assert await status(tunnel) == 403
        assert await status(tunnel, authorization="Basic YW5hOndyb25n") == 403
    assert upstream.requests == []


async def test_an_edge_enforces_what_the_control_node_registered(stacks: Stacks, upstream: Upstream) -> None:
    """Role all, and a cluster where visitors reach an edge: the rules travel with the tunnel, and
    operators' views show them (describe_policy)."""
    async with stacks.start(plugins=plugins()) as stack:
        async with stack.agent(upstream.port, **policy(["10.0.0.0/8"])) as tunnel, \
                stack.visitor(tunnel.alias) as client:
            refused = await client.get("/status/200")
            assert (refused.status_code, refused.text) == (403, REFUSED)
            with pytest.raises(HandshakeRejected) as caught:
                await open_ws(stack.public, tunnel.alias, {})
            assert caught.value.status == 403
            await control_in_sight(stack)
            [seen] = [t for t in await stack.public.all_tunnels() if t.alias == tunnel.alias]
            assert stack.public.describe_policies(seen) == {IP_FILTER: {"allow": ["10.0.0.0/8"], "deny": []}}
        async with stack.agent(upstream.port, **policy(["127.0.0.0/8"], ["10.0.0.0/8"])) as tunnel, \
                stack.visitor(tunnel.alias) as client:
            assert (await client.get("/status/200")).status_code == 200
    assert len(upstream.requests) == 1


async def test_a_server_without_the_plugin_refuses_the_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", plugins=[("ip_filter_v0", IpFilterPlugin())]) as server:
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port,
                                  **policy(["10.0.0.0/8"])), LocalForwarder("127.0.0.1", upstream.port),
                      RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(10):
            await agent.run()
        assert server.tunnels() == []
    assert str(caught.value) == ("this server does not enforce ip_filter: ask its operator to enable the ip_filter "
                                 "plugin (COMZY_PLUGINS), or start the agent without that policy")


async def test_an_edge_without_the_plugin_refuses_a_filtered_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    stacks = Stacks("cluster", tmp_path)
    try:
        async with stacks.start(plugins=plugins(), edge_plugins=()) as stack, \
                stack.agent(upstream.port, **policy(["127.0.0.0/8"])) as tunnel, \
                stack.visitor(tunnel.alias) as client:
            refused = await client.get("/status/200")
            assert refused.status_code == 502
            assert "policy this server cannot enforce (the ip_filter plugin is not enabled" in refused.text
    finally:
        stacks.close()
    assert upstream.requests == []


async def test_a_hand_made_hello_with_bad_networks_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    """The server checks the agent's data itself: an agent other than the stock one (here, its
    data written by hand) gets REJECT saying what is wrong, and no tunnel."""
    bad: list[tuple[Any, str]] = [
        ({"allow": ["10.1.2.3/8"]}, "is not an IP network (host bits must be zero)"),
        ({"allow": ["not-a-net"]}, "is not an IP network"),
        ({"deny": [f"10.0.{i}.0/24" for i in range(MAX_CIDRS + 1)]}, f"at most {MAX_CIDRS} networks"),
        ({"allow": [], "deny": []}, "names no network"),
        ({"allow": "10.0.0.0/8"}, "must be a list"),
        ({"allow": [7]}, "must be a CIDR text"),
        ({"allow": ["fe80::1%eth0/128"]}, "must be a CIDR text"),
        ({"allow": ["1" * 65]}, "must be a CIDR text"),
    ]
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        for data, words in bad:
            agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port,
                                      plugin_data={IP_FILTER: data}, require=[IP_FILTER]),
                          LocalForwarder("127.0.0.1", upstream.port), RecordingReporter())
            with pytest.raises(Rejected) as caught, anyio.fail_after(10):
                await agent.run()
            assert str(caught.value).startswith("ip filter: the agent's data is not valid (")
            assert words in str(caught.value)
        assert server.tunnels() == []


def test_rules_and_the_compiled_cache() -> None:
    rules = compile_rules(parse_policy({"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.9.0.0/16"]}))
    assert admitted("10.1.2.3", rules) and admitted("2001:db8::1", rules)
    assert not admitted("10.9.0.1", rules) and not admitted("192.0.2.1", rules) and not admitted("2001:db9::1", rules)
    assert admitted("::ffff:10.1.2.3", rules)  # a dual-stack listener's IPv4 visitor
    assert not admitted("::ffff:10.9.0.1", rules)
    for unreadable in ("", "unknown", "_hidden", "10.1.2.3:80"):
        assert not admitted(unreadable, rules)  # fail closed
    assert parse_policy({"allow": ["10.0.0.0/8", "10.0.0.0/8"]}) == {"allow": ["10.0.0.0/8"], "deny": []}
    assert COMPILED_TUNNELS > 0


def test_command_line_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["3000", "--cidr-allow", "203.0.113.0/24", "--cidr-allow", "2001:DB8::/32",
                       "--cidr-deny", "203.0.113.7"])
    assert args.ip_filter.plugin_data() == {"allow": ["203.0.113.0/24", "2001:db8::/32"], "deny": ["203.0.113.7/32"]}
    assert args.ip_filter.describe() == ("IP filter: allow 203.0.113.0/24, 2001:db8::/32; deny 203.0.113.7/32 "
                                         "(deny wins; other addresses get 403)")
    assert not parse_args(["3000"]).ip_filter
    for argv, words in [(["--cidr-allow", "10.1.2.3/8"], "did you mean 10.0.0.0/8 (the whole network) or "
                                                         "10.1.2.3/32 (that one address)?"),
                        (["--cidr-deny", "example.com"], "--cidr-deny 'example.com' is not an IP network"),
                        (["--cidr-allow", "10.0.0.0/33"], "is not an IP network"),
                        (["--cidr-allow", "fe80::1%eth0"], "is not an IP network"),
                        (["--cidr-allow", "1.2.3.4\x1b[2J"], "'1.2.3.4\\x1b[2J'"),  # printed escaped
                        ([arg for i in range(MAX_CIDRS + 1) for arg in ("--cidr-deny", f"10.0.{i}.0/24")],
                         f"at most {MAX_CIDRS} --cidr-deny networks")]:
        with pytest.raises(SystemExit) as exited:
            parse_args(["3000", *argv])
        assert exited.value.code == 2
        assert words in capsys.readouterr().err


async def test_the_agent_prints_the_policy_and_a_stock_server_enforces_it(tmp_path: Path,
                                                                          upstream: Upstream) -> None:
    """ip_filter is on by default (COMZY_PLUGINS unset): `comzy 3000 --cidr-allow ...` against a
    stock server prints the policy under the public URL and filters."""
    from comzy.core.hooks import builtin_names, select_plugins

    assert IP_FILTER in builtin_names() and IP_FILTER in select_plugins(None)
    command = [sys.executable, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1", "--log",
               "--inspect", "off", "--cidr-allow", "10.0.0.0/8", "--cidr-deny", "10.6.0.0/16"]
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        env = cli_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{server.ports.ws}", HOME=str(tmp_path))
        with popen(command, env) as agent:
            url = (await read_until(agent, r"Public URL: (\S+)"))[1]
            line = (await read_until(agent, r"Policy: .*"))[0]
            assert line == "Policy: IP filter: allow 10.0.0.0/8; deny 10.6.0.0/16 (deny wins; other addresses get 403)"
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.get(f"http://127.0.0.1:{server.ports.http}/status/200",
                                          headers={"host": url.split("//", 1)[1]})
            assert answer.status_code == 403
            agent.terminate()
    assert upstream.requests == []
