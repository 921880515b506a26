"""basic_auth and the fail-closed policy mechanism (issue 14): a real server, agent and local app."""

from __future__ import annotations

import base64
import io
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from rich.console import Console

from comzy import Registration, hookimpl
from comzy.agent.cli import parse_args
from comzy.agent.client import Agent, AgentConfig, PolicyNotEnforced, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.agent.output import Printer
from comzy.agent.policies import BASIC_AUTH, BasicAuth
from comzy.agent.screen import Screen
from comzy.core import protocol as p
from comzy.core.control import Hello, Welcome
from comzy.core.protocol import ProtocolError
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, HandshakeRejected, client_handshake, server_handshake
from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin
from comzy.plugins.basic_auth.plugin import CACHE_SIZE, basic_credentials, parse_policy
from tests.conftest import RecordingReporter, RunningAgent, cli_env, start_agent, start_server
from tests.helpers import serve_tcp
from tests.stack import Stacks, stacks_fixture  # noqa: F401 (the stacks fixture: role all and a cluster)
from tests.test_large_transfers import popen, read_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery"
OTHER = "Bob's pass:with colon"


def policy(forward: bool = False) -> dict[str, Any]:
    """What the stock agent sends for ``--basic-auth ana:PASSWORD --basic-auth bob:OTHER``."""
    return {"plugin_data": {BASIC_AUTH: BasicAuth.parse([f"ana:{PASSWORD}", f"bob:{OTHER}"], forward).plugin_data()},
            "require": [BASIC_AUTH]}


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@asynccontextmanager
async def protected(tmp_path: Path, upstream: Upstream, forward: bool = False) -> AsyncIterator[RunningAgent]:
    async with start_server(tmp_path / "data", plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as server, \
            start_agent(server, upstream.port, **policy(forward)) as running:
        yield running


async def test_visitors_log_in_and_the_authorization_header_stays_at_the_server(
        tmp_path: Path, upstream: Upstream) -> None:
    async with protected(tmp_path, upstream) as tunnel, tunnel.visitor() as client:
        assert tunnel.reporter.welcomes[0]["enforced"] == [BASIC_AUTH]
        refused = await client.get("/status/200")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == f'Basic realm="{tunnel.alias}", charset="UTF-8"'
        assert "user name and password" in refused.text
        assert upstream.requests == []  # nothing reached the agent

        wrong = await client.get("/status/200", headers=basic("ana", PASSWORD + "x"))
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        unknown = await client.get("/status/200", headers=basic("carol", PASSWORD))
        assert unknown.status_code == 401
        crossed = await client.get("/status/200", headers=basic("bob", PASSWORD))  # ana's password, bob's name
        assert crossed.status_code == 401
        garbage = await client.get("/status/200", headers={"authorization": "Basic !!!"})
        assert garbage.status_code == 401
        bearer = await client.get("/status/200", headers={"authorization": "Bearer x"})
        assert bearer.status_code == 401
        assert upstream.requests == []

        twice = [("authorization", basic("ana", PASSWORD)["authorization"]), ("authorization", "Basic eDp5")]
        assert (await client.get("/status/200", headers=httpx.Headers(twice))).status_code == 401
        assert upstream.requests == []

        for _ in range(2):  # the second one comes from the cache of verified headers
            ok = await client.get("/status/200", headers=basic("ana", PASSWORD))
            assert ok.status_code == 200
        assert (await client.get("/status/201", headers=basic("bob", OTHER))).status_code == 201
    assert len(upstream.requests) == 3
    for scope in upstream.requests:
        assert all(name.lower() != b"authorization" for name, _ in scope["headers"])


async def test_parallel_requests_with_one_header_share_its_verdict(tmp_path: Path, upstream: Upstream) -> None:
    """A browser (or a benchmark) sends the same header on many connections at once: each gets the
    answer of the one hash under way, right or wrong."""
    async with protected(tmp_path, upstream) as tunnel, tunnel.visitor() as client:
        answers: list[tuple[str, int]] = []

        async def get(password: str) -> None:
            answer = await client.get("/status/200", headers=basic("bob", password))
            answers.append((password, answer.status_code))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(get, OTHER)
                tg.start_soon(get, "not bob's password")
    assert sorted(answers) == sorted([(OTHER, 200)] * 8 + [("not bob's password", 401)] * 8)
    assert len(upstream.requests) == 8


async def test_basic_auth_forward_passes_the_header_on(tmp_path: Path, upstream: Upstream) -> None:
    async with protected(tmp_path, upstream, forward=True) as tunnel, tunnel.visitor() as client:
        assert (await client.get("/status/200")).status_code == 401
        assert (await client.get("/status/200", headers=basic("ana", PASSWORD))).status_code == 200
    [scope] = upstream.requests
    assert (b"authorization", basic("ana", PASSWORD)["authorization"].encode()) in scope["headers"]


async def open_ws(server: ServerContext, alias: str, headers: dict[str, str]) -> Any:
    stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
    try:
        ws, _ = await client_handshake(stream, f"{alias}.{server.settings.base_domain}", "/ws", 1 << 20,
                                       headers=[(k.encode(), v.encode()) for k, v in headers.items()])
    except BaseException:
        await stream.aclose()
        raise
    return ws


async def test_websocket_upgrades_need_credentials_too(tmp_path: Path, upstream: Upstream) -> None:
    async with protected(tmp_path, upstream) as tunnel:
        with pytest.raises(HandshakeRejected) as caught:
            await open_ws(tunnel.public, tunnel.alias, {})
        assert caught.value.status == 401
        assert any(name.lower() == b"www-authenticate" for name, _ in caught.value.headers)
        assert upstream.requests == []
        ws = await open_ws(tunnel.public, tunnel.alias, basic("bob", OTHER))
        try:
            await ws.send("hi")
            with anyio.fail_after(10):
                assert await ws.receive() == "echo:hi"
        finally:
            await ws.aclose()
    [scope] = upstream.requests
    assert scope["type"] == "websocket"
    assert all(name.lower() != b"authorization" for name, _ in scope["headers"])


async def test_a_server_without_the_plugin_refuses_the_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    # Another plugin under another name, as a server whose operator left basic_auth out.
    async with start_server(tmp_path / "data", plugins=[("basic_auth_v0", BasicAuthPlugin())]) as server:
        reporter = RecordingReporter()
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port, **policy()),
                      LocalForwarder("127.0.0.1", upstream.port), reporter)
        with pytest.raises(Rejected) as caught, anyio.fail_after(10):
            await agent.run()
        assert server.tunnels() == []
    assert str(caught.value) == ("this server does not enforce basic_auth: ask its operator to enable the basic_auth "
                                 "plugin (COMZY_PLUGINS), or start the agent without that policy")
    assert reporter.welcomes == []


