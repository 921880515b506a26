"""Deploying behind a proxy and from the original Comzy's .env (issue 17): the public agent URL in
every hint, and settings errors that name what the user wrote."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from pydantic import ValidationError

from comzy import PluginError, hookimpl
from comzy.core.server import ServerContext, describe
from comzy.core.settings import ServerSettings, explain_validation_error
from comzy.plugins.anonymous_timeout import AnonymousTimeout
from comzy.plugins.anonymous_timeout.settings import AnonymousTimeoutSettings
from tests.conftest import PYTHON, make_settings, start_agent, start_server
from tests.helpers import scratch_database
from tests.test_account_api import comzy
from tests.test_cli import SERVER, agent_env, run_agent, run_cli, server_env
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

PUBLIC_AGENT_URL = "wss://tunnel.example.com"


async def test_the_public_agent_url_is_in_the_hints_and_comzy_status(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with start_server(tmp_path / "data", public_agent_url=PUBLIC_AGENT_URL + "/") as server:
        hint = next(line for line in describe(server) if line.strip().startswith("agents"))
        # The internal listener is still named; agents are told the public URL.
        assert f"ws://127.0.0.1:{server.ports.ws}" in hint
        assert hint.endswith(f"(agents connect with: comzy PORT --server {PUBLIC_AGENT_URL})"), hint
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}", timeout=10) as client:
            status = (await client.get("/api/v1/status")).json()
            assert status["agent_url"] == PUBLIC_AGENT_URL
            assert PUBLIC_AGENT_URL in (await client.get("/")).json()["message"]
        internal = f"ws://127.0.0.1:{server.ports.ws}"
        code, out, err = await comzy(tmp_path, "status", "--server", internal)
        assert code == 0, err
        assert f"Agents:  this server's public agent URL is {PUBLIC_AGENT_URL} " \
               f"(comzy PORT --server {PUBLIC_AGENT_URL})" in out, out
    async with start_server(tmp_path / "data") as server:
        hint = next(line for line in describe(server) if line.strip().startswith("agents"))
        assert hint.endswith(f"--server ws://HOST:{server.ports.ws})"), hint
        code, out, err = await comzy(tmp_path, "status", "--server", f"ws://127.0.0.1:{server.ports.ws}")
        assert code == 0 and "Agents:" not in out, out + err


@pytest.mark.parametrize("value", ["https://tunnel.example.com", "tunnel.example.com", "wss://"])
def test_a_bad_public_agent_url_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   value: str) -> None:
    monkeypatch.setenv("COMZY_PUBLIC_AGENT_URL", value)
    with pytest.raises(ValidationError) as caught:
        ServerSettings(_env_file=None)
    message = explain_validation_error(ServerSettings, caught.value)
    assert message.startswith(f"invalid setting: COMZY_PUBLIC_AGENT_URL={value!r}: ")
    assert "must be a ws:// or wss:// URL" in message


def test_an_empty_public_agent_url_is_unset(tmp_path: Path) -> None:
    assert make_settings(tmp_path, public_agent_url=" ").public_agent_url is None


# -- item 5: a plugin that cannot start leaves nothing behind --------------------------------------

class Opener:
    """Opens something at start-up and releases it at shutdown."""

    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        self.events.append(f"{self.name} started")

    @hookimpl
    async def on_shutdown(self, server: ServerContext) -> None:
        self.events.append(f"{self.name} shut down")


class Refuser(Opener):
    """Refuses to start, as a plugin with a bad setting does."""

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        raise PluginError(f"{self.name}: invalid setting")


async def test_plugins_that_started_are_shut_down_when_a_later_one_fails(tmp_path: Path) -> None:
    events: list[str] = []
    plugins = [("first", Opener(events, "first")), ("bad", Refuser(events, "bad")), ("last", Opener(events, "last"))]
    with pytest.raises(BaseException) as caught:  # the server's task group may wrap it
        async with start_server(tmp_path / "data", plugins=plugins):
            pass
    assert "bad: invalid setting" in repr(caught.value)
    # The one started before the refusal (start-up runs them in the manager's order) is shut down;
    # the refusing plugin and the one after it never started, and are not shut down.
    started = [event.split()[0] for event in events if event.endswith(" started")]
    assert len(started) == 1 and started[0] in ("first", "last")
    assert events == [f"{started[0]} started", f"{started[0]} shut down"]


async def test_a_bad_plugin_setting_on_mariadb_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    """The seed's CUSTOM_DOMAINS mistake on MySQL: the pools the plugins before it had opened (the
    users' store's) used to be collected after the event loop closed ("Exception ignored in
    Connection.__del__", a traceback after the one-line error)."""
    async for url in scratch_database("mariadb"):
        env = server_env(tmp_path / "data", COMZY_PLUGINS="mysql_logging,auth_token,custom_domains",
                         COMZY_DATABASE_URL=url.render_as_string(hide_password=False))
        await anyio.run_process([PYTHON, "-m", SERVER, "db", "upgrade"], env=env, cwd=tmp_path)
        env["CUSTOM_DOMAINS"] = "shop.example.com"
        async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
            code = await cli.wait_exit(within=30)
        assert code == 2, cli.describe()
        problems = [line for line in cli.lines["stderr"] if " INFO " not in line]
        assert problems == ["comzy-server: custom_domains: invalid CUSTOM_DOMAINS (or COMZY_CUSTOM_DOMAINS_MAPPINGS): "
                            "entry 'shop.example.com' is not HOST:ALIAS (e.g. shop.example.com:ana-shop)"], \
            cli.describe()


# -- item 6: the seed's COMZY_ANONYMOUS_TIMEOUT (milliseconds) -----------------------------------

def test_the_seed_anonymous_timeout_is_milliseconds_unless_the_plugin_setting_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMZY_ANONYMOUS_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT", "90000")
    assert AnonymousTimeoutSettings(_env_file=None).seconds == 90
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT_SECONDS", "600")
    assert AnonymousTimeoutSettings(_env_file=None).seconds == 600
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT", "soon")
    with pytest.raises(ValidationError) as caught:
        AnonymousTimeoutSettings(_env_file=None)
    assert explain_validation_error(AnonymousTimeoutSettings, caught.value).startswith(
        "invalid setting: COMZY_ANONYMOUS_TIMEOUT='soon': ")


async def test_the_seed_anonymous_timeout_sets_the_tunnels_lifetime(tmp_path: Path, upstream: Upstream,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMZY_ANONYMOUS_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setenv("COMZY_ANONYMOUS_TIMEOUT", "120000")
    expiry = AnonymousTimeout(AnonymousTimeoutSettings(_env_file=None))
    async with start_server(tmp_path / "data", plugins=[("anonymous_timeout", expiry)]) as server, \
            start_agent(server, upstream.port):
        tunnel = server.tunnels()[0]
        assert tunnel.expires_at is not None
        assert 119 <= tunnel.expires_at - tunnel.created_at <= 121


async def test_the_agent_says_the_seed_anonymous_timeout_is_the_servers(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server, \
            run_agent(upstream.port, server.ports.ws, tmp_path, env=agent_env(COMZY_ANONYMOUS_TIMEOUT="60000")) as cli:
        await cli.wait_for(r"^Public URL: ")
        assert any("COMZY_ANONYMOUS_TIMEOUT has no effect on the agent: the server's setting decides" in line
                   for line in cli.lines["stdout"] + cli.lines["stderr"]), cli.describe()


def test_cacert_is_accepted_before_and_after_the_aliases_action() -> None:
    from comzy.agent.commands import _parser

    after = _parser().parse_args(["aliases", "release", "old", "--cacert", "ca.pem"])
    before = _parser().parse_args(["aliases", "--cacert", "ca.pem", "release", "old"])
    assert after.cacert == before.cacert == "ca.pem" and after.name == before.name == "old"
    assert _parser().parse_args(["aliases"]).cacert is None
