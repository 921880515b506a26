"""The database: URL resolution, async engines, and the Alembic schema (upgrade, current, readiness).

Plugins that keep data call :func:`prepare_database` from ``on_startup``: it returns an engine
on a database whose schema is current. The embedded SQLite default upgrades itself; any other
database must be upgraded by its operator (``comzy-server db upgrade``), so a server never
changes a shared production schema on its own. The core server never touches a database.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import anyio
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from comzy.core import sqlite_file
from comzy.core.hooks import PluginError
from comzy.core.settings import ServerSettings

log = logging.getLogger("comzy.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_FILE = "comzy.db"
UPGRADE_HINT = "run `comzy-server db upgrade`"

# A URL without a driver (``postgresql://``) gets the async driver Comzy installs for it.
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
# The pip extra that brings each driver, for the "not installed" message.
DRIVER_EXTRAS = {"aiomysql": "mysql", "asyncmy": "mysql", "asyncpg": "postgres"}


class DatabaseError(PluginError):
    """The database cannot be used: unreachable, bad URL, missing driver, or schema not current.

    A :class:`PluginError`, so a plugin's ``on_startup`` that raises it stops the server with
    the message (and exit status 2). Messages never contain the password.
    """


# -- URLs ------------------------------------------------------------------------------
def database_url(settings: ServerSettings) -> URL:
    """The database to use: COMZY_DATABASE_URL; else MySQL from the seed's DB_* variables when
    DB_PASSWORD is set; else the SQLite file ``comzy.db`` in COMZY_DATA_DIR."""
    if settings.database_url is not None:
        try:
            url = make_url(settings.database_url.get_secret_value().strip())
        except ArgumentError:
            raise DatabaseError("COMZY_DATABASE_URL is not a database URL (expected e.g. "
                                "postgresql+asyncpg://user:password@host/comzy)") from None
        driver = ASYNC_DRIVERS.get(url.drivername)
        return url.set(drivername=driver) if driver else url
    if settings.db_password is not None and settings.db_password.get_secret_value():  # `DB_PASSWORD=`: unset
        return URL.create("mysql+aiomysql", username=settings.db_user,
                          password=settings.db_password.get_secret_value(), host=settings.db_host,
                          port=settings.db_port, database=settings.db_name, query={"charset": "utf8mb4"})
    return URL.create("sqlite+aiosqlite", database=str(settings.data_dir / SQLITE_FILE))


def masked_url(url: URL | str) -> str:
    """``url`` as text with its password replaced by ``***``: the only form that may be logged."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return "<not a database URL>"
    return url.render_as_string(hide_password=True)


def is_sqlite(url: URL) -> bool:
    """Whether ``url`` is an SQLite database (which Comzy upgrades by itself)."""
    return url.get_backend_name() == "sqlite"


# -- Engines ---------------------------------------------------------------------------
def create_engine(url: URL, **options: Any) -> AsyncEngine:
    """An async engine for ``url``: SQLite with foreign keys on and WAL, its file private (0600)
    and watched for deletion (:mod:`comzy.core.sqlite_file`); pooled connections of other
    databases checked before use, so a database that comes back is picked up again."""
    sqlite_path: Path | None = None
    if is_sqlite(url):
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            sqlite_path = Path(url.database)
            sqlite_file.prepare(sqlite_path)  # 0600 before SQLite opens it: it holds token hashes
        options.setdefault("connect_args", {"timeout": 30})
    else:
        options.setdefault("pool_pre_ping", True)
        options.setdefault("pool_recycle", 3600)  # below MySQL's default wait_timeout
        # A database that does not answer must fail a call in seconds, not hang it (and the pool).
        if "poolclass" not in options:  # NullPool and StaticPool take no pool_timeout
            options.setdefault("pool_timeout", 10)
        if url.get_backend_name() in ("mysql", "mariadb"):
            options.setdefault("connect_args", {"connect_timeout": 10})
        elif url.get_backend_name() == "postgresql":
            options.setdefault("connect_args", {"timeout": 10})
    try:
        engine = create_async_engine(url, **options)
    except ModuleNotFoundError as exc:
        extra = DRIVER_EXTRAS.get(exc.name or "", "all")
        raise DatabaseError(f"the database driver {exc.name!r} for {url.get_backend_name()} is not installed: "
                            f"pip install 'comzy[{extra}]'") from None
    except ArgumentError as exc:
        raise DatabaseError(f"cannot use the database {masked_url(url)}: {exc}") from None
    if is_sqlite(url):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    if sqlite_path is not None:
        sqlite_file.watch(engine, sqlite_path)  # a deleted file is reported, not silently split
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets `comzy-server users ...` write while the server reads.
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def describe_error(exc: BaseException, url: URL) -> str:
    """A one-line reason for a failed database operation, without SQL, traceback or password."""
    reason = str(exc.orig) if isinstance(exc, DBAPIError) and exc.orig is not None else str(exc)
    reason = " ".join(reason.split()) or type(exc).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


