"""Limits the requests each client address sends to a tunnel: the operator's limit for every tunnel
(COMZY_RATE_LIMIT_PER_MINUTE) and a lower one a tunnel's owner asks for (``--rate-limit N/min``).

Over a limit a visitor gets 429 with Retry-After, HTTP and WebSocket upgrades alike, before
anything reaches the agent. The owner's limit never replaces the operator's: both are enforced, so
an owner can only lower the limit. Counting is per node (each edge of a cluster counts its own
visitors: README.md says what that means).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from comzy import ForwardRequest, Registration, Reject, Tunnel, hookimpl

from .limiter import Limiter, Rate, client_key
from .settings import MAX_REQUESTS, RateLimitSettings

#: This plugin's name: the key of the agent's data, of what it keeps on the tunnel and of its policy.
NAME = "rate_limit"
#: The periods an owner's limit may have, in seconds: ``N/s``, ``N/min`` and ``N/h``.
PERIODS = (1, 60, 3600)


def parse_policy(data: Any) -> dict[str, int]:
    """The owner's limit kept on the tunnel, from the agent's untrusted data; ValueError says what is wrong."""
    if not isinstance(data, dict) or set(data) != {"requests", "seconds"}:
        raise ValueError("it must be a map of exactly 'requests' and 'seconds'")
    requests, seconds = data["requests"], data["seconds"]
    if not isinstance(requests, int) or isinstance(requests, bool) or not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"'requests' must be a whole number from 1 to {MAX_REQUESTS}")
    if seconds not in PERIODS or isinstance(seconds, bool):
        raise ValueError("'seconds' must be 1, 60 or 3600 (N/s, N/min or N/h)")
    return {"requests": requests, "seconds": seconds}


class RateLimit:
    """Enforces the operator's and the owners' rate limits per tunnel and client address."""

    def __init__(self, settings: RateLimitSettings | None = None, limiter: Limiter | None = None) -> None:
        self.settings = settings or RateLimitSettings()
        self.operator = Rate(self.settings.per_minute, 60) if self.settings.per_minute else None
        self.limiter = limiter if limiter is not None else Limiter(self.settings.max_clients)

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        """Keep the owner's limit on the tunnel and confirm the policy."""
        state = registration.take_policy(NAME, parse_policy, "rate limit")
        if state is None:
            return
        owner = Rate(state["requests"], state["seconds"])
        if self.operator is not None and owner.interval < self.operator.interval:
            registration.notices.append(f"This server limits every tunnel to {self.operator} per client address, "
                                        f"below the {owner} asked for: both apply.")

    def rates(self, tunnel: Tunnel) -> list[Rate]:
        """The limits on ``tunnel``'s visitors: the operator's, then the owner's (either may be absent)."""
        rates = [self.operator] if self.operator is not None else []
        state = tunnel.metadata.get(NAME)
        if state:
            rates.append(_rate(state["requests"], state["seconds"]))
        return rates

    @hookimpl(tryfirst=True)
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> None:
        """Count the visitor's request; over a limit, answer 429 with Retry-After. First of the
        policies (tryfirst): a refusal here is cheap, and a password guesser is limited before
        basic_auth hashes anything for it."""
        rates = self.rates(tunnel)
        if not rates:
            return
        wait = self.limiter.check((tunnel.session, client_key(request.client)), rates)
        if wait:
            retry = max(1, math.ceil(wait))
            limits = " and ".join(str(rate) for rate in rates)
            reason = f"too many requests from your address to this tunnel (limit {limits}); retry in {retry} s"
            raise Reject(reason, status=429, body=f"429 Too Many Requests: {reason}.\n",
                         headers=[(b"retry-after", str(retry).encode())])

    @hookimpl
    def describe_policy(self, tunnel: Tunnel) -> dict[str, Any] | None:
        """The limits in force for the operator's views: per client address, by whom."""
        state = tunnel.metadata.get(NAME)
        if self.operator is None and not state:
            return None
        owner = Rate(state["requests"], state["seconds"]) if state else None
        return {"per": "client address", "operator": str(self.operator) if self.operator else None,
                "owner": str(owner) if owner else None}


@lru_cache(maxsize=1024)
def _rate(requests: int, seconds: int) -> Rate:
    """The owner's limit of a tunnel as a Rate, made once per value (per request it would cost more
    than the check itself); at most 1,024 values are kept."""
    return Rate(requests, seconds)
