"""Several tunnels on one agent session (issue 14: ``comzy 3000 8080``, HELLO ``tunnels``): a real
server (role ``all`` and through an edge), a real agent and two real local apps."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from comzy.agent.client import Agent, AgentConfig, Rejected, SeveralTunnelsUnsupported, TunnelSpec
from comzy.agent.forward import LocalForwarder
from comzy.agent.policies import BASIC_AUTH, BasicAuth
from comzy.core import control as c
from comzy.core import protocol as p
from comzy.core.protocol import FrameType as FT
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, connect, server_handshake
from comzy.plugins.auth_token import AuthToken, AuthTokenSettings
from comzy.plugins.auth_token.store import create_user
from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin
from comzy.plugins.dashboard import Dashboard
from tests.conftest import RecordingReporter, admin_client, start_agent, start_server, visitor
from tests.helpers import DisconnectWatcher, receive_until_closed, serve_tcp, wait_until
from tests.stack import Stacks, reachable, stacks_fixture  # noqa: F401 (fixtures)
from tests.upstream import Upstream, serve_upstream

PASSWORD = "correct-horse-battery"

pytestmark = pytest.mark.anyio


@pytest.fixture
async def second() -> AsyncIterator[Upstream]:
    """A second local app, on its own port."""
    async with serve_upstream() as app:
        yield app


class Several:
    """A running agent that serves several tunnels, and what it reported."""

    def __init__(self, agent: Agent, reporter: RecordingReporter, server: ServerContext) -> None:
        self.agent = agent
        self.reporter = reporter
        self.server = server
        self.public = server

    def alias(self, name: str) -> str:
        """The alias tunnel ``name`` has now."""
        return self.agent.resumes[name][0]

    def visitor(self, name: str, **kwargs: Any) -> Any:
        """An HTTP client for tunnel ``name`` through the public listener."""
        return visitor(self.public, self.alias(name), **kwargs)


def agent_for(server: ServerContext, specs: list[TunnelSpec], reporter: RecordingReporter,
              **config: Any) -> tuple[Agent, dict[str, LocalForwarder]]:
    """An agent (not started) for ``specs`` against ``server``."""
    forwarders = {spec.name: LocalForwarder("127.0.0.1", spec.port, on_served=reporter.served.append)
                  for spec in specs}
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=specs[0].port, tunnels=specs,
                              **config), forwarders[specs[0].name], reporter, forwarders)
    return agent, forwarders


@asynccontextmanager
async def several(server: ServerContext, specs: list[TunnelSpec], public: ServerContext | None = None,
                  **config: Any) -> AsyncIterator[Several]:
    """A running agent for ``specs``, connected when the block starts."""
    reporter = RecordingReporter()
    agent, forwarders = agent_for(server, specs, reporter, **config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        await reporter.wait_connected()
        running = Several(agent, reporter, server)
        if public is not None and public is not server:
            running.public = public
            for spec in specs:
                await reachable(public, running.alias(spec.name))
        yield running
        await agent.close()
        tg.cancel_scope.cancel()
    for forwarder in forwarders.values():
        await forwarder.aclose()


def sessions(server: ServerContext) -> int:
    """How many agent sessions (WebSockets) serve the server's tunnels."""
    return len({id(entry.session) for entry in server.registry.entries()})


async def test_two_tunnels_share_one_session_and_each_reaches_its_own_port(
        stacks: Stacks, upstream: Upstream, second: Upstream) -> None:
    async with stacks.start() as stack, \
            several(stack.control, [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)],
                    public=stack.public) as agent:
        welcome = agent.reporter.welcomes[-1]
        assert [t["name"] for t in welcome["tunnels"]] == ["web", "api"]
        assert agent.alias("web") != agent.alias("api")
        assert sessions(stack.control) == 1
        assert sorted(t.name or "" for t in stack.control.tunnels()) == ["api", "web"]
        async with agent.visitor("web") as web, agent.visitor("api") as api:
            for _ in range(3):
                assert (await web.get("/status/201")).status_code == 201
                assert (await api.get("/status/202")).status_code == 202
        assert [s["path"] for s in upstream.requests] == ["/status/201"] * 3
        assert [s["path"] for s in second.requests] == ["/status/202"] * 3


