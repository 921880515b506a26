"""Alias names: validation, random generation, and the core's subdomain parser."""

from __future__ import annotations

import re
import secrets

#: A DNS label: lowercase letters, digits and '-', 1-63 chars, no leading/trailing '-'.
ALIAS_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
#: 10 symbols of 36 is about 51.7 bits, above the 40-bit floor.
RANDOM_LENGTH = 10
#: The ACE prefix of punycode labels (RFC 3492, RFC 5890): browsers display them as Unicode.
PUNYCODE_PREFIX = "xn--"


def random_alias() -> str:
    """A fresh ``client-<random>`` alias with over 40 bits of entropy."""
    # One read of the OS random source, not one per character. 252 = 7 * 36, so taking
    # bytes below 252 modulo 36 keeps every symbol equally likely.
    symbols: list[str] = []
    while len(symbols) < RANDOM_LENGTH:
        symbols.extend(_ALPHABET[b % 36] for b in secrets.token_bytes(RANDOM_LENGTH * 2) if b < 252)
    return "client-" + "".join(symbols[:RANDOM_LENGTH])


def check_alias(name: str, reserved: frozenset[str], *, allow_punycode: bool = False) -> str | None:
    """Why ``name`` cannot be an alias, or None if it can.

    Names with '--' in the third and fourth places (``xn--...`` punycode, which browsers show
    as Unicode, and the other prefixes DNS reserves for internationalized labels) are refused
    unless ``allow_punycode`` (COMZY_ALLOW_PUNYCODE_ALIASES) is true.
    """
    if not ALIAS_RE.fullmatch(name):
        return (
            f"'{name}' is not a valid subdomain: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    if not allow_punycode and is_idna_reserved(name):
        return _idna_refusal(name)
    if name in reserved:
        return f"'{name}' is reserved on this server; choose another --subdomain"
    return None


def is_idna_reserved(name: str) -> bool:
    """Whether ``name`` has '--' in the third and fourth places: an ``xn--`` punycode label, or
    another prefix RFC 5890/5891 reserve for internationalized names ("R-LDH" labels)."""
    return name[2:4] == "--"


def _idna_refusal(name: str) -> str:
    hint = "choose another --subdomain (the operator may allow such names with COMZY_ALLOW_PUNYCODE_ALIASES)"
    if not name.startswith(PUNYCODE_PREFIX):
        return (f"'{name}' has '--' in the third and fourth places, which DNS reserves for internationalized "
                f"names (RFC 5891); {hint}")
    try:
        shown = name.encode("ascii").decode("idna")
    except UnicodeError:
        shown = ""
    # Shown only when every character prints: a bidi control would garble the agent's message.
    looks_like = f" (browsers show it as '{shown}')" if shown and shown.isprintable() else ""
    return (f"'{name}' is a punycode name{looks_like}: such names can look like other sites' names, so this "
            f"server refuses them; {hint}")


def subdomain_of(host: str, base_domain: str) -> str | None:
    """The single label in front of ``base_domain`` in ``host`` (lowercase, no port)."""
    suffix = "." + base_domain
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    if not label or "." in label:
        return None
    return label


def taken_over_reason(alias: str, user: str | None, client_address: str, previous_user: str | None) -> str:
    """The words for an agent whose alias another agent (of ``user``, from ``client_address``) took
    over; a control node of a cluster sends them with its eviction to the node that held it."""
    where = f"from {client_address}"
    if user is not None and user == previous_user:
        who = f"another agent logged in as {user} ({where})"
    else:
        who = f"another agent ({where}, with this tunnel's resume secret)"
    return f"{who} took over {alias}; only one agent serves an alias at a time"
