"""custom_domains: hosts outside the base domain reach a tunnel, from CUSTOM_DOMAINS and from the
database (``comzy-server domains add|list|remove``), on SQLite and MariaDB; and only ever the
tunnel of the user who owns the mapped alias (issue 10: the custom domain hijack)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import URL

from comzy import ForwardRequest, Reject, Tunnel
from comzy.core import db
from comzy.core.server import ServerContext
from comzy.plugins.auth_token import AuthToken, AuthTokenSettings
from comzy.plugins.auth_token.models import SCHEMA as AUTH_SCHEMA
from comzy.plugins.auth_token.store import claim_alias, create_user, find_user, hash_token
from comzy.plugins.custom_domains import CustomDomains, CustomDomainsSettings
from comzy.plugins.custom_domains.domains import (
    MappingError,
    add_mapping,
    check_alias,
    check_host,
    load_mappings,
    parse_mappings,
)
from comzy.plugins.custom_domains.models import SCHEMA as DOMAINS_SCHEMA
from tests.conftest import PYTHON, ROOT, cli_env, make_settings, start_agent, start_server
from tests.helpers import scratch_database, wait_until
from tests.test_hooks import _register_and_expect_reject
from tests.upstream import Upstream, serve_upstream

pytestmark = pytest.mark.anyio

SEED_VARIABLES = ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME",
                  "CUSTOM_DOMAINS", "COMZY_CUSTOM_DOMAINS_MAPPINGS", "COMZY_CUSTOM_DOMAINS_REFRESH_SECONDS",
                  "COMZY_PLUGINS", "COMZY_REQUIRE_TOKEN", "COMZY_TOKEN")
#: A random-looking alias nobody owns: what the docs used to map a domain to.
UNOWNED = "client-abc1234567"


@pytest.fixture(autouse=True)
def _no_seed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SEED_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def plugin(mappings: str = "", refresh: float = 0.05) -> CustomDomains:
    return CustomDomains(CustomDomainsSettings(_env_file=None, mappings=mappings, refresh_seconds=refresh))


def auth() -> AuthToken:
    """The plugin that knows who owns each alias (through the alias_owner hook)."""
    return AuthToken(AuthTokenSettings(_env_file=None, refresh_seconds=0.05))


async def owned_aliases(data_dir: Path, user: str, *aliases: str, **overrides: Any) -> str:
    """Create ``user`` owning ``aliases`` in the database a server on ``data_dir`` uses, before it
    starts (so CUSTOM_DOMAINS can name them); the user's token."""
    engine = await db.prepare_database(make_settings(data_dir, **overrides), AUTH_SCHEMA)
    try:
        token = await create_user(engine, user)
        record = await find_user(engine, hash_token(token))
        assert record is not None
        for port, alias in enumerate(aliases, start=40000):
            await claim_alias(engine, record.id, alias, port)
    finally:
        await engine.dispose()
    return token


def domains_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``comzy-server domains ...`` in a subprocess on the data dir tmp_path/data."""
    environment = cli_env(COMZY_DATA_DIR=str(tmp_path / "data"), **env)
    for name in SEED_VARIABLES:
        if name not in env:
            environment.pop(name, None)
    return subprocess.run([PYTHON, "-m", "comzy.core.cli", "domains", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


@asynccontextmanager
async def custom_visitor(server: ServerContext, host: str) -> AsyncIterator[httpx.AsyncClient]:
    """A visitor sending ``Host: host`` to the public listener."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.http}", headers={"host": host},
                                 timeout=30.0) as client:
        yield client


async def status_of(server: ServerContext, host: str, path: str = "/") -> int:
    async with custom_visitor(server, host) as client:
        return (await client.get(path)).status_code


def header_values(info: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in info["headers"] if n.lower() == name]


async def assert_reaches(server: ServerContext, host: str, alias: str) -> None:
    async with custom_visitor(server, host) as client:
        response = await client.get("/via-custom?x=1")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["raw_path"] == "/via-custom"
    assert header_values(info, "x-forwarded-host") == [host]
    assert header_values(info, "host") == [host]  # the agent preserves the visitor's Host by default
    assert server.tunnel(alias) is not None and server.tunnel(alias).requests >= 1  # type: ignore[union-attr]


def with_owners(domains: CustomDomains, owners: AuthToken | None = None) -> list[tuple[str, object]]:
    """The plugins of a server where aliases can have owners: auth_token, then custom_domains."""
    return [("auth_token", owners or auth()), ("custom_domains", domains)]


