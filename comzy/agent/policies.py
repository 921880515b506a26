"""Traffic policies the stock agent asks the server to enforce: ``--basic-auth``, ``--rate-limit``.

A policy is data for a server plugin (HELLO ``plugins``) plus that plugin's name in HELLO
``require``, so a server that cannot enforce it refuses the tunnel instead of opening it
unprotected (docs/protocol.md, "Policies"). The server's side is the ``basic_auth`` plugin; the
agent never imports it (the agent knows plugins only by the data it sends), so the format below is
the contract, documented in comzy/plugins/basic_auth/README.md.

Passwords never leave this process in clear: each one is sent as a salted scrypt hash, made once
at start-up (the same data serves every reconnect).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from comzy.core.logs import printable

#: The server plugin that enforces ``--basic-auth``.
BASIC_AUTH = "basic_auth"
#: The server plugin that enforces ``--rate-limit``.
RATE_LIMIT = "rate_limit"
#: scrypt's cost: N=2^14, r=8, p=1 (16 MiB and about 50 ms per hash on a 2020s core), the
#: parameters scrypt's paper gives for interactive logins. The server accepts N up to 2^15.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: At most this many ``--basic-auth`` credentials (the server accepts no more).
MAX_CREDENTIALS = 32
#: A password shorter than this is refused: the hash is only as strong as the password.
MIN_PASSWORD = 8
MAX_FIELD = 255


def parse_credential(text: str) -> tuple[str, str]:
    """``user:password`` split at the first ``:``; ValueError says what is wrong (without the password)."""
    user, colon, password = text.partition(":")
    if not colon:
        raise ValueError("--basic-auth takes USER:PASSWORD (a ':' between them)")
    if not user:
        raise ValueError("--basic-auth needs a user name before the ':'")
    if len(user) > MAX_FIELD or not user.isprintable():
        raise ValueError(f"--basic-auth user names are printable text of at most {MAX_FIELD} characters")
    if not MIN_PASSWORD <= len(password) <= MAX_FIELD:
        raise ValueError(f"--basic-auth passwords need {MIN_PASSWORD} to {MAX_FIELD} characters "
                         f"(user '{user}': {len(password)})")
    return user, password


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    """scrypt of the password's UTF-8 bytes: what the server's plugin computes from a visitor's."""
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=64 * 1024 * 1024)


@dataclass
class BasicAuth:
    """``--basic-auth USER:PASSWORD`` (repeatable) and ``--basic-auth-forward``."""

    credentials: list[tuple[str, str]] = field(default_factory=list)
    forward: bool = False

    @classmethod
    def parse(cls, texts: list[str], forward: bool) -> BasicAuth:
        """From the command line; ValueError for a malformed credential or too many."""
        if len(texts) > MAX_CREDENTIALS:
            raise ValueError(f"at most {MAX_CREDENTIALS} --basic-auth credentials")
        return cls([parse_credential(text) for text in texts], forward)

    @property
    def users(self) -> list[str]:
        """The user names, each once, in order."""
        return list(dict.fromkeys(user for user, _ in self.credentials))

    def plugin_data(self) -> dict[str, Any]:
        """The ``basic_auth`` plugin's HELLO data: per credential, the user, a random salt and the
        scrypt hash (both base64), with the cost; never a password."""
        entries = []
        for user, password in self.credentials:
            salt = os.urandom(SALT_BYTES)
            entries.append({"user": user, "salt": _b64(salt), "hash": _b64(hash_password(password, salt))})
        return {"scheme": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "credentials": entries,
                "forward": self.forward}

    def describe(self) -> str:
        """The policy in force, for the line under the public URL."""
        forward = "forwarded" if self.forward else "not forwarded"
        return f"basic auth for {', '.join(self.users)} (the Authorization header is {forward} to the local app)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: The server plugin that enforces ``--cidr-allow`` and ``--cidr-deny``.
IP_FILTER = "ip_filter"
#: At most this many ``--cidr-allow`` and as many ``--cidr-deny`` networks (the server accepts no more).
MAX_CIDRS = 64


def parse_cidr(text: str, flag: str) -> str:
    """One ``--cidr-allow``/``--cidr-deny`` network (IPv4 or IPv6; a bare address is one host) in its
    normal form; ValueError says what is wrong, and what was probably meant."""
    text = text.strip()
    try:
        if "%" not in text:
            return str(ipaddress.ip_network(text))
    except ValueError:
        pass
    try:
        # An IPv6 zone (fe80::1%eth0) names a link of this machine, not of the server's.
        network = ipaddress.ip_network(text if "%" not in text else "", strict=False)
    except ValueError:
        raise ValueError(f"{flag} '{printable(text)}' is not an IP network: give a CIDR such as 203.0.113.0/24 "
                         "or 2001:db8::/32, or a single address") from None
    host = text.split("/", 1)[0]
    raise ValueError(f"{flag} '{printable(text)}' has bits set after the prefix length: did you mean {network} "
                     f"(the whole network) or {host}/{network.max_prefixlen} (that one address)?")


