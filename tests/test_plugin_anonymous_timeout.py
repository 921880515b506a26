"""anonymous_timeout: anonymous tunnels expire with a warning; logged-in users' tunnels do not."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import anyio
import pytest

from comzy import Registration, hookimpl
from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from comzy.plugins.anonymous_timeout import AnonymousTimeout, AnonymousTimeoutSettings
from comzy.plugins.anonymous_timeout.plugin import span
from tests.conftest import RecordingReporter, cli_env, start_agent, start_server, visitor
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


def plugin(seconds: float, warn: float) -> AnonymousTimeout:
    return AnonymousTimeout(AnonymousTimeoutSettings(_env_file=None, seconds=seconds, warn_seconds=warn))


class LoginEveryone:
    """Stands in for an authentication plugin: every agent is user 'alice'."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        registration.user = "alice"


async def test_anonymous_tunnel_warns_then_ends_and_the_agent_stops(tmp_path: Path, upstream: Upstream) -> None:
    expiry = plugin(seconds=2, warn=1.0)
    async with start_server(tmp_path / "data", plugins=[("anonymous_timeout", expiry)]) as server:
        reporter = RecordingReporter()
        forwarder = LocalForwarder("127.0.0.1", upstream.port, on_served=reporter.served.append)
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port),
                      forwarder, reporter)
        started = time.time()
        with anyio.fail_after(10):
            final = await agent.run()  # returns only when the server ends the tunnel for good
        await forwarder.aclose()
    welcome = reporter.welcomes[0]
    assert welcome["expires_at"] == pytest.approx(started + 2, abs=0.5)
    assert welcome["notices"] == ["Run `comzy login` for a tunnel that lasts."]
    assert any(level == "warning" and "closes in" in text for level, text in reporter.notices), reporter.notices
    assert "anonymous tunnels last 2 s" in final and "comzy login" in final
    assert time.time() - started >= 1.9
    assert reporter.reconnects == []  # it did not try to come back


async def test_logged_in_tunnels_do_not_expire(tmp_path: Path, upstream: Upstream) -> None:
    expiry = plugin(seconds=0.6, warn=0.2)
    # LoginEveryone registered last runs first (pluggy's LIFO), and anonymous_timeout is trylast anyway.
    plugins = [("anonymous_timeout", expiry), ("login", LoginEveryone())]
    async with start_server(tmp_path / "data", plugins=plugins) as server, \
            start_agent(server, upstream.port) as running:
        assert running.reporter.welcomes[0]["expires_at"] is None
        assert running.reporter.welcomes[0]["user"] == "alice"
        tunnel = server.tunnel(running.alias)
        assert tunnel is not None
        await expiry.check(server, time.time() + 3600)  # far past any anonymous deadline
        async with running.visitor() as client:
            assert (await client.get("/still-here")).status_code == 200
        assert server.tunnel(running.alias) is tunnel


async def test_a_reconnect_keeps_the_first_deadline(tmp_path: Path, upstream: Upstream) -> None:
    expiry = plugin(seconds=600, warn=60)
    async with start_server(tmp_path / "data", plugins=[("anonymous_timeout", expiry)]) as server:
        async with start_agent(server, upstream.port) as first:
            alias, secret = first.alias, first.agent.resume_secret
            await expiry.check(server, time.time())
            deadline = server.tunnel(alias).expires_at  # type: ignore[union-attr]
        # The same agent identity comes back later: its alias, and its old deadline.
        async with start_agent(server, upstream.port) as again:
            assert again.alias != alias  # a brand-new agent gets its own alias and lifetime
        reporter = RecordingReporter()
        forwarder = LocalForwarder("127.0.0.1", upstream.port)
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port),
                      forwarder, reporter)
        agent.alias, agent.resume_secret = alias, secret
        final: list[str] = []

        async def run_agent() -> None:
            final.append(await agent.run())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_agent)
                await reporter.wait_connected()
                assert agent.alias == alias
                await expiry.check(server, time.time())
                assert server.tunnel(alias).expires_at == deadline  # type: ignore[union-attr]
                await expiry.check(server, deadline + 1)  # the first deadline, not a fresh one
        await forwarder.aclose()
        assert "anonymous tunnels last 10 min" in final[0]


