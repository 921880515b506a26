"""The database layer: URL resolution, Alembic migrations up and down on SQLite, MariaDB and
PostgreSQL, models and migrations in agreement, start-up readiness, and ``comzy-server db``.

MariaDB (root, no password, 127.0.0.1:3306, database ``test``) and PostgreSQL (postgres, trust,
127.0.0.1:5432, database ``test``) run on the developers' machines and in CI (DEVELOPERS.md);
COMZY_TEST_MARIADB_URL / COMZY_TEST_POSTGRES_URL point elsewhere. Unreachable, their tests are
skipped with the reason, except under CI=true where they fail. Each test works in a database of
its own, created for it and dropped afterwards, so concurrent runs never meet.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Column, Connection, Integer, String, Table, column, insert, inspect, make_url, select, table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from comzy.core import db, sqlite_file
from comzy.core.models import plugin_metadata
from comzy.core.schema import Schema
from comzy.core.settings import ServerSettings
from comzy.migrations.__main__ import write_revision
from comzy.plugins.auth_token.models import SCHEMA as AUTH_SCHEMA
from comzy.plugins.auth_token.models import User, UserAlias
from comzy.plugins.custom_domains.models import SCHEMA as DOMAINS_SCHEMA
from comzy.plugins.custom_domains.models import CustomDomain
from comzy.plugins.mysql_logging.models import SCHEMA as LOG_SCHEMA
from comzy.plugins.mysql_logging.models import ApiRequest
from tests.conftest import PYTHON, ROOT, cli_env, start_server
from tests.helpers import scratch_database as _scratch
from tests.legacy_schema import make_legacy_database

pytestmark = pytest.mark.anyio

PLUGIN_SCHEMAS = [AUTH_SCHEMA, DOMAINS_SCHEMA, LOG_SCHEMA]
TABLES = {"users", "user_aliases", "api_requests", "custom_domains"}
VERSION_TABLES = {"alembic_version", *(schema.version_table for schema in PLUGIN_SCHEMAS)}
#: Each tree's newest revision, as `comzy-server db` prints it.
HEAD = {"core": "0001", "auth_token": "0002", "custom_domains": "0002", "mysql_logging": "0002"}


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[URL]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield URL.create("sqlite+aiosqlite", database=str(tmp_path / "comzy.db"))
        return
    async for url in _scratch(request.param):
        yield url


@pytest.fixture
async def engine(database: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database`` (dropped afterwards with its database, or its directory)."""
    engine = db.create_engine(database)
    try:
        yield engine
    finally:
        await engine.dispose()


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(_tables)


def _model_diff(connection: Connection, schema: Schema) -> list[Any]:
    """What autogenerate would write for ``schema`` (its own tables only, as env.py compares)."""
    context = MigrationContext.configure(connection, opts={
        "compare_type": True,
        "include_name": lambda name, kind, _parent: kind != "table" or name in schema.metadata.tables})
    return list(compare_metadata(context, schema.metadata))


def _settings(tmp_path: Path, **values: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, data_dir=tmp_path, **values)


