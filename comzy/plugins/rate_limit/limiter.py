"""GCRA rate limiting over a bounded table of clients, without I/O: the clock is given.

GCRA (the generic cell rate algorithm) is a token bucket kept as one number per client and limit:
the *theoretical arrival time* (TAT) of the next request at the steady rate. A limit of N requests
per T seconds lets a client send N at once (a full bucket), then one every T/N seconds; a
refused request costs nothing, and the wait until the next slot frees is exact.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

#: TATs are whole nanoseconds: a float sum of N intervals drifts from N x the interval (100,000
#: requests of a 100000/min burst admitted 99,999), a sum of integers does not.
NS = 1_000_000_000
#: The units a rate may be given in, as ``N/unit`` (the agent's ``--rate-limit``), in seconds.
UNIT_SECONDS = {"s": 1, "min": 60, "h": 3600}
#: The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
_IPV4_MAPPED = bytes(10) + b"\xff\xff"


@dataclass(frozen=True, slots=True)
class Rate:
    """``requests`` per ``seconds``: a burst of ``requests``, then one every ``seconds / requests``.

    ``interval_ns`` is the time between two requests at the steady rate, in nanoseconds (rounded
    down: at most 1 ns early); ``burst_ns`` how far ahead of now a TAT may be for a request to be
    admitted (N - 1 intervals). Both are computed once: :meth:`Limiter.check` runs per request.
    """

    requests: int
    seconds: int
    interval_ns: int = field(init=False, compare=False, repr=False)
    burst_ns: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        interval = self.seconds * NS // self.requests
        object.__setattr__(self, "interval_ns", interval)
        object.__setattr__(self, "burst_ns", interval * (self.requests - 1))

    @property
    def interval(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self.seconds / self.requests

    def __str__(self) -> str:
        unit = next((name for name, seconds in UNIT_SECONDS.items() if seconds == self.seconds), None)
        return f"{self.requests}/{unit}" if unit else f"{self.requests}/{self.seconds}s"


def client_key(address: str) -> str:
    """The part of a client address one visitor is assumed to control: an IPv4 address whole, an
    IPv6 address's /64 (one host gets a /64, and counting its addresses apart would let it rotate
    past any limit), an IPv4-mapped IPv6 address as the IPv4 address it maps."""
    if ":" not in address:
        return address  # IPv4 (or empty): the common case, no parsing
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        return address
    if packed[:12] == _IPV4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class Limiter:
    """The TATs of up to ``max_clients`` keys (a key: a tunnel and a client), least recently seen
    forgotten first. ``clock`` gives monotonic nanoseconds (tests give their own).

    A key whose every TAT has passed has a full bucket again: forgetting it changes nothing, so
    such keys go first (at the old end, as they are found). Only when every kept key is still
    counting does the least recently seen one go, and that client gets a full bucket back: resetting
    one visitor's count so takes ``max_clients`` other keys, all active within one period.
    """

    def __init__(self, max_clients: int, clock: Callable[[], int] = time.monotonic_ns) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.max_clients = max_clients
        self.clock = clock
        self._tats: OrderedDict[Hashable, list[int]] = OrderedDict()
        #: Keys forgotten while still counting (the table was full): watch it grow under attack.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._tats)

    def check(self, key: Hashable, rates: Sequence[Rate]) -> float:
        """0.0 when a request of ``key`` is admitted under every one of ``rates`` (and counted); else
        the seconds until it would be (nothing counted: a refused request takes no slot)."""
        now = self.clock()  # nanoseconds: no float to convert on every request
        table = self._tats
        tats = table.get(key)
        if tats is None or len(tats) != len(rates):
            # Unknown (or its limits changed): a full bucket, so admitted.
            self._insert(key, [now + rate.interval_ns for rate in rates], now)
            return 0.0
        wait = 0
        for rate, tat in zip(rates, tats):  # noqa: B905 (of equal length: checked above)
            # Admitted while the TAT is at most a full bucket's worth (N - 1 intervals) ahead of now.
            ahead = tat - now - rate.burst_ns
            if ahead > wait:
                wait = ahead
        table.move_to_end(key)
        if wait > 0:
            return wait / NS
        for index, rate in enumerate(rates):
            tat = tats[index]
            tats[index] = (tat if tat > now else now) + rate.interval_ns
        return 0.0

    def _insert(self, key: Hashable, tats: list[int], now: int) -> None:
        table = self._tats
        table[key] = tats
        table.move_to_end(key)  # a key whose limits changed is there already
        # A new key: drop up to two full buckets at the old end (the table shrinks when traffic
        # does), then the least recently seen key if the table is still over its cap.
        for _ in range(2):
            oldest, oldest_tats = next(iter(table.items()))
            if oldest == key or max(oldest_tats) > now:
                break
            del table[oldest]
        if len(table) > self.max_clients:
            _, evicted = table.popitem(last=False)
            if max(evicted) > now:
                self.evicted += 1
