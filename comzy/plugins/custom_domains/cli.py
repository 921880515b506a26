"""``comzy-server domains add|list|remove``: the custom domain mappings kept in the database.

A domain is served only by the tunnel of the user who owns its alias, so ``add`` refuses an alias
nobody owns and ``list`` marks such mappings. Who owns an alias is known only to the enabled
plugins that answer the ``alias_owner`` hook: this command starts exactly those (their
``on_startup``, with a server context whose listeners never run), asks them as the server would,
and shuts them down. It names no plugin and reads no other plugin's table.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import anyio
from sqlalchemy.exc import SQLAlchemyError

from comzy.core.db import DatabaseError, describe_error, masked_url, prepare_database
from comzy.core.hooks import HookRunner, PluginError, build_manager, load_plugins, select_plugins
from comzy.core.server import ServerContext
from comzy.core.settings import ServerSettings

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
from .settings import CustomDomainsSettings

#: How ``list`` marks a mapping whose alias nobody owns.
UNREACHABLE = "(no owner: unreachable)"


def _fail(message: str, status: int = 2) -> int:
    print(f"comzy-server: {message}", file=sys.stderr)
    return status


def _no_owners(settings: ServerSettings) -> str:
    return (f"no enabled plugin knows who owns an alias (COMZY_PLUGINS={settings.plugins or 'unset'}), so no "
            f"user can own one. {WHY_OWNED} Enable a plugin that answers the alias_owner hook, such as the "
            "built-in auth_token (on when COMZY_PLUGINS is unset).")


async def ask_owners(settings: ServerSettings, aliases: Iterable[str]) -> dict[str, str | None] | None:
    """Who owns each alias (None: nobody), as the server's plugins would answer; None when no
    enabled plugin answers ``alias_owner`` (then nobody can own an alias).

    Raises PluginError or DatabaseError when those plugins cannot start.
    """
    plugins = load_plugins(select_plugins(settings.plugins))
    answering = set(HookRunner(build_manager(settings.base_domain, plugins)).implementers("alias_owner"))
    if not answering:
        return None
    owners = [(name, plugin) for name, plugin in plugins if name in answering]
    hooks = HookRunner(build_manager(settings.base_domain, owners))
    server = ServerContext(settings, hooks, [name for name, _ in owners])
    answers: dict[str, str | None] = {}
    failure: Exception | None = None
    # Their start-up lines describe a server, which this command is not; warnings still show.
    chatter = logging.getLogger("comzy.plugins")
    level = chatter.level
    chatter.setLevel(max(logging.WARNING, chatter.getEffectiveLevel()))
    try:
        async with anyio.create_task_group() as tg:
            server.task_group = tg
            try:
                await hooks.on_startup(server)
                answers = {alias: hooks.alias_owner(alias, server) for alias in aliases}
            except Exception as exc:  # raised below: out of the task group, which would wrap it in a group
                failure = exc
            finally:
                with anyio.CancelScope(shield=True):
                    await hooks.on_shutdown(server)
                tg.cancel_scope.cancel()
    finally:
        chatter.setLevel(level)
    if failure is not None:
        raise failure
    return answers


async def _domains(settings: ServerSettings, action: str, host: str | None, alias: str | None) -> int:
    base = settings.base_domain
    try:
        if host is not None:
            host = check_host(host, base)
        if alias is not None:
            alias = check_alias(alias, allow_punycode=settings.allow_punycode_aliases)
    except MappingError as exc:
        return _fail(str(exc))
    engine = await prepare_database(settings)  # the embedded SQLite default upgrades itself
    try:
        if action == "add":
            assert host is not None and alias is not None
            owners = await ask_owners(settings, [alias])
            if owners is None:
                return _fail(f"{host} was not mapped: {_no_owners(settings)}")
            owner = owners[alias]
            if owner is None:
                return _fail(f"{host} was not mapped: no user owns the alias '{alias}'. {WHY_OWNED} "
                             f"{claim_hint(alias)} Then run this command again.", 1)
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
            owners = await ask_owners(settings, {a for _, a, _ in rows})
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            unreachable = 0
            for h, a, source in sorted(rows):
                owner = owners.get(a) if owners is not None else None
                unreachable += owner is None
                state = f"owned by {owner}" if owner is not None else UNREACHABLE
                print(f"{h:<{widths[0]}}  {a:<{widths[1]}}  {source:<{widths[2]}}  {state}")
            if owners is None:
                print(f"comzy-server: every custom domain is unreachable: {_no_owners(settings)}", file=sys.stderr)
            elif unreachable:
                # Rows stay listed (and in the database): an operator sees them and mends them.
                print(f"comzy-server: {unreachable} custom domain(s) unreachable: no user owns their alias. "
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


def run_domains_command(settings: ServerSettings, action: str, host: str | None = None,
                        alias: str | None = None) -> int:
    """``comzy-server domains add HOST ALIAS | list | remove HOST``: prints the outcome; the exit status."""
    try:
        return anyio.run(_domains, settings, action, host, alias)
    except (DatabaseError, PluginError) as exc:
        return _fail(str(exc))
