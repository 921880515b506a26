"""Comzy: a self-hostable tunnel. This module is the public API for plugin authors.

A plugin needs only::

    from comzy import hookimpl, Reject
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from comzy.core.admin import AdminRoute
from comzy.core.commands import CommandContext, Commands
from comzy.core.hooks import PluginError
from comzy.core.hookspecs import hookimpl
from comzy.core.periodic import Periodic
from comzy.core.schema import Schema
from comzy.core.settings import ServerSettings
from comzy.core.tunnel_cache import TunnelCache
from comzy.core.types import Exchange, ForwardRequest, ForwardResponse, LoggedRequest, Registration, Reject, Tunnel

if TYPE_CHECKING:
    from comzy.core.server import ServerContext

__all__ = [
    "AdminRoute",
    "CommandContext",
    "Commands",
    "Exchange",
    "ForwardRequest",
    "ForwardResponse",
    "LoggedRequest",
    "Periodic",
    "PluginError",
    "Registration",
    "Reject",
    "Schema",
    "ServerContext",
    "ServerSettings",
    "Tunnel",
    "TunnelCache",
    "__version__",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    # ServerContext, the type every hook's ``server`` is, is loaded on first use: importing the
    # server (hypercorn and all) would slow every `comzy` agent command that never needs it.
    if name == "ServerContext":
        from comzy.core.server import ServerContext

        return ServerContext
    raise AttributeError(f"module 'comzy' has no attribute {name!r}")
