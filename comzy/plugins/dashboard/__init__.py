"""Built-in plugin ``dashboard``: a live page, a WebSocket feed and a JSON API on the admin listener (see README.md)."""

from .plugin import Dashboard
from .settings import DashboardSettings

__all__ = ["Dashboard", "DashboardSettings"]
