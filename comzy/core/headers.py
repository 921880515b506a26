"""What the edge does to a visitor's request head before it crosses the tunnel (and to a response
head on its way back): hop-by-hop headers, strict body framing, origin-form targets, and the
X-Forwarded-* and ``Forwarded`` headers with their trust rule (RFC 7239's grammar is in
forwarded.py). Pure functions on header lists, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from comzy.core.forwarded import SCHEMES, ForwardedChain, node_address, parse_forwarded
from comzy.core.forwarded import element as forwarded_element

Headers = list[tuple[bytes, bytes]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Hop-by-hop headers (RFC 9110 7.6.1) never cross the tunnel.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)
#: The WebSocket handshake is redone by the agent towards the local service.
WS_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
     b"sec-websocket-accept", b"sec-websocket-protocol"}
)
#: End-to-end headers the tunnel relies on: naming them in ``Connection`` does not remove them
#: (``Connection: host`` would otherwise reach the local app without a Host, and
#: ``Connection: content-length`` would unframe a body).
PROTECTED = frozenset({b"host", b"content-length"})
#: What a visitor may claim about the client or the original request (frameworks such as
#: Werkzeug's ProxyFix or Rails honour each); kept only from a trusted proxy.
FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-prefix",
    b"x-forwarded-ssl", b"x-forwarded-scheme", b"x-forwarded-server", b"x-real-ip", b"forwarded",
})


def strip_hop_by_hop(headers: Headers, extra: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without hop-by-hop ones, including those the Connection header names (except
    the ``PROTECTED`` ones)."""
    # Runs twice per request (its head and its response's): one pass with one lower() per header
    # drops the usual set; a second pass only when a Connection header names more, or ``extra``.
    kept = []
    named: set[bytes] | None = None
    for pair in headers:
        name = pair[0].lower()
        if name in _DROPPED:
            if name == b"connection":
                named = connection_tokens(pair[1], named)
            continue
        kept.append(pair)
    if named is None:
        named = set()
    if extra or not named <= HOP_BY_HOP:
        drop = (HOP_BY_HOP | named | extra) - PROTECTED
        kept = [(n, v) for n, v in kept if n.lower() not in drop]
    return kept


#: What strip_hop_by_hop drops when no Connection header names more (``Connection: keep-alive``).
_DROPPED = HOP_BY_HOP - PROTECTED


def host_of(headers: Headers) -> str:
    """The Host header's host, lowercase and without a port ('' if absent)."""
    return host_name(host_header(headers))


