"""auth_token: users with tokens, owned aliases, revocation, `comzy-server users`, and the agent's
`comzy login | status | aliases | logout`, on SQLite and MariaDB."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pty
import select as io_select
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from sqlalchemy import URL, event, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from comzy.core import db
from comzy.core import protocol as p
from comzy.core.hooks import builtin_names, load_plugins
from comzy.core.models import utc_now
from comzy.core.server import ServerContext
from comzy.core.websocket import connect
from comzy.plugins.anonymous_timeout import AnonymousTimeout, AnonymousTimeoutSettings
from comzy.plugins.auth_token import AuthToken, AuthTokenSettings
from comzy.plugins.auth_token.models import SCHEMA as AUTH_SCHEMA
from comzy.plugins.auth_token.models import User
from comzy.plugins.auth_token.store import create_user, hash_token, revoke_user, rotate_token
from comzy.plugins.auth_token.throttle import FailureThrottle, Throttled, UnknownTokens
from tests.conftest import PYTHON, ROOT, RecordingReporter, cli_env, start_agent, start_server
from tests.helpers import scratch_database, serve_tcp, wait_until
from tests.private_mariadb import PrivateMariaDB
from tests.test_hooks import _register_and_expect_reject
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

WAIT = 20.0
ENV = ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "COMZY_REQUIRE_TOKEN",
       "MAX_ALIASES_PER_USER", "COMZY_MAX_ALIASES_PER_USER", "COMZY_AUTH_REFRESH_SECONDS", "COMZY_TOKEN",
       "COMZY_WS_SERVER")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the agent's ~/.comzy/.user


@pytest.fixture(params=["sqlite", "mariadb"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Server overrides that select the database: the SQLite default, or a fresh migrated MariaDB."""
    if request.param == "sqlite":
        yield {}
        return
    async for url in scratch_database("mariadb"):
        engine = db.create_engine(url)
        try:
            await db.upgrade_to_head(engine, [AUTH_SCHEMA])
        finally:
            await engine.dispose()
        yield {"database_url": url.render_as_string(hide_password=False)}


def auth(**settings: Any) -> AuthToken:
    settings.setdefault("refresh_seconds", 0.05)
    return AuthToken(AuthTokenSettings(_env_file=None, **settings))


@asynccontextmanager
async def auth_server(tmp_path: Path, plugin: AuthToken, database: dict[str, Any],
                      *extra: tuple[str, object]) -> AsyncIterator[ServerContext]:
    async with start_server(tmp_path / "data", plugins=[("auth_token", plugin), *extra], **database) as server:
        yield server


class Background:
    """An in-process agent run in a task, whose final reason (or error) is kept."""

    def __init__(self, server: ServerContext, port: int, **config: Any) -> None:
        self.reporter = RecordingReporter()
        self.forwarder = LocalForwarder("127.0.0.1", port)
        self.agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=port, **config),
                           self.forwarder, self.reporter)
        self.ended = anyio.Event()
        self.result: str | BaseException | None = None

    async def run(self) -> None:
        try:
            self.result = await self.agent.run()
        except Exception as exc:
            self.result = exc
        finally:
            self.ended.set()


# -- owned aliases ------------------------------------------------------------------------------
async def test_a_user_keeps_the_alias_of_each_port_across_reconnects_and_restarts(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, database) as server:
        token = await create_user(plugin.engine, "ana")
        async with start_agent(server, upstream.port, token=token) as first:
            alias = first.alias
            assert first.reporter.welcomes[0]["user"] == "ana"
            async with first.visitor() as client:
                assert (await client.get("/owned")).status_code == 200
        # A fresh agent (no resume secret) for the same port gets the same alias...
        async with start_agent(server, upstream.port, token=token) as again:
            assert again.alias == alias
        # ... and another port gets another one.
        async with start_agent(server, 9, token=token) as other_port:
            assert other_port.alias != alias
            second = other_port.alias
    # After a restart (a new plugin reads the database) both are still hers.
    plugin = auth()
    async with auth_server(tmp_path, plugin, database) as server:
        assert plugin.alias_owner(alias) == "ana" and plugin.alias_owner(second) == "ana"
        async with start_agent(server, upstream.port, token=token) as after_restart:
            assert after_restart.alias == alias


