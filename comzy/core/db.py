"""The database: URL resolution, async engines, and the Alembic schemas (upgrade, current, readiness).

Every schema is its own Alembic tree with its own version table: the core's (``alembic_version``,
comzy/migrations/versions/, no tables yet) and one per plugin that keeps data (declared with
its ``database_schema`` hook as a :class:`~comzy.core.schema.Schema`). Plugins call
:func:`prepare_database` from ``on_startup``: it returns an engine on a database whose tables
for that plugin are current. The embedded SQLite default upgrades itself; any other database
must be upgraded by its operator (``comzy-server db upgrade``, which upgrades the core and the
enabled plugins only), so a server never changes a shared production schema on its own. The
core server never touches a database.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, MetaData, column, event, inspect, make_url, select
from sqlalchemy import table as table_clause
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from comzy.core import sqlite_file
from comzy.core.hooks import HookRunner, PluginError, build_manager, load_plugins, select_plugins
from comzy.core.models import NAMING_CONVENTION
from comzy.core.schema import CORE_VERSION_TABLE, VERSION_TABLE_PREFIX, Schema
from comzy.core.settings import ServerSettings

log = logging.getLogger("comzy.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_FILE = "comzy.db"
UPGRADE_HINT = "run `comzy-server db upgrade`"
#: The core's own tree: no tables yet (its baseline is where Comzy 0.1's single tree stood).
CORE_SCHEMA = Schema("core", MetaData(naming_convention=NAMING_CONVENTION), MIGRATIONS_DIR / "versions",
                     version_table=CORE_VERSION_TABLE)

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
            try:
                sqlite_file.use_wal(sqlite_path)
            except sqlite3.Error as exc:
                raise DatabaseError(f"cannot use the database {masked_url(url)}: {exc}") from None
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


# -- Alembic: one tree per schema ------------------------------------------------------
def alembic_config(schema: Schema = CORE_SCHEMA, url: URL | None = None) -> Config:
    """A programmatic Alembic configuration for ``schema``'s tree: the shared environment in
    comzy/migrations/ with the schema's revision directory and version table."""
    config = Config()
    config.set_main_option("script_location", _ini_value(MIGRATIONS_DIR))
    config.set_main_option("version_locations", _ini_value(schema.migrations))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["schema"] = schema
    if url is not None:
        # Not sqlalchemy.url: the config file parser would choke on a '%' in a password.
        config.attributes["url"] = url
    return config


def _ini_value(path: Path) -> str:
    return str(path).replace("%", "%%")  # Config options are interpolated


def _scripts(schema: Schema) -> ScriptDirectory:
    if not schema.migrations.is_dir():
        raise DatabaseError(f"{_tree(schema)} has no migrations directory {schema.migrations}")
    return ScriptDirectory.from_config(alembic_config(schema))


def head_revision(schema: Schema = CORE_SCHEMA) -> str:
    """The newest revision of ``schema``'s tree that this installation ships."""
    head = _scripts(schema).get_current_head()
    if head is None:
        raise DatabaseError(f"{_tree(schema)} has no migrations in {schema.migrations}")
    return head


def _tree(schema: Schema) -> str:
    return "the core's schema" if schema is CORE_SCHEMA else f"the plugin {schema.name}'s schema"


@dataclass(frozen=True)
class TreeState:
    """Where one schema's tree stands in a database."""

    schema: Schema
    current: str | None  # None: never migrated (no version table, or an empty one)
    head: str
    known: bool  # whether ``current`` is one of the tree's revisions (False: a newer Comzy migrated it)

    @property
    def at_head(self) -> bool:
        """Whether the tree needs nothing."""
        return self.current == self.head


def _state(connection: Connection, schema: Schema) -> TreeState:
    scripts = _scripts(schema)
    head = scripts.get_current_head()
    if head is None:
        raise DatabaseError(f"{_tree(schema)} has no migrations in {schema.migrations}")
    context = MigrationContext.configure(connection, opts={"version_table": schema.version_table})
    current = context.get_current_revision()
    known = current is None or any(script.revision == current for script in scripts.walk_revisions())
    return TreeState(schema, current, head, known)


def run_alembic(connection: Connection, schema: Schema, action: Any, *args: Any, **kwargs: Any) -> None:
    """Run the Alembic ``action`` (``alembic.command.upgrade``...) for ``schema``'s tree on an open
    connection (the synchronous facade of an async one: ``await connection.run_sync(...)``)."""
    config = alembic_config(schema)
    config.attributes["connection"] = connection
    action(config, *args, **kwargs)


