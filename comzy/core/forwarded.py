"""RFC 7239 ``Forwarded``: reading a trusted proxy's header and writing the edge's own element.

``Forwarded: for=192.0.2.43;proto=https;host=app.example, for="[2001:db8::17]:4711"`` lists one
element per proxy hop, the nearest hop last. Parsing is strict about the grammar (RFC 7239 4):
anything malformed makes the whole header count as absent, never an error for the visitor, since
the edge cannot tell which part of a broken header a proxy meant. Cost: one pass checks the whole
header (one regular-expression match per pair) and records where each element starts (4 bytes
per element of at least 4 characters); elements are then read on demand, each at most twice. Only the registered
parameters are kept (``for``, ``by``, ``proto``, ``host``), so a hostile header of thousands of
parameters costs linear time and memory within its own size (which the header size limit bounds).
"""

from __future__ import annotations

import ipaddress
import re
from array import array
from collections.abc import Iterable

#: token (RFC 9110 5.6.2).
_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_TOKEN = re.compile(_TOKEN_CHARS)
#: quoted-string's inside (RFC 9110 5.6.4): qdtext or a quoted-pair, nothing else (no control characters).
_QUOTED_BODY = r"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*+"
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
#: One list item: an optional ``name=value`` (token or quoted value), then the ``;`` or ``,`` that
#: ends it, or the end of the text; whitespace around. One match per pair keeps the scan in C.
#: Possessive quantifiers: a failing match never retries other splits of the same characters.
_ITEM = re.compile(rf'[ \t]*+(?:({_TOKEN_CHARS})=(?:({_TOKEN_CHARS})|"({_QUOTED_BODY})"))?[ \t]*+([,;]|\Z)')
#: What not even a quoted-string can carry.
_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
#: node-port (RFC 7239 6): a port number or an obfuscated one.
_NODE_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")
#: obfnode (RFC 7239 6.3).
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")
#: The registered parameters (RFC 7239 5); each at most once per element.
PARAMETERS = ("for", "by", "proto", "host")
_BITS = {name: 1 << index for index, name in enumerate(PARAMETERS)}
#: What the proxy's ``proto`` may say for the edge to believe it (anything else is ignored).
SCHEMES = frozenset({"http", "https"})


class ForwardedChain:
    """A well-formed ``Forwarded`` header (all its lines as one list), read element by element.

    ``element(0)`` is the hop farthest from the edge (the client's side), ``element(len - 1)`` the
    one the edge's own peer added.
    """

    __slots__ = ("_starts", "_text")

    def __init__(self, text: str, starts: array[int]) -> None:
        self._text = text
        self._starts = starts

    def __len__(self) -> int:
        return len(self._starts)

    def element(self, index: int) -> dict[str, str]:
        """The registered parameters of element ``index`` (lower-case names, unquoted values)."""
        text, pos, out = self._text, self._starts[index], {}
        while True:
            item = _ITEM.match(text, pos)
            assert item is not None  # the whole text matched in parse_forwarded
            name, value, quoted, separator = item.groups()
            if name is not None and (key := name.lower()) in PARAMETERS:
                out[key] = value if value is not None else _unquote(quoted)
            if separator != ";":
                return out
            pos = item.end()

    def hops(self) -> Iterable[str]:
        """Each element's ``for`` node as an X-Forwarded-For entry: its address (without port), an
        obfuscated ``_name`` as written, else 'unknown' (never text that could read as more hops)."""
        for index in range(len(self)):
            node = self.element(index).get("for", "unknown")
            yield node_address(node) or (node if _OBFUSCATED.fullmatch(node) else "unknown")


def _unquote(quoted: str) -> str:
    return _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted


def parse_forwarded(values: Iterable[bytes]) -> ForwardedChain | None:
    """The ``Forwarded`` header's lines as one chain; None when there are none, when no element
    has a parameter, or when anything is malformed (it then counts as absent).

    Checked: tokens and quoted strings (with their escapes), ``=`` with nothing around it, ``;``
    between pairs and ``,`` between elements (optional whitespace around both, empty list items
    allowed as in any HTTP list), and no registered parameter twice in one element.
    """
    text = ",".join(value.decode("latin-1") for value in values)
    if not text:
        return None
    starts: array[int] = array("I")
    pos, element_start, seen = 0, 0, 0
    while True:
        item = _ITEM.match(text, pos)
        if item is None:
            return None
        name, separator = item.group(1), item.group(4)
        if name is not None:
            bit = _BITS.get(name.lower(), 0)  # only the registered four are tracked
            if seen & bit:
                return None  # RFC 7239 4: a parameter MUST NOT occur twice in an element
            seen |= bit
            if not starts or starts[-1] != element_start:
                starts.append(element_start)  # an element with at least one pair
        if not separator:  # the end of the text
            return ForwardedChain(text, starts) if starts else None
        pos = item.end()
        if separator == ",":
            element_start, seen = pos, 0


def node_address(node: str) -> str | None:
    """The IP address a ``for``/``by`` node names, without its port; None for ``unknown``, an
    obfuscated ``_name`` or anything malformed (RFC 7239 6: IPv6 in brackets, in quotes)."""
    if node.startswith("["):
        host, bracket, port = node[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _NODE_PORT.fullmatch(port[1:]))):
            return None
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    host, colon, port = node.partition(":")
    if colon and not _NODE_PORT.fullmatch(port):
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def format_value(value: str) -> str | None:
    """``value`` as a token, or quoted (``"`` and ``\\`` escaped) when it is not one; None when a
    quoted string cannot carry it (control characters)."""
    if _TOKEN.fullmatch(value):
        return value
    if _UNQUOTABLE.search(value):
        return None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_node(address: str) -> str:
    """A ``for`` node for an IP address: IPv6 in brackets and quotes (RFC 7239 6), 'unknown' for none."""
    if not address:
        return "unknown"
    return f'"[{address}]"' if ":" in address else address


def element(peer: str, scheme: str, host: str) -> str:
    """The edge's own element: the hop it saw (its peer, that connection's scheme, the Host)."""
    pairs = [f"for={format_node(peer)}", f"proto={scheme}"]
    quoted_host = format_value(host) if host else None
    if quoted_host is not None:
        pairs.append(f"host={quoted_host}")
    return ";".join(pairs)
