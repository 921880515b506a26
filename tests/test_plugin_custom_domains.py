"""custom_domains: hosts outside the base domain reach a tunnel, from CUSTOM_DOMAINS and from the
database (``comzy-server domains add|list|remove``), on SQLite and MariaDB."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import URL

from comzy.core import db
from comzy.core.server import ServerContext
from comzy.plugins.custom_domains import CustomDomains, CustomDomainsSettings
from comzy.plugins.custom_domains.domains import MappingError, check_alias, check_host, parse_mappings
from tests.conftest import PYTHON, ROOT, cli_env, start_agent, start_server
from tests.helpers import scratch_database
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

SEED_VARIABLES = ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME",
                  "CUSTOM_DOMAINS", "COMZY_CUSTOM_DOMAINS_MAPPINGS", "COMZY_CUSTOM_DOMAINS_REFRESH_SECONDS")


@pytest.fixture(autouse=True)
def _no_seed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SEED_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def plugin(mappings: str = "", refresh: float = 0.05) -> CustomDomains:
    return CustomDomains(CustomDomainsSettings(_env_file=None, mappings=mappings, refresh_seconds=refresh))


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


def header_values(info: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in info["headers"] if n.lower() == name]


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until it is true (the refresher runs every 50 ms in these tests)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (the map is swapped by another task, no event to wait on)
            await anyio.sleep(0.02)


async def assert_reaches(server: ServerContext, host: str, alias: str) -> None:
    async with custom_visitor(server, host) as client:
        response = await client.get("/via-custom?x=1")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["raw_path"] == "/via-custom"
    assert header_values(info, "x-forwarded-host") == [host]
    assert header_values(info, "host") == [host]  # the agent preserves the visitor's Host by default
    assert server.tunnel(alias) is not None and server.tunnel(alias).requests >= 1  # type: ignore[union-attr]


# -- End to end ---------------------------------------------------------------------------------
async def test_env_mapping_reaches_the_tunnel_with_forwarded_host(tmp_path: Path, upstream: Upstream) -> None:
    domains = plugin("Custom.Example.com:site-xyz, another.com:client-abc123")
    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)]) as server, \
            start_agent(server, upstream.port, subdomain="site-xyz") as running:
        assert running.alias == "site-xyz"
        await assert_reaches(server, "custom.example.com", "site-xyz")
        # The port and the case of the Host do not matter; X-Forwarded-Host is the Host as sent.
        async with custom_visitor(server, f"CUSTOM.example.com:{server.ports.http}") as client:
            info = (await client.get("/")).json()
        assert header_values(info, "x-forwarded-host") == [f"CUSTOM.example.com:{server.ports.http}"]
        # The alias's own subdomain still works.
        async with running.visitor() as client:
            assert (await client.get("/")).status_code == 200
        # Mapped, but that alias has no live tunnel: the core's 404.
        async with custom_visitor(server, "another.com") as client:
            missing = await client.get("/")
        assert missing.status_code == 404
        async with custom_visitor(server, "unknown.example.net") as client:
            assert (await client.get("/")).status_code == 404
    assert (tmp_path / "data" / "comzy.db").is_file()  # the embedded default upgraded itself


async def test_cli_mappings_are_picked_up_while_the_server_runs(tmp_path: Path, upstream: Upstream) -> None:
    domains = plugin()
    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)]) as server, \
            start_agent(server, upstream.port) as running:
        alias = running.alias
        added = await anyio.to_thread.run_sync(domains_cli, tmp_path, "add", "App.Example.org", alias)
        assert added.returncode == 0, added.stderr
        assert f"added app.example.org -> {alias}" in added.stdout
        await wait_until(lambda: domains.resolve_host("app.example.org") == alias)
        await assert_reaches(server, "app.example.org", alias)

        listed = await anyio.to_thread.run_sync(domains_cli, tmp_path, "list")
        assert listed.returncode == 0, listed.stderr
        assert f"app.example.org  {alias}  (database)" in listed.stdout

        again = await anyio.to_thread.run_sync(domains_cli, tmp_path, "add", "app.example.org", "other-app")
        assert again.returncode == 0, again.stderr
        assert f"app.example.org existed (-> {alias}); updated to app.example.org -> other-app" in again.stdout
        await wait_until(lambda: domains.resolve_host("app.example.org") == "other-app")
        async with custom_visitor(server, "app.example.org") as client:
            assert (await client.get("/")).status_code == 404  # other-app has no tunnel

        removed = await anyio.to_thread.run_sync(domains_cli, tmp_path, "remove", "app.example.org")
        assert removed.returncode == 0, removed.stderr
        assert "removed app.example.org (was -> other-app)" in removed.stdout
        await wait_until(lambda: domains.resolve_host("app.example.org") is None)
        async with custom_visitor(server, "app.example.org") as client:
            assert (await client.get("/")).status_code == 404

        gone = await anyio.to_thread.run_sync(domains_cli, tmp_path, "remove", "app.example.org")
        assert gone.returncode == 1
        assert "no custom domain app.example.org" in gone.stderr


async def test_environment_wins_over_the_database(tmp_path: Path, upstream: Upstream) -> None:
    result = domains_cli(tmp_path, "add", "shared.example.com", "from-db")
    assert result.returncode == 0, result.stderr
    assert domains_cli(tmp_path, "add", "db-only.example.com", "from-db").returncode == 0
    domains = plugin("shared.example.com:from-env")
    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)]):
        assert domains.hosts == {"shared.example.com": "from-env", "db-only.example.com": "from-db"}
    listed = domains_cli(tmp_path, "list", CUSTOM_DOMAINS="shared.example.com:from-env")
    assert listed.stdout.splitlines() == ["db-only.example.com  from-db  (database)",
                                          "shared.example.com   from-env  (CUSTOM_DOMAINS)"]


async def test_a_database_outage_keeps_the_known_mappings(tmp_path: Path) -> None:
    domains = plugin(refresh=3600)
    assert domains_cli(tmp_path, "add", "kept.example.com", "kept").returncode == 0
    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)]) as server:
        assert domains.resolve_host("kept.example.com") == "kept"
        engine = domains._engine
        assert engine is not None
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"not an sqlite database" * 100)
        domains._engine = db.create_engine(URL.create("sqlite+aiosqlite", database=str(garbage)))
        try:
            await domains.refresh(server.settings.base_domain)  # fails: logged once, map kept
            assert domains.resolve_host("kept.example.com") == "kept"
            assert domains._failing
        finally:
            await domains._engine.dispose()
            domains._engine = engine
        await domains.refresh(server.settings.base_domain)
        assert not domains._failing


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
    assert domains_cli(tmp_path, "add", "x.localhost", "app", COMZY_BASE_DOMAIN="tunnel.example.com").returncode == 0


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
            await db.upgrade(engine)
        finally:
            await engine.dispose()
        await _mariadb_round_trip(tmp_path, upstream, secret)
        assert not (tmp_path / "data" / "comzy.db").exists()  # it used MariaDB, not the SQLite default



async def _mariadb_round_trip(tmp_path: Path, upstream: Upstream, secret: str) -> None:
    domains = plugin()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return domains_cli(tmp_path, *args, COMZY_DATABASE_URL=secret)

    async with start_server(tmp_path / "data", plugins=[("custom_domains", domains)], database_url=secret) as server, \
            start_agent(server, upstream.port, subdomain="maria-app") as running:
        added = await anyio.to_thread.run_sync(cli, "add", "maria.example.com", running.alias)
        assert added.returncode == 0, added.stderr
        await wait_until(lambda: domains.resolve_host("maria.example.com") == "maria-app")
        await assert_reaches(server, "maria.example.com", "maria-app")
        listed = await anyio.to_thread.run_sync(cli, "list")
        assert "maria.example.com  maria-app  (database)" in listed.stdout
        removed = await anyio.to_thread.run_sync(cli, "remove", "maria.example.com")
        assert removed.returncode == 0, removed.stderr
        await wait_until(lambda: domains.resolve_host("maria.example.com") is None)
        async with custom_visitor(server, "maria.example.com") as client:
            assert (await client.get("/")).status_code == 404