@pytest.fixture(autouse=True)
def _no_seed_database(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "COMZY_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


# -- Each tree on every database ------------------------------------------------------------
async def test_each_plugin_tree_up_and_down_alone(engine: AsyncEngine) -> None:
    await db.upgrade(engine, db.CORE_SCHEMA)
    assert await _table_names(engine) <= {"alembic_version"}  # the core has no tables
    version_tables = {"alembic_version"}  # Alembic keeps a version table, empty, once down at base
    for schema in PLUGIN_SCHEMAS:
        assert await db.current_revision(engine, schema) is None
        await db.upgrade(engine, schema)
        version_tables.add(schema.version_table)
        assert await db.current_revision(engine, schema) == db.head_revision(schema)
        assert await _table_names(engine) == version_tables | set(schema.metadata.tables)
        await db.downgrade(engine, schema)
        assert await db.current_revision(engine, schema) is None
        assert await _table_names(engine) <= version_tables
    await db.upgrade_to_head(engine, PLUGIN_SCHEMAS)  # and every tree up again, from base
    assert await _table_names(engine) == TABLES | VERSION_TABLES


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    await db.upgrade_to_head(engine, PLUGIN_SCHEMAS)
    for schema in [db.CORE_SCHEMA, *PLUGIN_SCHEMAS]:
        async with engine.connect() as connection:
            diff = await connection.run_sync(_model_diff, schema)
        assert diff == [], (f"{schema.name}'s models and its migrations ({schema.migrations}) disagree; add a "
                            "migration (docs/plugin_hooks.md, Tables and migrations):\n" + "\n".join(map(str, diff)))


async def test_schema_holds_data_and_constraints(engine: AsyncEngine) -> None:
    await db.upgrade_to_head(engine, PLUGIN_SCHEMAS)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        user = User(name="alice", token_hash="ab" * 32)
        session.add(user)
        await session.flush()
        session.add_all([
            UserAlias(user_id=user.id, alias="alice-app", port=3000),
            ApiRequest(alias="alice-app", port=3000, method="GET", path="/" + "x" * 1023, status_code=200,
                       bytes_in=0, bytes_out=5 * 2**32, duration_ms=1.25, client_address="2001:db8::1"),
            CustomDomain(host="custom.example.com", alias="alice-app"),
        ])
        await session.commit()
    async with sessions() as session:
        logged = (await session.execute(select(ApiRequest))).scalar_one()
        assert (logged.bytes_out, logged.duration_ms, len(logged.path)) == (5 * 2**32, 1.25, 1024)
        assert logged.created_at is not None
        owned = (await session.execute(select(UserAlias))).scalar_one()
        assert (owned.alias, owned.port, owned.user_id) == ("alice-app", 3000, user.id)
    async with sessions() as session:
        session.add(UserAlias(user_id=user.id, alias="alice-app", port=4000))
        with pytest.raises(IntegrityError):
            await session.commit()
    async with sessions() as session:
        session.add(UserAlias(user_id=user.id + 1000, alias="nobody", port=4000))
        with pytest.raises(IntegrityError):  # foreign key enforced (on SQLite too)
            await session.commit()


# -- 0002: times with microseconds, whole paths ------------------------------------------------
AT_0001 = {
    "users": {"id": 7, "name": "ana", "token_hash": "cd" * 32, "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
              "revoked_at": datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)},
    "user_aliases": {"id": 3, "user_id": 7, "alias": "ana-app", "port": 3000,
                     "created_at": datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)},
    "custom_domains": {"id": 5, "host": "shop.example.com", "alias": "ana-app",
                       "created_at": datetime(2026, 1, 2, 3, 4, 7, tzinfo=UTC)},
    "api_requests": {"id": 11, "alias": "ana-app", "port": 3000, "method": "VERSION-CONTROL", "path": "/" + "p" * 1023,
                     "status_code": 200, "bytes_in": 1, "bytes_out": 2, "duration_ms": 3.5,
                     "created_at": datetime(2026, 1, 2, 3, 4, 8, tzinfo=UTC)},
}
MODEL_TABLES = {name: model for schema in PLUGIN_SCHEMAS for name, model in schema.metadata.tables.items()}


def _columns_of(name: str) -> Any:
    """``name`` with the columns AT_0001 gives it, typed as the models type them (so times are times
    on SQLite too), and without the models' defaults (0001 has no ``cut`` column to default)."""
    return table(name, *(column(key, MODEL_TABLES[name].c[key].type) for key in AT_0001[name]))