# -- Alembic ---------------------------------------------------------------------------
def alembic_config(url: URL | None = None) -> Config:
    """A programmatic Alembic configuration on the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # Not sqlalchemy.url: the config file parser would choke on a '%' in a password.
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest migration this version of Comzy ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found in " + str(MIGRATIONS_DIR)
    return head


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _run_alembic(connection: Connection, action: Any, *args: Any) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    action(config, *args)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: the newest)."""
    async with engine.begin() as connection:
        await connection.run_sync(_run_alembic, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    """Revert migrations down to ``revision`` (default: an empty schema)."""
    async with engine.begin() as connection:
        await connection.run_sync(_run_alembic, command.downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The database's schema revision; None for a database Comzy never migrated."""
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


def _not_current(url: URL, current: str | None, head: str) -> str:
    where = f"the database {masked_url(url)}"
    if current is None:
        return f"{where} has no Comzy schema yet: {UPGRADE_HINT}"
    return f"{where} is at schema revision {current}, this server needs {head}: {UPGRADE_HINT}"


async def prepare_database(settings: ServerSettings) -> AsyncEngine:
    """An engine on the configured database with its schema at head, for plugins' ``on_startup``.

    SQLite is upgraded here; MySQL/MariaDB/PostgreSQL behind head raise :class:`DatabaseError`
    telling the operator to run ``comzy-server db upgrade``. The caller disposes of the engine.
    """
    url = database_url(settings)
    engine = create_engine(url)
    try:
        current = await current_revision(engine)
        head = head_revision()
        if current == head:
            return engine
        if current is not None and current not in _known_revisions():
            raise DatabaseError(f"the database {masked_url(url)} is at schema revision {current}, which this "
                                "version of Comzy does not know (a newer version migrated it): upgrade Comzy")
        if not is_sqlite(url):
            raise DatabaseError(_not_current(url, current, head))
        await upgrade(engine)
        log.info("database %s upgraded from %s to %s", masked_url(url), current or "empty", head)
        return engine
    except DatabaseError:
        await engine.dispose()
        raise
    except (SQLAlchemyError, OSError) as exc:
        await engine.dispose()
        raise DatabaseError(f"cannot use the database {masked_url(url)}: {describe_error(exc, url)}") from None


# -- `comzy-server db ...` ---------------------------------------------------------------
async def _db_command(settings: ServerSettings, action: str) -> int:
    url = database_url(settings)
    engine = create_engine(url)
    try:
        print(f"database: {masked_url(url)}")
        current = await current_revision(engine)
        head = head_revision()
        if action == "upgrade":
            if current == head:
                print(f"already at {head} (head)")
            else:
                await upgrade(engine)
                print(f"upgraded from {current or 'empty'} to {head} (head)")
        elif action == "current":
            if current == head:
                print(f"revision: {head} (head)")
            elif current is None:
                print(f"revision: none (empty database): {UPGRADE_HINT}")
            else:
                print(f"revision: {current} (head is {head}): {UPGRADE_HINT}")
        else:
            raise ValueError(f"unknown db action {action!r}")
        return 0
    except (SQLAlchemyError, OSError, CommandError) as exc:
        print(f"comzy-server: cannot use the database {masked_url(url)}: {describe_error(exc, url)}",
              file=sys.stderr)
        return 1
    finally:
        await engine.dispose()


def run_db_command(settings: ServerSettings, action: str) -> int:
    """``comzy-server db upgrade|current``: prints the outcome; returns the exit status."""
    try:
        return anyio.run(_db_command, settings, action)
    except DatabaseError as exc:
        print(f"comzy-server: {exc}", file=sys.stderr)
        return 2