class Unaware:
    """A plugin named basic_auth that does not know policies (an older version): it never confirms."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        registration.notices.append("hello")


async def test_an_enabled_plugin_that_does_not_confirm_the_policy_is_refused(tmp_path: Path,
                                                                              upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", plugins=[(BASIC_AUTH, Unaware())]) as server:
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port, **policy()),
                      LocalForwarder("127.0.0.1", upstream.port), RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(10):
            await agent.run()
        assert server.tunnels() == []
    assert "the basic_auth plugin on this server did not confirm it enforces" in str(caught.value)


async def test_an_old_server_that_does_not_confirm_is_left_at_once(upstream: Upstream) -> None:
    """A server from before policies ignores HELLO ``require`` and answers a plain WELCOME: the agent
    closes the connection before serving anything, and exits with what to do."""
    hellos: list[dict[str, Any]] = []
    after: list[object] = []
    answered = anyio.Event()

    async def old_server(stream: anyio.abc.SocketStream) -> None:
        ws, _ = await server_handshake(stream, 1 << 20)
        try:
            [frame] = p.decode_message(await ws.receive())
            hellos.append(frame.payload)
            await ws.send(Welcome(alias="old", url="http://old.localhost", server="comzy/0.0.9").encode())
            with anyio.fail_after(10):
                after.append(await ws.receive())  # the agent's next move: closing, not a PING
        finally:
            await ws.aclose()
            answered.set()

    async with serve_tcp(old_server) as port:
        reporter = RecordingReporter()
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}"], port=upstream.port, **policy()),
                      LocalForwarder("127.0.0.1", upstream.port), reporter)
        with pytest.raises(PolicyNotEnforced) as caught, anyio.fail_after(10):
            await agent.run()
        with anyio.fail_after(10):
            await answered.wait()
    assert isinstance(after[0], Closed)
    assert reporter.welcomes == []  # never reported as connected
    assert "did not confirm that it enforces basic_auth (it runs comzy/0.0.9" in str(caught.value)
    assert "tunnel was closed before serving anything" in str(caught.value)
    # What went over the wire: hashes and salts, never a password.
    [hello] = hellos
    assert Hello.from_payload(hello).require == [BASIC_AUTH]
    sent = repr(hello)
    assert PASSWORD not in sent and OTHER not in sent
    assert {c["user"] for c in hello["plugins"][BASIC_AUTH]["credentials"]} == {"ana", "bob"}


async def test_passwords_never_reach_the_logs(tmp_path: Path, upstream: Upstream,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with protected(tmp_path, upstream) as tunnel, tunnel.visitor() as client:
        assert (await client.get("/status/200", headers=basic("ana", PASSWORD))).status_code == 200
        assert (await client.get("/status/200", headers=basic("ana", "guess-guess"))).status_code == 401
    text = caplog.text
    assert caplog.records  # the server and agent did log
    for secret in (PASSWORD, OTHER, "guess-guess", basic("ana", PASSWORD)["authorization"].split()[1]):
        assert secret not in text


def test_policy_keys_of_hello_and_welcome() -> None:
    hello = Hello(agent="a", port=1, require=[BASIC_AUTH])
    assert hello.to_payload()["require"] == [BASIC_AUTH]
    assert "require" not in Hello(agent="a", port=1).to_payload()
    assert Hello.from_payload({**hello.to_payload(), "require": ["x", "x", "y"]}).require == ["x", "y"]
    for bad in ("basic_auth", [1], ["no spaces"], ["a"] * 33):
        with pytest.raises(ProtocolError, match="malformed HELLO: 'require' must be a list"):
            Hello.from_payload({**hello.to_payload(), "require": bad})
    welcome = Welcome(alias="a", url="http://a.localhost", enforced=[BASIC_AUTH])
    assert Welcome.from_payload(welcome.to_payload()).enforced == [BASIC_AUTH]
    old = Welcome(alias="a", url="http://a.localhost").to_payload()
    assert "enforced" not in old and Welcome.from_payload(old).enforced == []  # what an older server sends


def test_malformed_agent_data_is_refused_with_the_reason() -> None:
    good = BasicAuth.parse([f"ana:{PASSWORD}"], False).plugin_data()
    assert parse_policy(good)["credentials"][0]["user"] == "ana"
    for change, words in [({"scheme": "md5"}, "scheme"), ({"n": 2**20}, "power of two"), ({"n": 1000}, "power"),
                          ({"r": 99}, "r must"), ({"credentials": []}, "1 to 32"), ({"forward": "yes"}, "forward"),
                          ({"credentials": [{"user": "a:b", "salt": "AAAAAAAAAAA=", "hash": "A" * 44}]}, "without ':'"),
                          ({"credentials": [{"user": "a", "salt": "%%%", "hash": "A" * 44}]}, "salt")]:
        with pytest.raises(ValueError, match=words):
            parse_policy({**good, **change})
    assert basic_credentials("Basic " + base64.b64encode(b"a:b:c").decode()) == (b"a", b"b:c")
    assert basic_credentials("basic " + base64.b64encode(b"nocolon").decode()) is None
    assert CACHE_SIZE > 0


def test_command_line_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["3000", "--basic-auth", f"ana:{PASSWORD}", "--basic-auth", "bob:12345678"])
    assert args.policy.users == ["ana", "bob"] and not args.policy.forward
    assert "Authorization header is not forwarded" in args.policy.describe()
    for argv, words in [(["--basic-auth", "ana"], "USER:PASSWORD"), (["--basic-auth", ":12345678"], "user name"),
                        (["--basic-auth", "ana:short"], "8 to 255 characters"),
                        (["--basic-auth-forward"], "goes with --basic-auth")]:
        with pytest.raises(SystemExit) as exited:
            parse_args(["3000", *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert words in err
        assert "short" not in err  # a password is never echoed


async def test_the_agent_prints_the_policy_under_the_url_and_exits_when_refused(tmp_path: Path,
                                                                                upstream: Upstream) -> None:
    command = [sys.executable, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1", "--log",
               "--basic-auth", f"ana:{PASSWORD}"]
    async with start_server(tmp_path / "on", plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as server:
        env = cli_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{server.ports.ws}", HOME=str(tmp_path))
        with popen(command, env) as agent:
            url = (await read_until(agent, r"Public URL: (\S+)"))[1]
            policy_line = (await read_until(agent, r"Policy: .*"))[0]
            assert policy_line == ("Policy: basic auth for ana (the Authorization header is not forwarded to the "
                                   "local app)")
            async with httpx.AsyncClient(timeout=30) as client:
                host = url.split("//", 1)[1]
                answer = await client.get(f"http://127.0.0.1:{server.ports.http}/status/200", headers={"host": host})
                assert answer.status_code == 401
                answer = await client.get(f"http://127.0.0.1:{server.ports.http}/status/200",
                                          headers={"host": host, **basic("ana", PASSWORD)})
                assert answer.status_code == 200
            agent.terminate()
    async with start_server(tmp_path / "off") as server:  # COMZY_PLUGINS=none: nothing enforces it
        env = cli_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{server.ports.ws}", HOME=str(tmp_path))
        with popen(command, env) as agent:
            line = (await read_until(agent, r"comzy: .*"))[0]
            with anyio.fail_after(20):
                code = await anyio.to_thread.run_sync(agent.wait)
    assert code == 1
    assert line == ("comzy: the server refused the tunnel: this server does not enforce basic_auth: ask its operator "
                    "to enable the basic_auth plugin (COMZY_PLUGINS), or start the agent without that policy")


async def test_a_server_with_the_builtin_plugins_enforces_it(tmp_path: Path, upstream: Upstream) -> None:
    """basic_auth is on by default (COMZY_PLUGINS unset): `comzy 3000 --basic-auth ...` works against a
    stock server, and a tunnel that does not ask for it is not touched."""
    from comzy.core.hooks import builtin_names, load_plugins, select_plugins

    assert BASIC_AUTH in builtin_names() and BASIC_AUTH in select_plugins(None)
    plugins = [(name, plugin) for name, plugin in load_plugins(select_plugins(None)) if name == BASIC_AUTH]
    async with start_server(tmp_path / "data", plugins=plugins) as server:
        async with start_agent(server, upstream.port, **policy()) as running, running.visitor() as client:
            assert (await client.get("/status/200")).status_code == 401
        async with start_agent(server, upstream.port) as running, running.visitor() as client:
            assert "enforced" not in running.reporter.welcomes[0]
            assert (await client.get("/status/200", headers=basic("ana", PASSWORD))).status_code == 200
    [scope] = upstream.requests
    assert (b"authorization", basic("ana", PASSWORD)["authorization"].encode()) in scope["headers"]


async def test_an_edge_enforces_what_the_control_node_registered(stacks: Stacks, upstream: Upstream) -> None:
    """In a cluster the agent registers on a control node and visitors reach an edge: the policy
    travels with the tunnel's snapshot, and the edge answers 401 itself (both roles: ``all`` too)."""
    async with stacks.start(plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as stack, \
            stack.agent(upstream.port, **policy()) as tunnel, stack.visitor(tunnel.alias) as client:
        refused = await client.get("/status/200")
        assert refused.status_code == 401 and "www-authenticate" in refused.headers
        with pytest.raises(HandshakeRejected) as caught:
            await open_ws(stack.public, tunnel.alias, {})
        assert caught.value.status == 401
        assert (await client.get("/status/200", headers=basic("bob", OTHER))).status_code == 200
    [scope] = upstream.requests
    assert all(name.lower() != b"authorization" for name, _ in scope["headers"])


async def test_an_edge_without_the_plugin_refuses_a_protected_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    """Fail closed across roles: an edge configured without basic_auth answers 502 for a tunnel
    whose control node enforces it, rather than let its visitors through unprotected."""
    stacks = Stacks("cluster", tmp_path)
    try:
        async with stacks.start(plugins=[(BASIC_AUTH, BasicAuthPlugin())], edge_plugins=()) as stack, \
                stack.agent(upstream.port, **policy()) as tunnel, stack.visitor(tunnel.alias) as client:
            refused = await client.get("/status/200", headers=basic("ana", PASSWORD))
            assert refused.status_code == 502
            assert "policy this server cannot enforce (the basic_auth plugin is not enabled" in refused.text
            with pytest.raises(HandshakeRejected) as caught:
                await open_ws(stack.public, tunnel.alias, {})
            assert caught.value.status == 502
    finally:
        stacks.close()
    assert upstream.requests == []


def test_the_status_screen_and_plain_lines_show_only_confirmed_policies() -> None:
    policies = {BASIC_AUTH: "basic auth for ana", "ip_filter": "allow 10.0.0.0/8"}
    welcome = Welcome(alias="a", url="http://a.localhost:8190", enforced=[BASIC_AUTH])
    screen = Screen("localhost:3000", out=io.StringIO(), policies=policies)
    screen.connected(welcome, True)
    out = io.StringIO()
    Console(file=out, width=100, height=30, color_system=None, markup=False, highlight=False,
            emoji=False).print(screen.render(100, 30))
    lines = out.getvalue().splitlines()
    assert [line.split() for line in lines if line.startswith("Policy")] == [["Policy", "basic", "auth", "for", "ana"]]
    assert "10.0.0.0" not in out.getvalue()  # not confirmed: never shown as in force

    printed = io.StringIO()
    Printer("localhost:3000", out=printed, policies=policies).connected(welcome, True)
    lines = printed.getvalue().splitlines()
    assert lines[lines.index("Public URL: http://a.localhost:8190") + 1] == "Policy: basic auth for ana"
    assert "10.0.0.0" not in printed.getvalue()