def _naive_utc(value: Any) -> Any:
    """MySQL and SQLite give times back naive (meaning UTC), PostgreSQL aware: compared naive."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _rows_at_0001(connection: Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: [{key: _naive_utc(value) for key, value in row._mapping.items()}
                   for row in connection.execute(select(_columns_of(name)))]
            for name in AT_0001}


async def test_0002_keeps_the_rows_and_then_microseconds_and_long_paths(engine: AsyncEngine) -> None:
    """Every plugin tree at 0001 (whole seconds on MariaDB, VARCHAR(1024) paths) with rows, then
    upgraded to head: the rows are kept as they were, and from then on every time column keeps its
    microseconds and a long path or method is stored whole, on every database; the downgrade keeps
    the rows too (the long path cut to the old column)."""
    await db.upgrade(engine, db.CORE_SCHEMA)
    for schema in PLUGIN_SCHEMAS:
        await db.upgrade(engine, schema, "0001")
    async with engine.begin() as connection:
        for name, row in AT_0001.items():
            await connection.execute(insert(_columns_of(name)).values(**row))
    await db.upgrade_to_head(engine, PLUGIN_SCHEMAS)
    async with engine.connect() as connection:
        assert await connection.run_sync(_rows_at_0001) == {
            name: [{key: _naive_utc(value) for key, value in row.items()}] for name, row in AT_0001.items()}
        assert (await connection.execute(select(ApiRequest.cut))).scalar_one() is False

    moment = datetime(2026, 12, 7, 9, 10, 11, 123456, tzinfo=UTC)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        user = User(name="bo", token_hash="ef" * 32, created_at=moment, revoked_at=moment)
        session.add(user)
        await session.flush()
        session.add_all([
            UserAlias(user_id=user.id, alias="bo-app", port=3000, created_at=moment),
            CustomDomain(host="bo.example.com", alias="bo-app", created_at=moment),
            ApiRequest(alias="bo-app", port=3000, method="M" * 64, path="/" + "q" * 9999, status_code=200,
                       created_at=moment, cut=True),
        ])
        await session.commit()
    async with sessions() as session:
        times = [(await session.execute(query)).scalar_one() for query in (
            select(User.created_at).where(User.name == "bo"), select(User.revoked_at).where(User.name == "bo"),
            select(UserAlias.created_at).where(UserAlias.alias == "bo-app"),
            select(CustomDomain.created_at).where(CustomDomain.host == "bo.example.com"),
            select(ApiRequest.created_at).where(ApiRequest.alias == "bo-app"))]
        assert [_naive_utc(time) for time in times] == [moment.replace(tzinfo=None)] * 5
        logged = (await session.execute(select(ApiRequest).where(ApiRequest.alias == "bo-app"))).scalar_one()
        assert (logged.method, logged.path, logged.cut) == ("M" * 64, "/" + "q" * 9999, True)
    async with engine.begin() as connection:  # the database's own default, now CURRENT_TIMESTAMP(6) on MySQL
        await connection.execute(insert(table("custom_domains", column("host"), column("alias"))).values(
            host="later.example.com", alias="bo-app"))

    await db.downgrade(engine, LOG_SCHEMA, "0001")
    async with engine.connect() as connection:
        paths = (await connection.execute(select(column("path")).select_from(table("api_requests")))).scalars()
        assert sorted(len(path) for path in paths) == [1024, 1024]
        assert "cut" not in {c["name"] for c in await connection.run_sync(
            lambda sync: inspect(sync).get_columns("api_requests"))}


# -- Databases made by Comzy 0.1's single tree ----------------------------------------------------
LEGACY_ROWS = {
    "users": {"id": 7, "name": "ana", "token_hash": "cd" * 32},
    "user_aliases": {"id": 3, "user_id": 7, "alias": "ana-app", "port": 3000},
    "custom_domains": {"id": 5, "host": "shop.example.com", "alias": "ana-app"},
    "api_requests": {"id": 11, "alias": "ana-app", "port": 3000, "method": "GET", "path": "/old",
                     "status_code": 200, "bytes_in": 1, "bytes_out": 2, "duration_ms": 3.5},
}


def _fill_legacy(connection: Connection) -> None:
    make_legacy_database(connection)
    for name, row in LEGACY_ROWS.items():
        connection.execute(insert(table(name, *(column(key) for key in row))).values(**row))


def _rows(connection: Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: [dict(row._mapping) for row in connection.execute(
                select(*(column(key) for key in LEGACY_ROWS[name])).select_from(table(name)))]
            for name in LEGACY_ROWS}


async def test_a_single_tree_database_upgrades_in_place(database: URL, tmp_path: Path) -> None:
    """Comzy 0.1's database (every table, alembic_version at 0001) with rows: `db upgrade` adopts the
    enabled plugins' tables, keeps every row, and adopts a plugin's tables when it is enabled later."""
    engine = db.create_engine(database)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_fill_legacy)
        url = database.render_as_string(hide_password=False)

        first = _db_cli(tmp_path, "upgrade", COMZY_DATABASE_URL=url, COMZY_PLUGINS="auth_token,custom_domains")
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[1:] == ["core: already at 0001 (head)",
                                                 "auth_token: upgraded from empty to 0002 (head)",
                                                 "custom_domains: upgraded from empty to 0002 (head)"]
        assert "adopted the existing table users" in first.stderr
        assert await _table_names(engine) == TABLES | VERSION_TABLES - {LOG_SCHEMA.version_table}
        current = _db_cli(tmp_path, "current", COMZY_DATABASE_URL=url, COMZY_PLUGINS="auth_token,custom_domains")
        assert current.stdout.splitlines()[1:] == ["core: revision 0001 (head)", "auth_token: revision 0002 (head)",
                                                   "custom_domains: revision 0002 (head)"]

        later = _db_cli(tmp_path, "upgrade", COMZY_DATABASE_URL=url, COMZY_PLUGINS="mysql_logging")
        assert later.returncode == 0, later.stderr
        assert "mysql_logging: upgraded from empty to 0002 (head)" in later.stdout
        current = _db_cli(tmp_path, "current", COMZY_DATABASE_URL=url, COMZY_PLUGINS="mysql_logging")
        assert current.stdout.splitlines()[1:] == [
            "core: revision 0001 (head)", "mysql_logging: revision 0002 (head)",
            "auth_token: revision 0002 (plugin not enabled: its tables are left as they are)",
            "custom_domains: revision 0002 (plugin not enabled: its tables are left as they are)"]

        async with engine.connect() as connection:
            rows = await connection.run_sync(_rows)
            for name, row in LEGACY_ROWS.items():
                assert rows[name] == [row], name
            for schema in PLUGIN_SCHEMAS:
                assert await connection.run_sync(_model_diff, schema) == [], schema.name
        for schema in PLUGIN_SCHEMAS:
            await db.downgrade(engine, schema)  # the adopted tables are the plugins' own now
        assert await _table_names(engine) <= VERSION_TABLES
    finally:
        await engine.dispose()


async def test_a_foreign_table_is_not_adopted(tmp_path: Path) -> None:
    engine = db.create_engine(db.database_url(_settings(tmp_path / "data")))
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    finally:
        await engine.dispose()
    result = _db_cli(tmp_path, "upgrade", COMZY_PLUGINS="auth_token")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "comzy-server: the table 'users' exists but is not the one alembic_version_auth_token expects (its columns: "
        "email, id; expected: created_at, id, name, revoked_at, token_hash): rename or drop it, or give Comzy a "
        "database of its own")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("statements", "why"), [
    # The same column names, but times kept as text: another application's table.
    (["CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, token_hash TEXT, created_at TEXT, revoked_at TEXT)"],
     "its column created_at is TEXT, expected DATETIME"),
    # A view with exactly the columns: rows cannot be written into it.
    (["CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(255), token_hash VARCHAR(128), "
      "created_at DATETIME, revoked_at DATETIME)",
      "CREATE VIEW users AS SELECT id, name, token_hash, created_at, revoked_at FROM people"],
     "it is a view"),
], ids=["same-names-other-types", "a-view"])
async def test_a_look_alike_table_is_not_adopted(tmp_path: Path, statements: list[str], why: str) -> None:
    engine = db.create_engine(db.database_url(_settings(tmp_path / "data")))
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()
    result = _db_cli(tmp_path, "upgrade", COMZY_PLUGINS="auth_token")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"comzy-server: the table 'users' exists but is not the one alembic_version_auth_token expects ({why}): "
        "rename or drop it, or give Comzy a database of its own")


# -- Start-up readiness -----------------------------------------------------------------------
async def test_embedded_sqlite_upgrades_itself_one_plugin_at_a_time(tmp_path: Path) -> None:
    engine = await db.prepare_database(_settings(tmp_path / "data"), DOMAINS_SCHEMA)
    try:
        assert (tmp_path / "data" / "comzy.db").is_file()
        assert await db.current_revision(engine, DOMAINS_SCHEMA) == db.head_revision(DOMAINS_SCHEMA)
        assert await db.current_revision(engine, db.CORE_SCHEMA) == db.head_revision()
        assert await _table_names(engine) == {"alembic_version", DOMAINS_SCHEMA.version_table, "custom_domains"}
    finally:
        await engine.dispose()
    engine = await db.prepare_database(_settings(tmp_path / "data"), DOMAINS_SCHEMA)  # current: nothing to do
    await engine.dispose()


async def test_plugins_upgrading_one_sqlite_file_at_once_do_not_race(tmp_path: Path) -> None:
    """Several engines (a server's plugins, `comzy-server users` in another process) upgrading one new
    file together: each upgrade holds SQLite's write lock from reading the versions to committing."""
    engines: list[AsyncEngine] = []
    errors: list[str] = []

    async def prepare(schema: Schema) -> None:
        # Each failure is kept, not raised: a failing task would cancel the others mid-call, and a
        # cancelled aiosqlite call can leave a close that never ends (the test would hang, not fail).
        try:
            engines.append(await db.prepare_database(_settings(tmp_path / "data"), schema))
        except db.DatabaseError as exc:
            errors.append(str(exc))

    try:
        async with anyio.create_task_group() as group:
            for schema in [AUTH_SCHEMA, AUTH_SCHEMA, DOMAINS_SCHEMA, AUTH_SCHEMA, LOG_SCHEMA, DOMAINS_SCHEMA]:
                group.start_soon(prepare, schema)
        assert errors == []
        assert await _table_names(engines[0]) == TABLES | VERSION_TABLES
        async with engines[0].connect() as connection:
            for schema in [db.CORE_SCHEMA, *PLUGIN_SCHEMAS]:
                version = table(schema.version_table, column("version_num"))
                rows = await connection.execute(select(version.c.version_num))
                assert [row[0] for row in rows] == [HEAD[schema.name]], schema.version_table
    finally:
        for engine in engines:
            await engine.dispose()


def test_a_new_sqlite_file_switches_to_wal_once_its_lock_is_free(tmp_path: Path) -> None:
    """SQLite refuses a switch to WAL at once ("database is locked", no busy wait) while another
    connection holds the new file: the switch waits for it, and says so when it waits too long."""
    path = tmp_path / "comzy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match=r"stayed locked by another connection for 0.2 s"):
            sqlite_file.use_wal(path, timeout=0.2)
        holder.execute("COMMIT")
        sqlite_file.use_wal(path, timeout=0.2)
        assert holder.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        holder.close()


@pytest.mark.parametrize("service", ["postgres", "mariadb"])
async def test_unmigrated_server_database_refuses_start(service: str, tmp_path: Path) -> None:
    async for url in _scratch(service):
        secret_url = url.set(password="s3cret-pw") if service == "postgres" else url  # trust auth ignores it
        settings = _settings(tmp_path, database_url=secret_url.render_as_string(hide_password=False))
        engine = db.create_engine(url)
        try:
            await db.upgrade(engine, db.CORE_SCHEMA)
            with pytest.raises(db.DatabaseError, match=r"run `comzy-server db upgrade`") as info:
                await db.prepare_database(settings, AUTH_SCHEMA)
            assert "the plugin auth_token's schema in the database" in str(info.value)
            assert "has no tables yet" in str(info.value)
            assert "s3cret-pw" not in str(info.value)
            assert await db.current_revision(engine, AUTH_SCHEMA) is None  # refused without touching it
            await db.upgrade_to_head(engine, [AUTH_SCHEMA])
            ready = await db.prepare_database(settings, AUTH_SCHEMA)
            await ready.dispose()
            with pytest.raises(db.DatabaseError, match=r"plugin mysql_logging's schema .* has no tables yet"):
                await db.prepare_database(settings, LOG_SCHEMA)  # another plugin's tree is its own
        finally:
            await engine.dispose()


async def test_a_revision_from_a_newer_comzy_is_refused(tmp_path: Path) -> None:
    engine = await db.prepare_database(_settings(tmp_path / "data"), LOG_SCHEMA)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("UPDATE alembic_version_mysql_logging SET version_num = '0042'")
    finally:
        await engine.dispose()
    with pytest.raises(db.DatabaseError, match=r"plugin mysql_logging's schema .* is at revision 0042, which this "
                       r"version of Comzy does not know \(a newer version migrated it\): upgrade Comzy"):
        await db.prepare_database(_settings(tmp_path / "data"), LOG_SCHEMA)
    result = _db_cli(tmp_path, "current", COMZY_PLUGINS="mysql_logging")
    assert result.stdout.splitlines()[-1] == ("mysql_logging: revision 0042, which this version of Comzy does not "
                                             "know (a newer version migrated it): upgrade Comzy")


async def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path, database_url="postgresql://comzy:s3cret-pw@127.0.0.1:1/comzy")
    with pytest.raises(db.DatabaseError, match=r"cannot use the database postgresql\+asyncpg://comzy:\*\*\*@") as info:
        await db.prepare_database(settings, AUTH_SCHEMA)
    assert "s3cret-pw" not in str(info.value)


