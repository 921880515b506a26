"""What the edge does to a visitor's request head before it crosses the tunnel (and to a response
head on its way back): hop-by-hop headers, strict body framing, origin-form targets, and the
X-Forwarded-* headers with their trust rule. Pure functions on header lists, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

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
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    drop = (HOP_BY_HOP | named | extra) - PROTECTED
    return [(n, v) for n, v in headers if n.lower() not in drop]


def host_of(headers: Headers) -> str:
    """The Host header's host, lowercase and without a port ('' if absent)."""
    host = host_header(headers).decode("latin-1").strip().lower()
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


def real_client(headers: Headers, peer_ip: str, networks: Sequence[Network]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
    nearest address in its X-Forwarded-For chain (read from the right) that is not itself a trusted
    proxy, or its X-Real-IP when it sent no chain.

    What a client wrote at the left of the chain counts only where a trusted hop vouches for it;
    a value that is not an IP address ends the walk at the last hop that was one.
    """
    if not is_trusted(peer_ip, networks):
        return peer_ip
    chain = [part.strip() for name, value in headers if name.lower() == b"x-forwarded-for"
             for part in value.decode("latin-1").split(",")]
    if not chain:
        chain = [value.decode("latin-1").strip() for name, value in headers if name.lower() == b"x-real-ip"][-1:]
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


def add_forwarded(headers: Headers, client_ip: str, scheme: str, host: bytes, trusted: bool) -> Headers:
    """``headers`` with the edge's X-Forwarded-For/-Proto/-Host.

    A visitor's own forwarding headers (``FORWARDING``) are dropped: anyone can write them, and an
    app that trusts the tunnel would take them as the client's address or the original scheme.
    From a trusted proxy (COMZY_TRUSTED_PROXIES) they are kept: its X-Forwarded-For chain is
    extended with its own address, and its X-Forwarded-Proto/-Host (https, when it terminates TLS)
    win over the edge's view of the connection.
    """
    if trusted:
        prior = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
        out = [(n, v) for n, v in headers if n.lower() != b"x-forwarded-for"]
        present = {n.lower() for n, _ in out}
    else:
        prior = []
        out = [(n, v) for n, v in headers if n.lower() not in FORWARDING]
        present = set()
    chain = b", ".join([*prior, client_ip.encode()]) if client_ip else b", ".join(prior)
    if chain:
        out.append((b"x-forwarded-for", chain))
    if b"x-forwarded-proto" not in present:
        out.append((b"x-forwarded-proto", scheme.encode()))
    if host and b"x-forwarded-host" not in present:
        out.append((b"x-forwarded-host", host))
    return out