async def test_subdomains_are_claimed_up_to_the_limit_and_released_through_the_api(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    plugin = auth(max_aliases_per_user=2)
    async with auth_server(tmp_path, plugin, database) as server:
        token = await create_user(plugin.engine, "ana")
        async with start_agent(server, upstream.port, token=token, subdomain="ana-site") as named:
            assert named.alias == "ana-site"
        async with start_agent(server, 9, token=token) as by_port:
            random_alias = by_port.alias
        refused = await _register_and_expect_reject(server, token=token, subdomain="ana-third")
        assert "MAX_ALIASES_PER_USER=2" in str(refused) and "comzy aliases release" in str(refused)
        assert "ana-site" in str(refused) and random_alias in str(refused)
        # Her own name is still hers for any port, at the limit or not.
        async with start_agent(server, 9, token=token, subdomain="ana-site") as reused:
            assert reused.alias == "ana-site"
        base = f"http://127.0.0.1:{server.ports.ws}"
        async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {token}"}) as api:
            me = (await api.get("/api/v1/me")).json()
            assert me["user"] == "ana" and me["max_aliases"] == 2
            assert sorted(a["alias"] for a in me["aliases"]) == sorted(["ana-site", random_alias])
            assert (await api.delete("/api/v1/aliases/nobodys")).status_code == 404
            released = await api.delete(f"/api/v1/aliases/{random_alias}")
            assert released.status_code == 200 and released.json()["released"] == random_alias
        async with start_agent(server, upstream.port, token=token, subdomain="ana-third") as third:
            assert third.alias == "ana-third"
        assert plugin.alias_owner(random_alias) is None


async def test_nobody_else_takes_an_owned_alias_even_while_its_owner_is_offline(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, database) as server:
        ana = await create_user(plugin.engine, "ana")
        bob = await create_user(plugin.engine, "bob")
        async with start_agent(server, upstream.port, token=ana, subdomain="ana-site"):
            pass  # claimed; now offline
        anonymous = await _register_and_expect_reject(server, subdomain="ana-site")
        assert "belongs to another user" in str(anonymous)
        other_user = await _register_and_expect_reject(server, token=bob, subdomain="ana-site")
        assert "belongs to another user" in str(other_user)
        # The owner still gets it.
        async with start_agent(server, upstream.port, token=ana, subdomain="ana-site") as owner, \
                owner.visitor() as client:
            assert (await client.get("/still-ana")).status_code == 200
        assert [r["path"] for r in upstream.requests] == ["/still-ana"]


async def test_the_owner_replaces_a_stale_session_of_theirs_at_once(
        tmp_path: Path, upstream: Upstream) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, {}) as server:
        token = await create_user(plugin.engine, "ana")
        stale = Background(server, upstream.port, token=token)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stale.run)
            await stale.reporter.wait_connected()
            alias = stale.agent.alias
            # A second laptop (no resume secret) of the same user: no waiting for a heartbeat timeout.
            async with start_agent(server, upstream.port, token=token) as fresh:
                assert fresh.alias == alias
                with anyio.fail_after(WAIT):
                    await stale.ended.wait()
                # Said in plain words: who took it over (the plugin set the user), from where.
                assert stale.result == (f"another agent logged in as ana (from 127.0.0.1) took over {alias}; "
                                        "only one agent serves an alias at a time")
                async with fresh.visitor() as client:
                    assert (await client.get("/fresh")).status_code == 200
        await stale.forwarder.aclose()


async def test_the_replaced_agent_says_in_plain_words_who_took_its_alias(
        tmp_path: Path, upstream: Upstream) -> None:
    from tests.test_cli import agent_env, run_agent

    plugin = auth()
    async with auth_server(tmp_path, plugin, {}) as server:
        token = await create_user(plugin.engine, "ana")
        env = agent_env(COMZY_TOKEN=token, HOME=str(tmp_path / "home"))
        async with run_agent(upstream.port, server.ports.ws, tmp_path, env=env) as first:
            alias = (await first.wait_for(r"^Public URL: \S*?//([a-z0-9-]+)\.")).group(1)
            # ana starts a second agent for the same port: it takes the alias over at once.
            async with start_agent(server, upstream.port, token=token) as second:
                assert second.alias == alias
                assert await first.wait_exit(within=WAIT) == 1, first.describe()
        assert first.lines["stderr"] == [
            f"comzy: the server ended this tunnel: another agent logged in as ana (from 127.0.0.1) took over "
            f"{alias}; only one agent serves an alias at a time"], first.describe()
        assert "reconnecting" not in first.stdout, first.describe()


# -- tokens ---------------------------------------------------------------------------------------
async def test_require_token_refuses_anonymous_agents_with_a_hint(tmp_path: Path) -> None:
    async with auth_server(tmp_path, auth(require_token=True), {}) as server:
        refused = await _register_and_expect_reject(server)
        assert "comzy login" in str(refused) and "logged-in agents only" in str(refused)


async def test_a_bad_token_is_refused_even_when_anonymous_agents_are_allowed(tmp_path: Path) -> None:
    async with auth_server(tmp_path, auth(), {}) as server:
        refused = await _register_and_expect_reject(server, token="czy_not-a-real-token")
        assert "not accepted" in str(refused) and "comzy login" in str(refused)


