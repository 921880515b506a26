"""``comzy-server domains add|list|remove``: the custom domain mappings kept in the database.

A domain is served only by the tunnel of the user who owns its alias, so ``add`` refuses an alias
nobody owns and ``list`` marks such mappings. Who owns an alias is known only to the enabled
plugins that answer the ``alias_owner`` hook: this command starts exactly those
(``CommandContext.start_plugins``, with a server context whose listeners never run), asks them as
the server would, and shuts them down. It names no plugin and reads no other plugin's table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from comzy.db import DatabaseError, describe_error, masked_url, prepare_database

from .domains import (
    WHY_OWNED,
    MappingError,
    add_mapping,
    check_alias,
    check_host,
    claim_hint,
    load_mappings,
    parse_mappings,
    remove_mapping,
)
from .models import SCHEMA
from .settings import CustomDomainsSettings

if TYPE_CHECKING:
    from comzy import CommandContext, Commands

#: How ``list`` marks a mapping whose alias nobody owns.
UNREACHABLE = "(no owner: unreachable)"


def add_commands(commands: Commands) -> None:
    """``comzy-server domains`` and its actions."""
    domains = commands.add("domains", run_domains, help="custom domains served by an alias",
                           description="Manage the custom domain mappings kept in the database "
                           "(COMZY_DATABASE_URL, or DB_*, or comzy.db in COMZY_DATA_DIR).",
                           epilog="examples:\n"
                           "  comzy-server domains add shop.example.com ana-shop   serve it with ana-shop's tunnel\n"
                           "  comzy-server domains list                             every mapping\n"
                           "  comzy-server domains remove shop.example.com\n\n"
                           "The alias must be owned by a user (comzy-server users create, then her `comzy login`\n"
                           "and `comzy PORT --subdomain ana-shop`); a running server picks changes up within\n"
                           "COMZY_CUSTOM_DOMAINS_REFRESH_SECONDS. Point the host's DNS at the server.")
    actions = domains.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="serve HOST with ALIAS's tunnel (updates an existing HOST)")
    add.add_argument("host", metavar="HOST", help="a host outside the base domain, e.g. app.example.com")
    add.add_argument("alias", metavar="ALIAS", help="the alias whose tunnel serves it")
    actions.add_parser("list", help="print every mapping")
    actions.add_parser("remove", help="stop serving HOST").add_argument("host", metavar="HOST")


async def run_domains(args: argparse.Namespace, context: CommandContext) -> int:
    """``comzy-server domains add HOST ALIAS | list | remove HOST``: prints the outcome; the exit status."""
    try:
        return await _domains(context, args.action, getattr(args, "host", None), getattr(args, "alias", None))
    except DatabaseError as exc:
        return _fail(str(exc))


def _fail(message: str, status: int = 2) -> int:
    print(f"comzy-server: {message}", file=sys.stderr)
    return status


def _no_owners(context: CommandContext) -> str:
    return (f"no enabled plugin knows who owns an alias (COMZY_PLUGINS={context.settings.plugins or 'unset'}), "
            f"so no user can own one. {WHY_OWNED} Enable a plugin that answers the alias_owner hook "
            "(`comzy-server plugins` lists the installed plugins and the hooks of each).")


def _users_hint(context: CommandContext) -> str:
    owners = ", ".join(context.implementers("alias_owner"))
    return (f"Users come from the plugin that knows who owns an alias ({owners}): `comzy-server --help` lists "
            "its commands.")


async def ask_owners(context: CommandContext, aliases: Iterable[str]) -> dict[str, str | None] | None:
    """Who owns each alias (None: nobody), as the server's plugins would answer; None when no
    enabled plugin answers ``alias_owner`` (then nobody can own an alias).

    Raises PluginError or DatabaseError when those plugins cannot start.
    """
    if not context.implementers("alias_owner"):
        return None
    async with context.start_plugins("alias_owner") as server:
        return {alias: server.hooks.alias_owner(alias, server) for alias in aliases}


async def _domains(context: CommandContext, action: str, host: str | None, alias: str | None) -> int:
    settings = context.settings
    base = settings.base_domain
    try:
        if host is not None:
            host = check_host(host, base)
        if alias is not None:
            alias = check_alias(alias, allow_punycode=settings.allow_punycode_aliases)
    except MappingError as exc:
        return _fail(str(exc))
    engine = await prepare_database(settings, SCHEMA)  # the embedded SQLite default upgrades itself
    try:
        if action == "add":
            assert host is not None and alias is not None
            owners = await ask_owners(context, [alias])
            if owners is None:
                return _fail(f"{host} was not mapped: {_no_owners(context)}")
            owner = owners[alias]
            if owner is None:
                return _fail(f"{host} was not mapped: no user owns the alias '{alias}'. {WHY_OWNED} "
                             f"{claim_hint(alias)} {_users_hint(context)} Then run this command again.", 1)
            previous = await add_mapping(engine, host, alias)
            if previous is None:
                print(f"added {host} -> {alias} (owned by {owner})")
            elif previous == alias:
                print(f"{host} already maps to {alias} (owned by {owner}); nothing changed")
            else:
                print(f"{host} existed (-> {previous}); updated to {host} -> {alias} (owned by {owner})")
            print("a running server picks it up within COMZY_CUSTOM_DOMAINS_REFRESH_SECONDS (5 s by default); "
                  f"point the DNS record of {host} at the server")
        elif action == "remove":
            assert host is not None
            previous = await remove_mapping(engine, host)
            if previous is None:
                print(f"comzy-server: no custom domain {host} in the database (`comzy-server domains list`)",
                      file=sys.stderr)
                return 1
            print(f"removed {host} (was -> {previous})")
        elif action == "list":
            stored = await load_mappings(engine)
            try:
                from_env = parse_mappings(CustomDomainsSettings().mappings, base,
                                          allow_punycode=settings.allow_punycode_aliases)
            except MappingError as exc:
                print(f"comzy-server: invalid CUSTOM_DOMAINS in the environment: {exc}", file=sys.stderr)
                from_env = {}
            rows = [(h, a, "(database)") for h, a in stored.items() if h not in from_env]
            rows += [(h, a, "(CUSTOM_DOMAINS)") for h, a in from_env.items()]
            if not rows:
                print("no custom domains (add one with `comzy-server domains add HOST ALIAS`)")
                return 0
            owners = await ask_owners(context, {a for _, a, _ in rows})
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            unreachable = 0
            for h, a, source in sorted(rows):
                owner = owners.get(a) if owners is not None else None
                unreachable += owner is None
                state = f"owned by {owner}" if owner is not None else UNREACHABLE
                print(f"{h:<{widths[0]}}  {a:<{widths[1]}}  {source:<{widths[2]}}  {state}")
            if owners is None:
                print(f"comzy-server: every custom domain is unreachable: {_no_owners(context)}", file=sys.stderr)
            elif unreachable:
                # Rows stay listed (and in the database): an operator sees them and mends them.
                problem = "1 custom domain is unreachable: no user owns its alias" if unreachable == 1 else \
                    f"{unreachable} custom domains are unreachable: no user owns their alias"
                print(f"comzy-server: {problem}. "
                      f"{WHY_OWNED} Map each to an alias a user owns, or remove it, have the user claim the "
                      "alias and map it again.", file=sys.stderr)
        else:
            raise ValueError(f"unknown domains action {action!r}")
        return 0
    except (SQLAlchemyError, OSError) as exc:
        url = engine.url
        print(f"comzy-server: cannot use the database {masked_url(url)}: {describe_error(exc, url)}",
              file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