@dataclass(frozen=True)
class IpFilter:
    """``--cidr-allow CIDR`` and ``--cidr-deny CIDR`` (repeatable), with ngrok's meaning: a client
    address in a denied network is refused; with any allowed network, only addresses in one pass."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @classmethod
    def parse(cls, allow: list[str], deny: list[str]) -> IpFilter:
        """From plain lists of strings (the command line, a config file); ValueError says what is wrong."""
        for texts, flag in ((allow, "--cidr-allow"), (deny, "--cidr-deny")):
            if len(texts) > MAX_CIDRS:
                raise ValueError(f"at most {MAX_CIDRS} {flag} networks (got {len(texts)})")
        return cls(tuple(dict.fromkeys(parse_cidr(text, "--cidr-allow") for text in allow)),
                   tuple(dict.fromkeys(parse_cidr(text, "--cidr-deny") for text in deny)))

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def plugin_data(self) -> dict[str, Any]:
        """The ``ip_filter`` plugin's HELLO data: the networks in their normal form."""
        return {"allow": list(self.allow), "deny": list(self.deny)}

    def describe(self) -> str:
        """The policy in force, for the line under the public URL."""
        allow, deny = ", ".join(self.allow), ", ".join(self.deny)
        if not self.deny:
            return f"IP filter: allow {allow} (other addresses get 403)"
        if not self.allow:
            return f"IP filter: deny {deny} (403)"
        return f"IP filter: allow {allow}; deny {deny} (deny wins; other addresses get 403)"


#: The server plugin that enforces the ``--request-header-*`` and ``--response-header-*`` rules.
HEADERS = "headers"
#: At most this many names (or ``name: value`` pairs) in each of the four header flags.
MAX_HEADER_RULES = 32
MAX_HEADER_NAME = 128
MAX_HEADER_VALUE = 2048
#: The names and values of all the added headers together: the rules travel in HELLO, whose
#: plugin data is at most 16 KiB.
MAX_HEADER_BYTES = 8192
#: What a header rule may not touch: the hop-by-hop and framing headers (the edge and the HTTP
#: servers frame every message from them), Host (it routes the request: --host-header rewrite
#: changes what the local app gets) and the WebSocket handshake (redone by the agent).
FRAMING_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "proxy-authenticate", "proxy-authorization", "sec-websocket-key",
    "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept", "sec-websocket-protocol",
})
#: An RFC 9110 field name (a token) and field value (visible ASCII, spaces and tabs inside).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def header_name(text: str, flag: str) -> str:
    """A header rule's name, lowercased; ValueError says what is wrong."""
    if not _TOKEN.fullmatch(text) or len(text) > MAX_HEADER_NAME:
        raise ValueError(f"{flag} '{printable(text)}' is not a header name: use letters, digits and "
                         f"!#$%&'*+-.^_`|~ (at most {MAX_HEADER_NAME}), without spaces or ':'")
    name = text.lower()
    if name in FRAMING_HEADERS:
        hint = " (--host-header rewrite sends the local address instead)" if name == "host" else ""
        raise ValueError(f"{flag} cannot change {text}: the tunnel itself routes and frames messages with it{hint}")
    return name


def header_pair(text: str, flag: str) -> tuple[str, str]:
    """``name: value`` as (lowercased name, value without surrounding spaces); ValueError says what is wrong."""
    name, colon, value = text.partition(":")
    if not colon:
        raise ValueError(f"{flag} takes 'NAME: VALUE' (a ':' between them), not '{printable(text)}'")
    value = value.strip(" \t")
    if len(value) > MAX_HEADER_VALUE or not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"{flag} {printable(name)}: the value must be printable ASCII (spaces and tabs inside; no "
                         f"line breaks or control characters), at most {MAX_HEADER_VALUE} characters")
    return header_name(name.strip(" \t"), flag), value


