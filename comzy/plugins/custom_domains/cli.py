"""``comzy-server domains add|list|remove``: the custom domain mappings kept in the database."""

from __future__ import annotations

import sys

import anyio
from sqlalchemy.exc import SQLAlchemyError

from comzy.core.db import DatabaseError, describe_error, masked_url, prepare_database
from comzy.core.settings import ServerSettings

from .domains import MappingError, add_mapping, check_alias, check_host, load_mappings, parse_mappings, remove_mapping
from .settings import CustomDomainsSettings


def _fail(message: str) -> int:
    print(f"comzy-server: {message}", file=sys.stderr)
    return 2


async def _domains(settings: ServerSettings, action: str, host: str | None, alias: str | None) -> int:
    base = settings.base_domain
    try:
        if host is not None:
            host = check_host(host, base)
        if alias is not None:
            alias = check_alias(alias)
    except MappingError as exc:
        return _fail(str(exc))
    engine = await prepare_database(settings)  # the embedded SQLite default upgrades itself
    try:
        if action == "add":
            assert host is not None and alias is not None
            previous = await add_mapping(engine, host, alias)
            if previous is None:
                print(f"added {host} -> {alias}")
            elif previous == alias:
                print(f"{host} already maps to {alias}; nothing changed")
            else:
                print(f"{host} existed (-> {previous}); updated to {host} -> {alias}")
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
                from_env = parse_mappings(CustomDomainsSettings().mappings, base)
            except MappingError as exc:
                print(f"comzy-server: invalid CUSTOM_DOMAINS in the environment: {exc}", file=sys.stderr)
                from_env = {}
            rows = [(h, a, "database") for h, a in stored.items() if h not in from_env]
            rows += [(h, a, "CUSTOM_DOMAINS") for h, a in from_env.items()]
            if not rows:
                print("no custom domains (add one with `comzy-server domains add HOST ALIAS`)")
            width = max((len(h) for h, _, _ in rows), default=0)
            for h, a, source in sorted(rows):
                print(f"{h:<{width}}  {a}  ({source})")
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
    except DatabaseError as exc:
        return _fail(str(exc))
