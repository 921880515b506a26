"""The third-party example in examples/comzy-plugin-example, run through a real server.

It is imported from its source directory (installing it in the test would be slow). Where the
real ``comzy-server`` and ``python -m comzy.migrations`` must find it through its entry point,
a ``*.dist-info`` directory declares it, as tests/test_plugin_loading.py does.

Every extension point it shows is exercised: its setting, its table with its own migrations
(on SQLite, MariaDB and PostgreSQL), ``before_forward``, its admin route, its
``comzy-server example`` command, and the bound on what it keeps.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType

import anyio
import pytest
from setuptools import find_packages
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy import hookimpl
from comzy.core import db
from comzy.core.hooks import HookRunner, plugin_manager
from tests.conftest import ROOT, admin_client, start_agent, start_server
from tests.helpers import install_metadata, scratch_database, wait_until
from tests.test_cli import SERVER, Cli, run_cli, server_env
from tests.test_core_without_plugins import PUBLIC_MODULES, comzy_imports
from tests.test_migrations import _model_diff
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

EXAMPLE = ROOT / "examples" / "comzy-plugin-example"
EXAMPLE_SRC = EXAMPLE / "src"
ENTRY_POINT = {"example": "comzy_plugin_example:ExamplePlugin"}


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example package, imported by path, with no COMZY_EXAMPLE_* variables set."""
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    for name in list(os.environ):
        if name.startswith("COMZY_EXAMPLE_"):
            monkeypatch.delenv(name)
    yield importlib.import_module("comzy_plugin_example")


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[URL]:
    """An empty database of each kind (SQLite: the embedded default's file in tmp_path)."""
    if request.param == "sqlite":
        yield URL.create("sqlite+aiosqlite", database=str(tmp_path / db.SQLITE_FILE))
        return
    async for url in scratch_database(request.param):
        yield url