async def test_plain_server_touches_no_database(tmp_path: Path) -> None:
    async with start_server(tmp_path):
        pass
    assert not (tmp_path / "comzy.db").exists()


# -- A plugin author's revision ---------------------------------------------------------------------
async def test_a_new_plugin_gets_its_first_revision_by_autogenerate(tmp_path: Path) -> None:
    metadata = plugin_metadata()
    Table("notes", metadata, Column("id", Integer, primary_key=True), Column("text", String(200), nullable=False))
    schema = Schema("notes", metadata, tmp_path / "notes_migrations")
    settings = _settings(tmp_path / "data")
    engine = db.create_engine(db.database_url(settings))
    try:
        await db.upgrade(engine, db.CORE_SCHEMA)
        written = await write_revision(settings, schema, "notes table", autogenerate=True)
        assert written == schema.migrations / "0001_notes_table.py"
        assert 'op.create_table(\'notes\'' in written.read_text() or 'op.create_table("notes"' in written.read_text()
        assert "alembic_version" not in written.read_text()  # the other trees' tables are not "removed"
        await db.upgrade(engine, schema)
        assert await _table_names(engine) == {"alembic_version", "alembic_version_notes", "notes"}
        async with engine.connect() as connection:
            assert await connection.run_sync(_model_diff, schema) == []
        second = await write_revision(settings, schema, "nothing yet", autogenerate=False)
        assert second.name == "0002_nothing_yet.py" and "down_revision: str | None = '0001'" in second.read_text()
    finally:
        await engine.dispose()


