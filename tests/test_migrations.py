"""The database layer: URL resolution, Alembic migrations up and down on SQLite, MariaDB and
PostgreSQL, models and migrations in agreement, start-up readiness, and ``comzy-server db``.

MariaDB (root, no password, 127.0.0.1:3306, database ``test``) and PostgreSQL (postgres, trust,
127.0.0.1:5432, database ``test``) run on the developers' machines and in CI (DEVELOPERS.md);
COMZY_TEST_MARIADB_URL / COMZY_TEST_POSTGRES_URL point elsewhere. Unreachable, their tests are
skipped with the reason, except under CI=true where they fail. Each test works in a database of
its own, created for it and dropped afterwards, so concurrent runs never meet.
"""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, inspect, make_url, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from comzy.core import db
from comzy.core.models import ApiRequest, Base, CustomDomain, User, UserAlias
from comzy.core.settings import ServerSettings
from tests.conftest import PYTHON, ROOT, cli_env, start_server
from tests.helpers import scratch_database as _scratch

pytestmark = pytest.mark.anyio

TABLES = {"users", "user_aliases", "api_requests", "custom_domains"}


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
    """An engine on ``database``; whatever a test leaves migrated is downgraded to base."""
    engine = db.create_engine(database)
    try:
        yield engine
        if await db.current_revision(engine) is not None:
            await db.downgrade(engine, "base")
    finally:
        await engine.dispose()


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _model_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _settings(tmp_path: Path, **values: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, data_dir=tmp_path, **values)


@pytest.fixture(autouse=True)
def _no_seed_database(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME"):
        monkeypatch.delenv(name, raising=False)


# -- Migrations on every database ---------------------------------------------------------
async def test_migrations_up_and_down(engine: AsyncEngine) -> None:
    assert await db.current_revision(engine) is None
    await db.upgrade(engine)
    assert await db.current_revision(engine) == db.head_revision()
    async with engine.connect() as connection:
        assert await connection.run_sync(_tables) == TABLES | {"alembic_version"}

    await db.downgrade(engine, "base")
    assert await db.current_revision(engine) is None
    async with engine.connect() as connection:
        assert await connection.run_sync(_tables) <= {"alembic_version"}

    await db.upgrade(engine)  # and up again, from base
    assert await db.current_revision(engine) == db.head_revision()


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    await db.upgrade(engine)
    async with engine.connect() as connection:
        diff = await connection.run_sync(_model_diff)
    assert diff == [], "comzy/core/models.py and comzy/migrations disagree; add a migration:\n" + "\n".join(
        map(str, diff))


async def test_schema_holds_data_and_constraints(engine: AsyncEngine) -> None:
    await db.upgrade(engine)
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


# -- Start-up readiness -----------------------------------------------------------------------
async def test_embedded_sqlite_upgrades_itself(tmp_path: Path) -> None:
    engine = await db.prepare_database(_settings(tmp_path / "data"))
    try:
        assert (tmp_path / "data" / "comzy.db").is_file()
        assert await db.current_revision(engine) == db.head_revision()
    finally:
        await engine.dispose()
    engine = await db.prepare_database(_settings(tmp_path / "data"))  # already current: nothing to do
    await engine.dispose()


@pytest.mark.parametrize("service", ["postgres", "mariadb"])
async def test_unmigrated_server_database_refuses_start(service: str, tmp_path: Path) -> None:
    async for url in _scratch(service):
        secret_url = url.set(password="s3cret-pw") if service == "postgres" else url  # trust auth ignores it
        settings = _settings(tmp_path, database_url=secret_url.render_as_string(hide_password=False))
        with pytest.raises(db.DatabaseError, match=r"run `comzy-server db upgrade`") as info:
            await db.prepare_database(settings)
        assert "has no Comzy schema yet" in str(info.value)
        assert "s3cret-pw" not in str(info.value)
        engine = db.create_engine(url)
        try:
            assert await db.current_revision(engine) is None  # refused without touching it
            await db.upgrade(engine, "head")
            ready = await db.prepare_database(settings)
            await ready.dispose()
            await db.downgrade(engine, "base")
        finally:
            await engine.dispose()


async def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path, database_url="postgresql://comzy:s3cret-pw@127.0.0.1:1/comzy")
    with pytest.raises(db.DatabaseError, match=r"cannot use the database postgresql\+asyncpg://comzy:\*\*\*@") as info:
        await db.prepare_database(settings)
    assert "s3cret-pw" not in str(info.value)


async def test_plain_server_touches_no_database(tmp_path: Path) -> None:
    async with start_server(tmp_path):
        pass
    assert not (tmp_path / "comzy.db").exists()


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
    head = db.head_revision()
    before = _db_cli(tmp_path, "current")
    assert before.returncode == 0, before.stderr
    assert "revision: none (empty database): run `comzy-server db upgrade`" in before.stdout
    assert f"database: sqlite+aiosqlite:///{tmp_path / 'data' / 'comzy.db'}" in before.stdout

    upgraded = _db_cli(tmp_path, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from empty to {head} (head)" in upgraded.stdout
    assert upgraded.stderr == ""  # no Alembic chatter at the default log level

    after = _db_cli(tmp_path, "current")
    assert after.returncode == 0, after.stderr
    assert f"revision: {head} (head)" in after.stdout
    again = _db_cli(tmp_path, "upgrade")
    assert f"already at {head} (head)" in again.stdout


def test_db_command_on_an_unreachable_database_masks_the_password(tmp_path: Path) -> None:
    result = _db_cli(tmp_path, "current", COMZY_DATABASE_URL="mysql://root:s3cret-pw@127.0.0.1:1/comzy")
    assert result.returncode == 1
    assert "comzy-server: cannot use the database mysql+aiomysql://root:***@127.0.0.1:1/comzy" in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_db_command_needs_an_action(tmp_path: Path) -> None:
    result = _db_cli(tmp_path)
    assert result.returncode == 2
    assert "ACTION" in result.stderr


def test_migrations_ship_in_the_wheel() -> None:
    """Every file under comzy/migrations/ is a module or matches the package-data globs, so a
    non-editable install has them (a wheel built from this tree lists them all)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["comzy.migrations"]
    for path in db.MIGRATIONS_DIR.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(db.MIGRATIONS_DIR)
        shipped = any(relative.match(pattern) for pattern in globs) or (
            path.suffix == ".py" and (path.parent / "__init__.py").exists())
        assert shipped, f"comzy/migrations/{relative} is not in [tool.setuptools.package-data]"
