"""Built-in plugin ``headers``: a tunnel's agent adds and removes request and response headers (see README.md)."""

from .plugin import Headers

__all__ = ["Headers"]
