"""The dashboard plugin: collects tunnel and request events and serves the page, feed and API."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from comzy import AdminRoute, Exchange, Tunnel, hookimpl

from .app import DashboardApp
from .feed import FeedHub, tunnel_view
from .settings import DashboardSettings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from comzy.core.server import ServerContext

log = logging.getLogger("comzy.plugins.dashboard")

#: The request-logging plugin whose table ``/api/requests`` reads when it is enabled.
REQUEST_LOG_PLUGIN = "mysql_logging"


class Dashboard:
    """Live page at ``/`` of the admin listener, WebSocket feed at ``/feed``, JSON API under ``/api``."""

    def __init__(self, settings: DashboardSettings | None = None) -> None:
        self.settings = settings or DashboardSettings()
        self.hub = FeedHub(self.settings.feed_queue, self.settings.recent_requests, self.settings.history_seconds)
        self.engine: AsyncEngine | None = None

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        """Open the request log's database when the logging plugin is on (for ``/api/requests``)."""
        if REQUEST_LOG_PLUGIN in server.plugin_names:
            from comzy.core.db import prepare_database

            self.engine = await prepare_database(server.settings)

    @hookimpl
    async def on_shutdown(self) -> None:
        """Dispose of the database engine."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.dispose()

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
