"""``python -m comzy.migrations revision``: write a new revision file for the core's or a plugin's tree.

For developers (operators run ``comzy-server db upgrade``). The plain ``alembic`` command knows
only the core's tree (alembic.ini); this one finds a plugin's tree through its
``database_schema`` hook, so it works for any installed plugin, built-in or not::

    python -m comzy.migrations revision --plugin example --autogenerate -m "add notes"

``--autogenerate`` compares the plugin's models with the database Comzy is configured for
(COMZY_DATABASE_URL, DB_*, or comzy.db in COMZY_DATA_DIR), which must be at the tree's head
first (``comzy-server db upgrade`` with the plugin enabled). Review what it writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio
from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from comzy.core.db import (
    CORE_SCHEMA,
    alembic_config,
    create_engine,
    database_url,
    describe_error,
    masked_url,
)
from comzy.core.hooks import HookRunner, PluginError, build_manager, load_plugins
from comzy.core.schema import Schema
from comzy.core.settings import ServerSettings


async def schema_of(plugin: str | None, settings: ServerSettings) -> Schema:
    """The core's schema (``plugin`` None) or the one the named installed plugin declares."""
    if plugin is None:
        return CORE_SCHEMA
    runner = HookRunner(build_manager(settings.base_domain, load_plugins([plugin])))
    for name, schema in await runner.database_schemas():
        if name == plugin and isinstance(schema, Schema):
            return schema
    raise PluginError(f"the plugin {plugin!r} declares no tables (its database_schema hook returns no Schema)")


def next_revision_id(schema: Schema) -> str:
    """``0001``, ``0002``...: the tree's revisions numbered in order, as Comzy's own are."""
    return f"{len(list(schema.migrations.glob('[0-9]*.py'))) + 1:04d}"


async def write_revision(settings: ServerSettings, schema: Schema, message: str, *, autogenerate: bool) -> Path:
    """Write the next revision of ``schema``'s tree (empty, or ``autogenerate``d against the
    configured database) into its migrations directory; returns the new file."""
    schema.migrations.mkdir(parents=True, exist_ok=True)  # a plugin's first revision
    revision_id = next_revision_id(schema)
    written: list[Any] = []
    if not autogenerate:
        written.append(command.revision(alembic_config(schema), message=message, rev_id=revision_id))
    else:
        url = database_url(settings)
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                written.append(await connection.run_sync(_revision_on, schema, message, revision_id))
        except SQLAlchemyError as exc:
            raise PluginError(f"cannot use the database {masked_url(url)}: {describe_error(exc, url)}") from None
        finally:
            await engine.dispose()
    script = written[0]
    return Path(script.path)


def _revision_on(connection: Connection, schema: Schema, message: str, revision_id: str) -> Any:
    config = alembic_config(schema)
    config.attributes["connection"] = connection
    return command.revision(config, message=message, autogenerate=True, rev_id=revision_id)


async def _run(settings: ServerSettings, plugin: str | None, message: str, autogenerate: bool) -> int:
    path = await write_revision(settings, await schema_of(plugin, settings), message, autogenerate=autogenerate)
    print(f"wrote {path}: review it, then run `comzy-server db upgrade`")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m comzy.migrations",
                                     description="Write a new Alembic revision for the core's or a plugin's tables.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    revision = actions.add_parser("revision", help="write a new revision file into the tree's directory")
    revision.add_argument("--plugin", metavar="NAME", help="the plugin whose tree it is (default: the core's)")
    revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    revision.add_argument("--autogenerate", action="store_true",
                          help="fill it in by comparing the models with the database (review the result)")
    args = parser.parse_args(argv)
    try:
        return anyio.run(_run, ServerSettings(), args.plugin, args.message, args.autogenerate)
    except (PluginError, CommandError) as exc:
        print(f"python -m comzy.migrations: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