async def test_revoked_and_rotated_tokens_close_live_tunnels(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, database) as server:
        token = await create_user(plugin.engine, "ana")
        env = {"COMZY_DATABASE_URL": database["database_url"]} if database else {}
        async with anyio.create_task_group() as tg:
            live = Background(server, upstream.port, token=token)
            tg.start_soon(live.run)
            await live.reporter.wait_connected()
            revoked = await anyio.to_thread.run_sync(lambda: users_cli(tmp_path, "revoke", "ana", **env))
            assert revoked.returncode == 0, revoked.stderr
            with anyio.fail_after(WAIT):
                await live.ended.wait()
            assert isinstance(live.result, str) and "revoked" in live.result and "comzy login" in live.result
            assert server.tunnels() == []
            refused = await _register_and_expect_reject(server, token=token)
            assert "revoked" in str(refused)
            # Rotating gives a working token again; the old one stays dead, and tunnels on it close.
            new_token = await rotate_token(plugin.engine, "ana")
            second = Background(server, upstream.port, token=new_token)
            tg.start_soon(second.run)
            await second.reporter.wait_connected()
            assert second.agent.alias == live.agent.alias  # still her alias
            await _register_and_expect_reject(server, token=token)
            await rotate_token(plugin.engine, "ana")
            with anyio.fail_after(WAIT):
                await second.ended.wait()
            assert isinstance(second.result, str) and "replaced" in second.result
        await live.forwarder.aclose()
        await second.forwarder.aclose()


async def test_logged_in_tunnels_do_not_expire(tmp_path: Path, upstream: Upstream) -> None:
    plugin = auth()
    expiry = AnonymousTimeout(AnonymousTimeoutSettings(_env_file=None, seconds=600))
    async with auth_server(tmp_path, plugin, {}, ("anonymous_timeout", expiry)) as server:
        token = await create_user(plugin.engine, "ana")
        async with start_agent(server, upstream.port, token=token) as user, \
                start_agent(server, upstream.port) as anonymous:
            assert user.reporter.welcomes[0]["expires_at"] is None
            assert anonymous.reporter.welcomes[0]["expires_at"] is not None


async def test_tokens_are_stored_hashed_and_never_logged(tmp_path: Path, upstream: Upstream,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    plugin = auth()
    with caplog.at_level(logging.DEBUG):
        async with auth_server(tmp_path, plugin, {}) as server:
            token = await create_user(plugin.engine, "ana")
            async with start_agent(server, upstream.port, token=token):
                pass
            await _register_and_expect_reject(server, token=token + "x")
            async with plugin.engine.connect() as conn:
                stored = (await conn.execute(select(User.token_hash))).scalar_one()
    assert stored == hashlib.sha256(token.encode()).hexdigest() == hash_token(token)
    assert token not in caplog.text and token not in (tmp_path / "data" / "comzy.db").read_bytes().decode("latin-1")


# -- token guessing ---------------------------------------------------------------------------------
def count_token_lookups(engine: AsyncEngine) -> list[str]:
    """The database lookups of single tokens on ``engine`` from now on (a list that grows)."""
    lookups: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "users.token_hash =" in statement:
            lookups.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    return lookups


def account_api(server: ServerContext, token: str, source: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client of the account API with ``token``, connecting from the loopback address ``source``."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}",
                             headers={"authorization": f"Bearer {token}"},
                             transport=httpx.AsyncHTTPTransport(local_address=source))


async def throttled_hello(server: ServerContext, token: str) -> dict[str, Any]:
    """The REJECT a HELLO with ``token`` gets; it must be the retryable "throttled" kind."""
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 * 1024 * 1024)
    try:
        await ws.send(p.encode(p.FrameType.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "t/1", "port": 1,
                                                      "token": token}))
        message = await ws.receive()
    finally:
        await ws.aclose()
    assert isinstance(message, bytes)
    [frame] = p.decode_message(message)
    assert frame.type == p.FrameType.REJECT and frame.payload["code"] == "throttled", frame
    return dict(frame.payload)


async def agent_waits_when_throttled(server: ServerContext, token: str) -> None:
    """A stock agent refused as throttled reports it and waits to retry, without exiting."""
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", 9)
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=9, token=token), forwarder,
                  reporter)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)  # raising Rejected here would fail the test
            await wait_until(lambda: reporter.reconnects, 10)
            tg.cancel_scope.cancel()
    finally:
        await forwarder.aclose()
    assert "too many failed token checks" in reporter.reconnects[0]
    assert reporter.welcomes == []


