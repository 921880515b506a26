"""Custom domain mappings: validation of hosts and aliases, parsing CUSTOM_DOMAINS, and the database rows."""

from __future__ import annotations

import re

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy.aliases import ALIAS_RE
from comzy.aliases import check_alias as core_check_alias

from .models import CustomDomain

# One DNS label: letters, digits and '-', 1-63 characters, no '-' at either end (after lowercasing).
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_HOST_LENGTH = 253


class MappingError(ValueError):
    """A host or alias that cannot be mapped; the message says why, for a person."""


def check_host(host: str, base_domain: str) -> str:
    """``host`` normalised (lowercase, no trailing dot); :class:`MappingError` when it is not a DNS
    name outside the base domain."""
    name = host.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if "://" in name or "/" in name:
        raise MappingError(f"'{host}' is not a host name: give the bare host, e.g. app.example.com")
    if ":" in name:
        raise MappingError(f"'{host}' is not a host name: give it without a port, e.g. app.example.com")
    labels = name.split(".")
    if (not name or len(name) > MAX_HOST_LENGTH or not all(_LABEL_RE.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise MappingError(f"'{host}' is not a valid host name: use DNS labels of letters, digits and '-' "
                           "separated by dots, e.g. app.example.com")
    base = base_domain.lower().rstrip(".")
    if name == base:
        raise MappingError(f"'{name}' is the base domain {base} itself; it cannot be a custom domain")
    if name.endswith("." + base):
        raise MappingError(f"'{name}' is under the base domain {base}: the server already routes "
                           f"<alias>.{base} by itself; custom domains are hosts outside it")
    return name


def check_alias(alias: str, *, allow_punycode: bool = False) -> str:
    """``alias`` normalised (lowercase); :class:`MappingError` when it is not a valid alias, or is an
    xn-- (punycode) name that COMZY_ALLOW_PUNYCODE_ALIASES does not allow (no agent could take it)."""
    name = alias.strip().lower()
    if not ALIAS_RE.fullmatch(name):
        raise MappingError(f"'{alias}' is not a valid alias: use 1-63 lowercase letters, digits and '-', "
                           "not starting or ending with '-'")
    # The core's rule and wording for look-alike names: no tunnel could take such an alias.
    problem = core_check_alias(name, frozenset(), allow_punycode=allow_punycode)
    if problem:
        raise MappingError(problem)
    return name


def parse_mappings(text: str, base_domain: str, *, allow_punycode: bool = False) -> dict[str, str]:
    """``shop.example.com:ana-shop,docs.example.net:bob-docs`` as ``{host: alias}``.

    :class:`MappingError` names the first bad entry; empty entries are skipped.
    """
    mappings: dict[str, str] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, sep, alias = entry.rpartition(":")
        if not sep or not host.strip() or not alias.strip():
            raise MappingError(f"entry '{entry}' is not HOST:ALIAS (e.g. shop.example.com:ana-shop)")
        try:
            name = check_host(host, base_domain)
            mappings[name] = check_alias(alias, allow_punycode=allow_punycode)
        except MappingError as exc:
            raise MappingError(f"entry '{entry}': {exc}") from None
    return mappings


# -- Ownership ---------------------------------------------------------------------------------
#: Why a mapped alias must be owned, for messages: the reason behind every refusal below.
WHY_OWNED = ("A custom domain is served only by the tunnel of the user who owns its alias, so that no "
             "other agent can take the alias and serve the domain.")


def claim_hint(alias: str) -> str:
    """How a user comes to own ``alias``, with the agent's commands (which plugin keeps users is not
    this plugin's business: any that answers ``alias_owner`` will do)."""
    return (f"To claim {alias}: its user, logged in with `comzy login`, runs `comzy PORT --subdomain {alias}` "
            "once (`comzy aliases` lists the aliases they own).")


def reservation(host: str) -> str:
    """The ``alias_reserved`` answer for an alias that ``host`` maps to (agents see it when refused)."""
    return f"it serves the custom domain {host}"


# -- The custom_domains table ---------------------------------------------------------------
async def load_mappings(engine: AsyncEngine) -> dict[str, str]:
    """Every mapping in the database, ``{host: alias}``."""
    async with engine.connect() as connection:
        rows = await connection.execute(select(CustomDomain.host, CustomDomain.alias))
        return {host: alias for host, alias in rows}


async def add_mapping(engine: AsyncEngine, host: str, alias: str) -> str | None:
    """Map ``host`` (already checked) to ``alias``, replacing an existing mapping; the alias it had before."""
    async with engine.begin() as connection:
        previous = (await connection.execute(
            select(CustomDomain.alias).where(CustomDomain.host == host))).scalar_one_or_none()
        if previous is None:
            await connection.execute(insert(CustomDomain).values(host=host, alias=alias))
        elif previous != alias:
            await connection.execute(
                update(CustomDomain).where(CustomDomain.host == host).values(alias=alias))
        return previous


async def remove_mapping(engine: AsyncEngine, host: str) -> str | None:
    """Remove the mapping of ``host``; the alias it had, or None when there was none."""
    async with engine.begin() as connection:
        previous = (await connection.execute(
            select(CustomDomain.alias).where(CustomDomain.host == host))).scalar_one_or_none()
        if previous is not None:
            await connection.execute(delete(CustomDomain).where(CustomDomain.host == host))
        return previous
