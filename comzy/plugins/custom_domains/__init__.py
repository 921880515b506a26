"""Built-in plugin ``custom_domains``: hosts outside the base domain reach a tunnel (see README.md)."""

from .plugin import CustomDomains
from .settings import CustomDomainsSettings

__all__ = ["CustomDomains", "CustomDomainsSettings"]
