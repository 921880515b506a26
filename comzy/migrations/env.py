"""Alembic environment shared by every schema: the core's tree and each plugin's.

Comzy (comzy/core/db.py) puts the :class:`~comzy.core.schema.Schema` being migrated in
``config.attributes["schema"]`` (its metadata and version table; its revision directory is the
config's ``version_locations``) and an open connection in ``config.attributes["connection"]``.
The plain ``alembic`` command (alembic.ini at the repository top) passes neither: it works on
the core's tree, with the URL from ``config.attributes["url"]``, ``sqlalchemy.url`` or, usually,
the same COMZY_DATABASE_URL / DB_* / data-directory resolution the server uses.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import URL, Connection, make_url, pool

from comzy.core.db import CORE_SCHEMA, create_engine, database_url
from comzy.core.schema import Schema
from comzy.core.settings import ServerSettings

config = context.config
schema: Schema = config.attributes.get("schema") or CORE_SCHEMA


def _url() -> URL:
    if config.attributes.get("url") is not None:
        return make_url(config.attributes["url"])
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return make_url(configured)
    return database_url(ServerSettings())


def _include_name(name: str | None, type_: str, _parent: object) -> bool:
    # Autogenerate compares this schema's tables only: the core's and the other plugins' tables
    # (and their version tables) share the database and must not show up as "removed".
    if type_ == "table":
        return name in schema.metadata.tables
    return True


def _configure(**options: object) -> None:
    context.configure(target_metadata=schema.metadata, version_table=schema.version_table,
                      include_name=_include_name, render_as_batch=True, compare_type=True, **options)


def run_with(connection: Connection) -> None:
    """Run the migrations on an open (synchronous facade of an async) connection."""
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_with)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run_with(config.attributes["connection"])
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(_run_online())