def unreachable_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "comzy.plugins.custom_domains" and r.levelno == logging.WARNING
            and "is unreachable" in r.getMessage()]


# -- End to end ---------------------------------------------------------------------------------
async def test_env_mapping_reaches_the_owner_tunnel_with_forwarded_host(tmp_path: Path, upstream: Upstream) -> None:
    token = await owned_aliases(tmp_path / "data", "ana", "site-xyz")
    domains = plugin(f"Custom.Example.com:site-xyz, another.com:{UNOWNED}")
    async with start_server(tmp_path / "data", plugins=with_owners(domains)) as server, \
            start_agent(server, upstream.port, subdomain="site-xyz", token=token) as running:
        assert running.alias == "site-xyz"
        await assert_reaches(server, "custom.example.com", "site-xyz")
        # The port and the case of the Host do not matter; X-Forwarded-Host is the Host as sent.
        async with custom_visitor(server, f"CUSTOM.example.com:{server.ports.http}") as client:
            info = (await client.get("/")).json()
        assert header_values(info, "x-forwarded-host") == [f"CUSTOM.example.com:{server.ports.http}"]
        # The alias's own subdomain still works.
        async with running.visitor() as client:
            assert (await client.get("/")).status_code == 200
        # Mapped to an alias nobody owns: nobody can serve it, the core's 404.
        assert await status_of(server, "another.com") == 404
        assert await status_of(server, "unknown.example.net") == 404
    assert (tmp_path / "data" / "comzy.db").is_file()  # the embedded default upgraded itself


async def test_cli_mappings_are_picked_up_while_the_server_runs(tmp_path: Path, upstream: Upstream) -> None:
    domains, owners = plugin(), auth()
    async with start_server(tmp_path / "data", plugins=with_owners(domains, owners)) as server:
        token = await create_user(owners.engine, "ana")
        async with start_agent(server, 9, token=token, subdomain="other-app"):
            pass  # ana claims a second alias, then goes offline
        async with start_agent(server, upstream.port, token=token) as running:
            alias = running.alias  # claimed for ana's port by her first connection
            added = await anyio.to_thread.run_sync(domains_cli, tmp_path, "add", "App.Example.org", alias)
            assert added.returncode == 0, added.stderr
            assert f"added app.example.org -> {alias} (owned by ana)" in added.stdout
            await wait_until(lambda: domains.hosts.get("app.example.org") == alias)
            await assert_reaches(server, "app.example.org", alias)

            listed = await anyio.to_thread.run_sync(domains_cli, tmp_path, "list")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.splitlines() == [f"app.example.org  {alias}  (database)  owned by ana"]

            again = await anyio.to_thread.run_sync(domains_cli, tmp_path, "add", "app.example.org", "other-app")
            assert again.returncode == 0, again.stderr
            assert (f"app.example.org existed (-> {alias}); updated to app.example.org -> other-app (owned by ana)"
                    in again.stdout)
            await wait_until(lambda: domains.hosts.get("app.example.org") == "other-app")
            assert await status_of(server, "app.example.org") == 404  # other-app has no tunnel

            removed = await anyio.to_thread.run_sync(domains_cli, tmp_path, "remove", "app.example.org")
            assert removed.returncode == 0, removed.stderr
            assert "removed app.example.org (was -> other-app)" in removed.stdout
            await wait_until(lambda: "app.example.org" not in domains.hosts)
            assert await status_of(server, "app.example.org") == 404

            gone = await anyio.to_thread.run_sync(domains_cli, tmp_path, "remove", "app.example.org")
            assert gone.returncode == 1
            assert "no custom domain app.example.org" in gone.stderr


async def test_environment_wins_over_the_database(tmp_path: Path) -> None:
    await owned_aliases(tmp_path / "data", "ana", "from-db", "from-env")
    result = domains_cli(tmp_path, "add", "shared.example.com", "from-db")
    assert result.returncode == 0, result.stderr
    assert domains_cli(tmp_path, "add", "db-only.example.com", "from-db").returncode == 0
    domains = plugin("shared.example.com:from-env")
    async with start_server(tmp_path / "data", plugins=with_owners(domains)):
        assert domains.hosts == {"shared.example.com": "from-env", "db-only.example.com": "from-db"}
        assert domains.reserved == {"from-env": "shared.example.com", "from-db": "db-only.example.com"}
        assert domains.ownerless == set()
    listed = domains_cli(tmp_path, "list", CUSTOM_DOMAINS="shared.example.com:from-env")
    assert listed.stdout.splitlines() == ["db-only.example.com  from-db   (database)        owned by ana",
                                          "shared.example.com   from-env  (CUSTOM_DOMAINS)  owned by ana"]


