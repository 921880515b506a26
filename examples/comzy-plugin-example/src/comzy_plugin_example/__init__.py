"""An example third-party Comzy plugin, packaged on its own.

Enable it on a server with ``COMZY_PLUGINS=example`` once this package is installed.
"""

from __future__ import annotations

from comzy_plugin_example.plugin import ExamplePlugin
from comzy_plugin_example.settings import ExampleSettings
from comzy_plugin_example.store import BlockedRequest

__all__ = ["BlockedRequest", "ExamplePlugin", "ExampleSettings"]
