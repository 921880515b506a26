"""Built-in plugin ``anonymous_timeout``: anonymous tunnels expire (see README.md)."""

from .plugin import AnonymousTimeout
from .settings import AnonymousTimeoutSettings

__all__ = ["AnonymousTimeout", "AnonymousTimeoutSettings"]