async def test_each_tunnel_has_its_own_policy(tmp_path: Path, upstream: Upstream, second: Upstream) -> None:
    data = {BASIC_AUTH: BasicAuth.parse([f"ana:{PASSWORD}"], False).plugin_data()}
    specs = [TunnelSpec("open", upstream.port), TunnelSpec("shut", second.port, plugin_data=data, require=[BASIC_AUTH])]
    async with start_server(tmp_path, plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as server, \
            several(server, specs) as agent:
        welcome = agent.reporter.welcomes[-1]
        assert {t["name"]: t["enforced"] for t in welcome["tunnels"]} == {"open": [], "shut": [BASIC_AUTH]}
        assert {t.name: t.policies for t in server.tunnels()} == {"open": [], "shut": [BASIC_AUTH]}
        async with agent.visitor("open") as open_, agent.visitor("shut") as shut:
            assert (await open_.get("/status/200")).status_code == 200
            assert (await shut.get("/status/200")).status_code == 401
            assert (await shut.get("/status/200", auth=("ana", PASSWORD))).status_code == 200
        assert len(second.requests) == 1  # the refused visitor never reached the app


async def test_a_server_without_a_tunnels_policy_refuses_them_all(tmp_path: Path, upstream: Upstream,
                                                                  second: Upstream) -> None:
    data = {BASIC_AUTH: BasicAuth.parse([f"ana:{PASSWORD}"], False).plugin_data()}
    specs = [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port, plugin_data=data, require=[BASIC_AUTH])]
    async with start_server(tmp_path) as server:
        agent, _ = agent_for(server, specs, RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(20):
            await agent.run()
        assert server.tunnels() == []  # web, accepted first, was let go too
    assert str(caught.value).startswith("tunnel 'api': this server does not enforce basic_auth")


async def test_one_tunnel_refused_refuses_the_agent_naming_it(tmp_path: Path, upstream: Upstream,
                                                              second: Upstream) -> None:
    async with start_server(tmp_path) as server, start_agent(server, upstream.port, subdomain="taken") as other:
        agent, _ = agent_for(server, [TunnelSpec("web", upstream.port, subdomain="mine"),
                                      TunnelSpec("api", second.port, subdomain="taken")], RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(20):
            await agent.run()
        assert str(caught.value) == "tunnel 'api': 'taken' is in use by another agent; choose another --subdomain"
        # Nothing of the refused agent stays; the other agent serves on.
        assert [t.alias for t in server.tunnels()] == ["taken"]
        async with other.visitor() as client:
            assert (await client.get("/status/200")).status_code == 200


async def test_one_subdomain_for_two_tunnels_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path) as server:
        agent, _ = agent_for(server, [TunnelSpec("a", upstream.port, subdomain="same"),
                                      TunnelSpec("b", upstream.port, subdomain="same")], RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(20):
            await agent.run()
        assert server.tunnels() == []
    assert str(caught.value) == ("tunnel 'b': 'same' is already one of this agent's tunnels; give each tunnel its "
                                 "own subdomain")


async def test_a_reconnect_brings_every_tunnel_back_with_its_alias(stacks: Stacks, upstream: Upstream,
                                                                   second: Upstream) -> None:
    async with stacks.start() as stack, \
            several(stack.control, [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)],
                    public=stack.public) as agent:
        server = stack.control
        before = {name: agent.alias(name) for name in ("web", "api")}
        [session] = {entry.session for entry in server.registry.entries()}
        await session.close(1011, "test: link lost")
        await wait_until(lambda: len(agent.reporter.welcomes) == 2 and len(server.tunnels()) == 2)
        assert {name: agent.alias(name) for name in ("web", "api")} == before
        assert sessions(server) == 1 and {entry.session for entry in server.registry.entries()} != {session}
        async with agent.visitor("web") as web, agent.visitor("api") as api:
            # Through an edge, a route to the old session is dropped (RESET MOVED) and looked up again.
            assert (await web.get("/status/201")).status_code == 201
            assert (await api.get("/status/202")).status_code == 202
        assert [s["path"] for s in upstream.requests] == ["/status/201"]
        assert [s["path"] for s in second.requests] == ["/status/202"]


async def test_a_takeover_of_one_alias_takes_only_that_tunnel(stacks: Stacks, upstream: Upstream,
                                                              second: Upstream) -> None:
    watcher = DisconnectWatcher()
    async with stacks.start(plugins=[("watcher", watcher)]) as stack, \
            several(stack.control, [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)],
                    public=stack.public) as agent:
        server = stack.control
        api_alias, secret = agent.agent.resumes["api"]
        # Another agent with api's resume secret (a copy of this agent elsewhere) takes api over.
        async with stack.agent(upstream.port, extra_hello={"resume": {"alias": api_alias, "secret": secret}}) \
                as thief:
            assert thief.alias == api_alias
            await wait_until(lambda: "api" in agent.agent.ended)
            # Its on_disconnect ran at once, while the session goes on serving web.
            assert await watcher.wait_for(api_alias) == ["replaced by a new session"]
            assert agent.alias("web") not in watcher.ended
            assert any("tunnel api ended: another agent" in text for _, text in agent.reporter.notices)
            # web stays on the first agent's session; api now reaches the new agent's app.
            assert server.registry.get(agent.alias("web")).session is not server.registry.get(api_alias).session
            async with agent.visitor("web") as web, thief.visitor() as api:
                assert (await web.get("/status/201")).status_code == 201
                assert (await api.get("/status/203")).status_code == 203
            assert [s["path"] for s in upstream.requests] == ["/status/201", "/status/203"]
            assert second.requests == []