async def test_token_guessing_is_throttled_per_address_and_logged_once(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    plugin = auth(refresh_seconds=3600)  # the default: 5 failures a minute
    with caplog.at_level(logging.INFO, logger="comzy"):
        async with auth_server(tmp_path, plugin, {}) as server:
            token = await create_user(plugin.engine, "ana")
            lookups = count_token_lookups(plugin.engine)
            guesses = [f"czy_guess-{n}" for n in range(12)]
            for guess in guesses[:5]:
                async with account_api(server, guess) as api:
                    assert (await api.get("/api/v1/me")).status_code == 401
            assert len(lookups) == 5
            # Past the limit: 429 with Retry-After, whatever the token, and no database query.
            for guess in [*guesses[5:], token]:
                async with account_api(server, guess) as api:
                    refused = await api.get("/api/v1/me")
                assert refused.status_code == 429, refused.text
                assert 1 <= int(refused.headers["retry-after"]) <= 60
                assert refused.json()["error"]["code"] == "throttled"
                assert "too many failed token checks" in refused.json()["error"]["message"]
            assert len(lookups) == 5
            # The agent link shares the allowance: the HELLO is refused with when to retry...
            refusal = await throttled_hello(server, token)
            assert "too many failed token checks" in refusal["reason"] and "try again in" in refusal["reason"]
            assert 1 <= refusal["retry_after"] <= 60
            # ... and the stock agent waits that long and tries again, rather than giving up for
            # good (behind a proxy or NAT the address may be throttled for someone else's guesses).
            await agent_waits_when_throttled(server, token)
            # Another address is not held back by this one.
            async with account_api(server, token, source="127.0.0.2") as api:
                assert (await api.get("/api/v1/me")).json()["user"] == "ana"
    throttled = [r for r in caplog.records if "failed token checks" in r.getMessage()]
    assert len(throttled) == 1 and throttled[0].levelno == logging.WARNING, caplog.text
    assert "127.0.0.1" in throttled[0].getMessage()
    assert not any(secret in caplog.text for secret in [token, *guesses])


async def test_behind_a_trusted_proxy_guessing_throttles_the_guesser_not_everyone(tmp_path: Path) -> None:
    """Behind nginx every agent comes from 127.0.0.1: the throttle must key on the address the
    proxy reports, or one guesser would lock every agent out."""
    plugin = auth(refresh_seconds=3600, max_failures_per_minute=2)
    async with auth_server(tmp_path, plugin, {"trusted_proxies": "127.0.0.1/32"}) as server:
        token = await create_user(plugin.engine, "ana")

        async def me(credential: str, via: str) -> httpx.Response:
            async with account_api(server, credential) as api:
                return await api.get("/api/v1/me", headers={"x-forwarded-for": via})

        for n in range(2):
            assert (await me(f"czy_guess-{n}", "198.51.100.1")).status_code == 401
        assert (await me("czy_guess-2", "198.51.100.1")).status_code == 429
        # Ana, behind the same proxy, is not held back; the guesser's own address is.
        assert (await me(token, "198.51.100.2")).json()["user"] == "ana"
        assert (await me(token, "198.51.100.1")).status_code == 429
        # The same on the agent link: the upgrade's X-Forwarded-For names the agent.
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 * 1024 * 1024,
                           headers=[(b"x-forwarded-for", b"203.0.113.9, 198.51.100.2")])
        try:
            await ws.send(p.encode(p.FrameType.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "t/1", "port": 9,
                                                          "token": token}))
            message = await ws.receive()
            assert isinstance(message, bytes)
            [welcome] = p.decode_message(message)
            assert welcome.type == p.FrameType.WELCOME, welcome
            tunnel = server.tunnel(welcome.payload["alias"])
            # The nearest untrusted hop: what a client wrote further left is not believed.
            assert tunnel is not None and tunnel.client_address == "198.51.100.2"
        finally:
            await ws.aclose()


async def test_a_guess_on_the_agent_link_counts_and_many_at_once_gain_nothing(tmp_path: Path) -> None:
    plugin = auth(refresh_seconds=3600, max_failures_per_minute=3)
    async with auth_server(tmp_path, plugin, {}) as server:
        for n in range(3):
            refused = await _register_and_expect_reject(server, token=f"czy_hello-guess-{n}")
            assert "not accepted" in str(refused)
        throttled = await throttled_hello(server, "czy_hello-guess-3")
        assert "too many failed token checks" in throttled["reason"]
    # Checks started together (each waiting for the database) are counted before they finish.
    plugin = auth(refresh_seconds=3600, max_failures_per_minute=3)
    async with auth_server(tmp_path, plugin, {}) as server:
        statuses: list[int] = []

        async def guess(n: int) -> None:
            async with account_api(server, f"czy_parallel-{n}") as api:
                statuses.append((await api.get("/api/v1/me")).status_code)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(guess, n)
        assert sorted(statuses) == [401] * 3 + [429] * 17


