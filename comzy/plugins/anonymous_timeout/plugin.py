"""Anonymous tunnels expire; tunnels of logged-in users do not."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from comzy import Registration, Tunnel, hookimpl

from .settings import AnonymousTimeoutSettings

#: This plugin's name: the key of what it keeps on a registration and its tunnel (``plugin_state``).
NAME = "anonymous_timeout"
#: The bus topic of deadlines: a reconnect to another node keeps the alias's first one.
DEADLINES_TOPIC = "anonymous_timeout.deadlines"

if TYPE_CHECKING:
    from comzy import ServerContext


def span(seconds: float) -> str:
    """``3600`` -> ``1 h``, ``90`` -> ``1 min 30 s``: for messages to people."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h" if hours else "", f"{minutes} min" if minutes else "", f"{secs} s" if secs else ""]
    return " ".join(p for p in parts if p) or "0 s"


class AnonymousTimeout:
    """Sets an expiry on tunnels with no user, warns their agents, and closes them on time.

    The deadline belongs to the alias: an agent that reconnects (and resumes its alias) keeps
    the deadline it had, so reconnecting never buys a fresh lifetime. In a cluster each node
    publishes the deadlines of its new tunnels on ``server.bus`` (topic
    ``anonymous_timeout.deadlines``), so a reconnect to another control node keeps it too.
    """

    def __init__(self, settings: AnonymousTimeoutSettings | None = None) -> None:
        self.settings = settings or AnonymousTimeoutSettings()
        self._deadlines: dict[str, float] = {}
        self._warned: set[str] = set()

    @property
    def lifetime(self) -> float:
        """Seconds an anonymous tunnel lasts."""
        return self.settings.seconds

    @property
    def warn_before(self) -> float:
        """Seconds before expiry at which the agent is warned."""
        return min(self.settings.warn_seconds, self.settings.seconds / 2)

    def _message(self) -> str:
        return f"anonymous tunnels last {span(self.lifetime)}; run `comzy login` for a lasting one"

    # Runs after every other plugin's on_register, so an authentication plugin has set the user.
    @hookimpl(trylast=True)
    def on_register(self, registration: Registration) -> None:
        """Give anonymous registrations an expiry time."""
        if registration.user is not None:
            return
        registration.expires_at = time.time() + self.lifetime
        registration.plugin_state(NAME)["anonymous"] = True
        # The time is in WELCOME's expires_at, which the agent shows: the notice gives the advice only.
        registration.notices.append("Run `comzy login` for a tunnel that lasts.")

    @hookimpl
    def on_connect(self, tunnel: Tunnel, server: ServerContext) -> None:
        """Tell the other nodes an anonymous tunnel's deadline (the earliest this alias had)."""
        if tunnel.metadata.get(NAME, {}).get("anonymous") and tunnel.expires_at is not None:
            deadline = min(self._deadlines.get(tunnel.alias, tunnel.expires_at), tunnel.expires_at)
            server.bus.publish(DEADLINES_TOPIC, {"alias": tunnel.alias, "deadline": deadline})

    @hookimpl
    def on_startup(self, server: ServerContext) -> None:
        """Start the sweeper that warns and closes anonymous tunnels; learn other nodes' deadlines."""
        def learn(node: str, event: dict[str, Any]) -> None:
            alias, deadline = event.get("alias"), event.get("deadline")
            if node == server.node or not isinstance(alias, str) or not isinstance(deadline, (int, float)):
                return  # this node's own (known already), or "lagged"
            known = self._deadlines.get(alias)
            self._deadlines[alias] = deadline if known is None else min(known, deadline)

        server.bus.subscribe(DEADLINES_TOPIC, learn)
        server.task_group.start_soon(self._sweep, server)

    async def _sweep(self, server: ServerContext) -> None:
        tick = min(1.0, self.lifetime / 20)
        while True:
            await anyio.sleep(tick)
            await self.check(server, time.time())

    async def check(self, server: ServerContext, now: float) -> None:
        """Warn and close what is due at ``now``; forget deadlines long past."""
        for tunnel in server.tunnels():
            if not tunnel.metadata.get(NAME, {}).get("anonymous") or tunnel.expires_at is None:
                continue
            deadline = self._deadlines.setdefault(tunnel.alias, tunnel.expires_at)
            if deadline < tunnel.expires_at:  # a reconnect: keep the first deadline
                tunnel.expires_at = deadline
            if now >= deadline:
                self._warned.discard(tunnel.alias)
                await server.close_tunnel(tunnel.alias, self._message())
            elif now >= deadline - self.warn_before and tunnel.alias not in self._warned:
                self._warned.add(tunnel.alias)
                server.notify(tunnel.alias, f"This anonymous tunnel closes in {span(deadline - now)}. "
                              "Run `comzy login` for a lasting one.", "warning")
        # A deadline outlives its tunnel for one lifetime (so a quick reconnect keeps it), no longer.
        for alias, deadline in list(self._deadlines.items()):
            if now > deadline + self.lifetime:
                del self._deadlines[alias]
                self._warned.discard(alias)