@pytest.fixture
async def engine(database: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database``."""
    engine = db.create_engine(database)
    try:
        yield engine
    finally:
        await engine.dispose()


def cli_environment(tmp_path: Path, src: Path = EXAMPLE_SRC, **extra: str) -> dict[str, str]:
    """comzy-server's environment with the example "installed" from ``src`` (a dist-info for its
    entry point) and its data directory, hence its SQLite database, in ``tmp_path``."""
    site = tmp_path / "site"
    if not site.exists():
        install_metadata(site, "comzy-plugin-example", ENTRY_POINT)
    env = server_env(tmp_path, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(src), str(ROOT)])
    return env


async def comzy_server(tmp_path: Path, *args: str, plugins: str = "example") -> Cli:
    """Run ``comzy-server args`` to its end; the finished program (its output and exit status)."""
    async with run_cli(SERVER, *args, env=cli_environment(tmp_path, COMZY_PLUGINS=plugins), cwd=tmp_path) as cli:
        await cli.wait_exit(within=60)
    return cli


# -- The setting and before_forward -------------------------------------------------------------
async def test_example_stamps_requests_and_blocks_a_prefix(tmp_path: Path, upstream: Upstream,
                                                          example: ModuleType) -> None:
    plugin = example.ExamplePlugin()
    async with start_server(tmp_path, plugins=[("example", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        stamped = await client.get("/page", headers={"x-comzy-example": "forged"})
        assert stamped.status_code == 200
        headers = stamped.json()["headers"]
        assert ["x-comzy-example", "stamped"] in headers
        assert ["x-comzy-example", "forged"] not in headers  # a visitor cannot pre-set it
        for path in ("/private", "/private/", "/private/keys.txt"):
            blocked = await client.get(path)
            assert blocked.status_code == 403, path
            assert blocked.text == f"{path} is blocked on {agent.alias}\n"
        assert (await client.get("/privateer")).status_code == 200  # a prefix is whole path segments
    assert [r["path"] for r in upstream.requests] == ["/page", "/privateer"]


async def test_example_settings_from_its_own_environment_prefix(tmp_path: Path, upstream: Upstream,
                                                               example: ModuleType,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_EXAMPLE_HEADER_NAME", "X-Team")
    monkeypatch.setenv("COMZY_EXAMPLE_HEADER_VALUE", "blue")
    monkeypatch.setenv("COMZY_EXAMPLE_BLOCKED_PREFIX", "")
    monkeypatch.setenv("COMZY_EXAMPLE_KEEP_PER_ALIAS", "7")
    plugin = example.ExamplePlugin()  # settings are read when the plugin is built, never at import
    assert plugin.settings.keep_per_alias == 7
    async with start_server(tmp_path, plugins=[("example", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        response = await client.get("/private/now-allowed")
    assert response.status_code == 200
    assert ["x-team", "blue"] in response.json()["headers"]


def test_example_settings_reject_bad_values(example: ModuleType) -> None:
    with pytest.raises(ValueError, match="blocked_prefix"):
        example.ExampleSettings(blocked_prefix="private")
    with pytest.raises(ValueError, match="header_name"):
        example.ExampleSettings(header_name="Bad Header")
    with pytest.raises(ValueError, match="keep_per_alias"):
        example.ExampleSettings(keep_per_alias=0)  # recording without keeping anything is a mistake
    with pytest.raises(ValueError, match="queue_size"):
        example.ExampleSettings(queue_size=0)


# -- The table, the admin route and the bound on rows ---------------------------------------------
async def test_blocked_requests_are_kept_bounded_and_served_on_the_admin_route(
        tmp_path: Path, upstream: Upstream, example: ModuleType, database: URL, engine: AsyncEngine) -> None:
    """On each database: every refusal is recorded (alias, method, path without its query, client,
    time), each alias keeps only its newest KEEP_PER_ALIAS rows, and GET /example/blocked shows them."""
    options = {}
    if database.get_backend_name() != "sqlite":
        # What the operator does for a server database: the server never changes its schema itself.
        await db.upgrade_to_head(engine, [example.models.SCHEMA])
        options["database_url"] = database.render_as_string(hide_password=False)
    plugin = example.ExamplePlugin(example.ExampleSettings(keep_per_alias=3))
    started = time.time()
    async with start_server(tmp_path, plugins=[("example", plugin)], **options) as server, \
            start_agent(server, upstream.port) as first, start_agent(server, upstream.port) as second, \
            admin_client(server) as admin:
        async with first.visitor() as client:
            assert (await client.get("/page")).status_code == 200  # allowed: not recorded
            for n in range(1, 6):
                assert (await client.get(f"/private/{n}?token=secret")).status_code == 403
        async with second.visitor() as client:
            assert (await client.post("/private/upload", content=b"x")).status_code == 403
        await wait_until(lambda: plugin.written == 6)

        answer = (await admin.get("/example/blocked")).json()
        assert answer["dropped"] == 0
        rows = answer["blocked"]
        # Newest first; the first alias kept only its newest three of five.
        assert [(r["alias"], r["method"], r["path"]) for r in rows] == [
            (second.alias, "POST", "/private/upload"),
            (first.alias, "GET", "/private/5"), (first.alias, "GET", "/private/4"), (first.alias, "GET", "/private/3")]
        assert {r["client"] for r in rows} == {"127.0.0.1"}
        for row in rows:
            blocked_at = datetime.fromisoformat(row["blocked_at"]).timestamp()
            assert started - 1 <= blocked_at <= time.time() + 1, row

        only_first = (await admin.get("/example/blocked", params={"alias": first.alias.upper(), "limit": 2})).json()
        assert [r["path"] for r in only_first["blocked"]] == ["/private/5", "/private/4"]

        # More refusals push the oldest out, alias by alias.
        async with second.visitor() as client:
            for n in range(3):
                assert (await client.get(f"/private/again-{n}")).status_code == 403
        await wait_until(lambda: plugin.written == 9)
        rows = (await admin.get("/example/blocked")).json()["blocked"]
        assert [(r["alias"], r["path"]) for r in rows] == [
            (second.alias, "/private/again-2"), (second.alias, "/private/again-1"), (second.alias, "/private/again-0"),
            (first.alias, "/private/5"), (first.alias, "/private/4"), (first.alias, "/private/3")]
    assert [r["path"] for r in upstream.requests] == ["/page"]


async def test_the_admin_route_refuses_bad_requests(tmp_path: Path, example: ModuleType) -> None:
    async with start_server(tmp_path, plugins=[("example", example.ExamplePlugin())]) as server, \
            admin_client(server) as admin:
        assert (await admin.get("/example/blocked")).json() == {"blocked": [], "dropped": 0}
        bad_alias = await admin.get("/example/blocked", params={"alias": "no spaces"})
        assert bad_alias.status_code == 400
        assert "is not an alias" in bad_alias.json()["error"]
        for limit, reason in (("0", "between 1 and 1000"), ("lots", "a whole number")):
            response = await admin.get("/example/blocked", params={"limit": limit})
            assert response.status_code == 400 and reason in response.json()["error"], response.text
        posted = await admin.post("/example/blocked")
        assert posted.status_code == 405 and posted.headers["allow"] == "GET"
        assert (await admin.get("/example/elsewhere")).status_code == 404
        # The admin listener asks for its token before the route sees anything.
        anonymous = await admin.get("/example/blocked", headers={"authorization": ""})
        assert anonymous.status_code == 401


class WriteLock:
    """Holds the SQLite database's write lock, as another process writing would, until the server's
    shutdown begins: its ``on_shutdown`` runs before the example's (the plugin registered later
    runs first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None

    def take(self) -> None:
        """Take the lock (the server made the file: take it after start-up)."""
        self.connection = sqlite3.connect(self.path, isolation_level=None)
        self.connection.execute("BEGIN IMMEDIATE")

    @hookimpl
    def on_shutdown(self) -> None:
        self.release()

    def release(self) -> None:
        """Let the writer in (again safe to call)."""
        if self.connection is not None:
            self.connection.execute("ROLLBACK")
            self.connection.close()
            self.connection = None