async def test_an_unknown_token_costs_one_query_and_works_once_it_exists(tmp_path: Path) -> None:
    ttl = 1.5
    # Re-reads of the users far apart: only the end of the unknown-token memory lets the token in.
    plugin = auth(refresh_seconds=3600, unknown_token_seconds=ttl, max_failures_per_minute=10_000)
    async with auth_server(tmp_path, plugin, {}) as server:
        lookups = count_token_lookups(plugin.engine)
        token = "czy_made-a-moment-later"
        async with account_api(server, token) as api:
            for _ in range(20):
                assert (await api.get("/api/v1/me")).status_code == 401
            refused_at = time.monotonic()
            assert len(lookups) == 1
            # The token now exists (as `users create` would make it, with this value).
            async with plugin.engine.begin() as conn:
                await conn.execute(insert(User).values(name="late", token_hash=hash_token(token),
                                                       created_at=utc_now()))

            async def accepted() -> bool:
                return (await api.get("/api/v1/me")).status_code == 200

            await wait_until(accepted, timeout=ttl + 10)
        assert time.monotonic() - refused_at < ttl + 5
        assert plugin.refreshes == 1  # the start-up read only


def test_the_tables_against_guessing_stay_bounded() -> None:
    now = [0.0]
    throttle = FailureThrottle(limit=2, max_addresses=100, clock=lambda: now[0])
    # Many addresses: the table holds the newest 100, never more.
    for n in range(1000):
        throttle.begin(f"10.0.{n // 250}.{n % 250}")
    assert len(throttle) == 100
    # IPv6 counts per /64; an IPv4-mapped address as its IPv4 address.
    throttle.begin("2001:db8::1")
    throttle.begin("2001:db8::ffff:2")
    with pytest.raises(Throttled) as refused:
        throttle.begin("2001:db8::3")
    assert refused.value.key == "2001:db8::/64" and refused.value.first and refused.value.retry_after == 60
    with pytest.raises(Throttled) as again:
        throttle.begin("2001:db8::4")
    assert not again.value.first  # logged once per window
    throttle.begin("::ffff:192.0.2.1")
    throttle.begin("192.0.2.1")
    with pytest.raises(Throttled):
        throttle.begin("192.0.2.1")
    # A check forgiven (it succeeded) does not count, and takes no room once none are left.
    kind = FailureThrottle(limit=1, clock=lambda: now[0])
    for _ in range(3):
        kind.begin("198.51.100.7").forgive()
    assert len(kind) == 0
    # After the window the address starts over, and old windows are dropped.
    now[0] = 61.0
    throttle.begin("2001:db8::5")
    assert len(throttle) == 1

    unknown = UnknownTokens(seconds=10, limit=50, clock=lambda: now[0])
    for n in range(500):
        unknown.add(f"digest-{n}")
    assert len(unknown) == 50 and "digest-499" in unknown and "digest-0" not in unknown
    now[0] += 10.5
    assert "digest-499" not in unknown
    unknown.add("fresh")
    assert len(unknown) == 1


# -- comzy-server users ---------------------------------------------------------------------------
def users_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``comzy-server users ...`` in a subprocess on the data dir tmp_path/data."""
    environment = cli_env(COMZY_DATA_DIR=str(tmp_path / "data"), **env)
    for name in ENV:
        if name not in env:
            environment.pop(name, None)
    return subprocess.run([PYTHON, "-m", "comzy.core.cli", "users", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


def test_users_cli_creates_lists_revokes_and_rotates(tmp_path: Path) -> None:
    created = users_cli(tmp_path, "create", "ana")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("czy_") and len(token) > 40
    assert "shown only now" in created.stdout
    again = users_cli(tmp_path, "create", "ana")
    assert again.returncode == 1 and "exists already" in again.stderr and "users rotate ana" in again.stderr
    bad = users_cli(tmp_path, "create", "no spaces")
    assert bad.returncode == 2 and "not a valid user name" in bad.stderr
    listed = users_cli(tmp_path, "list")
    assert listed.returncode == 0 and "ana" in listed.stdout and "active" in listed.stdout
    assert "  0 aliases  " in listed.stdout, listed.stdout
    assert token not in listed.stdout + listed.stderr
    revoked = users_cli(tmp_path, "revoke", "ana")
    assert revoked.returncode == 0 and "revoked ana's token" in revoked.stdout
    assert "revoked already" in users_cli(tmp_path, "revoke", "ana").stdout
    assert "revoked" in users_cli(tmp_path, "list").stdout
    rotated = users_cli(tmp_path, "rotate", "ana")
    assert rotated.returncode == 0
    new_token = rotated.stdout.strip().splitlines()[-1]
    assert new_token.startswith("czy_") and new_token != token
    assert "active" in users_cli(tmp_path, "list").stdout
    missing = users_cli(tmp_path, "rotate", "nobody")
    assert missing.returncode == 1 and "no user 'nobody'" in missing.stderr


# -- the agent's commands ---------------------------------------------------------------------------
async def comzy(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``comzy ARGS`` in a subprocess with HOME in tmp_path."""
    env = cli_env(HOME=str(tmp_path / "home"))
    env.pop("COMZY_TOKEN", None)
    return await anyio.run_process([PYTHON, "-m", "comzy.agent.cli", *args], input=stdin, env=env,
                                   cwd=tmp_path, check=False)


