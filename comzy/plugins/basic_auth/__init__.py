"""Built-in plugin ``basic_auth``: visitors of a tunnel log in with what its agent asked (see README.md)."""

from .plugin import BasicAuth

__all__ = ["BasicAuth"]