async def test_a_database_outage_keeps_the_known_mappings(tmp_path: Path) -> None:
    domains = plugin(refresh=3600)
    await owned_aliases(tmp_path / "data", "ana", "kept")
    assert domains_cli(tmp_path, "add", "kept.example.com", "kept").returncode == 0
    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)]) as server:
        assert domains.hosts == {"kept.example.com": "kept"}
        engine = domains._engine
        assert engine is not None
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"not an sqlite database" * 100)
        domains._engine = db.create_engine(URL.create("sqlite+aiosqlite", database=str(garbage)))
        try:
            await domains.refresh(server.settings.base_domain)  # fails: logged once, map kept
            assert domains.hosts == {"kept.example.com": "kept"}
            assert domains.alias_reserved("kept") == "it serves the custom domain kept.example.com"
            assert domains._failing
        finally:
            await domains._engine.dispose()
            domains._engine = engine
        await domains.refresh(server.settings.base_domain)
        assert not domains._failing


# -- The hijack (issue 10) -----------------------------------------------------------------------
async def test_a_mapped_alias_serves_its_domain_only_through_its_owner(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """The attack: an anonymous agent (or another user) asks for the alias a custom domain maps to,
    by --subdomain or by a resume alias in HELLO, and would then serve the domain."""
    ana = await owned_aliases(tmp_path / "data", "ana", "ana-shop")
    domains, owners = plugin(f"shop.example.com:ana-shop,orphan.example.com:{UNOWNED}"), auth()
    with caplog.at_level(logging.INFO, logger="comzy.plugins.custom_domains"):
        async with start_server(tmp_path / "data", plugins=with_owners(domains, owners)) \
                as server, serve_upstream() as attacker:
            # Warned at start-up, once, for the mapping nobody can serve; not for ana's.
            [warning] = unreachable_warnings(caplog)
            assert f"orphan.example.com -> {UNOWNED} is unreachable (404): no user owns the alias" in warning
            assert f"`comzy PORT --subdomain {UNOWNED}`" in warning and "`comzy login`" in warning
            bob = await create_user(owners.engine, "bob")

            # By --subdomain: anonymous agents and other users are refused both names...
            for config in ({}, {"token": bob}):
                owned = await _register_and_expect_reject(server, subdomain="ana-shop", **config)
                assert "'ana-shop' belongs to another user" in str(owned)
                ownerless = await _register_and_expect_reject(server, subdomain=UNOWNED, **config)
                assert (f"'{UNOWNED}' is kept for the user who owns it (it serves the custom domain "
                        "orphan.example.com), and no user owns it: no agent may take it") in str(ownerless)
            assert owners.alias_owner(UNOWNED) is None  # bob's login did not claim it on the way
            # ... and by a resume alias (a secret of the right length, but not the alias's): another alias.
            for alias in ("ana-shop", UNOWNED):
                resume = {"resume": {"alias": alias, "secret": "not-the-secret-0123456789"}}
                async with start_agent(server, attacker.port, extra_hello=resume) as resumed:
                    assert resumed.alias not in ("ana-shop", UNOWNED)
                    assert await status_of(server, "shop.example.com", "/stolen") == 404
                    assert await status_of(server, "orphan.example.com", "/stolen") == 404
            assert attacker.requests == []

            # The owner gets her alias, and the domain reaches her local app.
            async with start_agent(server, upstream.port, subdomain="ana-shop", token=ana) as owner:
                assert owner.alias == "ana-shop"
                await assert_reaches(server, "shop.example.com", "ana-shop")
                retry = await _register_and_expect_reject(server, subdomain="ana-shop")
                assert "belongs to another user" in str(retry)  # not even while she is online
            assert [r["path"] for r in upstream.requests] == ["/via-custom"]
            assert attacker.requests == []
            assert len(unreachable_warnings(caplog)) == 1  # refreshes do not repeat it


async def test_a_random_alias_for_a_user_is_never_a_mapped_one(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """auth_token picks a random alias for a logged-in user's new port: a name a custom domain maps
    to (unowned) must be skipped, however unlikely the draw."""
    from comzy.plugins.auth_token import plugin as auth_plugin

    draws = iter([UNOWNED, "client-second00001"])
    monkeypatch.setattr(auth_plugin, "random_alias", lambda: next(draws))
    token = await owned_aliases(tmp_path / "data", "bob")
    async with start_server(tmp_path / "data", plugins=with_owners(plugin(f"orphan.example.com:{UNOWNED}"))) \
            as server, start_agent(server, upstream.port, token=token) as agent:
        assert agent.alias == "client-second00001"
        assert await status_of(server, "orphan.example.com", "/x") == 404


async def test_a_domain_never_reaches_a_tunnel_its_alias_owner_does_not_hold(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """An anonymous agent holds an alias when a stored mapping to it appears (a row the CLI did not
    check, e.g. written by an older version): the domain stays unreachable, the row stays listed,
    and the agent's resume secret no longer gets it the alias back."""
    domains, owners = plugin(), auth()
    with caplog.at_level(logging.WARNING, logger="comzy.plugins.custom_domains"):
        async with start_server(tmp_path / "data", plugins=with_owners(domains, owners)) as server, \
                start_agent(server, upstream.port) as squatter:
            alias = squatter.alias
            assert domains._engine is not None
            await add_mapping(domains._engine, "late.example.com", alias)
            await wait_until(lambda: domains.hosts.get("late.example.com") == alias)
            async with custom_visitor(server, "late.example.com") as client:
                stolen = await client.get("/stolen")
            assert stolen.status_code == 404  # the core's page: nothing tells the visitor a tunnel is there
            assert stolen.headers["content-type"].startswith("text/html")
            assert "<h1>Tunnel Not Active</h1><p>No tunnel is connected for <b>late.example.com</b>." in stolen.text
            async with squatter.visitor() as client:  # its own subdomain is still its own
                assert (await client.get("/own")).status_code == 200
            assert [r["path"] for r in upstream.requests] == ["/own"]
            [warning] = unreachable_warnings(caplog)
            assert f"late.example.com -> {alias} is unreachable" in warning

            listed = await anyio.to_thread.run_sync(domains_cli, tmp_path, "list")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.splitlines() == [f"late.example.com  {alias}  (database)  (no owner: unreachable)"]
            assert "1 custom domain is unreachable: no user owns its alias" in listed.stderr

            # Its connection drops; it reconnects asking for the alias back with its valid resume secret.
            entry = server.registry.get(alias)
            assert entry is not None
            await entry.session.flush_and_close(1011, "test: connection lost")
            await wait_until(lambda: len(squatter.reporter.welcomes) == 2)
            assert squatter.reporter.welcomes[-1]["alias"] != alias
            assert server.tunnel(alias) is None
            assert await status_of(server, "late.example.com") == 404
    assert [r["path"] for r in upstream.requests] == ["/own"]


async def test_the_owner_check_needs_no_tunnel_when_the_host_is_resolved(tmp_path: Path) -> None:
    """A cluster edge resolves the host before it knows the tunnel (its route cache may be cold):
    resolve_host answers from the mappings alone, and before_forward, which always has the tunnel
    (an edge's snapshot, node set), keeps the domain for the owner (docs/design/cluster.md 2.6)."""
    await owned_aliases(tmp_path / "data", "ana", "ana-shop")
    domains = plugin("shop.example.com:ana-shop")
    async with start_server(tmp_path / "data", plugins=with_owners(domains)) as server:
        assert server.tunnel("ana-shop") is None
        assert server.hooks.resolve_host("shop.example.com", server) == "ana-shop"
        request = ForwardRequest("ana-shop", "GET", b"/", [], "shop.example.com", "192.0.2.1", "https")
        snapshot = Tunnel("ana-shop", "https://ana-shop.example.com", 3000, "192.0.2.9", user="ana", node="ctl-1")
        domains.before_forward(request, snapshot, server)  # the owner's: forwarded
        for user in (None, "bob"):
            intruder = Tunnel("ana-shop", "https://ana-shop.example.com", 3000, "192.0.2.9", user=user, node="ctl-1")
            with pytest.raises(Reject) as refused:
                domains.before_forward(request, intruder, server)
            assert refused.value.status == 404 and b"Tunnel Not Active" in refused.value.body.encode()
        # The alias's own subdomain is not the plugin's business.
        own = ForwardRequest("ana-shop", "GET", b"/", [], "ana-shop.example.com", "192.0.2.1", "https")
        domains.before_forward(own, intruder, server)


@pytest.mark.parametrize("env", [{}, {"COMZY_PLUGINS": "custom_domains"}])
async def test_domains_add_refuses_an_unowned_alias_and_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    refused = domains_cli(tmp_path, "add", "shop.example.com", UNOWNED, **env)
    assert refused.stdout == ""
    if env:  # nothing can own an alias
        assert refused.returncode == 2, refused.stderr
        assert ("shop.example.com was not mapped: no enabled plugin knows who owns an alias "
                "(COMZY_PLUGINS=custom_domains), so no user can own one") in refused.stderr
        # Generic: which plugin answers alias_owner is for `comzy-server plugins` to show, not for us to name.
        assert "(`comzy-server plugins` lists the installed plugins and the hooks of each)" in refused.stderr
        assert "auth_token" not in refused.stderr
    else:
        assert refused.returncode == 1, refused.stderr
        message = refused.stderr.strip().splitlines()[-1]  # after the database's "upgraded from empty"
        assert message.startswith(f"comzy-server: shop.example.com was not mapped: no user owns the alias '{UNOWNED}'.")
        assert "served only by the tunnel of the user who owns its alias" in message
        assert "`comzy login`" in message and f"`comzy PORT --subdomain {UNOWNED}`" in message
        # The plugins answering alias_owner are found by hook, never named in the code: their commands too.
        assert "Users come from the plugin that knows who owns an alias (auth_token): `comzy-server --help` " \
            "lists its commands." in message
        assert "users create" not in message
        assert "`comzy aliases`" in message
    assert await stored_mappings(tmp_path) == {}
    assert "no custom domains" in domains_cli(tmp_path, "list", **env).stdout

    # Another alias, owned: mapped. Changing it to the unowned one later is refused and changes nothing.
    await owned_aliases(tmp_path / "data", "ana", "ana-shop")
    added = domains_cli(tmp_path, "add", "shop.example.com", "ana-shop")
    assert added.returncode == 0, added.stderr
    changed = domains_cli(tmp_path, "add", "shop.example.com", UNOWNED, **env)
    assert changed.returncode != 0 and changed.stdout == ""
    assert await stored_mappings(tmp_path) == {"shop.example.com": "ana-shop"}


async def stored_mappings(tmp_path: Path) -> dict[str, str]:
    engine = await db.prepare_database(make_settings(tmp_path / "data"), DOMAINS_SCHEMA)
    try:
        return await load_mappings(engine)
    finally:
        await engine.dispose()


# -- Refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (("x.localhost", "app"), "'x.localhost' is under the base domain localhost"),
    (("localhost", "app"), "'localhost' is the base domain localhost itself"),
    (("bad host", "app"), "'bad host' is not a valid host name"),
    (("ex.com:8080", "app"), "give it without a port"),
    (("https://ex.com/", "app"), "give the bare host"),
    (("under_score.com", "app"), "is not a valid host name"),
    (("127.0.0.1", "app"), "is not a valid host name"),
    (("ok.example.com", "Bad_Alias"), "'Bad_Alias' is not a valid alias"),
])
def test_cli_refuses_bad_mappings(tmp_path: Path, args: tuple[str, str], message: str) -> None:
    result = domains_cli(tmp_path, "add", *args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert result.stdout == ""


def test_cli_refuses_hosts_under_a_configured_base_domain(tmp_path: Path) -> None:
    result = domains_cli(tmp_path, "add", "a.b.tunnel.example.com", "app", COMZY_BASE_DOMAIN="tunnel.example.com")
    assert result.returncode == 2
    assert "under the base domain tunnel.example.com" in result.stderr
    # Outside this base domain the host is fine; what stops it then is the alias nobody owns.
    elsewhere = domains_cli(tmp_path, "add", "x.localhost", "app", COMZY_BASE_DOMAIN="tunnel.example.com")
    assert elsewhere.returncode == 1
    assert "x.localhost was not mapped: no user owns the alias 'app'" in elsewhere.stderr


def test_bad_custom_domains_entry_stops_start_up(tmp_path: Path) -> None:
    for value, problem in [("good.example.com:app,x.localhost:app", "under the base domain localhost"),
                           ("good.example.com:app,no-alias.com", "is not HOST:ALIAS"),
                           ("good.example.com:Not_Valid", "is not a valid alias")]:
        environment = cli_env(COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                              COMZY_DATA_DIR=str(tmp_path / "data"), COMZY_PLUGINS="custom_domains",
                              CUSTOM_DOMAINS=value)
        result = subprocess.run([PYTHON, "-m", "comzy.core.cli"], cwd=tmp_path, env=environment,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("comzy-server: custom_domains: invalid CUSTOM_DOMAINS"), line
        bad = value.split(",")[-1]
        assert f"entry '{bad}'" in line and problem in line, line


def test_parse_mappings() -> None:
    assert parse_mappings("custom.example.com:client-abc123,another.com:site-xyz", "localhost") == {
        "custom.example.com": "client-abc123", "another.com": "site-xyz"}
    assert parse_mappings(" A.com.:X , ,", "localhost") == {"a.com": "x"}
    assert parse_mappings("", "localhost") == {}
    with pytest.raises(MappingError, match=r"entry 'a\.com:' is not HOST:ALIAS"):
        parse_mappings("a.com:", "localhost")
    with pytest.raises(MappingError, match=r"entry 'x\.example\.com:a': 'x\.example\.com' is under the base domain"):
        parse_mappings("ok.com:a,x.example.com:a", "example.com")
    assert check_host("xn--bcher-kva.example", "localhost") == "xn--bcher-kva.example"
    with pytest.raises(MappingError):
        check_host("a" * 64 + ".com", "localhost")
    with pytest.raises(MappingError):
        check_host(".".join(["abcdefghi"] * 26), "localhost")  # 259 characters
    with pytest.raises(MappingError):
        check_alias("-x")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTOM_DOMAINS", "seed.example.com:seed")
    monkeypatch.setenv("COMZY_CUSTOM_DOMAINS_REFRESH_SECONDS", "2.5")
    loaded = CustomDomains()
    assert loaded.settings.mappings == "seed.example.com:seed"
    assert loaded.settings.refresh_seconds == 2.5
    monkeypatch.setenv("COMZY_CUSTOM_DOMAINS_MAPPINGS", "comzy.example.com:comzy")
    assert CustomDomainsSettings(_env_file=None).mappings == "comzy.example.com:comzy"


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "comzy" / "plugins" / "custom_domains" / "README.md").read_text()
    for name in CustomDomainsSettings.model_fields:
        assert f"`COMZY_CUSTOM_DOMAINS_{name.upper()}`" in readme
    assert "`CUSTOM_DOMAINS`" in readme


def test_it_is_a_builtin_plugin() -> None:
    from comzy.core.hooks import builtin_names, load_plugins

    assert "custom_domains" in builtin_names()
    [(_name, loaded)] = load_plugins(["custom_domains"])
    assert isinstance(loaded, CustomDomains)


# -- MariaDB ---------------------------------------------------------------------------------
async def test_database_round_trip_on_mariadb(tmp_path: Path, upstream: Upstream) -> None:
    async for url in scratch_database("mariadb"):
        secret = url.render_as_string(hide_password=False)
        refused = domains_cli(tmp_path, "list", COMZY_DATABASE_URL=secret)
        assert refused.returncode == 2 and "run `comzy-server db upgrade`" in refused.stderr
        engine = db.create_engine(url)
        try:
            await db.upgrade_to_head(engine, [AUTH_SCHEMA, DOMAINS_SCHEMA])
        finally:
            await engine.dispose()
        await _mariadb_round_trip(tmp_path, upstream, secret)
        assert not (tmp_path / "data" / "comzy.db").exists()  # it used MariaDB, not the SQLite default



async def _mariadb_round_trip(tmp_path: Path, upstream: Upstream, secret: str) -> None:
    domains, owners = plugin(), auth()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return domains_cli(tmp_path, *args, COMZY_DATABASE_URL=secret)

    async with start_server(tmp_path / "data", plugins=with_owners(domains, owners), database_url=secret) as server:
        refused = await anyio.to_thread.run_sync(cli, "add", "maria.example.com", "maria-app")
        assert refused.returncode == 1 and "no user owns the alias 'maria-app'" in refused.stderr
        token = await create_user(owners.engine, "maria")
        async with start_agent(server, upstream.port, subdomain="maria-app", token=token) as running:
            added = await anyio.to_thread.run_sync(cli, "add", "maria.example.com", running.alias)
            assert added.returncode == 0, added.stderr
            await wait_until(lambda: domains.hosts.get("maria.example.com") == "maria-app")
            await assert_reaches(server, "maria.example.com", "maria-app")
            listed = await anyio.to_thread.run_sync(cli, "list")
            assert "maria.example.com  maria-app  (database)  owned by maria" in listed.stdout
            removed = await anyio.to_thread.run_sync(cli, "remove", "maria.example.com")
            assert removed.returncode == 0, removed.stderr
            await wait_until(lambda: "maria.example.com" not in domains.hosts)
            assert await status_of(server, "maria.example.com") == 404