async def test_a_server_that_ignores_tunnels_is_left_at_once(upstream: Upstream, second: Upstream) -> None:
    """A server from before HELLO ``tunnels`` opens one tunnel (the first's keys) and answers a
    WELCOME without ``tunnels``: the agent closes the connection unused and says why."""
    hellos: list[dict[str, Any]] = []
    after: list[object] = []
    answered = anyio.Event()

    async def old_server(stream: anyio.abc.SocketStream) -> None:
        ws, _ = await server_handshake(stream, 1 << 20)
        try:
            [frame] = p.decode_message(await ws.receive())
            hellos.append(frame.payload)
            await ws.send(c.Welcome(alias="old", url="http://old.localhost", server="comzy/0.0.9").encode())
            with anyio.fail_after(10):
                after.append(await ws.receive())
        finally:
            await ws.aclose()
            answered.set()

    async with serve_tcp(old_server) as port:
        reporter = RecordingReporter()
        specs = [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)]
        forwarders = {s.name: LocalForwarder("127.0.0.1", s.port) for s in specs}
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}"], port=upstream.port, tunnels=specs),
                      forwarders["web"], reporter, forwarders)
        with pytest.raises(SeveralTunnelsUnsupported) as caught, anyio.fail_after(10):
            await agent.run()
        with anyio.fail_after(10):
            await answered.wait()
    assert isinstance(after[0], Closed)
    assert reporter.welcomes == []
    assert "asked for 2 on one connection (it runs comzy/0.0.9" in str(caught.value)
    [hello] = hellos
    assert hello["port"] == upstream.port  # what an old server reads: the first tunnel
    assert [t["name"] for t in hello["tunnels"]] == ["web", "api"]


async def raw_hello(server: ServerContext, payload: dict[str, Any]) -> tuple[p.Frame, Closed]:
    """Send one raw HELLO map; the server's one answer and how it closed the link."""
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 << 20)
    try:
        await ws.send(p.encode(FT.HELLO, 0, payload))
        closed, frames = await receive_until_closed(ws)
    finally:
        await ws.aclose()
    assert len(frames) == 1
    return frames[0], closed


def tunnels_hello(tunnels: Any) -> dict[str, Any]:
    return {"v": 1, "agent": "test", "port": 1, "tunnels": tunnels}


@pytest.mark.parametrize(("tunnels", "reason"), [
    ([{"name": f"t{i}", "port": 1} for i in range(c.MAX_SESSION_TUNNELS + 1)],
     f"malformed HELLO: 'tunnels' must be a list of 1 to {c.MAX_SESSION_TUNNELS} tunnels (got 17 of them); "
     f"this server takes at most {c.MAX_SESSION_TUNNELS} on one connection"),
    ([], "malformed HELLO: 'tunnels' must be a list of 1 to 16 tunnels (got 0 of them); this server takes at most "
         "16 on one connection"),
    ({"web": 1}, "malformed HELLO: 'tunnels' must be a list of 1 to 16 tunnels (got dict); this server takes at "
                 "most 16 on one connection"),
    ([{"name": "web", "port": 1}, {"name": "web", "port": 2}], "malformed HELLO: 'tunnels' names web more than once"),
    ([{"name": "we b", "port": 1}],
     "malformed HELLO tunnels[0]: 'name' must be 1 to 64 letters, digits, '_', '.' or '-'"),
    ([{"port": 1}], "malformed HELLO tunnels[0]: 'name' must be a string (got NoneType)"),
    ([{"name": "web", "port": 1}, {"name": "api", "port": "8080"}],
     "malformed HELLO tunnels[1]: 'port' must be an integer from 0 to 65535 (got str)"),
    ([{"name": "web", "plugins": {"x": "y"}}],
     "malformed HELLO tunnels[0] 'plugins': 'x' must be a map (a JSON object)"),
    (["web"], "malformed HELLO tunnels[0]: it must be a map"),
])
async def test_a_malformed_tunnels_list_is_refused_with_what_to_fix(tmp_path: Path, tunnels: Any,
                                                                    reason: str) -> None:
    async with start_server(tmp_path) as server:
        frame, closed = await raw_hello(server, tunnels_hello(tunnels))
        assert c.control_message(frame) == c.Refusal("protocol", reason)
        assert closed.code == 1008
        assert server.tunnels() == []


