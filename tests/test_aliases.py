"""Aliases: random names, requested names, refusals, resume after a restart, takeover."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from comzy import CommandContext
from comzy.agent.client import Agent, AgentConfig, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.core import aliases
from comzy.core.server import ServerContext
from comzy.plugins.auth_token.store import claim_alias, create_user, hash_token
from comzy.plugins.custom_domains import domains
from comzy.plugins.custom_domains.cli import run_domains
from tests.conftest import RecordingReporter, make_settings, start_agent, start_server, visitor
from tests.test_plugin_auth_token import auth
from tests.upstream import Upstream, serve_upstream

pytestmark = pytest.mark.anyio

RANDOM_ALIAS = re.compile(r"client-[a-z0-9]{8,}")


class CountingReporter(RecordingReporter):
    """A RecordingReporter that can wait for its n-th welcome."""

    def __init__(self) -> None:
        super().__init__()
        self._welcomed = anyio.Event()

    def connected(self, welcome: dict[str, Any], first: bool) -> None:
        super().connected(welcome, first)
        self._welcomed.set()
        self._welcomed = anyio.Event()

    async def wait_welcomes(self, count: int) -> dict[str, Any]:
        """Wait until ``count`` WELCOMEs have arrived; the latest one."""
        while len(self.welcomes) < count:
            await self._welcomed.wait()
        return self.welcomes[-1]


class BackgroundAgent:
    """An agent running in a caller's task group, so it can outlive one server.

    ``outcome`` receives what ``Agent.run`` returned or raised, once it ends.
    """

    def __init__(self, servers: list[str], port: int, **config: Any) -> None:
        self.reporter = CountingReporter()
        self.forwarder = LocalForwarder("127.0.0.1", port)
        self.agent = Agent(AgentConfig(servers=servers, port=port, **config), self.forwarder, self.reporter)
        self.outcome: list[Any] = []
        self.ended = anyio.Event()
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        """Run the agent until it ends or is stopped; never raises."""
        try:
            with self._scope:
                self.outcome.append(await self.agent.run())
        except Exception as exc:
            self.outcome.append(exc)
        finally:
            self.ended.set()

    async def stop(self) -> None:
        """Close the session, stop the agent, close the local connection pool."""
        await self.agent.close()
        self._scope.cancel()
        await self.ended.wait()
        await self.forwarder.aclose()


async def refused(server: ServerContext, port: int, **config: Any) -> Rejected:
    """Run an agent that the server must refuse; the Rejected it raised."""
    forwarder = LocalForwarder("127.0.0.1", port)
    agent = Agent(AgentConfig(servers=[ws_url(server)], port=port, **config),
                  forwarder, RecordingReporter())
    try:
        with anyio.fail_after(10), pytest.raises(Rejected) as caught:
            await agent.run()
    finally:
        await forwarder.aclose()
    return caught.value


def ws_url(server: ServerContext) -> str:
    """The agent listener URL of ``server``."""
    return f"ws://127.0.0.1:{server.ports.ws}"


async def get_ok(server: ServerContext, alias: str, path: str) -> None:
    """A GET through the tunnel that must succeed."""
    async with visitor(server, alias) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.json()["raw_path"] == path


def paths_seen(upstream: Upstream) -> list[str]:
    """The HTTP paths an upstream has served."""
    return [scope["path"] for scope in upstream.requests if scope["type"] == "http"]


# -- random aliases ---------------------------------------------------------------------
def test_random_alias_has_at_least_40_bits() -> None:
    assert aliases.RANDOM_LENGTH * math.log2(36) >= 40
    names = {aliases.random_alias() for _ in range(2000)}
    assert len(names) == 2000
    for name in names:
        assert RANDOM_ALIAS.fullmatch(name)
        assert len(name) == len("client-") + aliases.RANDOM_LENGTH
    # Every symbol of the alphabet is used: the entropy is not silently smaller.
    assert set("".join(n.removeprefix("client-") for n in names)) == set("abcdefghijklmnopqrstuvwxyz0123456789")


async def test_agents_get_distinct_random_aliases(server: ServerContext, upstream: Upstream) -> None:
    async with start_agent(server, upstream.port) as one, start_agent(server, upstream.port) as two:
        assert RANDOM_ALIAS.fullmatch(one.alias)
        assert RANDOM_ALIAS.fullmatch(two.alias)
        assert one.alias != two.alias
        assert one.url == f"http://{one.alias}.localhost:{server.ports.http}"
        for running in (one, two):
            async with running.visitor() as client:
                assert (await client.get("/hello")).status_code == 200


# -- requested aliases ------------------------------------------------------------------
async def test_requested_subdomain_is_granted(server: ServerContext, upstream: Upstream) -> None:
    async with start_agent(server, upstream.port, subdomain="myapp") as running:
        assert running.alias == "myapp"
        assert running.url == f"http://myapp.localhost:{server.ports.http}"
        async with visitor(server, "myapp") as client:
            response = await client.get("/via/myapp?x=1")
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/via/myapp"
    assert ("host", "myapp.localhost") in [tuple(h) for h in response.json()["headers"]]


async def test_requested_subdomain_is_lowercased(server: ServerContext, upstream: Upstream) -> None:
    # DNS names are case-insensitive: "MyApp" and "myapp" are one tunnel.
    async with start_agent(server, upstream.port, subdomain="MyApp") as running:
        assert running.alias == "myapp"
        error = await refused(server, upstream.port, subdomain="MYAPP")
        assert "in use" in str(error)


@pytest.mark.parametrize("name", ["-bad", "bad-", "bad_name", "a" * 64, "has.dot"])
async def test_invalid_subdomain_is_refused(server: ServerContext, upstream: Upstream, name: str) -> None:
    error = await refused(server, upstream.port, subdomain=name)
    assert "not a valid subdomain" in str(error)
    assert name in str(error)
    assert server.tunnel(name) is None


async def test_longest_valid_subdomain_is_granted(server: ServerContext, upstream: Upstream) -> None:
    name = "a" * 63
    async with start_agent(server, upstream.port, subdomain=name) as running:
        assert running.alias == name


@pytest.mark.parametrize("name", ["www", "admin", "api"])
async def test_reserved_subdomain_is_refused(server: ServerContext, upstream: Upstream, name: str) -> None:
    error = await refused(server, upstream.port, subdomain=name)
    assert "reserved" in str(error)
    assert name in str(error)


async def test_reserved_list_is_configurable(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", reserved_aliases="secret, internal") as server:
        for name in ("secret", "internal"):
            error = await refused(server, upstream.port, subdomain=name)
            assert "reserved" in str(error)
        async with start_agent(server, upstream.port, subdomain="public") as running:
            assert running.alias == "public"


async def test_name_held_by_live_agent_is_refused(server: ServerContext, upstream: Upstream) -> None:
    async with start_agent(server, upstream.port, subdomain="taken") as holder:
        error = await refused(server, upstream.port, subdomain="taken")
        assert "in use" in str(error)
        assert "taken" in str(error)
        # The holder keeps serving.
        async with holder.visitor() as client:
            assert (await client.get("/still")).status_code == 200
        assert server.registry.get("taken") is not None


# -- resume and takeover ----------------------------------------------------------------
async def test_agent_gets_its_alias_back_after_server_restart(tmp_path: Path, upstream: Upstream) -> None:
    async with anyio.create_task_group() as tg:
        async with start_server(tmp_path / "data", shutdown_grace=1.0) as first_server:
            ports = first_server.ports
            running = BackgroundAgent([ws_url(first_server)], upstream.port)
            tg.start_soon(running.run)
            welcome = await running.reporter.wait_welcomes(1)
            alias = welcome["alias"]
            await get_ok(first_server, alias, "/before")
        # The first server is gone (it said GOAWAY); the agent keeps trying by itself.
        async with start_server(tmp_path / "data", http_port=ports.http, ws_port=ports.ws) as second_server:
            with anyio.fail_after(15):
                again = await running.reporter.wait_welcomes(2)
            assert running.reporter.reconnects, "the agent should have reported reconnecting"
            assert again["alias"] == alias
            assert again["url"] == welcome["url"]
            assert running.agent.alias == alias
            await get_ok(second_server, alias, "/after")
            await running.stop()
    assert paths_seen(upstream) == ["/before", "/after"]


async def test_resume_secret_takes_over_a_live_alias_at_once(server: ServerContext, upstream: Upstream) -> None:
    async with serve_upstream() as other, anyio.create_task_group() as tg:
        first = BackgroundAgent([ws_url(server)], upstream.port)
        tg.start_soon(first.run)
        alias = (await first.reporter.wait_welcomes(1))["alias"]
        await get_ok(server, alias, "/to-first")
        old_session = server.registry.get(alias).session  # type: ignore[union-attr]

        # The same agent coming back on a new connection (its old one not yet known dead).
        second = BackgroundAgent([ws_url(server)], other.port)
        second.agent.alias = first.agent.alias
        second.agent.resume_secret = first.agent.resume_secret
        tg.start_soon(second.run)
        with anyio.fail_after(10):
            welcome = await second.reporter.wait_welcomes(1)
            # The server closed the old session at once (no heartbeat timeout needed) and told
            # its agent not to come back: two holders of one secret must not trade the alias forever.
            await old_session.wait_closed()
            await first.ended.wait()
        assert welcome["alias"] == alias
        assert server.registry.get(alias).session is not old_session  # type: ignore[union-attr]
        assert len(first.outcome) == 1 and isinstance(first.outcome[0], str)
        assert first.outcome[0] == (f"another agent (from 127.0.0.1, with this tunnel's resume secret) took over "
                                    f"{alias}; only one agent serves an alias at a time")
        assert not first.reporter.reconnects
        await get_ok(server, alias, "/to-second")
        assert "/to-second" in paths_seen(other)
        assert "/to-second" not in paths_seen(upstream)
        await second.stop()
        await first.stop()


async def test_wrong_resume_secret_does_not_take_over(server: ServerContext, upstream: Upstream) -> None:
    async with serve_upstream() as other, anyio.create_task_group() as tg:
        holder = BackgroundAgent([ws_url(server)], upstream.port)
        tg.start_soon(holder.run)
        alias = (await holder.reporter.wait_welcomes(1))["alias"]
        assert holder.agent.resume_secret

        intruder = BackgroundAgent([ws_url(server)], other.port)
        intruder.agent.alias = alias
        intruder.agent.resume_secret = "x" * len(holder.agent.resume_secret)
        tg.start_soon(intruder.run)
        welcome = await intruder.reporter.wait_welcomes(1)
        assert welcome["alias"] != alias
        assert RANDOM_ALIAS.fullmatch(welcome["alias"])
        assert welcome["resume_secret"] != holder.agent.resume_secret
        # The holder was not disturbed and still serves its alias.
        assert not holder.reporter.reconnects
        assert not holder.ended.is_set()
        await get_ok(server, alias, "/holder")
        assert "/holder" in paths_seen(upstream)
        assert "/holder" not in paths_seen(other)
        await intruder.stop()
        await holder.stop()


async def test_wrong_resume_secret_with_subdomain_is_refused(server: ServerContext, upstream: Upstream) -> None:
    async with start_agent(server, upstream.port, subdomain="mine") as holder:
        assert holder.agent.resume_secret
        forwarder = LocalForwarder("127.0.0.1", upstream.port)
        intruder = Agent(AgentConfig(servers=[ws_url(server)], port=upstream.port, subdomain="mine"),
                         forwarder, RecordingReporter())
        intruder.alias = "mine"
        intruder.resume_secret = "y" * len(holder.agent.resume_secret)
        try:
            with anyio.fail_after(10), pytest.raises(Rejected) as caught:
                await intruder.run()
        finally:
            await forwarder.aclose()
        assert "in use" in str(caught.value)
        assert not holder.reporter.reconnects
        async with holder.visitor() as client:
            assert (await client.get("/holder")).status_code == 200


# -- punycode (IDNA) names -----------------------------------------------------------------
#: Shown by browsers as apple with a Cyrillic a (U+0430): a look-alike of apple.<base-domain>.
LOOKALIKE = "xn--pple-43d"


@pytest.mark.parametrize("name", [LOOKALIKE, "xn--80ak6aa92e", "xn--abc", "ab--cd"])
def test_names_reserved_for_idna_are_refused_unless_allowed(name: str) -> None:
    problem = aliases.check_alias(name, frozenset())
    assert problem is not None and name in problem
    assert "COMZY_ALLOW_PUNYCODE_ALIASES" in problem
    assert aliases.check_alias(name, frozenset(), allow_punycode=True) is None
    # Reserved stays reserved, allowed or not.
    assert "reserved" in str(aliases.check_alias(name, frozenset({name}), allow_punycode=True))


@pytest.mark.parametrize("name", ["xn", "x-n", "my-app", "a-b--c", "client-xn--abcd"])
def test_other_hyphenated_names_stay_valid(name: str) -> None:
    assert aliases.check_alias(name, frozenset()) is None


def test_refusal_shows_what_a_browser_would_show() -> None:
    problem = str(aliases.check_alias(LOOKALIKE, frozenset()))
    assert "punycode" in problem
    assert "\u0430pple" in problem  # the Cyrillic look-alike, so the person sees why


async def test_agent_asking_for_a_punycode_alias_is_refused(server: ServerContext, upstream: Upstream) -> None:
    error = await refused(server, upstream.port, subdomain=LOOKALIKE)
    assert "punycode" in str(error)
    assert LOOKALIKE in str(error)
    assert server.tunnel(LOOKALIKE) is None


async def test_punycode_alias_is_granted_when_the_operator_allows_it(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", allow_punycode_aliases=True) as server, \
            start_agent(server, upstream.port, subdomain=LOOKALIKE) as running:
        assert running.alias == LOOKALIKE
        await get_ok(server, LOOKALIKE, "/idn")


async def test_resume_never_grants_a_punycode_alias(server: ServerContext, upstream: Upstream) -> None:
    # An agent that claims (with any secret) to have held the alias gets a random one instead.
    async with anyio.create_task_group() as tg:
        agent = BackgroundAgent([ws_url(server)], upstream.port)
        agent.agent.alias = LOOKALIKE
        agent.agent.resume_secret = "z" * 32
        tg.start_soon(agent.run)
        welcome = await agent.reporter.wait_welcomes(1)
        assert RANDOM_ALIAS.fullmatch(welcome["alias"])
        await agent.stop()


@pytest.mark.parametrize("allowed", [False, True])
async def test_logged_in_user_claims_a_punycode_alias_only_when_allowed(
        tmp_path: Path, upstream: Upstream, allowed: bool) -> None:
    plugin = auth(refresh_seconds=3600)
    async with start_server(tmp_path / "data", plugins=[("auth_token", plugin)],
                            allow_punycode_aliases=allowed) as server:
        token = await create_user(plugin.engine, "ana")
        if not allowed:
            error = await refused(server, upstream.port, subdomain=LOOKALIKE, token=token)
            assert "punycode" in str(error)
            assert LOOKALIKE not in plugin.aliases  # nothing claimed
            return
        async with start_agent(server, upstream.port, subdomain=LOOKALIKE, token=token) as running:
            assert running.alias == LOOKALIKE
            assert plugin.aliases[LOOKALIKE].user_id == plugin.users_by_hash[hash_token(token)].id


async def test_punycode_alias_owned_from_before_is_not_granted(tmp_path: Path, upstream: Upstream) -> None:
    # Claimed while the server allowed it (or before the rule): the plugin grants it for this
    # port, and the core refuses it all the same, so turning the setting off takes effect at once.
    plugin = auth(refresh_seconds=3600)
    async with start_server(tmp_path / "data", plugins=[("auth_token", plugin)]) as server:
        token = await create_user(plugin.engine, "ana")
        await plugin.refresh(server)
        await claim_alias(plugin.engine, plugin.users_by_hash[hash_token(token)].id, LOOKALIKE, upstream.port)
        await plugin.refresh(server)
        assert LOOKALIKE in plugin.aliases
        error = await refused(server, upstream.port, token=token)
        assert "punycode" in str(error)
        assert server.tunnel(LOOKALIKE) is None


def test_custom_domains_refuse_punycode_aliases_unless_allowed(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    entry = f"shop.example.com:{LOOKALIKE}"
    for refused_here in (lambda: domains.check_alias(LOOKALIKE), lambda: domains.parse_mappings(entry, "localhost")):
        with pytest.raises(domains.MappingError, match="punycode"):
            refused_here()
    assert domains.check_alias(LOOKALIKE, allow_punycode=True) == LOOKALIKE
    assert domains.parse_mappings(entry, "localhost", allow_punycode=True) == {"shop.example.com": LOOKALIKE}
    # `comzy-server domains add` says why before it touches the database.
    args = argparse.Namespace(action="add", host="shop.example.com", alias=LOOKALIKE)
    assert anyio.run(run_domains, args, CommandContext(make_settings(tmp_path / "data"), [], "custom_domains")) == 2
    assert "punycode" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
