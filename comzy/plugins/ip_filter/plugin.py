"""Visitors of a tunnel whose agent asked for ``--cidr-allow``/``--cidr-deny`` pass only from the
networks it allows: the check runs on the server, before anything reaches the agent.

The address checked is the request's client address as the core computed it (``request.client``):
the TCP peer, or what a proxy in ``COMZY_TRUSTED_PROXIES`` says in X-Forwarded-For or Forwarded;
a visitor's own X-Forwarded-For never counts. ngrok's semantics: an address in a denied network is
refused; when there are allowed networks, an address in none of them is refused too. Refused: 403.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from comzy import ForwardRequest, Registration, Reject, Tunnel, TunnelCache, hookimpl

#: This plugin's name: the key of the agent's data, of the tunnel's state and of the policy it confirms.
NAME = "ip_filter"
#: The most networks in each list (the stock agent sends no more).
MAX_CIDRS = 64
#: The longest network text accepted (an IPv6 address with its prefix length is at most 43).
MAX_CIDR_TEXT = 64
#: Rules compiled for the tunnels seen lately (by session number): the state on the tunnel is plain
#: data (it crosses a cluster to the edges), and parsing up to 128 networks per request would cost
#: more than the check. At most this many tunnels are remembered, the least recently used go first.
COMPILED_TUNNELS = 4096
#: What a refused visitor reads: why, without the rules or the address.
REFUSED = "403 Forbidden: this tunnel does not accept requests from your network address.\n"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Networks as (address bits, mask) integer pairs, by address length in bytes (4 or 16).
Compiled = dict[int, tuple[tuple[int, int], ...]]
#: (allowed, denied): a check is a few integer operations, with no ipaddress object per request.
Rules = tuple[Compiled, Compiled]
#: The top 96 bits of an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
_MAPPED = 0xFFFF


def parse_policy(data: Any) -> dict[str, list[str]]:
    """The state kept on the tunnel, from the agent's untrusted data; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("it must be a map {allow, deny}")
    lists: dict[str, list[str]] = {}
    for key in ("allow", "deny"):
        texts = data.get(key, [])
        if not isinstance(texts, list) or len(texts) > MAX_CIDRS:
            raise ValueError(f"'{key}' must be a list of at most {MAX_CIDRS} networks")
        lists[key] = list(dict.fromkeys(str(network) for network in map(_network, texts)))
    if not lists["allow"] and not lists["deny"]:
        raise ValueError("it names no network to allow or deny")
    return lists


def _network(text: Any) -> Network:
    if not isinstance(text, str) or len(text) > MAX_CIDR_TEXT or "%" in text:
        raise ValueError("each network must be a CIDR text such as 203.0.113.0/24 or 2001:db8::/32")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        raise ValueError(f"{text[:MAX_CIDR_TEXT]!r} is not an IP network (host bits must be zero)") from None


def compile_rules(state: dict[str, list[str]]) -> Rules:
    """The tunnel's (allowed, denied) networks from its state (checked at registration)."""
    return _compiled(state["allow"]), _compiled(state["deny"])


def _compiled(texts: list[str]) -> Compiled:
    networks = [ipaddress.ip_network(text) for text in texts]
    return {size: tuple((int(n.network_address), int(n.netmask)) for n in networks if n.max_prefixlen == size * 8)
            for size in (4, 16)}


def _address(client: str) -> tuple[int, int] | None:
    """(length in bytes, value) of an IP address text, or None. inet_pton: about 20 times
    cheaper than ipaddress here. An IPv6 zone (%eth0) says which link, not which address."""
    text = client.partition("%")[0] if "%" in client else client
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    try:
        return 16, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        return None


def admitted(client: str, rules: Rules) -> bool:
    """Whether ``client`` passes: in no denied network, and in an allowed one when there are any.
    An address that cannot be read (none, or not an IP) never passes: the filter fails closed."""
    address = _address(client)
    if address is None:
        return False
    size, value = address
    allow, deny = rules
    if _within(value, deny[size]):
        return False
    passes = not (allow[4] or allow[16]) or _within(value, allow[size])
    if size == 16 and (value >> 32) == _MAPPED:
        # A dual-stack listener reports IPv4 visitors as ::ffff:a.b.c.d: the IPv4 rules are meant for them.
        value &= 0xFFFFFFFF
        if _within(value, deny[4]):
            return False
        passes = passes or _within(value, allow[4])
    return passes


def _within(value: int, networks: tuple[tuple[int, int], ...]) -> bool:
    for network, mask in networks:  # noqa: SIM110 (a plain loop: a generator costs more than the check)
        if value & mask == network:
            return True
    return False


class IpFilter:
    """Enforces the ``--cidr-allow``/``--cidr-deny`` policy of the tunnels whose agents ask for it."""

    def __init__(self) -> None:
        self._compiled: TunnelCache[dict[str, list[str]], Rules] = TunnelCache(compile_rules, COMPILED_TUNNELS)

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        """Keep the agent's networks on the tunnel and confirm the policy."""
        registration.take_policy(NAME, parse_policy, "ip filter")

    @hookimpl
    def describe_policy(self, tunnel: Tunnel) -> dict[str, Any] | None:
        """The allowed and denied networks, for operators' views (/api/tunnels, the dashboard)."""
        state = tunnel.metadata.get(NAME)
        return {"allow": list(state["allow"]), "deny": list(state["deny"])} if state else None

    @hookimpl(tryfirst=True)
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> None:
        """Answer 403 to a client address the tunnel's rules refuse. First of the policies: a refused
        address costs no password hash (basic_auth) and no count against a rate limit."""
        state = tunnel.metadata.get(NAME)
        if not state:
            return
        if not admitted(request.client, self._compiled.get(tunnel, state)):
            raise Reject("the client address is not allowed by the tunnel's IP filter", status=403, body=REFUSED)
