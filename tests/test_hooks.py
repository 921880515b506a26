"""Every hookspec, exercised through a real server (and where it matters a real agent and upstream).

tests/test_docs.py checks that each hook in comzy/core/hookspecs.py has a ``test_hook_<name>``
here and a heading in docs/plugin_hooks.md.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from comzy import (
    AdminRoute,
    Exchange,
    ForwardRequest,
    ForwardResponse,
    LoggedRequest,
    Registration,
    Reject,
    Schema,
    Tunnel,
    hookimpl,
)
from comzy.agent.client import Agent, AgentConfig, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.core import protocol as p
from comzy.core.hooks import HookRunner, PluginError, build_manager
from comzy.core.server import ServerContext
from comzy.core.websocket import connect
from tests.conftest import (
    PYTHON,
    RecordingReporter,
    admin_client,
    cli_env,
    make_settings,
    start_agent,
    start_server,
    visitor,
)
from tests.helpers import wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

WAIT = 5.0  # generous upper bound for events that normally arrive in milliseconds


def _accepting(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def _register_and_expect_reject(server: ServerContext, **config: Any) -> Rejected:
    """Run an in-process agent that must be refused; returns the Rejected it raised."""
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", 9)
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=9, **config), forwarder, reporter)
    try:
        with anyio.fail_after(WAIT), pytest.raises(Rejected) as info:
            await agent.run()
    finally:
        await forwarder.aclose()
    assert reporter.welcomes == []
    return info.value


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


# -- lifecycle ----------------------------------------------------------------------
class Lifecycle:
    """Records start-up and shut-down, and runs a background task in the server's task group."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.startup_server: ServerContext | None = None
        self.background_ran = anyio.Event()
        self.listeners_at_shutdown: dict[str, bool] = {}

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        await anyio.lowlevel.checkpoint()  # really async: the runner must await it
        self.events.append("startup")
        self.startup_server = server
        server.task_group.start_soon(self._background)

    async def _background(self) -> None:
        self.background_ran.set()

    @hookimpl
    def on_shutdown(self, server: ServerContext) -> None:
        self.events.append("shutdown")
        self.listeners_at_shutdown = {name: _accepting(getattr(server.ports, name)) for name in ("http", "ws", "admin")}


async def test_hook_on_startup(tmp_path: Path) -> None:
    plugin = Lifecycle()
    async with start_server(tmp_path, plugins=[("lifecycle", plugin)]) as server:
        # Called once, awaited, before the server is handed out; its task group is usable.
        assert plugin.events == ["startup"]
        assert plugin.startup_server is server
        with anyio.fail_after(WAIT):
            await plugin.background_ran.wait()
        async with admin_client(server) as client:
            health = await client.get("/healthz")
        assert health.status_code == 200
    assert plugin.events == ["startup", "shutdown"]


class FailingStartup:
    """An on_startup that cannot open its resource."""

    @hookimpl
    def on_startup(self) -> None:
        raise RuntimeError("database unreachable")


async def test_hook_on_startup_error_stops_startup(tmp_path: Path) -> None:
    lifecycle = Lifecycle()
    with pytest.raises(Exception) as info:
        async with start_server(tmp_path, plugins=[("lifecycle", lifecycle), ("failing", FailingStartup())]):
            pytest.fail("the server must not start when on_startup fails")
    assert [str(e) for e in _leaves(info.value)] == ["database unreachable"]


async def test_hook_on_shutdown(tmp_path: Path, upstream: Upstream) -> None:
    plugin = Lifecycle()
    async with start_server(tmp_path, plugins=[("lifecycle", plugin)]) as server:
        async with start_agent(server, upstream.port) as agent, agent.visitor() as client:
            assert (await client.get("/")).status_code == 200
        assert "shutdown" not in plugin.events
    # Called once, at the end, when no listener accepts any more.
    assert plugin.events == ["startup", "shutdown"]
    assert plugin.listeners_at_shutdown == {"http": False, "ws": False, "admin": False}


class BrokenShutdown:
    """An on_shutdown that fails: logged, and the other plugins still shut down."""

    @hookimpl
    def on_shutdown(self) -> None:
        raise RuntimeError("cannot flush")


async def test_hook_on_shutdown_errors_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Lifecycle()
    with caplog.at_level(logging.ERROR, logger="comzy.plugins"):
        async with start_server(tmp_path, plugins=[("lifecycle", plugin), ("broken", BrokenShutdown())]):
            pass
    assert plugin.events == ["startup", "shutdown"]  # "broken" runs first (LIFO) and fails
    assert any(r.name == "comzy.plugins" and "broken" in r.getMessage() and "on_shutdown" in r.getMessage()
               for r in caplog.records)


# -- on_register ---------------------------------------------------------------------
class RejectAll:
    """Refuses every tunnel."""

    def __init__(self) -> None:
        self.seen: list[Registration] = []

    @hookimpl
    async def on_register(self, registration: Registration) -> None:
        self.seen.append(registration)
        raise Reject("no tunnels for you")


async def test_hook_on_register(tmp_path: Path) -> None:
    plugin = RejectAll()
    async with start_server(tmp_path, plugins=[("reject", plugin)]) as server:
        rejected = await _register_and_expect_reject(server, subdomain="wanted", token="tok-123")
        assert str(rejected) == "no tunnels for you"
        assert rejected.code == "rejected"
        assert server.tunnels() == []
    # What the hook saw: the agent's HELLO.
    (registration,) = plugin.seen
    assert registration.port == 9
    assert registration.requested_alias == "wanted"
    assert registration.token == "tok-123"
    assert registration.client_address == "127.0.0.1"
    assert registration.agent_version.startswith("comzy/")


async def test_hook_on_register_reject_cli_agent(tmp_path: Path) -> None:
    """The stock CLI prints the plugin's reason and exits non-zero."""
    refusals = Refusals()
    async with start_server(tmp_path, plugins=[("refusals", refusals), ("reject", RejectAll())]) as server:
        command = [PYTHON, "-m", "comzy.agent.cli", "3999", "--server", f"ws://127.0.0.1:{server.ports.ws}"]
        # run_process kills the agent if the deadline passes.
        with anyio.fail_after(15):
            result = await anyio.run_process(command, env=cli_env(), check=False)
        assert [code for code, _, _ in refusals.calls] == ["rejected"]  # refused once; no retries
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode != 0
    assert "no tunnels for you" in err, (out, err)
    assert "Public URL" not in out


# -- on_registration_refused --------------------------------------------------------------
class Refusals:
    """Records every on_registration_refused call; the first one fails (it must only be logged)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.fail_first = fail_first

    @hookimpl
    async def on_registration_refused(self, code: str, reason: str, client_address: str,
                                      server: ServerContext) -> None:
        assert isinstance(server, ServerContext)
        await anyio.lowlevel.checkpoint()  # really async: the runner must await it
        self.calls.append((code, reason, client_address))
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("refusal log down")


class RefusesByToken:
    """Refuses by the agent's token: ``throttle`` with a 429, ``crash`` by a bug, ``refuse`` plainly."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        if registration.token == "throttle":
            raise Reject("too many failed logins", status=429, headers=[(b"retry-after", b"7")])
        if registration.token == "crash":
            raise KeyError("bug in plugin")
        if registration.token == "refuse":
            raise Reject("no tunnels for you")