async def upgrade(engine: AsyncEngine, schema: Schema, revision: str = "head") -> None:
    """Apply ``schema``'s migrations up to ``revision`` (default: the newest)."""
    async with engine.begin() as connection:
        await connection.run_sync(run_alembic, schema, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, schema: Schema, revision: str = "base") -> None:
    """Revert ``schema``'s migrations down to ``revision`` (default: none of its tables)."""
    async with engine.begin() as connection:
        await connection.run_sync(run_alembic, schema, command.downgrade, revision)


async def current_revision(engine: AsyncEngine, schema: Schema) -> str | None:
    """``schema``'s revision in the database; None where its tree was never migrated."""
    async with engine.connect() as connection:
        return (await connection.run_sync(_state, schema)).current


def _unknown(url: URL, state: TreeState) -> str:
    return (f"{_tree(state.schema)} in the database {masked_url(url)} is at revision {state.current}, which "
            "this version of Comzy does not know (a newer version migrated it): upgrade Comzy")


def _not_current(url: URL, state: TreeState) -> str:
    where = f"{_tree(state.schema)} in the database {masked_url(url)}"
    if state.current is None:
        return f"{where} has no tables yet: {UPGRADE_HINT}"
    return f"{where} is at revision {state.current}, this server needs {state.head}: {UPGRADE_HINT}"


async def _upgrade_trees(engine: AsyncEngine, url: URL, schemas: Sequence[Schema]) -> list[TreeState]:
    """Bring every tree of ``schemas`` to head, in order, in one transaction; returns their states
    from before. An unknown revision stops it before anything changes."""
    async with engine.connect() as connection:
        if is_sqlite(url):
            # Two processes upgrading one new SQLite file (a server starting while `comzy-server
            # users ...` runs) must not both see "no tables" and both create them: the write lock
            # is taken before the versions are read, and the upgrade commits as a whole.
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        states = [await connection.run_sync(_state, schema) for schema in schemas]
        for state in states:
            if not state.known:
                raise DatabaseError(_unknown(url, state))
        for state in states:
            if not state.at_head:
                await connection.run_sync(run_alembic, state.schema, command.upgrade, "head")
        await connection.commit()
    return states


async def upgrade_to_head(engine: AsyncEngine, schemas: Iterable[Schema]) -> None:
    """Bring the core's tree and each of ``schemas`` to head, as ``comzy-server db upgrade`` does."""
    url = engine.url
    await _upgrade_trees(engine, url, [CORE_SCHEMA, *(schema for schema in schemas if schema is not CORE_SCHEMA)])


async def prepare_database(settings: ServerSettings, schema: Schema) -> AsyncEngine:
    """An engine on the configured database with ``schema``'s tables (and the core's) at head,
    for a plugin's ``on_startup`` or command.

    SQLite is upgraded here; MySQL/MariaDB/PostgreSQL behind head raise :class:`DatabaseError`
    naming the plugin and telling the operator to run ``comzy-server db upgrade``, so a server
    never changes a shared production schema on its own. The caller disposes of the engine.
    """
    url = database_url(settings)
    engine = create_engine(url)
    trees = [CORE_SCHEMA, schema]
    try:
        if is_sqlite(url):
            for before in await _upgrade_trees(engine, url, trees):
                if not before.at_head:
                    log.info("database %s: %s upgraded from %s to %s", masked_url(url), _tree(before.schema),
                             before.current or "empty", before.head)
            return engine
        async with engine.connect() as connection:
            # The plugin's tree first: its name is what the operator needs to read.
            states = [await connection.run_sync(_state, tree) for tree in reversed(trees)]
        for state in states:
            if not state.known:
                raise DatabaseError(_unknown(url, state))
            if not state.at_head:
                raise DatabaseError(_not_current(url, state))
        return engine
    except DatabaseError:
        await engine.dispose()
        raise
    except (SQLAlchemyError, OSError, CommandError) as exc:
        await engine.dispose()
        raise DatabaseError(f"cannot use the database {masked_url(url)}: {describe_error(exc, url)}") from None


# -- `comzy-server db ...` ---------------------------------------------------------------
async def enabled_schemas(settings: ServerSettings) -> list[Schema]:
    """The schemas of the plugins COMZY_PLUGINS enables (see :func:`collect_schemas`)."""
    return await collect_schemas(load_plugins(select_plugins(settings.plugins)), settings.base_domain)


