"""Built-in plugin ``rate_limit``: requests per tunnel and client address, limited (see README.md)."""

from .plugin import RateLimit

__all__ = ["RateLimit"]