async def test_login_status_aliases_and_logout(tmp_path: Path, upstream: Upstream) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, {}) as server:
        url = f"ws://127.0.0.1:{server.ports.ws}"
        token = await create_user(plugin.engine, "ana")
        saved = tmp_path / "home" / ".comzy" / ".user"
        bad = await comzy(tmp_path, "login", "--server", url, "--token", "czy_wrong")
        assert bad.returncode == 1 and not saved.exists()
        assert bad.stderr.decode() == f"comzy: login failed: {url} says: the token was not accepted (unknown, " \
                                      "mistyped, or replaced by a newer one); run `comzy login` with a token from " \
                                      "the server's operator\n"
        not_logged = await comzy(tmp_path, "status", "--server", url)
        assert not_logged.returncode == 0 and b"not logged in" in not_logged.stdout
        login = await comzy(tmp_path, "login", "--server", url, stdin=token.encode() + b"\n")  # piped token
        assert login.returncode == 0, login.stderr
        assert b"Logged in to" in login.stdout and b"as ana" in login.stdout
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
        assert json.loads(saved.read_text()) == {"token": token, "user": "ana", "server": url}
        # The saved login is used by `comzy PORT` (the saved server, too: no --server here).
        async with start_agent(server, upstream.port, token=token, subdomain="ana-site"):
            status = await comzy(tmp_path, "status")
            assert status.returncode == 0, status.stderr
            out = status.stdout.decode()
            assert "reachable" in out and "Login:   ana" in out and "Aliases: 1 of 5" in out
            assert "ana-site" in out and "online" in out
        listed = await comzy(tmp_path, "aliases")
        assert listed.returncode == 0 and b"ana-site" in listed.stdout and b"offline" in listed.stdout
        release = await comzy(tmp_path, "aliases", "release", "ana-site")
        assert release.returncode == 0 and b"Released ana-site" in release.stdout
        assert plugin.alias_owner("ana-site") is None
        unknown = await comzy(tmp_path, "aliases", "release", "ana-site")
        assert unknown.returncode == 1 and b"you own no alias" in unknown.stderr
        none_left = await comzy(tmp_path, "aliases")  # the limit is still shown with no alias owned
        assert (none_left.returncode, none_left.stdout) == (0, b"ana owns no aliases yet (up to 5); `comzy PORT` "
                                                               b"claims one.\n"), none_left.stderr
        # A saved token the server no longer accepts (rotated, say): said once, with what to do.
        saved.write_text(json.dumps({"token": "czy_stale", "user": "ana", "server": url}))
        stale = await comzy(tmp_path, "status")
        refused = (f"{url} refused the token saved for ana: the token was not accepted (unknown, mistyped, or "
                   "replaced by a newer one); run `comzy login` with a token from the server's operator")
        assert stale.returncode == 1 and f"\nLogin:   {refused}\n" in stale.stdout.decode(), stale.stdout
        stale = await comzy(tmp_path, "aliases")
        assert (stale.returncode, stale.stderr.decode()) == (1, f"comzy: {refused}\n")
        logout = await comzy(tmp_path, "logout")
        assert logout.returncode == 0 and not saved.exists()
        assert b"not logged in" in (await comzy(tmp_path, "status", "--server", url)).stdout
    assert token.encode() not in login.stdout + login.stderr


async def test_login_explains_unreachable_servers_and_servers_without_accounts(tmp_path: Path) -> None:
    async with start_server(tmp_path / "data") as server:  # no plugins: no account API
        url = f"ws://127.0.0.1:{server.ports.ws}"
        plain = await comzy(tmp_path, "login", "--server", url, "--token", "czy_x")
        assert plain.returncode == 1 and b"has no user accounts" in plain.stderr
        status = await comzy(tmp_path, "status", "--server", url)
        assert status.returncode == 0 and b"reachable" in status.stdout
    gone = await comzy(tmp_path, "login", "--server", url, "--token", "czy_x")
    assert gone.returncode == 1 and b"cannot reach the Comzy server" in gone.stderr
    assert (await comzy(tmp_path, "status", "--server", url)).returncode == 1