async def collect_schemas(plugins: Sequence[tuple[str, object]], base_domain: str) -> list[Schema]:
    """What ``plugins``' ``database_schema`` hooks answer, in their order. A plugin answering with
    something else than a Schema named after itself raises :class:`PluginError`."""
    runner = HookRunner(build_manager(base_domain, plugins))
    schemas: dict[str, Schema] = {}
    for plugin, schema in await runner.database_schemas():
        if not isinstance(schema, Schema):
            raise PluginError(f"plugin {plugin!r}: database_schema must return a comzy.Schema, "
                              f"not {type(schema).__name__}")
        if schema.name != plugin:
            raise PluginError(f"plugin {plugin!r}: its Schema is named {schema.name!r}; name it {plugin!r}, "
                              "as in COMZY_PLUGINS (it names the version table)")
        if schema.version_table == CORE_VERSION_TABLE or schema.version_table in {
                s.version_table for s in schemas.values()}:
            raise PluginError(f"plugin {plugin!r}: the version table {schema.version_table} is taken; "
                              f"leave Schema.version_table unset")
        schemas[plugin] = schema
    order = [name for name, _plugin in plugins]
    return sorted(schemas.values(), key=lambda schema: order.index(schema.name))


def _label(schema: Schema) -> str:
    return "core" if schema is CORE_SCHEMA else schema.name


async def _db_command(settings: ServerSettings, action: str) -> int:
    url = database_url(settings)
    trees = [CORE_SCHEMA, *await enabled_schemas(settings)]
    engine = create_engine(url)
    try:
        print(f"database: {masked_url(url)}")
        if action == "upgrade":
            for before in await _upgrade_trees(engine, url, trees):
                if before.at_head:
                    print(f"{_label(before.schema)}: already at {before.head} (head)")
                else:
                    print(f"{_label(before.schema)}: upgraded from {before.current or 'empty'} to {before.head} (head)")
        elif action == "current":
            async with engine.connect() as connection:
                states = [await connection.run_sync(_state, tree) for tree in trees]
                others = await connection.run_sync(_other_trees, {tree.version_table for tree in trees})
            for state in states:
                print(_describe_state(state))
            for table, revisions in others:
                print(f"{table.removeprefix(VERSION_TABLE_PREFIX)}: revision {revisions or 'none'} "
                      "(plugin not enabled: its tables are left as they are)")
        else:
            raise ValueError(f"unknown db action {action!r}")
        return 0
    except (SQLAlchemyError, OSError, CommandError) as exc:
        print(f"comzy-server: cannot use the database {masked_url(url)}: {describe_error(exc, url)}",
              file=sys.stderr)
        return 1
    finally:
        await engine.dispose()


def schema_states(connection: Connection, schemas: Sequence[Schema]) -> list[TreeState]:
    """Where each tree of ``schemas`` stands on ``connection``, read only (``comzy-server check``);
    on an async connection: ``await connection.run_sync(schema_states, schemas)``."""
    return [_state(connection, schema) for schema in schemas]


def describe_state(state: TreeState) -> str:
    """One line: a tree's revision and, when it is not current, what to do (run ``db upgrade``...)."""
    return _describe_state(state)


def _describe_state(state: TreeState) -> str:
    label = _label(state.schema)
    if state.at_head:
        return f"{label}: revision {state.head} (head)"
    if state.current is None:
        return f"{label}: revision none (no tables yet): {UPGRADE_HINT}"
    if not state.known:
        return (f"{label}: revision {state.current}, which this version of Comzy does not know "
                "(a newer version migrated it): upgrade Comzy")
    return f"{label}: revision {state.current} (head is {state.head}): {UPGRADE_HINT}"


def _other_trees(connection: Connection, enabled: set[str]) -> list[tuple[str, str]]:
    """Version tables of plugins that are not enabled (their trees stay as they are), with their revisions."""
    found = []
    for table in sorted(inspect(connection).get_table_names()):
        if table.startswith(VERSION_TABLE_PREFIX) and table not in enabled:
            rows = connection.execute(select(column("version_num")).select_from(table_clause(table)))
            found.append((table, ", ".join(sorted(row[0] for row in rows))))
    return found


def run_db_command(settings: ServerSettings, action: str) -> int:
    """``comzy-server db upgrade|current``: prints the outcome; returns the exit status."""
    try:
        return anyio.run(_db_command, settings, action)
    except PluginError as exc:  # DatabaseError included
        print(f"comzy-server: {exc}", file=sys.stderr)
        return 2
