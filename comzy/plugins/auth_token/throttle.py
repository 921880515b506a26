"""Bounded memories that make token guessing slow and cheap to refuse.

- :class:`FailureThrottle` counts failed token checks per client address and refuses an address
  that failed too often for the rest of its minute, before its token is looked at.
- :class:`UnknownTokens` remembers digests the database did not know for a few seconds, so the
  same wrong token costs one query, not one per attempt.

Both hold at most a fixed number of entries and forget the oldest first: an attacker with many
addresses or many tokens cannot make them grow. Time comes from ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: The window failures are counted in, in seconds (the setting is "failures per minute").
WINDOW_SECONDS = 60.0
#: Client addresses whose failures are remembered at once; the oldest window is forgotten first.
MAX_ADDRESSES = 10_000
#: Unknown token digests remembered at once; the oldest is forgotten first.
MAX_UNKNOWN_TOKENS = 10_000


def address_key(address: str) -> str:
    """What failures are counted under: an IPv4 address, or the /64 an IPv6 address is in.

    One IPv6 host usually holds a whole /64, so counting single addresses would give it 2**64
    fresh allowances. An IPv4-mapped IPv6 address counts as the IPv4 address it maps.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a Unix socket, "?"): counted as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Throttled(Exception):
    """An address used up its failures for this window; ``first`` is true once per window (log it)."""

    def __init__(self, key: str, failures: int, retry_after: int, first: bool) -> None:
        super().__init__(f"{key}: {failures} failed token checks; refused for {retry_after} s")
        self.key = key
        self.failures = failures
        self.retry_after = retry_after
        self.first = first


@dataclass(slots=True, eq=False)
class _Window:
    key: str
    started: float
    failures: int = 0
    reported: bool = False


class Attempt:
    """One token check, counted as a failure from the start; :meth:`forgive` it when it was not."""

    __slots__ = ("_throttle", "_window")

    def __init__(self, throttle: FailureThrottle, window: _Window) -> None:
        self._throttle = throttle
        self._window = window

    def forgive(self) -> None:
        """The check succeeded: it does not count against the address."""
        self._throttle._forgive(self._window)


class FailureThrottle:
    """At most ``limit`` failed token checks per client address per minute.

    An attempt counts as a failure from the moment it starts, until it is forgiven: otherwise
    many checks started at once (each waiting for the database) would all get past the limit.
    Windows are fixed: they start at an address's first attempt and last ``WINDOW_SECONDS``. A
    refused attempt is not counted (its token is never checked), so an address that keeps trying
    is let in again when its window ends, not later.
    """

    def __init__(self, limit: int, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.max_addresses = max_addresses
        self.clock = clock
        # Ordered by window start (a new window goes to the end), so expired ones are at the front.
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def begin(self, address: str) -> Attempt:
        """Count a token check from ``address``; :class:`Throttled` if it has no failures left."""
        now = self.clock()
        self._forget_expired(now)
        key = address_key(address)
        window = self._windows.get(key)
        if window is None:
            while len(self._windows) >= self.max_addresses:
                self._windows.popitem(last=False)
            window = self._windows[key] = _Window(key, now)
        elif window.failures >= self.limit:
            first, window.reported = not window.reported, True
            raise Throttled(key, window.failures, max(1, math.ceil(window.started + WINDOW_SECONDS - now)), first)
        window.failures += 1
        return Attempt(self, window)

    def _forgive(self, window: _Window) -> None:
        window.failures = max(0, window.failures - 1)
        if not window.failures and self._windows.get(window.key) is window:
            del self._windows[window.key]  # an address that only succeeds takes no room

    def _forget_expired(self, now: float) -> None:
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.started + WINDOW_SECONDS > now:
                return
            del self._windows[key]


class UnknownTokens:
    """Digests of tokens the database did not know, each for ``seconds`` after it was asked."""

    def __init__(self, seconds: float, limit: int = MAX_UNKNOWN_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.limit = limit
        self.clock = clock
        # Every entry lives equally long, so insertion order is expiry order.
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, digest: object) -> bool:
        until = self._until.get(digest) if isinstance(digest, str) else None
        return until is not None and until > self.clock()

    def add(self, digest: str) -> None:
        """Remember ``digest`` as unknown for the next ``seconds``."""
        now = self.clock()
        while self._until:
            oldest, until = next(iter(self._until.items()))
            if until > now and len(self._until) < self.limit:
                break
            del self._until[oldest]
        self._until.pop(digest, None)  # re-added: to the end, with a fresh expiry
        self._until[digest] = now + self.seconds

    def discard(self, digest: str) -> None:
        """Forget ``digest`` (it belongs to a user now)."""
        self._until.pop(digest, None)