async def test_the_saved_token_goes_only_to_the_server_it_was_checked_with(tmp_path: Path, upstream: Upstream) -> None:
    home = auth()
    async with auth_server(tmp_path / "home-server", home, {}) as server:
        url = f"ws://127.0.0.1:{server.ports.ws}"
        token = await create_user(home.engine, "ana")
        assert (await comzy(tmp_path, "login", "--server", url, "--token", token)).returncode == 0
    # Another server, which has never seen ana's token, and expires anonymous tunnels in 2 s.
    other = auth()
    expiry = AnonymousTimeout(AnonymousTimeoutSettings(_env_file=None, seconds=2, warn_seconds=1))
    async with auth_server(tmp_path / "other-server", other, {}, ("anonymous_timeout", expiry)) as server:
        elsewhere = f"ws://127.0.0.1:{server.ports.ws}"
        status = await comzy(tmp_path, "status", "--server", elsewhere)
        assert status.returncode == 0 and b"saved login (ana) is for " + url.encode() in status.stdout
        aliases = await comzy(tmp_path, "aliases", "--server", elsewhere)
        assert aliases.returncode == 1 and b"comzy login --server " + elsewhere.encode() in aliases.stderr
        with anyio.fail_after(30):
            run = await comzy(tmp_path, str(upstream.port), "--local-host", "127.0.0.1", "--server", elsewhere)
    # Anonymous there (it expired; a token it does not know would have been refused at once).
    assert b"connecting anonymously" in run.stdout + run.stderr
    assert b"anonymous tunnels last 2 s" in run.stderr and b"not accepted" not in run.stderr


def test_token_for_prefers_comzy_token_and_matches_saved_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    from comzy.agent.account import Credentials, token_for

    cluster = Credentials("czy_saved", "ana", "wss://a.example/,wss://b.example")
    monkeypatch.delenv("COMZY_TOKEN", raising=False)
    assert token_for(["wss://b.example", "wss://A.example"], cluster) == ("czy_saved", None)
    token, why = token_for(["wss://a.example", "wss://evil.example"], cluster)
    assert token is None and why == ("your saved login (ana) is for wss://a.example/,wss://b.example, "
                                     "not wss://a.example, wss://evil.example")
    assert token_for(["wss://a.example"], None) == (None, None)
    monkeypatch.setenv("COMZY_TOKEN", "czy_env")
    assert token_for(["wss://evil.example"], cluster) == ("czy_env", None)


def test_the_account_api_keeps_a_path_prefix_of_the_server_url() -> None:
    from comzy.agent.account import api_base

    assert api_base("ws://127.0.0.1:8191") == "http://127.0.0.1:8191"
    assert api_base("wss://tunnel.example.com/comzy/") == "https://tunnel.example.com/comzy"


# -- packaging and settings -------------------------------------------------------------------------
def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_ALIASES_PER_USER", "7")  # the seed's name
    monkeypatch.setenv("COMZY_REQUIRE_TOKEN", "true")
    monkeypatch.setenv("COMZY_AUTH_REFRESH_SECONDS", "2.5")
    settings = AuthTokenSettings(_env_file=None)
    assert (settings.max_aliases_per_user, settings.require_token, settings.refresh_seconds) == (7, True, 2.5)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "comzy" / "plugins" / "auth_token" / "README.md").read_text()
    table = readme[readme.index("## Settings"):]
    for field, info in AuthTokenSettings.model_fields.items():
        names = [f"COMZY_AUTH_{field.upper()}"]
        if info.validation_alias is not None:
            names = [str(choice) for choice in getattr(info.validation_alias, "choices", [info.validation_alias])]
        assert any(f"`{name}`" in table for name in names), field


def test_it_is_a_builtin_plugin() -> None:
    assert "auth_token" in builtin_names()
    [(_name, loaded)] = load_plugins(["auth_token"])
    assert isinstance(loaded, AuthToken)