# -- URL resolution ---------------------------------------------------------------------------
def test_default_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    url = db.database_url(_settings(tmp_path))
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(tmp_path / "comzy.db")


def test_seed_variables_build_a_mysql_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DB_HOST", "db.internal")
    monkeypatch.setenv("DB_USER", "comzy")
    monkeypatch.setenv("DB_NAME", "tunnels")
    assert db.database_url(_settings(tmp_path)).drivername == "sqlite+aiosqlite"  # no DB_PASSWORD: not MySQL
    monkeypatch.setenv("DB_PASSWORD", "")  # an empty line in a seed .env template
    assert db.database_url(_settings(tmp_path)).drivername == "sqlite+aiosqlite"
    monkeypatch.setenv("DB_PASSWORD", "p@ss:w/rd%")
    url = db.database_url(_settings(tmp_path))
    assert (url.drivername, url.host, url.port, url.username, url.database) == (
        "mysql+aiomysql", "db.internal", 3306, "comzy", "tunnels")
    assert url.password == "p@ss:w/rd%"
    assert url.query == {"charset": "utf8mb4"}
    assert make_url(url.render_as_string(hide_password=False)).password == "p@ss:w/rd%"
    assert db.masked_url(url) == "mysql+aiomysql://comzy:***@db.internal:3306/tunnels?charset=utf8mb4"


