"""Hosts outside the base domain served by an alias: from CUSTOM_DOMAINS and the database."""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from comzy import ForwardRequest, Periodic, PluginError, Reject, Schema, Tunnel, hookimpl

from .domains import (
    MappingError,
    check_alias,
    check_host,
    claim_hint,
    load_mappings,
    parse_mappings,
    reservation,
)
from .settings import MAPPINGS_VARIABLES, CustomDomainsSettings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from comzy import Commands, ServerContext

log = logging.getLogger("comzy.plugins.custom_domains")


def _not_active(host: str) -> str:
    """The core's Tunnel Not Active page, in its words: a visitor cannot tell the two apart."""
    safe = html.escape(host)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Tunnel Not Active</title></head>"
        f"<body><h1>Tunnel Not Active</h1><p>No tunnel is connected for <b>{safe}</b>.</p>"
        "<p>If this is your tunnel, start the agent again: <code>comzy PORT</code>.</p></body></html>\n"
    )


class CustomDomains:
    """Answers ``resolve_host`` for custom hosts from a dict in memory.

    The dict joins the environment's mappings (which win) and the database's; a background
    task re-reads the database every ``refresh_seconds``, so ``comzy-server domains add`` from
    another process takes effect without a restart. The request path never touches the database.

    A mapped alias is kept for the user who owns it (``alias_reserved``): the core gives it to
    nobody else, and to nobody at all while no user owns it. Such a mapping is unreachable (404)
    rather than open to whichever agent asks first; a warning names it.
    """

    def __init__(self, settings: CustomDomainsSettings | None = None) -> None:
        self.settings = settings or CustomDomainsSettings()
        self.hosts: dict[str, str] = {}
        #: Mapped alias -> the first of its hosts (``alias_reserved`` answers from it).
        self.reserved: dict[str, str] = {}
        #: (host, alias) mappings whose alias no user owns, as last checked (each warned about once).
        self.ownerless: set[tuple[str, str]] = set()
        self._server: ServerContext | None = None
        self._from_env: dict[str, str] = {}
        self._engine: AsyncEngine | None = None
        self._failing = False
        self._skipped: set[str] = set()
        # Re-reads the database for the server's lifetime (made at start-up).
        self._refresher: Periodic | None = None
        self.refreshes = 0

    @hookimpl
    def resolve_host(self, host: str) -> str | None:
        """The alias mapped to ``host`` (lowercase, without port), or None."""
        return self.hosts.get(host)

    @hookimpl
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel, server: ServerContext) -> None:
        """A custom domain reaches only its alias owner's tunnel: whatever path another tunnel took to
        the alias, its visitor gets the Tunnel Not Active page (404), as if none were connected.

        Checked here, where the tunnel is always known, not in ``resolve_host``: a cluster edge may
        not have the tunnel at hand when it resolves the host (docs/design/cluster.md 2.6).
        """
        if self.hosts.get(request.host) != request.alias:
            return  # not a custom-domain request
        owner = server.hooks.alias_owner(request.alias, server)
        if owner is None or tunnel.user != owner:
            raise Reject(f"{request.host} serves {request.alias} only through its owner's tunnel", 404,
                         _not_active(request.host), [(b"content-type", b"text/html; charset=utf-8")])

    @hookimpl
    def alias_reserved(self, alias: str) -> str | None:
        """Why a mapped alias is kept for its owner ("it serves the custom domain HOST"), or None."""
        host = self.reserved.get(alias)
        return reservation(host) if host is not None else None

    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        """``comzy-server domains`` (cli.py)."""
        from .cli import add_commands  # its modules load only for comzy-server's commands

        add_commands(commands)

    @hookimpl
    def database_schema(self) -> Schema:
        """``custom_domains`` (models.py), with its migrations."""
        from .models import SCHEMA

        return SCHEMA

    # Last: the plugins that know who owns each alias (alias_owner) have loaded it by then.
    @hookimpl(trylast=True)
    async def on_startup(self, server: ServerContext) -> None:
        """Check CUSTOM_DOMAINS, open the database, load every mapping, warn about those whose alias
        nobody owns, start the refresher."""
        from comzy.db import prepare_database  # SQLAlchemy loads only with the plugin

        try:
            self._from_env = parse_mappings(self.settings.mappings, server.settings.base_domain,
                                            allow_punycode=server.settings.allow_punycode_aliases)
        except MappingError as exc:
            raise PluginError(f"custom_domains: invalid {' (or '.join(reversed(MAPPINGS_VARIABLES))}): {exc}") from None
        self._engine = await prepare_database(server.settings, self.database_schema())
        self._server = server
        await self.refresh(server.settings.base_domain)
        log.info("custom domains: %d mapped (%d from CUSTOM_DOMAINS)", len(self.hosts), len(self._from_env))
        base_domain = server.settings.base_domain
        self._refresher = Periodic(lambda: self.refresh(base_domain), self.settings.refresh_seconds)
        self._refresher.start(server.task_group)

    @hookimpl
    async def on_shutdown(self) -> None:
        """Stop the refresher (never in the middle of a query), then dispose of the database engine."""
        if self._refresher is not None:
            await self._refresher.stop()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def refresh(self, base_domain: str) -> None:
        """Re-read the database's mappings and swap in the new map; on a database error keep the old one."""
        engine = self._engine
        if engine is None:
            return
        try:
            stored = await load_mappings(engine)
        except (SQLAlchemyError, OSError) as exc:
            if not self._failing:
                log.warning("custom domains: cannot read the database (%s); keeping the %d known mappings",
                            type(exc).__name__, len(self.hosts))
            self._failing = True
            return
        if self._failing:
            log.info("custom domains: the database is readable again")
            self._failing = False
        hosts: dict[str, str] = {}
        allow_punycode = self._server is not None and self._server.settings.allow_punycode_aliases
        for host, alias in stored.items():
            try:
                hosts[check_host(host, base_domain)] = check_alias(alias, allow_punycode=allow_punycode)
            except MappingError as exc:  # e.g. written before COMZY_BASE_DOMAIN changed
                if host not in self._skipped:
                    self._skipped.add(host)
                    log.warning("custom domains: ignoring the stored mapping of %s: %s", host, exc)
        hosts.update(self._from_env)
        reserved: dict[str, str] = {}
        for host, alias in sorted(hosts.items()):
            reserved.setdefault(alias, host)
        # Swapped together, with no await in between: no registration sees a mapped alias unreserved.
        self.reserved = reserved
        self.hosts = hosts  # one assignment: resolve_host never sees a half-built map
        self._check_owners()
        self.refreshes += 1

    def _check_owners(self) -> None:
        """Warn once per mapping whose alias no user owns (and say when one is served again)."""
        server = self._server
        if server is None:
            return
        ownerless = {(host, alias) for host, alias in self.hosts.items()
                     if server.hooks.alias_owner(alias, server) is None}
        if ownerless - self.ownerless and not server.hooks.implementers("alias_owner"):
            log.warning("custom domains: no enabled plugin knows who owns an alias (COMZY_PLUGINS=%s), so every "
                        "custom domain is unreachable; enable one (`comzy-server plugins` lists each plugin's hooks)",
                        ",".join(server.plugin_names) or "none")
        for host, alias in sorted(ownerless - self.ownerless):
            log.warning("custom domains: %s -> %s is unreachable (404): no user owns the alias %s, and an alias "
                        "a custom domain maps to is kept for its owner, so no agent may take it. Map %s to an "
                        "alias a user owns, or remove the mapping, have the user claim %s and map it again. %s",
                        host, alias, alias, host, alias, claim_hint(alias))
        for host, alias in sorted(self.ownerless - ownerless):
            if self.hosts.get(host) == alias:
                log.info("custom domains: %s -> %s has an owner again: served by their tunnel", host, alias)
        self.ownerless = ownerless