async def test_a_stuck_database_never_slows_visitors(tmp_path: Path, upstream: Upstream,
                                                    example: ModuleType) -> None:
    """While another process holds the database's write lock, refusals are answered at once: the
    writer waits, the bounded queue fills, the rest are dropped and counted. At shutdown the
    writer still writes what it holds and what is queued before the database is closed."""
    plugin = example.ExamplePlugin(example.ExampleSettings(queue_size=2, keep_days=0))
    lock = WriteLock(tmp_path / db.SQLITE_FILE)
    try:
        async with start_server(tmp_path, plugins=[("example", plugin), ("lock", lock)]) as server, \
                start_agent(server, upstream.port) as agent, agent.visitor() as client, \
                admin_client(server) as admin:
            lock.take()  # the writer's INSERT now waits (up to SQLite's 30 s busy timeout)
            with anyio.fail_after(10):  # far less than the writer's wait: no visitor waited for it
                for n in range(6):
                    assert (await client.get(f"/private/{n}")).status_code == 403
            # One record in the writer's stuck batch (none if it had not woken yet), two queued.
            assert 3 <= plugin.dropped <= 4
            assert (await admin.get("/example/blocked")).json()["dropped"] == plugin.dropped
            assert plugin.written == 0
    finally:
        lock.release()
    assert plugin.written == 6 - plugin.dropped
    with sqlite3.connect(tmp_path / db.SQLITE_FILE) as connection:
        paths = [row[0] for row in connection.execute("SELECT path FROM example_blocked ORDER BY id DESC")]
    assert paths == [f"/private/{n}" for n in reversed(range(plugin.written))]


# -- The command -----------------------------------------------------------------------------------
async def test_the_commands_print_and_purge_what_the_server_blocked(tmp_path: Path, upstream: Upstream,
                                                                     example: ModuleType) -> None:
    """``comzy-server example blocked|purge`` work on the server's database; what was still queued
    when the server stopped was written on its way out."""
    plugin = example.ExamplePlugin()
    async with start_server(tmp_path, plugins=[("example", plugin)]) as server:
        async with start_agent(server, upstream.port) as first, first.visitor() as client:
            for path in ("/private/a", "/private/b"):
                assert (await client.get(path)).status_code == 403
        async with start_agent(server, upstream.port) as second, second.visitor() as client:
            assert (await client.get("/private/c")).status_code == 403
    assert plugin.written == 3

    listed = await comzy_server(tmp_path, "example", "blocked")
    assert listed.process.returncode == 0, listed.describe()
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  (\S+)\s+127\.0\.0\.1\s+GET (\S+)$")
    matches = [line.match(text) for text in listed.lines["stdout"]]
    assert all(matches), listed.describe()
    assert [m.groups() for m in matches if m] == [(second.alias, "/private/c"), (first.alias, "/private/b"),
                                                  (first.alias, "/private/a")]

    newest = await comzy_server(tmp_path, "example", "blocked", "--alias", first.alias, "--limit", "1")
    assert [text.split()[-1] for text in newest.lines["stdout"]] == ["/private/b"], newest.describe()

    purged = await comzy_server(tmp_path, "example", "purge", "--alias", first.alias)
    assert purged.process.returncode == 0, purged.describe()
    assert purged.lines["stdout"] == [f"deleted 2 blocked requests of {first.alias}"]
    left = await comzy_server(tmp_path, "example", "blocked")
    assert [text.split()[2] for text in left.lines["stdout"]] == [second.alias], left.describe()
    none_left = await comzy_server(tmp_path, "example", "blocked", "--alias", first.alias)
    assert none_left.lines["stdout"] == [f"no blocked requests recorded for {first.alias}"]

    everything = await comzy_server(tmp_path, "example", "purge")
    assert everything.lines["stdout"] == ["deleted 1 blocked request"], everything.describe()


