"""RFC 7239 ``Forwarded``: reading a trusted proxy's header and writing the edge's own element.

``Forwarded: for=192.0.2.43;proto=https;host=app.example, for="[2001:db8::17]:4711"`` lists one
element per proxy hop, the nearest hop last. Parsing is strict about the grammar (RFC 7239 4):
anything malformed makes the whole header count as absent, never an error for the visitor, since
the edge cannot tell which part of a broken header a proxy meant. Cost: one pass checks the whole
header and records where each element starts (4 bytes per element of at least 4 characters);
elements are then read on demand, from the right, each at most twice. Only the registered
parameters are kept (``for``, ``by``, ``proto``, ``host``), so a hostile header of thousands of
parameters costs linear time and memory within its own size (which the header size limit bounds).
"""

from __future__ import annotations

import ipaddress
import re
from array import array
from collections.abc import Iterable

#: token (RFC 9110 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: quoted-string (RFC 9110 5.6.4): qdtext or a quoted-pair, nothing else (no control characters).
_QUOTED = re.compile(r'"((?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*)"')
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_OWS = re.compile(r"[ \t]*")
#: What not even a quoted-string can carry.
_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
#: node-port (RFC 7239 6): a port number or an obfuscated one.
_NODE_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")
#: obfnode (RFC 7239 6.3).
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")
#: The registered parameters (RFC 7239 5); each at most once per element.
PARAMETERS = ("for", "by", "proto", "host")
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
            pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]  # [ \t]* always matches
            if pos < len(text) and text[pos] not in ",;":
                name, value, pos = _pair(text, pos)  # type: ignore[misc]  # checked in parse_forwarded
                if name in PARAMETERS:
                    out[name] = value
                pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]
            if pos >= len(text) or text[pos] == ",":
                return out
            pos += 1

    def hops(self) -> Iterable[str]:
        """Each element's ``for`` node as an X-Forwarded-For entry: its address (without port), an
        obfuscated ``_name`` as written, else 'unknown' (never text that could read as more hops)."""
        for index in range(len(self)):
            node = self.element(index).get("for", "unknown")
            yield node_address(node) or (node if _OBFUSCATED.fullmatch(node) else "unknown")


def _pair(text: str, pos: int) -> tuple[str, str, int] | None:
    """``token=value`` at ``pos``: (lower-case name, unquoted value, where it ends), or None."""
    name = _TOKEN.match(text, pos)
    if name is None or name.end() >= len(text) or text[name.end()] != "=":
        return None
    start = name.end() + 1
    quoted = _QUOTED.match(text, start)
    if quoted is not None:
        return name.group().lower(), _QUOTED_PAIR.sub(r"\1", quoted.group(1)), quoted.end()
    token = _TOKEN.match(text, start)
    if token is None:
        return None
    return name.group().lower(), token.group(), token.end()


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
    pos, element_start, seen = 0, 0, set()
    while True:
        pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]  # [ \t]* always matches
        if pos < len(text) and text[pos] not in ",;":
            pair = _pair(text, pos)
            if pair is None:
                return None
            name, _, pos = pair
            if name in PARAMETERS:  # only these four are tracked: the set stays tiny
                if name in seen:
                    return None  # RFC 7239 4: a parameter MUST NOT occur twice in an element
                seen.add(name)
            pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]
            if not starts or starts[-1] != element_start:
                starts.append(element_start)  # an element with at least one pair
        if pos >= len(text):
            return ForwardedChain(text, starts) if starts else None
        if text[pos] == ",":
            pos += 1
            element_start, seen = pos, set()
        elif text[pos] == ";":
            pos += 1
        else:
            return None


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