def test_database_url_wins_and_gets_an_async_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DB_PASSWORD", "ignored")
    monkeypatch.setenv("COMZY_DATABASE_URL", "postgresql://u:pw@pg/comzy")
    assert db.database_url(_settings(tmp_path)).drivername == "postgresql+asyncpg"
    for given, driver in [("postgres://u@h/d", "postgresql+asyncpg"), ("mysql://u@h/d", "mysql+aiomysql"),
                          ("mariadb://u@h/d", "mariadb+aiomysql"), ("sqlite:////tmp/x.db", "sqlite+aiosqlite"),
                          ("mysql+asyncmy://u@h/d", "mysql+asyncmy")]:
        assert db.database_url(_settings(tmp_path, database_url=given)).drivername == driver
    with pytest.raises(db.DatabaseError, match="COMZY_DATABASE_URL is not a database URL"):
        db.database_url(_settings(tmp_path, database_url="not a url"))


def test_masked_url_never_shows_the_password() -> None:
    assert db.masked_url("postgresql+asyncpg://u:secret@h:5432/d") == "postgresql+asyncpg://u:***@h:5432/d"
    assert db.masked_url("sqlite+aiosqlite:////tmp/comzy.db") == "sqlite+aiosqlite:////tmp/comzy.db"
    assert "secret" not in db.masked_url("::secret::")
    assert "secret" not in repr(_settings(Path("/tmp"), database_url="mysql://u:secret@h/d", db_password="secret"))