def test_span_reads_well() -> None:
    assert span(3600) == "1 h"
    assert span(90) == "1 min 30 s"
    assert span(0.4) == "0 s"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT_SECONDS", "120")
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT_WARN_SECONDS", "500")
    loaded = AnonymousTimeout()
    assert loaded.lifetime == 120
    assert loaded.warn_before == 60  # capped at half the lifetime


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "comzy" / "plugins" / "anonymous_timeout" / "README.md").read_text()
    for name, field in AnonymousTimeoutSettings.model_fields.items():
        variable = field.validation_alias if isinstance(field.validation_alias, str) else \
            f"COMZY_ANONYMOUS_TIMEOUT_{name.upper()}"
        assert f"`{variable}`" in readme, variable


async def test_cli_agent_shows_expiry_and_exits_with_the_reason(tmp_path: Path, upstream: Upstream) -> None:
    expiry = plugin(seconds=2, warn=1)
    async with start_server(tmp_path / "data", plugins=[("anonymous_timeout", expiry)]) as server:
        with anyio.fail_after(20):
            result = await anyio.run_process(
                [sys.executable, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1",
                 "--server", f"ws://127.0.0.1:{server.ports.ws}"],
                env=cli_env(), check=False)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode != 0
    assert re.search(r"^Anonymous tunnel: expires in \d+ s \(at \d\d:\d\d\)$", out, re.MULTILINE), out
    # What the agent prints on connecting says when the tunnel ends once (the plugin's notice
    # gives the advice, not the time again); the warning before expiry comes later.
    lines = out.splitlines()
    on_connect = lines[:next(i for i, line in enumerate(lines) if "closes in" in line)]
    assert len([line for line in on_connect if re.search(r"(?i)expire|closes after", line)]) == 1, out
    assert "Run `comzy login` for a tunnel that lasts." in out, out
    assert "closes in" in out, out
    assert "anonymous tunnels last 2 s" in err and "comzy login" in err, err
    assert "Reconnect" not in out and "reconnecting" not in out


async def test_server_with_builtin_plugins_enables_it(tmp_path: Path, upstream: Upstream) -> None:
    from comzy.core.hooks import builtin_names, load_plugins, select_plugins

    assert "anonymous_timeout" in builtin_names()
    names = select_plugins(None)
    async with start_server(tmp_path / "data", plugins=load_plugins(names)) as server, \
            start_agent(server, upstream.port) as running:
        assert running.reporter.welcomes[0]["expires_at"] is not None
        async with visitor(server, running.alias) as client:
            assert (await client.get("/x")).status_code == 200


class OtherPluginState:
    """Another plugin that happens to keep a key named "anonymous" in its own state."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        registration.plugin_state("other")["anonymous"] = True


async def test_its_mark_lives_in_its_own_metadata(tmp_path: Path, upstream: Upstream) -> None:
    """What the plugin keeps on a tunnel is under its name; another plugin's keys are not its own."""
    expiry = plugin(seconds=0.6, warn=0.2)
    plugins = [("anonymous_timeout", expiry), ("other", OtherPluginState())]
    async with start_server(tmp_path / "data", plugins=plugins) as server, \
            start_agent(server, upstream.port) as anonymous:
        tunnel = server.tunnel(anonymous.alias)
        assert tunnel is not None
        assert tunnel.metadata == {"other": {"anonymous": True}, "anonymous_timeout": {"anonymous": True}}
    expiry = plugin(seconds=0.6, warn=0.2)
    plugins = [("anonymous_timeout", expiry), ("other", OtherPluginState()), ("login", LoginEveryone())]
    async with start_server(tmp_path / "data2", plugins=plugins) as server, \
            start_agent(server, upstream.port) as logged_in:
        tunnel = server.tunnel(logged_in.alias)
        assert tunnel is not None and tunnel.metadata == {"other": {"anonymous": True}}
        await expiry.check(server, time.time() + 3600)  # far past any anonymous deadline
        assert server.tunnel(logged_in.alias) is tunnel  # "other"'s key did not make it anonymous
