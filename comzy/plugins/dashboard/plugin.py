"""The dashboard plugin: collects tunnel and request events and serves the page, feed and API."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from comzy import AdminRoute, Exchange, ForwardRequest, Tunnel, hookimpl

from .app import DashboardApp
from .feed import FeedHub, refused_view, request_view, tunnel_view
from .settings import DashboardSettings

if TYPE_CHECKING:
    from comzy import ServerContext


#: The bus topic of the feed's events: every node publishes its own, every node's feed shows all.
FEED_TOPIC = "dashboard.feed"


class Dashboard:
    """Live page at ``/`` of the admin listener, WebSocket feed at ``/feed``, JSON API under ``/api``.

    Tunnel and request events go through ``server.bus`` (topic ``dashboard.feed``), so in a
    cluster each node's feed shows every node's events; in role all the bus hands them over at once.
    ``/api/requests`` asks the ``recent_requests`` hook, which any request-logging plugin may
    answer; with none enabled it answers from the requests this plugin keeps in memory.
    """

    def __init__(self, settings: DashboardSettings | None = None) -> None:
        self.settings = settings or DashboardSettings()
        self.hub = FeedHub(self.settings.feed_queue, self.settings.recent_requests, self.settings.history_seconds)

    @hookimpl
    def on_startup(self, server: ServerContext) -> None:
        """Feed the hub from the bus: this node's events and, in a cluster, every other node's."""
        server.bus.subscribe(FEED_TOPIC, self._on_event)

    def _on_event(self, node: str, event: dict[str, Any]) -> None:
        if node:  # a cluster node: say whose event it is ("" in role all, where there is one)
            event["node"] = node
        if event.get("type") == "request":
            self.hub.record(event)
        else:
            self.hub.publish(event)

    @hookimpl
    def on_connect(self, tunnel: Tunnel, server: ServerContext) -> None:
        """Publish ``tunnel_registered``."""
        server.bus.publish(FEED_TOPIC, {"type": "tunnel_registered", "time": time.time(),
                                        "tunnel": tunnel_view(tunnel, server)})

    @hookimpl
    def on_disconnect(self, tunnel: Tunnel, reason: str, server: ServerContext) -> None:
        """Publish ``tunnel_closed`` with the reason and the tunnel's final totals."""
        server.bus.publish(FEED_TOPIC, {"type": "tunnel_closed", "time": time.time(), "alias": tunnel.alias,
                                        "reason": reason, "tunnel": tunnel_view(tunnel, server)})

    @hookimpl
    def after_response(self, exchange: Exchange, server: ServerContext) -> None:
        """Publish a ``request`` event (queued per client; never waits)."""
        server.bus.publish(FEED_TOPIC, request_view(exchange))

    @hookimpl
    def on_request_refused(self, request: ForwardRequest, status: int, plugin: str, server: ServerContext) -> None:
        """Publish a ``request`` event for a visitor a plugin refused (``refused_by`` names it)."""
        server.bus.publish(FEED_TOPIC, refused_view(request, status, plugin))

    @hookimpl
    def admin_routes(self, server: ServerContext) -> list[AdminRoute]:
        """The page (the admin listener's fallback route ``/``), the feed and the API."""
        return [AdminRoute("/", DashboardApp(self, server))]