def test_the_token_file_is_private_even_if_it_existed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comzy.agent import account

    path = account.credentials_path()
    path.parent.mkdir(parents=True)
    path.write_text("old")
    os.chmod(path, 0o644)
    account.save_credentials(account.Credentials("czy_t", "ana", "ws://x:1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert account.load_credentials() == account.Credentials("czy_t", "ana", "ws://x:1")


# -- a dead database ------------------------------------------------------------------------------
async def test_known_users_keep_connecting_while_the_database_is_down(
        tmp_path: Path, upstream: Upstream, private_mariadb: PrivateMariaDB) -> None:
    await private_mariadb.execute("CREATE DATABASE comzy_auth")
    url = private_mariadb.url("pw", "comzy_auth")
    engine = db.create_engine(url)
    try:
        await db.upgrade_to_head(engine, [AUTH_SCHEMA])
    finally:
        await engine.dispose()
    plugin = auth()
    async with auth_server(tmp_path, plugin, {"database_url": url.render_as_string(hide_password=False)}) as server:
        ana = await create_user(plugin.engine, "ana")
        async with start_agent(server, upstream.port, token=ana) as first:
            alias = first.alias
        await private_mariadb.stop()
        # Known token, known alias: served from memory.
        async with start_agent(server, upstream.port, token=ana) as again, again.visitor() as client:
            assert again.alias == alias
            assert (await client.get("/while-down")).status_code == 200
        # What needs the database is refused with what to do, not an error.
        new_alias = await _register_and_expect_reject(server, token=ana, subdomain="ana-new")
        assert "database is unavailable" in str(new_alias) and "try again" in str(new_alias)
        unknown = await _register_and_expect_reject(server, token="czy_someone-new")
        assert "cannot check tokens right now" in str(unknown)
        await private_mariadb.start()
        async with start_agent(server, upstream.port, token=ana, subdomain="ana-new") as later:
            assert later.alias == "ana-new"


def _login_at_a_terminal(home: Path, url: str, token: str, login_url: str) -> tuple[int, str]:
    """``comzy login`` on a pseudo-terminal: answer its prompt as a person would; (status, screen)."""
    env = cli_env(HOME=str(home), COMZY_LOGIN_URL=login_url)
    env.pop("COMZY_TOKEN", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes `comzy login` with the pty as its terminal
        os.execve(PYTHON, [PYTHON, "-m", "comzy.agent.cli", "login", "--server", url], env)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        answered = False
        while time.monotonic() < deadline:
            ready, _, _ = io_select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"Token" in screen:
                os.write(fd, token.encode() + b"\n")
                answered = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


async def test_login_prompts_for_the_token_without_echoing_it(tmp_path: Path) -> None:
    plugin = auth()
    async with auth_server(tmp_path, plugin, {}) as server:
        token = await create_user(plugin.engine, "ana")
        url = f"ws://127.0.0.1:{server.ports.ws}"
        status, screen = await anyio.to_thread.run_sync(
            _login_at_a_terminal, tmp_path / "home", url, token, "https://tunnel.example.com/login")
    assert status == 0, screen
    assert "Get your token at https://tunnel.example.com/login" in screen
    assert "Logged in to" in screen and "as ana" in screen
    assert token not in screen  # getpass: typed, never shown
    assert json.loads((tmp_path / "home" / ".comzy" / ".user").read_text())["token"] == token


async def test_a_new_session_on_the_alias_of_a_closed_one_is_still_checked(tmp_path: Path, upstream: Upstream) -> None:
    plugin = auth(refresh_seconds=3600)  # refreshes driven by the test, one at a time
    async with auth_server(tmp_path, plugin, {}) as server, anyio.create_task_group() as tg:
        token = await create_user(plugin.engine, "ana")
        first = Background(server, upstream.port, token=token)
        tg.start_soon(first.run)
        await first.reporter.wait_connected()
        await revoke_user(plugin.engine, "ana")
        await plugin.refresh(server)
        with anyio.fail_after(WAIT):
            await first.ended.wait()
        # She gets a new token and comes back on the same alias before the next refresh...
        second = Background(server, upstream.port, token=await rotate_token(plugin.engine, "ana"))
        tg.start_soon(second.run)
        await second.reporter.wait_connected()
        assert second.agent.alias == first.agent.alias
        await plugin.refresh(server)
        assert server.tunnel(second.agent.alias) is not None  # the new token is good
        # ... and a second revocation reaches the new session too.
        await revoke_user(plugin.engine, "ana")
        await plugin.refresh(server)
        with anyio.fail_after(WAIT):
            await second.ended.wait()
        assert isinstance(second.result, str) and "revoked" in second.result
        await first.forwarder.aclose()
        await second.forwarder.aclose()


async def test_a_database_that_stops_answering_never_holds_up_known_users(
        tmp_path: Path, upstream: Upstream) -> None:
    async def black_hole(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()  # accepts, never answers: a wedged database server

    plugin = auth(database_timeout=0.5)
    async with auth_server(tmp_path, plugin, {}) as server, serve_tcp(black_hole) as port:
        ana = await create_user(plugin.engine, "ana")
        carol = await create_user(plugin.engine, "carol")
        async with start_agent(server, upstream.port, token=carol) as before:
            alias = before.alias
        await plugin.refresh(server)  # both users are known now
        sqlite = plugin._engine
        plugin._engine = db.create_engine(URL.create("mysql+aiomysql", username="u", password="p",
                                                     host="127.0.0.1", port=port, database="comzy"))
        try:
            with anyio.fail_after(5):  # far less than the agent's 30 s handshake wait
                async with anyio.create_task_group() as tg:
                    refused: list[str] = []

                    async def claim() -> None:
                        refused.append(str(await _register_and_expect_reject(server, token=ana,
                                                                              subdomain="ana-new")))
                    tg.start_soon(claim)
                    # Meanwhile carol, known and owning her alias, is served from memory at once.
                    async with start_agent(server, upstream.port, token=carol) as again:
                        assert again.alias == alias
            assert "cannot record your alias right now" in refused[0]
            with anyio.fail_after(5):
                unknown = await _register_and_expect_reject(server, token="czy_nobody")
            assert "cannot check tokens right now" in str(unknown)
        finally:
            wedged, plugin._engine = plugin._engine, sqlite
            with anyio.move_on_after(1):
                await wedged.dispose()