async def test_the_command_says_what_to_fix_in_one_line(tmp_path: Path) -> None:
    disabled = await comzy_server(tmp_path, "example", "blocked", plugins="none")
    assert disabled.process.returncode == 2, disabled.describe()
    assert disabled.lines["stderr"] == ["comzy-server: `example` belongs to the plugin example, which is not "
                                        "enabled: add it to COMZY_PLUGINS (now: none)"]
    bad_alias = await comzy_server(tmp_path, "example", "purge", "--alias", "Not An Alias")
    assert bad_alias.process.returncode == 2, bad_alias.describe()
    assert bad_alias.lines["stderr"] == ["comzy-server: example purge: 'Not An Alias' is not an alias: use 1 to 63 "
                                         "letters, digits and '-' (not first or last)"]
    bad_limit = await comzy_server(tmp_path, "example", "blocked", "--limit", "5000")
    assert bad_limit.process.returncode == 2, bad_limit.describe()
    assert bad_limit.lines["stderr"] == ["comzy-server: example blocked: the limit must be between 1 and 1000, "
                                         "not 5000"]
    assert "Traceback" not in disabled.stderr + bad_alias.stderr + bad_limit.stderr


# -- Migrations and packaging ----------------------------------------------------------------------
async def test_the_example_migrations_agree_with_its_models(example: ModuleType, engine: AsyncEngine) -> None:
    schema = example.models.SCHEMA
    assert schema.name == "example" and schema.version_table == "alembic_version_example"
    await db.upgrade_to_head(engine, [schema])
    assert await db.current_revision(engine, schema) == db.head_revision(schema)
    async with engine.connect() as connection:
        diff = await connection.run_sync(_model_diff, schema)
    assert diff == [], "the example's models and migrations disagree:\n" + "\n".join(map(str, diff))
    await db.downgrade(engine, schema)
    async with engine.connect() as connection:
        assert not await connection.run_sync(lambda sync: sync.dialect.has_table(sync, "example_blocked"))


async def test_the_documented_revision_command_works_for_the_example(tmp_path: Path) -> None:
    """docs/plugin_hooks.md's workflow, on a copy of the example: `db upgrade`, then
    `python -m comzy.migrations revision --plugin example --autogenerate` finds the plugin through
    its entry point and, the models being unchanged, writes a revision that does nothing."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE_SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    env = cli_environment(tmp_path, src, COMZY_PLUGINS="example")
    async with run_cli(SERVER, "db", "upgrade", env=env, cwd=tmp_path) as upgrade:
        assert await upgrade.wait_exit(within=60) == 0, upgrade.describe()
    assert "example: upgraded from empty to 0002 (head)" in upgrade.lines["stdout"], upgrade.describe()
    async with run_cli("comzy.migrations", "revision", "--plugin", "example", "--autogenerate", "-m", "no change",
                       env=env, cwd=tmp_path) as revision:
        assert await revision.wait_exit(within=60) == 0, revision.describe()
    written = src / "comzy_plugin_example" / "migrations" / "0003_no_change.py"
    assert f"wrote {written}" in revision.stdout, revision.describe()
    upgrade_body = written.read_text().split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]
    assert "op." not in upgrade_body, upgrade_body


def test_the_migrations_ship_in_the_package() -> None:
    """setuptools' package discovery (pyproject: packages.find in src) takes the revisions along."""
    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(EXAMPLE / config["where"][0]))
    assert "comzy_plugin_example.migrations" in packages
    assert list((EXAMPLE_SRC / "comzy_plugin_example" / "migrations").glob("0001_*.py"))


# -- The package and its README ----------------------------------------------------------------------
def test_example_declares_its_entry_point(example: ModuleType) -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["comzy"]["example"]
    assert {"example": target} == ENTRY_POINT
    module, _, attribute = target.partition(":")
    assert getattr(importlib.import_module(module), attribute) is example.ExamplePlugin
    assert any(dep.startswith("comzy") for dep in project["dependencies"])


def test_example_imports_only_the_public_api() -> None:
    """A third-party plugin imports the documented public modules (docs/plugin_hooks.md), never
    ``comzy.core``: the same rule the built-in plugins keep."""
    offenders = [f"{path.name}:{line}: {module}"
                 for path in sorted((EXAMPLE_SRC / "comzy_plugin_example").rglob("*.py"))
                 for line, module in comzy_imports(path) if module not in PUBLIC_MODULES]
    assert offenders == []


def test_example_readme_documents_every_setting_and_hook(example: ModuleType) -> None:
    readme = (EXAMPLE / "README.md").read_text()
    prefix = example.ExampleSettings.model_config["env_prefix"]
    assert prefix == "COMZY_EXAMPLE_"
    for field in example.ExampleSettings.model_fields:
        assert f"`{prefix}{field.upper()}`" in readme, field
    assert "COMZY_PLUGINS=example" in readme
    hooks = HookRunner(plugin_manager([("example", example.ExamplePlugin())])).hooks_of("example")
    assert {"before_forward", "database_schema", "admin_routes", "register_commands"} <= set(hooks)
    for hook in hooks:
        assert f"`{hook}`" in readme, hook
    for command in ("comzy-server example blocked", "comzy-server example purge",
                    "python -m comzy.migrations revision --plugin example"):
        assert command in readme, command