async def _raw_reject(server: ServerContext, message: bytes | str) -> dict[str, Any]:
    """Send ``message`` as an agent's first WebSocket message; the REJECT payload it got."""
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}", 1 << 20)
    try:
        await ws.send(message)
        with anyio.fail_after(WAIT):
            answer = await ws.receive()
    finally:
        await ws.aclose()
    assert isinstance(answer, bytes), answer
    frame = next(p.decode_message(answer))
    assert frame.type == p.FrameType.REJECT
    payload: dict[str, Any] = frame.payload
    return payload


def _hello(**fields: Any) -> bytes:
    return p.encode(p.FrameType.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "test/1", "port": 9, **fields})


async def test_hook_on_registration_refused(tmp_path: Path, upstream: Upstream,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal is reported once, with the code and reason the agent got; accepted agents never are."""
    refusals = Refusals(fail_first=True)
    with caplog.at_level(logging.ERROR):
        async with start_server(tmp_path, plugins=[("refusals", refusals), ("gate", RefusesByToken())]) as server:
            rejected = await _register_and_expect_reject(server, token="refuse")
            assert (rejected.code, str(rejected)) == ("rejected", "no tunnels for you")  # the failing impl: logged
            answers = [await _raw_reject(server, "hello?"),
                       await _raw_reject(server, p.encode(p.FrameType.HELLO, 0, {"v": 99, "agent": "x", "port": 9})),
                       await _raw_reject(server, _hello(token="throttle")),
                       await _raw_reject(server, _hello(token="crash"))]
            async with start_agent(server, upstream.port):
                pass
            refused = await _register_and_expect_reject(server, subdomain="www")  # the core's own rule
    assert [code for code, _, _ in refusals.calls] == ["rejected", "protocol", "version", "throttled", "internal",
                                                     "rejected"]
    assert [(a["code"], a["reason"]) for a in answers] == [(c, r) for c, r, _ in refusals.calls[1:5]]
    assert answers[2]["retry_after"] == 7
    assert refusals.calls[0][1] == "no tunnels for you" and refusals.calls[5][1] == str(refused)
    assert {client for _, _, client in refusals.calls} == {"127.0.0.1"}
    assert "plugin refusals failed in on_registration_refused" in caplog.text


async def test_hook_on_registration_refused_counts_a_peer_that_never_reads(tmp_path: Path) -> None:
    """A malformed HELLO from a peer that then neither reads nor answers the close: the handshake
    deadline cancels the REJECT's close, and the refusal is reported all the same."""
    refusals = Refusals()
    async with start_server(tmp_path, plugins=[("refusals", refusals)], handshake_timeout=0.3) as server, \
            await anyio.connect_tcp("127.0.0.1", server.ports.ws) as raw:
        key = base64.b64encode(os.urandom(16)).decode()
        await raw.send(f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        hello = b"hello?"  # text, where HELLO must be binary: REJECT 'protocol'
        # One masked text frame (clients must mask): FIN + opcode 1, then the payload.
        mask = os.urandom(4)
        await raw.send(bytes([0x81, 0x80 | len(hello)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(hello)))
        await wait_until(lambda: refusals.calls, timeout=5)  # never reading what the server sends
    assert [code for code, _, _ in refusals.calls] == ["protocol"]


class Shape:
    """Grants an alias, names the user, sets an expiry and adds notices."""

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    @hookimpl
    def on_register(self, registration: Registration, server: ServerContext) -> None:
        assert isinstance(server, ServerContext)
        registration.alias = f"granted-{registration.port}"
        registration.user = "alice"
        registration.expires_at = self.expires_at
        registration.notices.append("welcome, alice")
        registration.notices.append("this tunnel expires in an hour")
        registration.plugin_state("shape")["plan"] = "free"


async def test_hook_on_register_shapes_the_tunnel(tmp_path: Path, upstream: Upstream) -> None:
    expires = time.time() + 3600
    async with start_server(tmp_path, plugins=[("shape", Shape(expires))]) as server, \
            start_agent(server, upstream.port) as agent:
        welcome = agent.reporter.welcomes[0]
        assert welcome["alias"] == f"granted-{upstream.port}"
        assert welcome["user"] == "alice"
        assert welcome["expires_at"] == pytest.approx(expires)
        assert welcome["notices"] == ["welcome, alice", "this tunnel expires in an hour"]
        assert welcome["url"].startswith(f"http://granted-{upstream.port}.localhost:")
        tunnel = server.tunnel(f"granted-{upstream.port}")
        assert tunnel is not None
        assert (tunnel.user, tunnel.metadata) == ("alice", {"shape": {"plan": "free"}})
        assert tunnel.plugin_state("shape") == {"plan": "free"}
        async with agent.visitor() as client:
            assert (await client.get("/granted")).status_code == 200


class Crashes:
    """An on_register with a bug (not a Reject)."""

    @hookimpl
    def on_register(self) -> None:
        raise KeyError("bug in plugin")


async def test_hook_on_register_plugin_bug_refuses_safely(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        async with start_server(tmp_path, plugins=[("crashes", Crashes())]) as server:
            rejected = await _register_and_expect_reject(server)
            assert server.tunnels() == []
    assert rejected.code == "internal"
    assert "bug in plugin" not in str(rejected)  # internals stay on the server
    assert any(r.exc_info and "bug in plugin" in str(r.exc_info[1]) for r in caplog.records)


class Ordered:
    """Appends to a shared log; awaits in the middle, so gathering would interleave."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    @hookimpl
    async def on_register(self, registration: Registration, server: ServerContext) -> None:
        self.log.append(f"{self.name} start (saw {registration.notices})")
        await anyio.sleep(0.01)
        registration.notices.append(self.name)
        self.log.append(f"{self.name} end")


class SubsetOfArgs:
    """Takes only ``registration``; a sync impl among async ones."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl(tryfirst=True)
    def on_register(self, registration: Registration) -> None:
        self.log.append("subset")
        registration.notices.append("subset")


async def test_hook_on_register_order(tmp_path: Path, upstream: Upstream) -> None:
    """Impls run one after another in pluggy's order (tryfirst, then LIFO), each awaited."""
    log: list[str] = []
    plugins = [("first", Ordered("first", log)), ("second", Ordered("second", log)), ("subset", SubsetOfArgs(log))]
    async with start_server(tmp_path, plugins=plugins) as server, start_agent(server, upstream.port) as agent:
        assert agent.reporter.welcomes[0]["notices"] == ["subset", "second", "first"]
    assert log == [
        "subset",
        "second start (saw ['subset'])",
        "second end",
        "first start (saw ['subset', 'second'])",  # sees the change made by the impl before it
        "first end",
    ]


# -- on_disconnect ----------------------------------------------------------------------
class Connects:
    """Records every on_connect call; the first one fails (the tunnel must serve anyway)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, str | None]] = []
        self.changed = anyio.Event()

    @hookimpl
    async def on_connect(self, tunnel: Tunnel, server: ServerContext) -> None:
        self.calls.append((tunnel.alias, server.tunnel(tunnel.alias) is tunnel, tunnel.user))
        self.changed.set()
        self.changed = anyio.Event()
        if len(self.calls) == 1:
            raise RuntimeError("dashboard feed down")

    async def wait(self, count: int) -> None:
        # The agent may see its WELCOME a moment before the server runs the hook.
        with anyio.fail_after(WAIT):
            while len(self.calls) < count:
                await self.changed.wait()


async def test_hook_on_connect(tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Connects()
    async with start_server(tmp_path, plugins=[("connects", plugin), ("login", AnaLogin())]) as server:
        async with start_agent(server, upstream.port) as first, first.visitor() as client:
            # Called once, with the live tunnel; an error is logged and the tunnel serves anyway.
            await plugin.wait(1)
            assert plugin.calls == [(first.alias, True, None)]
            assert (await client.get("/after-a-failing-hook")).status_code == 200
        assert "failed in on_connect" in caplog.text
        async with start_agent(server, upstream.port, subdomain="owned-by-ana", token="ana-token"):
            await plugin.wait(2)
            assert plugin.calls[1] == ("owned-by-ana", True, "ana")
        refused = await _register_and_expect_reject(server, subdomain="www")  # reserved
        assert "reserved" in str(refused)
    assert len(plugin.calls) == 2  # refused registrations never connect


class Disconnects:
    """Records every on_disconnect call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.changed = anyio.Event()

    @hookimpl
    async def on_disconnect(self, tunnel: Tunnel, reason: str, server: ServerContext) -> None:
        assert server.tunnel(tunnel.alias) is not tunnel  # already out of the registry
        await anyio.sleep(0.05)  # a database write, say
        self.calls.append((tunnel.alias, reason))
        self.changed.set()
        self.changed = anyio.Event()

    @hookimpl
    def on_shutdown(self) -> None:
        self.calls.append(("<server>", "on_shutdown"))

    async def wait(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while len(self.calls) < count:
                await self.changed.wait()


async def test_hook_on_disconnect(tmp_path: Path, upstream: Upstream) -> None:
    plugin = Disconnects()
    async with start_server(tmp_path, plugins=[("disconnects", plugin)]) as server:
        async with start_agent(server, upstream.port) as first:
            alias = first.alias
            assert plugin.calls == []
        await plugin.wait(1)
        assert plugin.calls[0][0] == alias
        assert "agent stopped" in plugin.calls[0][1]
        assert server.tunnels() == []
        # A tunnel the server closes is disconnected once too, with the server's reason.
        async with start_agent(server, upstream.port) as second:
            second_alias = second.alias
            assert await server.close_tunnel(second_alias, "closed by an admin")
            await plugin.wait(2)
    # The server is gone: nothing more was reported, each tunnel exactly once.
    assert [alias for alias, _ in plugin.calls] == [alias, second_alias, "<server>"]
    assert plugin.calls[1][1] == "closed by an admin"


async def test_hook_on_disconnect_at_server_shutdown(tmp_path: Path, upstream: Upstream) -> None:
    """A tunnel still open when the server stops is disconnected exactly once."""
    plugin = Disconnects()
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", upstream.port)
    async with anyio.create_task_group() as tg:
        async with start_server(tmp_path, plugins=[("disconnects", plugin)]) as server:
            agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port),
                          forwarder, reporter)
            tg.start_soon(agent.run)
            await reporter.wait_connected()
            alias = agent.alias
            assert plugin.calls == []
        # The agent outlives the server (it is now trying to reconnect).
        tg.cancel_scope.cancel()
    await forwarder.aclose()
    # Once, with the server's reason, and before on_shutdown (a plugin may still write to its database).
    assert plugin.calls == [(alias, "server shutting down"), ("<server>", "on_shutdown")]


# -- resolve_host --------------------------------------------------------------------------
class CustomDomains:
    """Maps whole host names to aliases (the custom-domain plugin in miniature)."""

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}
        self.hosts_seen: list[str] = []

    @hookimpl
    def resolve_host(self, host: str, server: ServerContext) -> str | None:
        assert isinstance(server, ServerContext)
        self.hosts_seen.append(host)
        if host == "boom.test":
            raise LookupError("domain table corrupt")
        return self.domains.get(host)


async def test_hook_resolve_host(tmp_path: Path, upstream: Upstream) -> None:
    plugin = CustomDomains()
    async with start_server(tmp_path, plugins=[("domains", plugin)]) as server, \
            start_agent(server, upstream.port) as agent:
        plugin.domains["custom.test"] = agent.alias
        base = f"http://127.0.0.1:{server.ports.http}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            custom = await client.get("/via-custom?x=1", headers={"host": "custom.test:8080"})
            assert custom.status_code == 200
            assert custom.json()["raw_path"] == "/via-custom"
            # Host reaches the hook lowercase and without the port.
            assert "custom.test" in plugin.hosts_seen
            # The core subdomain parser still answers for hosts the plugin does not know (trylast).
            core = await client.get("/via-subdomain", headers={"host": f"{agent.alias}.localhost"})
            assert core.status_code == 200
            assert core.json()["raw_path"] == "/via-subdomain"
            # The plugin runs first: it can claim a host the core would have parsed differently.
            plugin.domains["shadow.localhost"] = agent.alias
            shadow = await client.get("/shadow", headers={"host": "shadow.localhost"})
            assert shadow.status_code == 200
            unknown = await client.get("/", headers={"host": "unknown.test"})
            assert unknown.status_code == 404
            assert "Tunnel Not Active" in unknown.text
            # A failing resolver fails only that request.
            assert (await client.get("/", headers={"host": "boom.test"})).status_code == 500
            assert (await client.get("/after-boom", headers={"host": "custom.test"})).status_code == 200
    assert [r["path"] for r in upstream.requests] == ["/via-custom", "/via-subdomain", "/shadow", "/after-boom"]


class AsyncResolver:
    """Not allowed: resolve_host is firstresult, and a coroutine is never None."""

    @hookimpl
    async def resolve_host(self, host: str) -> str | None:
        return None


async def test_hook_resolve_host_must_be_sync(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"async.*resolve_host"):
        async with start_server(tmp_path, plugins=[("async-resolver", AsyncResolver())]):
            pytest.fail("an async resolve_host must be refused at start-up")


class FirstWord:
    """Answers with the host's first label, or passes (None) when the host starts with 'pass'."""

    @hookimpl(tryfirst=True)
    def resolve_host(self, host: str) -> str | None:
        return None if host.startswith("pass") else host.split(".")[0] + "-first"


class Fallback:
    @hookimpl
    def resolve_host(self, host: str, server: Any) -> str | None:
        return "fallback"


class Wrapping:
    """A new-style wrapper around resolve_host (allowed: pluggy calls the sync firstresult hooks itself)."""

    @hookimpl(wrapper=True)
    def resolve_host(self, host: str) -> Any:
        answer = yield
        return None if answer is None else answer.upper()


def test_resolve_host_answers_as_pluggy_does() -> None:
    # The runner calls resolve_host's implementations itself (it runs per request); the answer is
    # pluggy's: the first non-None in pluggy's order (tryfirst, then last registered first), the
    # core's subdomain parser last; with a wrapper among them, pluggy's own call.
    plugins: list[tuple[str, object]] = [("fallback", Fallback()), ("first", FirstWord())]
    hooks = HookRunner(build_manager("example.test", plugins))
    pluggy_call = hooks.pm.hook.resolve_host
    for host in ("abc.example.test", "pass.example.test", "other.host"):
        assert hooks.resolve_host(host, None) == pluggy_call(host=host, server=None)
    assert hooks.resolve_host("abc.example.test", None) == "abc-first"
    assert hooks.resolve_host("pass.example.test", None) == "fallback"
    assert HookRunner(build_manager("example.test", [])).resolve_host("abc.example.test", None) == "abc"
    wrapped = HookRunner(build_manager("example.test", [*plugins, ("wrapping", Wrapping())]))
    assert wrapped.resolve_host("abc.example.test", None) == "ABC-FIRST"


class Takes:
    """before_forward and after_response implementations that name their arguments in every way
    pluggy allows (a subset, another order, none) and record what they were given."""

    def __init__(self, seen: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.seen = seen

    @hookimpl
    def before_forward(self, tunnel: Any, request: Any) -> None:
        self.seen.append(("tunnel, request", (tunnel, request)))

    @hookimpl
    def after_response(self) -> None:
        self.seen.append(("nothing", ()))


class TakesServer:
    def __init__(self, seen: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.seen = seen

    @hookimpl
    def before_forward(self, server: Any) -> None:
        self.seen.append(("server", (server,)))

    @hookimpl
    def after_response(self, server: Any, exchange: Any) -> None:
        self.seen.append(("server, exchange", (server, exchange)))


def test_implementations_get_the_arguments_they_name() -> None:
    # The runner calls the per-request hooks' implementations with positional arguments built once
    # per implementation (hooks._positional); each still gets exactly what it names, as from pluggy.
    seen: list[tuple[str, tuple[Any, ...]]] = []
    hooks = HookRunner(build_manager("example.test", [("takes", Takes(seen)), ("server", TakesServer(seen))]))
    assert hooks.before_forward_now("request", "tunnel", "server") is None
    assert seen == [("server", ("server",)), ("tunnel, request", ("tunnel", "request"))]
    seen.clear()
    assert hooks.after_response_soon("exchange", "server") is None
    assert seen == [("server, exchange", ("server", "exchange")), ("nothing", ())]


# -- alias_owner -----------------------------------------------------------------------------------
class Owners:
    """Says 'owned-by-ana' belongs to ana; records every question."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def alias_owner(self, alias: str, server: ServerContext) -> str | None:
        assert isinstance(server, ServerContext)
        self.asked.append(alias)
        return "ana" if alias == "owned-by-ana" else None


class AnaLogin:
    """Registrations asking for 'as-ana' are ana's (a login plugin in miniature)."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        if registration.requested_alias == "owned-by-ana" and registration.token == "ana-token":
            registration.user = "ana"


async def test_hook_alias_owner(tmp_path: Path, upstream: Upstream) -> None:
    owners = Owners()
    async with start_server(tmp_path, plugins=[("owners", owners), ("login", AnaLogin())]) as server:
        # Anonymous: refused the owned name, even though its owner is offline.
        refused = await _register_and_expect_reject(server, subdomain="owned-by-ana")
        assert "belongs to another user" in str(refused)
        assert "owned-by-ana" in owners.asked
        # Its owner gets it.
        async with start_agent(server, upstream.port, subdomain="owned-by-ana", token="ana-token") as agent:
            assert agent.alias == "owned-by-ana"
            async with agent.visitor() as client:
                assert (await client.get("/mine")).status_code == 200
        # Random aliases are checked too: every candidate was asked about.
        async with start_agent(server, upstream.port) as anonymous:
            assert anonymous.alias in owners.asked
            assert anonymous.alias != "owned-by-ana"


class AsyncOwner:
    @hookimpl
    async def alias_owner(self, alias: str) -> str | None:
        return None


async def test_hook_alias_owner_must_be_sync(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"async.*alias_owner"):
        async with start_server(tmp_path, plugins=[("async-owner", AsyncOwner())]):
            pytest.fail("an async alias_owner must be refused at start-up")


# -- alias_reserved --------------------------------------------------------------------------------
class Keeper:
    """Keeps 'kept-name' for its owner, who is whoever ``owner`` says (nobody at first); records
    every question."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.owner: str | None = None

    @hookimpl
    def alias_reserved(self, alias: str, server: ServerContext) -> str | None:
        assert isinstance(server, ServerContext)
        self.asked.append(alias)
        return "it serves the demo" if alias == "kept-name" else None

    @hookimpl
    def alias_owner(self, alias: str) -> str | None:
        return self.owner if alias == "kept-name" else None


class GrantKept:
    """A login plugin in miniature that hands out 'kept-name' to the bearer of 'ana-token'."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        if registration.token == "ana-token":
            registration.user = "ana"
            registration.alias = "kept-name"


async def test_hook_alias_reserved(tmp_path: Path, upstream: Upstream) -> None:
    keeper = Keeper()
    async with start_server(tmp_path, plugins=[("keeper", keeper), ("login", GrantKept())]) as server:
        # Nobody owns it: refused to everyone, by every path, with the plugin's reason.
        anonymous = await _register_and_expect_reject(server, subdomain="kept-name")
        assert "'kept-name' is kept for the user who owns it (it serves the demo), and no user owns it" in str(
            anonymous)
        granted = await _register_and_expect_reject(server, token="ana-token")
        assert "no user owns it" in str(granted)
        resume = {"resume": {"alias": "kept-name", "secret": "s" * 24}}
        async with start_agent(server, upstream.port, extra_hello=resume) as resumed:
            assert resumed.alias != "kept-name"
            assert resumed.alias in keeper.asked  # random candidates are checked too
        # Owned: its owner gets it, everyone else is refused.
        keeper.owner = "ana"
        other = await _register_and_expect_reject(server, subdomain="kept-name")
        assert "belongs to another user" in str(other)
        async with start_agent(server, upstream.port, token="ana-token") as owner, owner.visitor() as client:
            assert owner.alias == "kept-name"
            assert (await client.get("/kept")).status_code == 200
    assert [r["path"] for r in upstream.requests] == ["/kept"]


class AsyncKeeper:
    @hookimpl
    async def alias_reserved(self, alias: str) -> str | None:
        return None


async def test_hook_alias_reserved_must_be_sync(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"async.*alias_reserved"):
        async with start_server(tmp_path, plugins=[("async-keeper", AsyncKeeper())]):
            pytest.fail("an async alias_reserved must be refused at start-up")


# -- before_forward -----------------------------------------------------------------------------
class Gate:
    """Refuses /admin paths with 403, stamps a header on everything else."""

    def __init__(self) -> None:
        self.seen: list[tuple[ForwardRequest, Tunnel]] = []

    @hookimpl
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel, server: ServerContext) -> None:
        self.seen.append((request, tunnel))
        if request.path.startswith("/admin"):
            raise Reject("forbidden", status=403)
        request.headers.append((b"x-added-by-plugin", f"{tunnel.alias}:{request.header('x-visitor')}".encode()))


async def test_hook_before_forward(tmp_path: Path, upstream: Upstream) -> None:
    plugin = Gate()
    async with start_server(tmp_path, plugins=[("gate", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        refused = await client.post("/admin/users?x=1", content=b"secret")
        assert refused.status_code == 403
        assert refused.text == "forbidden\n"
        allowed = await client.get("/public", headers={"x-visitor": "v1"})
        assert allowed.status_code == 200
        headers = allowed.json()["headers"]
        assert ["x-added-by-plugin", f"{agent.alias}:v1"] in headers
        assert ["x-visitor", "v1"] in headers
    # The refused request never reached the agent or the local app.
    assert [r["path"] for r in upstream.requests] == ["/public"]
    assert [s.target for s in agent.reporter.served] == ["/public"]
    request, tunnel = plugin.seen[0]
    assert (request.method, request.target, request.path) == ("POST", b"/admin/users?x=1", "/admin/users")
    assert request.alias == tunnel.alias == agent.alias
    assert request.host == f"{agent.alias}.localhost"
    assert request.client == "127.0.0.1"
    assert request.websocket is False


class RateLimited:
    """A Reject with its own status, body and headers."""

    @hookimpl
    def before_forward(self) -> None:
        raise Reject("slow down", status=429, body=b'{"error": "slow down"}',
                     headers=[(b"retry-after", b"7")])


async def test_hook_before_forward_custom_response(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("limit", RateLimited())]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        response = await client.get("/anything")
    assert response.status_code == 429
    assert response.json() == {"error": "slow down"}
    assert response.headers["retry-after"] == "7"
    assert upstream.requests == []


class BuggyGate:
    """A before_forward with a bug (not a Reject)."""

    @hookimpl
    def before_forward(self, request: ForwardRequest) -> None:
        if request.path == "/bug":
            raise ZeroDivisionError("bug in gate")


async def test_hook_before_forward_plugin_bug_answers_500(tmp_path: Path, upstream: Upstream,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async with start_server(tmp_path, plugins=[("buggy", BuggyGate())]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        with caplog.at_level(logging.ERROR):
            failed = await client.get("/bug")
        fine = await client.get("/fine")
    assert failed.status_code == 500
    assert "bug in gate" not in failed.text  # internals stay in the server log
    assert fine.status_code == 200
    assert [r["path"] for r in upstream.requests] == ["/fine"]
    assert any(r.exc_info and "bug in gate" in str(r.exc_info[1]) for r in caplog.records)


async def test_hook_before_forward_plugin_bug_answers_500_to_websockets_too(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """One error policy for both kinds of request: the edge answers the upgrade itself and logs why
    (it used to escape to the HTTP server, which logged "Error in ASGI Framework" and sent no body)."""
    async with start_server(tmp_path, plugins=[("buggy", BuggyGate())]) as server, \
            start_agent(server, upstream.port) as agent:
        head = (f"GET /bug HTTP/1.1\r\nHost: {agent.alias}.localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n")
        with caplog.at_level(logging.ERROR):
            async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
                await stream.send(head.encode())
                data = b""
                with anyio.fail_after(WAIT):
                    while b"plugin failed" not in data:
                        data += await stream.receive()
        tunnel = server.tunnel(agent.alias)
        assert tunnel is not None and (tunnel.streams_open, tunnel.websockets_open) == (0, 0)
    assert data.startswith(b"HTTP/1.1 500")
    assert b"bug in gate" not in data
    assert upstream.requests == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [
        f"before_forward failed for {agent.alias}; answering 500"]


async def test_hook_before_forward_refuses_websocket(tmp_path: Path, upstream: Upstream) -> None:
    """A WebSocket upgrade goes through before_forward too; the Reject becomes an HTTP answer."""
    plugin = Gate()
    async with start_server(tmp_path, plugins=[("gate", plugin)]) as server, \
            start_agent(server, upstream.port) as agent:
        head = (f"GET /admin/ws HTTP/1.1\r\nHost: {agent.alias}.localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n")
        async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
            await stream.send(head.encode())
            data = b""
            with anyio.fail_after(WAIT):
                while b"forbidden" not in data:
                    data += await stream.receive()
    assert data.startswith(b"HTTP/1.1 403")
    assert plugin.seen[0][0].websocket is True
    assert upstream.requests == []


# -- before_response ----------------------------------------------------------------------------------
class Stamp:
    """Edits response heads: drops x-status, stamps the tunnel; refuses /status/418 and fails on /status/500."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    @hookimpl
    def before_response(self, response: ForwardResponse, request: ForwardRequest, tunnel: Tunnel) -> None:
        self.seen.append((response.status, request.websocket))
        if response.status == 418:
            raise Reject("no teapots here", status=403)
        if response.status == 500:
            raise ZeroDivisionError("bug in stamp")
        response.headers[:] = [(n, v) for n, v in response.headers if n.lower() != b"x-status"]
        response.headers.append((b"x-stamped", tunnel.alias.encode()))


async def test_hook_before_response(tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """Response heads (a WebSocket's upgrade answer too) pass through before_response: its edits
    reach the visitor; a Reject replaces the local app's response, any other error answers 500."""
    plugin = Stamp()
    async with start_server(tmp_path, plugins=[("stamp", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        ok = await client.get("/status/201")
        assert ok.status_code == 201 and ok.text == "status 201\n"
        assert ok.headers["x-stamped"] == agent.alias and "x-status" not in ok.headers
        cookies = await client.get("/cookies")
        assert cookies.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]  # others untouched
        refused = await client.get("/status/418")
        assert (refused.status_code, refused.text) == (403, "no teapots here\n")
        with caplog.at_level(logging.ERROR):
            failed = await client.get("/status/500")
        assert failed.status_code == 500 and "bug in stamp" not in failed.text
        head = (f"GET /ws HTTP/1.1\r\nHost: {agent.alias}.localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n")
        async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
            await stream.send(head.encode())
            data = b""
            with anyio.fail_after(WAIT):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
        assert data.startswith(b"HTTP/1.1 101")
        assert f"x-stamped: {agent.alias}".encode() in data.lower()
        # Edge-made answers (no agent response) do not pass through it.
        assert (await client.get("/status/200", headers={"host": "nobody.localhost"})).status_code == 404
    assert plugin.seen == [(201, False), (200, False), (418, False), (500, False), (101, True)]
    assert any(r.exc_info and "bug in stamp" in str(r.exc_info[1]) for r in caplog.records)


class Reframer:
    """A careless before_response: rewrites the framing of every response it sees."""

    @hookimpl
    def before_response(self, response: ForwardResponse) -> None:
        response.headers[:] = [(n, v) for n, v in response.headers if n.lower() != b"content-length"]
        response.headers += [(b"content-length", b"3"), (b"transfer-encoding", b"chunked"),
                             (b"connection", b"close"), (b"x-reframed", b"1")]


async def test_before_response_cannot_break_the_framing(tmp_path: Path, upstream: Upstream) -> None:
    """The body that follows is the local service's: a hook's Content-Length is replaced by the local
    service's, and the hop-by-hop headers it added are dropped (its other edits stay)."""
    async with start_server(tmp_path, plugins=[("reframer", Reframer())]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        for _ in range(2):  # the connection survives the first answer: no Connection: close went out
            answer = await client.get("/bytes/5000")
            assert answer.status_code == 200 and len(answer.content) == 5000
            assert answer.headers["content-length"] == "5000" and answer.headers["x-reframed"] == "1"
            assert "transfer-encoding" not in answer.headers and "connection" not in answer.headers


# -- after_response ------------------------------------------------------------------------------------
class Recorder:
    """Queues every exchange for the test to read (after_response must not block)."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Exchange](100)

    @hookimpl
    def after_response(self, exchange: Exchange) -> None:
        self.send.send_nowait(exchange)

    async def next(self) -> Exchange:
        with anyio.fail_after(WAIT):
            return await self.receive.receive()

    def close(self) -> None:
        self.send.close()
        self.receive.close()


class Explodes:
    """An after_response with a bug."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    async def after_response(self, exchange: Exchange, server: ServerContext) -> None:
        self.calls += 1
        raise RuntimeError(f"metrics backend down ({exchange.request.path})")


async def test_hook_after_response(tmp_path: Path, upstream: Upstream) -> None:
    recorder = Recorder()
    try:
        async with start_server(tmp_path, plugins=[("recorder", recorder)]) as server, \
                start_agent(server, upstream.port) as agent, agent.visitor() as client:
            body = b"u" * 1234
            response = await client.post("/echo/path?q=1", content=body)
            assert response.status_code == 200
            exchange = await recorder.next()
            assert (exchange.request.method, exchange.request.path) == ("POST", "/echo/path")
            assert exchange.status == 200
            assert exchange.bytes_in == len(body)
            assert exchange.bytes_out == len(response.content)
            assert 0 <= exchange.duration < WAIT
            assert exchange.started_at == pytest.approx(time.time(), abs=WAIT)
            assert exchange.tunnel.alias == agent.alias
            assert exchange.error is None
            missing = await client.get("/status/404")
            assert missing.status_code == 404
            exchange = await recorder.next()
            assert (exchange.status, exchange.request.method, exchange.bytes_in) == (404, "GET", 0)
            assert exchange.bytes_out == len(b"status 404\n")
            tunnel = server.tunnel(agent.alias)
            assert tunnel is not None
            assert tunnel.requests == 2
            assert tunnel.bytes_in == len(body)
    finally:
        recorder.close()


class AwaitsThenRecords:
    """An async after_response that awaits before it records (a database write, say)."""

    def __init__(self) -> None:
        self.seen: list[Exchange] = []
        self.recorded = anyio.Event()

    @hookimpl
    async def after_response(self, exchange: Exchange) -> None:
        await anyio.sleep(0.05)
        self.seen.append(exchange)
        self.recorded.set()


@pytest.mark.parametrize("kind", ["hypercorn", "uvicorn"])
async def test_an_async_after_response_records_an_exchange_shutdown_cut(
        tmp_path: Path, upstream: Upstream, kind: str) -> None:
    """A shutdown past its grace cuts the requests still running; an implementation that awaits
    before it records still records the cut exchange (on both HTTP servers)."""
    plugin = AwaitsThenRecords()
    visitors: list[anyio.abc.SocketStream] = []
    async with contextlib.AsyncExitStack() as stack:

        async def leave() -> None:
            for visitor in visitors:
                await visitor.aclose()

        stack.push_async_callback(leave)  # first in, so last out: the visitor stays until the server stopped
        server = await stack.enter_async_context(
            start_server(tmp_path, plugins=[("awaits", plugin)], http_server=kind, shutdown_grace=0.2))
        agent = await stack.enter_async_context(start_agent(server, upstream.port))
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        visitors.append(stream)
        await stream.send(f"GET /bytes/{1024 * 1024 * 1024} HTTP/1.1\r\nHost: {agent.alias}.localhost\r\n\r\n"
                          .encode())
        with anyio.fail_after(WAIT):
            assert (await stream.receive()).startswith(b"HTTP/1.1 200")
        # Not reading on: the response stalls, and the server's stop cuts it after its grace.
    assert plugin.recorded.is_set(), "the cut exchange was not recorded"
    [exchange] = plugin.seen
    assert exchange.status == 200


async def test_hook_after_response_errors_never_break_traffic(tmp_path: Path, upstream: Upstream,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    recorder, boom = Recorder(), Explodes()
    try:
        with caplog.at_level(logging.ERROR, logger="comzy.plugins"):
            async with start_server(tmp_path, plugins=[("recorder", recorder), ("boom", boom)]) as server, \
                    start_agent(server, upstream.port) as agent, agent.visitor() as client:
                for i in range(5):
                    response = await client.get(f"/req/{i}")
                    assert response.status_code == 200
                    assert json.loads(response.content)["raw_path"] == f"/req/{i}"
                    # "boom" runs first (registered last) and fails; "recorder" still runs.
                    assert (await recorder.next()).request.path == f"/req/{i}"
                bytes_response = await client.get("/bytes/70000")
                assert bytes_response.status_code == 200
                assert len(bytes_response.content) == 70000
                assert (await recorder.next()).bytes_out == 70000
    finally:
        recorder.close()
    assert boom.calls == 6
    failures = [r for r in caplog.records if r.name == "comzy.plugins" and r.levelno == logging.ERROR]
    assert len(failures) == 6
    assert all("boom" in r.getMessage() and "after_response" in r.getMessage() for r in failures)
    assert failures[0].exc_info is not None and "metrics backend down (/req/0)" in str(failures[0].exc_info[1])


# -- admin_routes ------------------------------------------------------------------------------------------
class AdminPage:
    """Serves /x on the admin listener, with the live tunnel count from ``server``."""

    @hookimpl
    def admin_routes(self, server: ServerContext) -> list[AdminRoute]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = json.dumps({"path": scope["path"], "tunnels": len(server.tunnels())}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        return [AdminRoute("/x", app)]


async def test_hook_admin_routes(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("page", AdminPage())]) as server, \
            start_agent(server, upstream.port) as agent:
        async with admin_client(server) as admin:
            page = await admin.get("/x")
            assert page.status_code == 200
            assert page.json() == {"path": "/x", "tunnels": 1}
            assert (await admin.get("/x/sub")).json()["path"] == "/x/sub"
            assert (await admin.get("/xy")).status_code == 404  # a prefix is a path segment
            assert (await admin.get("/healthz")).status_code == 200  # built-ins stay
        # Admin routes are not on the public listener.
        async with visitor(server, agent.alias) as client:
            public = await client.get("/x")
        assert public.json()["raw_path"] == "/x"  # the tunnel's app answered, not the plugin


class BrokenAdmin:
    """An admin_routes that fails: the server must not start half-configured."""

    @hookimpl
    def admin_routes(self) -> list[AdminRoute]:
        raise RuntimeError("templates missing")


async def test_hook_admin_routes_error_stops_startup(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:  # anyio wraps it in an ExceptionGroup
        async with start_server(tmp_path, plugins=[("broken", BrokenAdmin())]):
            pytest.fail("the server must not start when admin_routes fails")
    assert [str(e) for e in _leaves(info.value)] == ["templates missing"]


# -- agent_routes ------------------------------------------------------------------------------------------
class Motd:
    """Serves /api/v1/motd on the agent listener (plain HTTP next to the WebSocket)."""

    @hookimpl
    def agent_routes(self, server: ServerContext) -> list[AdminRoute]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            request = await receive()
            body = json.dumps({"method": scope["method"], "path": scope["path"],
                               "query": scope["query_string"].decode(),
                               "body": request["body"].decode(), "tunnels": len(server.tunnels())}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        return [AdminRoute("/api/v1/motd", app)]


class Stuck:
    """An agent route whose plugin never answers (a wedged database behind it, say)."""

    @hookimpl
    def agent_routes(self, server: ServerContext) -> list[AdminRoute]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await anyio.sleep_forever()

        return [AdminRoute("/api/v1/stuck", app)]


async def test_an_agent_route_that_never_answers_gets_a_503_past_the_handshake_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comzy.core import agent_api

    # The answer's own deadline, longer than the handshake's: a slow plugin is not cut off silently.
    monkeypatch.setattr(agent_api, "ANSWER_TIMEOUT", 1.0)
    async with start_server(tmp_path, plugins=[("stuck", Stuck())], handshake_timeout=0.3) as server, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}", timeout=WAIT) as api:
        got = await api.get("/api/v1/stuck")
        assert got.status_code == 503 and got.json()["error"]["code"] == "unavailable"
        assert "try again" in got.json()["error"]["message"]
        assert (await api.get("/api/v1/status")).status_code == 200


async def test_hook_agent_routes(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path, plugins=[("motd", Motd())]) as server, start_agent(server, upstream.port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}", timeout=WAIT) as api:
            got = await api.post("/api/v1/motd/today?lang=en", content=b"hello")
            assert got.status_code == 200
            assert got.headers["connection"] == "close"
            assert got.json() == {"method": "POST", "path": "/api/v1/motd/today", "query": "lang=en",
                                  "body": "hello", "tunnels": 1}
            status = await api.get("/api/v1/status")
            assert status.status_code == 200
            assert status.json()["base_domain"] == server.settings.base_domain
            assert (await api.get("/api/v1/motdx")).status_code == 404  # a prefix is a path segment
            too_big = await api.post("/api/v1/motd", content=b"x" * (65 * 1024))
            assert too_big.status_code == 413
        # The tunnel still serves: plain HTTP on the agent port did not disturb the WebSocket sessions.
        async with visitor(server, server.tunnels()[0].alias) as client:
            assert (await client.get("/still")).status_code == 200
        # Not on the admin listener.
        async with admin_client(server) as admin:
            assert (await admin.get("/api/v1/motd")).status_code == 404


# -- recent_requests ------------------------------------------------------------------------------
class History:
    """A request log answering ``recent_requests`` from a list (or not at all, or failing)."""

    def __init__(self, name: str, asked: list[str], kept: list[LoggedRequest] | None,
                 fails: bool = False) -> None:
        self.name, self.asked, self.kept, self.fails = name, asked, kept, fails

    @hookimpl
    async def recent_requests(self, alias: str | None, limit: int) -> list[LoggedRequest] | None:
        await anyio.lowlevel.checkpoint()  # really async: the runner must await it
        self.asked.append(self.name)
        if self.fails:
            raise ConnectionError("the log's database is down")
        if self.kept is None:
            return None  # this log is off: the next plugin answers
        return [r for r in self.kept if alias is None or r.alias == alias][:limit]


def _logged(alias: str, path: str, started_at: float) -> LoggedRequest:
    return LoggedRequest(alias=alias, method="GET", path=path, status=200, bytes_in=0, bytes_out=3,
                         started_at=started_at, duration=0.0125, client="192.0.2.7", port=3000)


async def test_hook_recent_requests(tmp_path: Path) -> None:
    """The first non-None answer wins, async answers awaited; the dashboard shows it, and says when it fails."""
    from comzy.plugins.dashboard import Dashboard

    asked: list[str] = []
    kept = [_logged("a", "/3", 30.0), _logged("b", "/2", 20.0), _logged("a", "/1", 10.0)]
    plugins = [("dashboard", Dashboard()), ("full", History("full", asked, kept)),
               ("off", History("off", asked, None))]
    async with start_server(tmp_path, plugins=plugins) as server:
        assert await server.hooks.recent_requests("a", 1, server) == [kept[0]]
        assert asked == ["off", "full"]  # registered last, asked first; None passes the question on
        async with admin_client(server) as admin:
            got = (await admin.get("/api/requests", params={"alias": "a", "limit": 5})).json()
        assert got["source"] == "log"
        assert got["requests"] == [
            {"time": 30.0, "alias": "a", "port": 3000, "method": "GET", "path": "/3", "status": 200, "bytes_in": 0,
             "bytes_out": 3, "duration_ms": 12.5, "client": "192.0.2.7"},
            {"time": 10.0, "alias": "a", "port": 3000, "method": "GET", "path": "/1", "status": 200, "bytes_in": 0,
             "bytes_out": 3, "duration_ms": 12.5, "client": "192.0.2.7"}]
    # A log that cannot be read: the error reaches the caller, and the dashboard answers 503.
    failing = [("dashboard", Dashboard()), ("down", History("down", asked, kept, fails=True))]
    async with start_server(tmp_path, plugins=failing) as server:
        with pytest.raises(ConnectionError):
            await server.hooks.recent_requests(None, 10, server)
        async with admin_client(server) as admin:
            down = await admin.get("/api/requests")
        assert down.status_code == 503
        assert down.json() == {"error": "the request log cannot be read right now (ConnectionError); try again"}
    # No plugin keeps a log: no answer, and the dashboard answers from its memory.
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server:
        assert await server.hooks.recent_requests(None, 10, server) is None
        async with admin_client(server) as admin:
            assert (await admin.get("/api/requests")).json() == {"source": "memory", "requests": []}


# -- the command line -----------------------------------------------------------------------
def test_hook_register_commands(tmp_path: Path) -> None:
    """A third-party package's command, through the real ``comzy-server``: listed while its plugin
    is off, run with its own settings while it is on."""
    from tests.test_plugin_commands import comzy_server, greeter_site

    site = greeter_site(tmp_path)
    assert "greet someone (plugin greeter)" in comzy_server(tmp_path, site, "--help", COMZY_PLUGINS="none").stdout
    off = comzy_server(tmp_path, site, "greet", "ana", COMZY_PLUGINS="none")
    assert off.returncode == 2 and "`greet` belongs to the plugin greeter, which is not enabled" in off.stderr
    on = comzy_server(tmp_path, site, "greet", "ana", COMZY_PLUGINS="greeter", COMZY_GREETER_GREETING="hi")
    assert (on.returncode, on.stdout) == (0, "hi ana\n"), on.stderr
    assert comzy_server(tmp_path, site, "greet", "nobody", COMZY_PLUGINS="greeter").returncode == 3


# -- database_schema ------------------------------------------------------------------------------
NOTES_REVISION = '''"""notes: the table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("text", sa.String(200), nullable=False))


def downgrade() -> None:
    op.drop_table("notes")
'''


class Notes:
    """A third-party plugin with a table: it ships only its model and one revision file."""

    def __init__(self, migrations: Path, name: str = "notes") -> None:
        from sqlalchemy import Column, Integer, String, Table

        from comzy.core.models import plugin_metadata

        metadata = plugin_metadata()
        self.table = Table("notes", metadata, Column("id", Integer, primary_key=True),
                           Column("text", String(200), nullable=False))
        self.schema = Schema(name, metadata, migrations)
        self.rows: list[str] = []

    @hookimpl
    def database_schema(self) -> Schema:
        return self.schema

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        from sqlalchemy import insert, select

        from comzy.core.db import prepare_database

        engine = await prepare_database(server.settings, self.schema)
        try:
            async with engine.begin() as connection:
                await connection.execute(insert(self.table).values(text="kept"))
                self.rows = [row.text for row in await connection.execute(select(self.table))]
        finally:
            await engine.dispose()


async def test_hook_database_schema(tmp_path: Path) -> None:
    from comzy.core import db

    migrations = tmp_path / "notes_migrations"
    migrations.mkdir()
    (migrations / "0001_notes.py").write_text(NOTES_REVISION)
    plugin = Notes(migrations)
    # What `comzy-server db upgrade` asks: the enabled plugins' schemas, without a server.
    assert await db.collect_schemas([("notes", plugin)], "localhost") == [plugin.schema]
    assert plugin.schema.version_table == "alembic_version_notes"
    # The embedded SQLite database: on_startup's prepare_database makes the plugin's table itself.
    async with start_server(tmp_path, plugins=[("notes", plugin)]):
        assert plugin.rows == ["kept"]
    engine = db.create_engine(db.database_url(make_settings(tmp_path)))
    try:
        assert await db.current_revision(engine, plugin.schema) == "0001"
    finally:
        await engine.dispose()

    with pytest.raises(PluginError, match="plugin 'memo': its Schema is named 'notes'; name it 'memo'"):
        await db.collect_schemas([("memo", plugin)], "localhost")

    class Wrong:
        @hookimpl
        def database_schema(self) -> str:
            return "notes"

    with pytest.raises(PluginError, match=r"plugin 'wrong': database_schema must return a comzy\.Schema, not str"):
        await db.collect_schemas([("wrong", Wrong())], "localhost")
    with pytest.raises(ValueError, match="must be a lowercase identifier"):
        Schema("Notes!", plugin.schema.metadata, migrations)


# -- on_request_refused and describe_policy (issue 14: policies operators can see and count) -----------
class RefusalLog:
    """Records what on_request_refused reports."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str, int, str, str, bool]] = []

    @hookimpl
    def on_request_refused(self, request: ForwardRequest, tunnel: Tunnel, status: int, reason: str,
                           plugin: str) -> None:
        self.refused.append((tunnel.alias, request.path, status, reason, plugin, request.websocket))


class BrokenRefusalLog:
    @hookimpl
    def on_request_refused(self) -> None:
        raise RuntimeError("refusal log broke")


async def test_hook_on_request_refused(tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal by a before_forward (HTTP and WebSocket) is reported once the visitor has its
    answer, naming the plugin that refused; a failing implementation is logged and the others run."""
    log_plugin = RefusalLog()
    plugins = [("gate", Gate()), ("broken", BrokenRefusalLog()), ("log", log_plugin)]
    async with start_server(tmp_path, plugins=plugins) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        with caplog.at_level(logging.ERROR):
            assert (await client.get("/admin/x")).status_code == 403
            assert (await client.get("/fine")).status_code == 200
            head = (f"GET /admin/ws HTTP/1.1\r\nHost: {agent.alias}.localhost\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n")
            async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
                await stream.send(head.encode())
                data = b""
                with anyio.fail_after(WAIT):
                    while b"forbidden" not in data:
                        data += await stream.receive()
            await wait_until(lambda: len(log_plugin.refused) == 2)
    assert data.startswith(b"HTTP/1.1 403")
    assert log_plugin.refused == [(agent.alias, "/admin/x", 403, "forbidden", "gate", False),
                                  (agent.alias, "/admin/ws", 403, "forbidden", "gate", True)]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [
        "plugin broken failed in on_request_refused (traffic unaffected)"] * 2


class Describer:
    """Summarises a policy it keeps in the tunnel's metadata, secret included (which must stay there)."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        registration.plugin_state("describer").update({"level": 3, "secret": "hash-that-must-not-show"})

    @hookimpl
    def describe_policy(self, tunnel: Tunnel) -> dict[str, Any] | None:
        state = tunnel.metadata.get("describer")
        return {"level": state["level"]} if state else None


class Silent:
    @hookimpl
    def describe_policy(self) -> None:
        return None


class BrokenDescriber:
    @hookimpl
    def describe_policy(self) -> dict[str, Any]:
        raise RuntimeError("describer broke")


class AsyncDescriber:
    @hookimpl
    async def describe_policy(self) -> dict[str, Any]:
        return {}


async def test_hook_describe_policy(tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """Every implementation is asked; those answering None are left out, one that fails is logged and
    left out; all_tunnels and describe_policies give the summaries, never the metadata's secret."""
    plugins = [("describer", Describer()), ("silent", Silent()), ("broken", BrokenDescriber())]
    async with start_server(tmp_path, plugins=plugins) as server, start_agent(server, upstream.port):
        with caplog.at_level(logging.ERROR):
            [tunnel] = await server.all_tunnels()
            summary = server.describe_policies(tunnel)
    assert summary == {"describer": {"level": 3}}
    assert "hash-that-must-not-show" not in json.dumps(summary)
    assert "plugin broken failed in describe_policy (left out of the view)" in caplog.text
    # A copy from another node carries the summaries instead of the metadata.
    view = tunnel.to_view(metadata=False)
    view["policy_summary"] = summary
    copy = Tunnel.from_view(view, "ctl")
    assert copy.metadata == {} and server.describe_policies(copy) == summary
    with pytest.raises(TypeError, match="policy_summary"):
        Tunnel.from_view({**view, "policy_summary": ["x"]}, "ctl")
    with pytest.raises(PluginError, match=r"async.*describe_policy"):
        async with start_server(tmp_path / "async", plugins=[("async", AsyncDescriber())]):
            pytest.fail("an async describe_policy must be refused at start-up")