@dataclass(frozen=True)
class HeaderEdits:
    """The headers to remove (every field of each name) and then to add (in order), one direction."""

    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def data(self) -> dict[str, Any]:
        """As the ``headers`` plugin reads it: ``{"add": [[name, value], ...], "remove": [name, ...]}``."""
        return {"add": [list(pair) for pair in self.add], "remove": list(self.remove)}

    def names(self) -> str:
        """``-name`` for each removal and ``+name`` for each addition (never the values, which may be secrets)."""
        return ", ".join([*(f"-{name}" for name in self.remove), *(f"+{name}" for name, _ in self.add)])


@dataclass(frozen=True)
class HeaderRules:
    """``--request-header-add 'NAME: VALUE'``, ``--request-header-remove NAME`` and the two
    ``--response-header-*`` flags (repeatable, ngrok's names). Removal comes first, so removing and
    adding one name replaces it; names are case-insensitive."""

    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()

    @classmethod
    def parse(cls, request_add: list[str], request_remove: list[str], response_add: list[str],
              response_remove: list[str]) -> HeaderRules:
        """From plain lists of strings (the command line, a config file); ValueError says what is wrong."""
        lists = {"--request-header-add": request_add, "--request-header-remove": request_remove,
                 "--response-header-add": response_add, "--response-header-remove": response_remove}
        for flag, texts in lists.items():
            if len(texts) > MAX_HEADER_RULES:
                raise ValueError(f"at most {MAX_HEADER_RULES} {flag} rules (got {len(texts)})")
        rules = cls(_edits(request_add, request_remove, "request"), _edits(response_add, response_remove, "response"))
        size = sum(len(n) + len(v) for edits in (rules.request, rules.response) for n, v in edits.add)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"the added headers come to {size} characters; at most {MAX_HEADER_BYTES} in all")
        return rules

    def __bool__(self) -> bool:
        return any((self.request.add, self.request.remove, self.response.add, self.response.remove))

    def plugin_data(self) -> dict[str, Any]:
        """The ``headers`` plugin's HELLO data."""
        return {"request": self.request.data(), "response": self.response.data()}

    def describe(self) -> str:
        """The policy in force, for the line under the public URL (names only)."""
        parts = [f"{side} {edits.names()}" for side, edits in (("request", self.request), ("response", self.response))
                 if edits.add or edits.remove]
        return f"headers: {'; '.join(parts)}"


def _edits(add: list[str], remove: list[str], side: str) -> HeaderEdits:
    pairs = tuple(header_pair(text, f"--{side}-header-add") for text in add)
    names = (header_name(text.strip(" \t"), f"--{side}-header-remove") for text in remove)
    return HeaderEdits(pairs, tuple(dict.fromkeys(names)))


#: ``--rate-limit``'s units (ngrok-like spellings), in seconds; the server accepts these three periods.
RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hr": 3600, "hour": 3600}
#: How a period is written back (the agent's line under the URL, the server's summaries).
RATE_UNIT_NAMES = {1: "s", 60: "min", 3600: "h"}
#: The most requests a ``--rate-limit`` may name (the server accepts no more).
MAX_RATE_REQUESTS = 1_000_000
_RATE = re.compile(r"\s*(\d{1,7})\s*(?:/|\s+per\s+)\s*([a-z]+)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class RateLimit:
    """``--rate-limit N/min`` (or ``N/s``, ``N/h``): at most N requests per period from each client
    address to this tunnel, a burst of N then one every period/N. The server's own limit, when it
    has one, applies as well: an owner can only lower it."""

    requests: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """From ``N/s``, ``N/min`` or ``N/h`` (also ``N/second``, ``N/minute``, ``N/hour``, ``N per min``);
        ValueError says what is wrong. A plain function of a string, for the command line and config files."""
        match = _RATE.fullmatch(text)
        name = match[2].lower() if match else ""
        unit = RATE_UNITS.get(name) or (RATE_UNITS.get(name[:-1]) if len(name) > 2 and name[-1] == "s" else None)
        if match is None or unit is None:
            raise ValueError(f"--rate-limit takes N/s, N/min or N/h (e.g. 60/min), not {text!r}")
        requests = int(match[1])
        if not 1 <= requests <= MAX_RATE_REQUESTS:
            raise ValueError(f"--rate-limit needs 1 to {MAX_RATE_REQUESTS:,} requests per period, not {requests}")
        return cls(requests, unit)

    def __str__(self) -> str:
        return f"{self.requests}/{RATE_UNIT_NAMES[self.seconds]}"

    def plugin_data(self) -> dict[str, Any]:
        """The ``rate_limit`` plugin's HELLO data."""
        return {"requests": self.requests, "seconds": self.seconds}

    def describe(self) -> str:
        """The policy in force, for the line under the public URL."""
        return f"rate limit {self} per client address (over it: 429 Too Many Requests)"