async def test_sixteen_tunnels_on_one_session_is_the_limit(tmp_path: Path, upstream: Upstream) -> None:
    specs = [TunnelSpec(f"t{i}", upstream.port) for i in range(c.MAX_SESSION_TUNNELS)]
    async with start_server(tmp_path) as server, several(server, specs) as agent:
        assert len(server.tunnels()) == c.MAX_SESSION_TUNNELS and sessions(server) == 1
        async with agent.visitor("t15") as client:
            assert (await client.get("/status/200")).status_code == 200
    with pytest.raises(ValueError, match="at most 16 tunnels on one agent"):
        AgentConfig(servers=["ws://x"], port=1, tunnels=[*specs, TunnelSpec("t16", 1)])


async def test_a_one_tunnel_agent_gets_no_tunnel_name(tmp_path: Path, upstream: Upstream) -> None:
    """The HELLO and WELCOME of a one-tunnel agent stay as they were: no ``tunnels``, no REQUEST ``tn``."""
    async with start_server(tmp_path) as server, start_agent(server, upstream.port) as agent:
        assert "tunnels" not in agent.reporter.welcomes[-1]
        assert [t.name for t in server.tunnels()] == [None]
        async with agent.visitor() as client:
            assert (await client.get("/status/200")).status_code == 200


def test_request_head_names_the_tunnel_only_when_set() -> None:
    head = p.RequestHead("GET", b"/", [])
    assert "tn" not in head.to_payload()
    named = p.RequestHead("GET", b"/", [], tunnel="api")
    assert p.RequestHead.from_payload(named.to_payload()).tunnel == "api"
    for bad in (3, "", "x" * 65):
        with pytest.raises(p.ProtocolError, match="'tn' must be a tunnel name"):
            p.RequestHead.from_payload({**head.to_payload(), "tn": bad})


async def test_the_server_closing_one_tunnel_leaves_the_others(tmp_path: Path, upstream: Upstream,
                                                               second: Upstream) -> None:
    """An operator's close (admin API, dashboard) or a plugin's (expiry, a revoked token) ends one
    row of /api/tunnels: the agent keeps serving the others on the same session."""
    watcher = DisconnectWatcher()
    async with start_server(tmp_path, plugins=[("watcher", watcher)]) as server, \
            several(server, [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)]) as agent:
        web, api = agent.alias("web"), agent.alias("api")
        assert await server.close_tunnel(api, "closed by the server's operator")
        assert await watcher.wait_for(api) == ["closed by the server's operator"]
        await wait_until(lambda: "api" in agent.agent.ended)
        assert [t.alias for t in server.tunnels()] == [web]
        async with agent.visitor("web") as client:
            assert (await client.get("/status/201")).status_code == 201
        async with visitor(server, api) as client:
            assert (await client.get("/status/202")).status_code == 404
        # Closing the last one ends the session; the agent exits with the reason.
        assert await server.close_tunnel(web, "closed again")
        assert await watcher.wait_for(web) == ["closed again"]
        await wait_until(lambda: agent.agent.session is None)
    assert second.requests == []


async def test_each_tunnel_counts_against_the_users_alias_limit(tmp_path: Path, upstream: Upstream) -> None:
    plugin = AuthToken(AuthTokenSettings(_env_file=None, max_aliases_per_user=2, refresh_seconds=0.05))
    async with start_server(tmp_path, plugins=[("auth_token", plugin)]) as server:
        token = await create_user(plugin.engine, "ana")
        agent, _ = agent_for(server, [TunnelSpec("a", upstream.port, subdomain="ana-a"),
                                      TunnelSpec("b", upstream.port, subdomain="ana-b"),
                                      TunnelSpec("c", upstream.port, subdomain="ana-c")], RecordingReporter(),
                             token=token)
        with pytest.raises(Rejected) as caught, anyio.fail_after(20):
            await agent.run()
        assert str(caught.value).startswith("tunnel 'c': you own 2 aliases, the most this server allows "
                                            "(MAX_ALIASES_PER_USER=2): ana-a, ana-b")
        assert server.tunnels() == []
        # Two fit, owned by ana like any she asked for alone; a port the user already has an alias for
        # cannot serve two tunnels under it.
        async with several(server, [TunnelSpec("a", upstream.port, subdomain="ana-a"),
                                    TunnelSpec("b", upstream.port, subdomain="ana-b")], token=token) as running:
            assert {t.alias: t.user for t in server.tunnels()} == {"ana-a": "ana", "ana-b": "ana"}
            assert running.reporter.welcomes[-1]["user"] == "ana"