# -- comzy-server db ... ----------------------------------------------------------------------
def _db_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = cli_env(COMZY_DATA_DIR=str(tmp_path / "data"), **env)
    for name in ("DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME"):
        environment.pop(name, None)
    return subprocess.run([PYTHON, "-m", "comzy.core.cli", "db", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


def test_db_upgrade_and_current_commands(tmp_path: Path) -> None:
    before = _db_cli(tmp_path, "current")
    assert before.returncode == 0, before.stderr
    assert before.stdout.splitlines() == [
        f"database: sqlite+aiosqlite:///{tmp_path / 'data' / 'comzy.db'}",
        "core: revision none (no tables yet): run `comzy-server db upgrade`",
        "auth_token: revision none (no tables yet): run `comzy-server db upgrade`",
        "custom_domains: revision none (no tables yet): run `comzy-server db upgrade`",
        "mysql_logging: revision none (no tables yet): run `comzy-server db upgrade`"]

    upgraded = _db_cli(tmp_path, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.splitlines()[1:] == [f"{name}: upgraded from empty to {head} (head)"
                                                for name, head in HEAD.items()]
    assert upgraded.stderr == ""  # no Alembic chatter at the default log level

    after = _db_cli(tmp_path, "current")
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines()[1:] == [f"{name}: revision {head} (head)" for name, head in HEAD.items()]
    again = _db_cli(tmp_path, "upgrade")
    assert again.stdout.splitlines()[1:] == [f"{name}: already at {head} (head)" for name, head in HEAD.items()]


async def test_db_upgrade_makes_only_the_enabled_plugins_tables(tmp_path: Path) -> None:
    none = _db_cli(tmp_path, "upgrade", COMZY_PLUGINS="none")
    assert none.returncode == 0, none.stderr
    assert none.stdout.splitlines()[1:] == ["core: upgraded from empty to 0001 (head)"]
    engine = db.create_engine(db.database_url(_settings(tmp_path / "data")))
    try:
        assert await _table_names(engine) == {"alembic_version"}
        assert _db_cli(tmp_path, "current", COMZY_PLUGINS="none").stdout.splitlines()[1:] == [
            "core: revision 0001 (head)"]

        domains = _db_cli(tmp_path, "upgrade", COMZY_PLUGINS="custom_domains")
        assert domains.stdout.splitlines()[1:] == ["core: already at 0001 (head)",
                                                   "custom_domains: upgraded from empty to 0002 (head)"]
        assert await _table_names(engine) == {"alembic_version", "alembic_version_custom_domains", "custom_domains"}
        assert _db_cli(tmp_path, "current", COMZY_PLUGINS="custom_domains").stdout.splitlines()[1:] == [
            "core: revision 0001 (head)", "custom_domains: revision 0002 (head)"]
        assert _db_cli(tmp_path, "current", COMZY_PLUGINS="none").stdout.splitlines()[1:] == [
            "core: revision 0001 (head)",
            "custom_domains: revision 0002 (plugin not enabled: its tables are left as they are)"]
    finally:
        await engine.dispose()


def test_db_command_with_a_bad_plugin_setting_says_which(tmp_path: Path) -> None:
    result = _db_cli(tmp_path, "upgrade", COMZY_PLUGINS="auth_token", COMZY_AUTH_REFRESH_SECONDS="soon")
    assert result.returncode == 2
    assert "COMZY_AUTH_REFRESH_SECONDS" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "comzy.db").exists()


def test_db_command_on_an_unreachable_database_masks_the_password(tmp_path: Path) -> None:
    result = _db_cli(tmp_path, "current", COMZY_DATABASE_URL="mysql://root:s3cret-pw@127.0.0.1:1/comzy")
    assert result.returncode == 1
    assert "comzy-server: cannot use the database mysql+aiomysql://root:***@127.0.0.1:1/comzy" in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_db_command_needs_an_action(tmp_path: Path) -> None:
    result = _db_cli(tmp_path)
    assert result.returncode == 2
    assert "ACTION" in result.stderr


@pytest.mark.parametrize("schema", [db.CORE_SCHEMA, *PLUGIN_SCHEMAS], ids=lambda schema: schema.name)
def test_migrations_ship_in_the_wheel(schema: Schema) -> None:
    """Every file of the shared environment (comzy/migrations/) and of each tree's revisions is a
    module of a package or matches the package-data globs, so a non-editable install has them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    for directory in (db.MIGRATIONS_DIR, schema.migrations):
        for path in directory.rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            package = next(parent for parent in path.parents if (parent / "__init__.py").exists())
            globs = package_data.get(".".join(package.relative_to(ROOT).parts), [])
            shipped = any(path.relative_to(package).match(pattern) for pattern in globs) or (
                path.suffix == ".py" and path.parent == package)
            assert shipped, f"{path.relative_to(ROOT)} is not in [tool.setuptools.package-data]"
    assert sorted(path.name for path in schema.migrations.glob("*.py") if path.name != "__init__.py")
