"""``comzy-server example blocked|purge``: the blocked requests, from the same database as the server.

The plugin adds the command through the ``register_commands`` hook. The core runs it only
while the plugin is enabled (COMZY_PLUGINS), and otherwise says which plugin to enable.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from comzy import PluginError
from comzy.db import describe_error, prepare_database
from sqlalchemy.exc import SQLAlchemyError

from .models import SCHEMA
from .store import MAX_LIMIT, check_alias, check_limit, newest, purge

if TYPE_CHECKING:
    from comzy import CommandContext, Commands

DEFAULT_LIMIT = 20


def add_commands(commands: Commands) -> None:
    """``comzy-server example`` and its actions."""
    example = commands.add("example", run_example, help="requests the example plugin blocked",
                           description="Show or delete the requests the example plugin refused, kept in the "
                           "server's database (COMZY_DATABASE_URL, or DB_*, or comzy.db in COMZY_DATA_DIR).")
    actions = example.add_subparsers(dest="action", metavar="ACTION", required=True)
    blocked = actions.add_parser("blocked", help="print the newest blocked requests, newest first")
    blocked.add_argument("--alias", metavar="ALIAS", help="only those to this alias")
    blocked.add_argument("--limit", metavar="N", type=int, default=DEFAULT_LIMIT,
                         help=f"at most N (1-{MAX_LIMIT}; default {DEFAULT_LIMIT})")
    purge_parser = actions.add_parser("purge", help="delete the recorded blocked requests")
    purge_parser.add_argument("--alias", metavar="ALIAS", help="only those to this alias")


async def run_example(args: argparse.Namespace, context: CommandContext) -> int:
    """Run ``comzy-server example ACTION``: prints the outcome; the exit status.

    Bad input and an unusable database raise ``PluginError``: comzy-server prints its one line
    and exits 2.
    """
    try:
        alias = check_alias(args.alias) if args.alias is not None else None
        limit = check_limit(args.limit) if args.action == "blocked" else 0
    except ValueError as exc:
        raise PluginError(f"example {args.action}: {exc}") from None
    # The embedded SQLite upgrades itself here; another database must be at head already
    # (`comzy-server db upgrade`), which the DatabaseError (a PluginError) says.
    engine = await prepare_database(context.settings, SCHEMA)
    try:
        if args.action == "blocked":
            records = await newest(engine, alias, limit)
            if not records:
                print("no blocked requests recorded" + (f" for {alias}" if alias else ""))
            width = max((len(record.alias) for record in records), default=0)
            for record in records:
                when = datetime.fromtimestamp(record.blocked_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
                print(f"{when}  {record.alias:<{width}}  {record.client or '-':<15}  {record.method} {record.path}")
        else:
            deleted = await purge(engine, alias)
            print(f"deleted {deleted} blocked request{'' if deleted == 1 else 's'}"
                  + (f" of {alias}" if alias else ""))
        return 0
    except (SQLAlchemyError, OSError) as exc:  # a query failed: one line, not a traceback
        reason = describe_error(exc, engine.url)
        raise PluginError(f"example {args.action}: cannot use the database: {reason}") from None
    finally:
        await engine.dispose()