async def test_the_admin_api_has_a_row_per_tunnel_and_closes_one(tmp_path: Path, upstream: Upstream,
                                                                 second: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server, \
            several(server, [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)]) as agent, \
            admin_client(server) as admin:
        listed = (await admin.get("/api/tunnels")).json()["tunnels"]
        assert sorted((t["alias"], t["port"], t["name"]) for t in listed) == sorted(
            [(agent.alias("web"), upstream.port, "web"), (agent.alias("api"), second.port, "api")])
        closed = await admin.delete(f"/api/tunnels/{agent.alias('api')}")
        assert closed.status_code == 200
        await wait_until(lambda: "api" in agent.agent.ended)
        assert [t["alias"] for t in (await admin.get("/api/tunnels")).json()["tunnels"]] == [agent.alias("web")]
        async with agent.visitor("web") as client:
            assert (await client.get("/status/200")).status_code == 200


def random_tunnels(rng: random.Random) -> Any:
    """A HELLO ``tunnels`` value: sometimes valid, often not, in every way a key can be wrong."""
    odd: list[Any] = [None, True, -1, 0, 70000, math.nan, "", "x" * 300, "we b", b"\xff", [], {}, [1], {"a": 1}]
    if rng.random() < 0.2:
        return rng.choice(odd)
    tunnels = []
    for i in range(rng.choice([0, 1, 2, 3, 16, 17])):
        tunnel: dict[str, Any] = {"name": f"t{i}" if rng.random() < 0.9 else rng.choice(odd),
                                  "port": rng.randint(1, 65535) if rng.random() < 0.9 else rng.choice(odd)}
        for key in ("subdomain", "resume", "plugins", "require"):
            if rng.random() < 0.3:
                tunnel[key] = rng.choice(odd)
        tunnels.append(tunnel if rng.random() < 0.95 else rng.choice(odd))
    return tunnels


async def test_random_tunnels_lists_get_an_answer_and_harm_nobody(tmp_path: Path, upstream: Upstream) -> None:
    rng = random.Random(14)
    async with start_server(tmp_path) as server, start_agent(server, upstream.port) as bystander:
        answers = {FT.WELCOME: 0, FT.REJECT: 0}
        for _ in range(60):
            tunnels = random_tunnels(rng)
            ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 << 20)
            try:
                await ws.send(p.encode(FT.HELLO, 0, tunnels_hello(tunnels)))
                with anyio.fail_after(20):
                    message = await ws.receive()
                assert isinstance(message, bytes), tunnels
                [frame] = p.decode_message(message)
                assert frame.type in answers, tunnels
                answers[frame.type] += 1
                if frame.type == FT.WELCOME:
                    welcome = c.control_message(frame)
                    assert isinstance(welcome, c.Welcome)
                    assert [t.name for t in welcome.tunnels] == [t["name"] for t in tunnels]
            finally:
                await ws.aclose()
        assert answers[FT.WELCOME] and answers[FT.REJECT]
        async with bystander.visitor() as client:
            assert (await client.get("/status/200")).status_code == 200
        await wait_until(lambda: [t.alias for t in server.tunnels()] == [bystander.alias])


def test_a_tunnels_name_crosses_the_cluster_in_its_view() -> None:
    """Lookups and operators' views across nodes carry the name (absent for a one-tunnel session)."""
    from comzy.core.types import Tunnel

    named = Tunnel("a", "http://a.localhost", 3000, "127.0.0.1", name="web")
    assert Tunnel.from_view(named.to_view(), "n1").name == "web"
    assert "name" not in Tunnel("b", "http://b.localhost", 3000, "127.0.0.1").to_view()
    with pytest.raises(TypeError, match="name is not a tunnel name"):
        Tunnel.from_view({**named.to_view(), "name": 5}, "n1")
