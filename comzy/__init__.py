"""Comzy: a self-hostable tunnel. This module is the public API for plugin authors.

A plugin needs only::

    from comzy import hookimpl, Reject
"""

from __future__ import annotations

__version__ = "0.1.0"

from comzy.core.admin import AdminRoute
from comzy.core.hooks import PluginError
from comzy.core.hookspecs import hookimpl
from comzy.core.types import Exchange, ForwardRequest, Registration, Reject, Tunnel

__all__ = [
    "AdminRoute",
    "Exchange",
    "ForwardRequest",
    "PluginError",
    "Registration",
    "Reject",
    "Tunnel",
    "__version__",
    "hookimpl",
]
