"""The dashboard plugin: collects tunnel and request events and serves the page, feed and API."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from comzy import AdminRoute, Exchange, Tunnel, hookimpl

from .app import DashboardApp
from .feed import FeedHub, tunnel_view
from .settings import DashboardSettings

if TYPE_CHECKING:
    from comzy import ServerContext


class Dashboard:
    """Live page at ``/`` of the admin listener, WebSocket feed at ``/feed``, JSON API under ``/api``.

    ``/api/requests`` asks the ``recent_requests`` hook, which any request-logging plugin may
    answer; with none enabled it answers from the requests this plugin keeps in memory.
    """

    def __init__(self, settings: DashboardSettings | None = None) -> None:
        self.settings = settings or DashboardSettings()
        self.hub = FeedHub(self.settings.feed_queue, self.settings.recent_requests, self.settings.history_seconds)

    @hookimpl
    def on_connect(self, tunnel: Tunnel) -> None:
        """Publish ``tunnel_registered``."""
        self.hub.publish({"type": "tunnel_registered", "time": time.time(), "tunnel": tunnel_view(tunnel)})

    @hookimpl
    def on_disconnect(self, tunnel: Tunnel, reason: str) -> None:
        """Publish ``tunnel_closed`` with the reason and the tunnel's final totals."""
        self.hub.publish({"type": "tunnel_closed", "time": time.time(), "alias": tunnel.alias, "reason": reason,
                          "tunnel": tunnel_view(tunnel)})

    @hookimpl
    def after_response(self, exchange: Exchange) -> None:
        """Publish a ``request`` event (queued per client; never waits)."""
        self.hub.request(exchange)

    @hookimpl
    def admin_routes(self, server: ServerContext) -> list[AdminRoute]:
        """The page (the admin listener's fallback route ``/``), the feed and the API."""
        return [AdminRoute("/", DashboardApp(self, server))]