def host_name(value: bytes) -> str:
    """A Host header value's host, lowercase and without a port."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def host_header(headers: Headers) -> bytes:
    """The raw Host header value (empty if absent)."""
    for name, value in headers:
        if name == b"host":
            return value
    return b""


class FramingError(ValueError):
    """A request head whose body framing is refused (400); the message says why, for the visitor."""


def announces_body(headers: Headers) -> bool | None:
    """From a request head: whether a body follows; None when the head does not say (no
    Content-Length, no Transfer-Encoding: HTTP/2 and HTTP/3 need not announce a body).

    Raises FramingError for Content-Length together with Transfer-Encoding: that is how request
    smuggling starts, the two ends of a connection each believing a different one (RFC 9112 6.3
    allows a server to refuse it, and a proxy must never forward both).
    """
    chunked = False
    length: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and length is not None:
        raise FramingError("Content-Length and Transfer-Encoding together are refused (RFC 9112 6.3).\n")
    if chunked:
        return True
    return None if length is None else length.strip() not in (b"0", b"")


#: The names :func:`plain_request_headers` looks at; every other header passes in one set test.
_PLAIN_NOTED = HOP_BY_HOP | FORWARDING | {b"host", b"content-length"}


def plain_request_headers(headers: Headers, trusted: bool) -> tuple[Headers, bytes, int] | None:
    """For a request head as httptools gives it (names in lower case): the headers to forward, its
    Host value and :func:`head_size` of its headers, in one pass, or None for a head the edge's
    plain path leaves to the ASGI app (a body announced, Transfer-Encoding at all, or not exactly
    one Host).

    The headers are :func:`strip_hop_by_hop`'s, and from a peer that is not ``trusted`` also
    without the forwarding ones :func:`add_forwarded` drops (the caller adds the edge's own then);
    from a trusted one they are kept for :func:`add_forwarded`. Each header costs one set test:
    ``strip_hop_by_hop``, ``announces_body``, ``host_header`` and ``add_forwarded`` each went
    over every header, lowering each name twice.
    """
    kept: Headers = []
    host: bytes | None = None
    named: set[bytes] | None = None
    size = 4 * len(headers)
    for pair in headers:
        name, value = pair
        size += len(name) + len(value)  # here: a generator over the headers cost twice as much
        if name not in _PLAIN_NOTED:
            kept.append(pair)
        elif name == b"host":
            if host is not None:
                return None  # OneHostOnly's 400
            host = value
            kept.append(pair)
        elif name == b"content-length":
            if value.strip() not in (b"0", b""):
                return None
            kept.append(pair)
        elif name == b"transfer-encoding":
            return None  # a body, or with Content-Length the 400 of announces_body
        elif name == b"connection":
            named = connection_tokens(value, named)
        elif trusted and name in FORWARDING:
            kept.append(pair)
    if host is None:
        return None  # OneHostOnly's 400 (HTTP/1.1), or HTTP/1.0 without a Host: not a tunnel's
    if named is not None and not named <= HOP_BY_HOP:
        drop = (HOP_BY_HOP | named) - PROTECTED
        kept = [pair for pair in kept if pair[0] not in drop]
    return kept, host, size


def head_size(headers: Headers) -> int:
    """What a request head's headers count towards COMZY_MAX_REQUEST_HEAD (its target adds its length)."""
    return sum(len(n) + len(v) + 4 for n, v in headers)


def connection_tokens(value: bytes, named: set[bytes] | None = None) -> set[bytes]:
    """The names a Connection header's ``value`` lists, lower case, added to ``named`` (a new set)."""
    if b"," not in value:  # one token, as nearly every Connection header has (keep-alive, close)
        token = value.strip().lower()
        return {token} if named is None else named | {token}
    tokens = {token.strip().lower() for token in value.split(b",")}
    return tokens if named is None else named | tokens


def origin_form(target: bytes) -> bytes:
    """``target`` in origin-form (``/path``): an absolute-form target (``GET http://host/path``,
    which a server must accept, RFC 9112 3.2.2) loses its scheme and authority.

    The local app sees the path only, as from any client talking to it directly; the tunnel is
    still chosen by the Host header, as uvicorn (which drops the authority itself) leaves no other.
    """
    if target[:1] == b"/" or target == b"*":
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha():
        return target  # not absolute-form: passed on as sent, the app judges it
    _, slash, path = rest.partition(b"/")
    return b"/" + path if slash else b"/"


def parse_networks(value: str) -> tuple[Network, ...]:
    """A comma list of CIDRs (or bare addresses) as networks; ValueError names a bad entry."""
    networks = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR such as 10.0.0.0/8 or 127.0.0.1/32") from None
    return tuple(networks)


def is_trusted(client_ip: str, networks: Sequence[Network]) -> bool:
    """Whether ``client_ip`` (the TCP peer) is a proxy whose forwarding headers count."""
    if not networks or not client_ip:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class Origin:
    """The visitor's request as the edge may believe it: the client's address, the scheme and the
    host it asked for. The edge's own view of the connection, unless a trusted proxy says otherwise."""

    client: str
    scheme: str
    host: bytes


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def request_origin(headers: Headers, peer_ip: str, scheme: str, host: bytes,
                   networks: Sequence[Network]) -> Origin:
    """Where the request really came from: the TCP peer and its connection, unless the peer is a
    trusted proxy, whose headers then count (see :func:`real_client` for the address).

    When a proxy sends both, X-Forwarded-* wins: ``Forwarded`` counts only when there is no
    X-Forwarded-For. The proxies put in front of Comzy (nginx's ``proxy_set_header``, Caddy,
    Traefik, HAProxy's ``forwardfor``) write X-Forwarded-* themselves, replacing a visitor's, but
    pass a visitor's ``Forwarded`` through untouched unless told otherwise: with X-Forwarded-For
    present, ``Forwarded`` may be the visitor's, and none of it (address, ``proto``, ``host``) is
    believed. A proxy that writes ``Forwarded`` itself sends no X-Forwarded-For.
    """
    if not is_trusted(peer_ip, networks):
        return Origin(peer_ip, scheme, host)
    element: dict[str, str] = {}
    client = _xff_client(headers, peer_ip, networks)
    if client is None:
        chain = _forwarded_chain(headers)
        if chain is not None:
            client, element = _forwarded_walk(chain, peer_ip, networks)
    if client is None:  # X-Real-IP: a single hop, when the proxy sent no chain of either kind
        real_ip = [value.decode("latin-1").strip() for value in _values(headers, b"x-real-ip")][-1:]
        client = _walk(real_ip, peer_ip, networks) if real_ip else peer_ip
    proto = (_last_item(_values(headers, b"x-forwarded-proto")).decode("latin-1") or element.get("proto", "")).lower()
    forwarded_host = (_last_item(_values(headers, b"x-forwarded-host"))
                      or element.get("host", "").encode("latin-1"))
    return Origin(client, proto if proto in SCHEMES else scheme, forwarded_host or host)


def _last_item(values: list[bytes]) -> bytes:
    """The last item of a comma list spread over header lines: the one the nearest hop wrote."""
    return values[-1].rsplit(b",", 1)[-1].strip() if values else b""


def _forwarded_chain(headers: Headers) -> ForwardedChain | None:
    values = _values(headers, b"forwarded")
    return parse_forwarded(values) if values else None


def _xff_client(headers: Headers, peer_ip: str, networks: Sequence[Network]) -> str | None:
    chain = [part.strip() for value in _values(headers, b"x-forwarded-for")
             for part in value.decode("latin-1").split(",")]
    return _walk(chain, peer_ip, networks) if chain else None


def _walk(chain: list[str], peer_ip: str, networks: Sequence[Network]) -> str:
    """From the right of ``chain``: the first address that is not a trusted proxy; a value that is
    not an address ends the walk at the last hop that was one."""
    nearest = peer_ip
    for entry in reversed(chain):
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            return nearest
        nearest = str(address)
        if not any(address in network for network in networks):
            return nearest
    return nearest


def _forwarded_walk(chain: ForwardedChain, peer_ip: str,
                    networks: Sequence[Network]) -> tuple[str, dict[str, str]]:
    """As :func:`_walk` over the ``for`` nodes, and the element where the walk stopped: the one
    the outermost trusted proxy wrote, whose ``proto`` and ``host`` describe the visitor's request."""
    nearest, element = peer_ip, {}
    for index in reversed(range(len(chain))):
        element = chain.element(index)
        address = node_address(element.get("for", ""))
        if address is None:  # unknown, obfuscated or missing: the last known hop stands
            return nearest, element
        nearest = address
        if not any(ipaddress.ip_address(address) in network for network in networks):
            return nearest, element
    return nearest, element


def real_client(headers: Headers, peer_ip: str, networks: Sequence[Network]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
    nearest address in its X-Forwarded-For chain (read from the right) that is not itself a trusted
    proxy; without that chain the same walk over its ``Forwarded`` elements' ``for`` nodes; without
    either, its X-Real-IP.

    What a client wrote at the left of the chain counts only where a trusted hop vouches for it;
    a value that is not an IP address (``unknown``, an obfuscated ``_name``) ends the walk at the
    last hop that was one.
    """
    return request_origin(headers, peer_ip, "http", b"", networks).client


def add_forwarded(headers: Headers, client_ip: str, scheme: str, host: bytes, trusted: bool,
                  origin: Origin | None = None) -> Headers:
    """``headers`` with the edge's X-Forwarded-For/-Proto/-Host.

    A visitor's own forwarding headers (``FORWARDING``) are dropped: anyone can write them, and an
    app that trusts the tunnel would take them as the client's address or the original scheme.
    From a trusted proxy (COMZY_TRUSTED_PROXIES) they are kept: its X-Forwarded-For chain is
    extended with its own address, and its X-Forwarded-Proto/-Host (https, when it terminates TLS)
    win over the edge's view of the connection. Its ``Forwarded`` (RFC 7239) is kept and extended
    with an element for the hop the edge saw; when it sent ``Forwarded`` without X-Forwarded-For,
    the X-Forwarded-* the edge adds say what ``Forwarded`` says (``origin``, from
    :func:`request_origin`), so an app reading either learns the same. A malformed ``Forwarded``
    is dropped, as if absent.
    """
    forwarded: list[bytes] = []
    if trusted:
        prior = _values(headers, b"x-forwarded-for")
        forwarded = _values(headers, b"forwarded")
        out = [(n, v) for n, v in headers if n.lower() not in (b"x-forwarded-for", b"forwarded")]
        present = {n.lower() for n, _ in out}
    else:
        prior = []
        out = [(n, v) for n, v in headers if n.lower() not in FORWARDING]
        present = set()
    chain = parse_forwarded(forwarded) if forwarded else None
    if chain is not None:
        edge_element = forwarded_element(client_ip, scheme, host.decode("latin-1"))
        out.append((b"forwarded", b", ".join([*forwarded, edge_element.encode("latin-1")])))
        if not prior:  # grown in place: no list of per-element strings (memory within the header's size)
            said = bytearray()
            for hop in chain.hops():
                said += b", " + hop.encode("latin-1") if said else hop.encode("latin-1")
            prior = [bytes(said)]
    hops = b", ".join([*prior, client_ip.encode()]) if client_ip else b", ".join(prior)
    if hops:
        out.append((b"x-forwarded-for", hops))
    if b"x-forwarded-proto" not in present:
        out.append((b"x-forwarded-proto", (origin.scheme if origin else scheme).encode()))
    proxied_host = origin.host if origin else host
    if proxied_host and b"x-forwarded-host" not in present:
        out.append((b"x-forwarded-host", proxied_host))
    return out
