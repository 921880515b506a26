"""The look Comzy's web pages share: one stylesheet and the icon, served by each page's own program.

The admin dashboard (a plugin, on the server's admin listener) and the agent's inspector (on the
agent's own port) are served by different programs, so neither can link the other's files: each
serves these under its own asset path (``/static/base.css``, ``/assets/base.css``) and links
``base.css`` before its own stylesheet. A plugin with a page of its own (``admin_routes``) may do
the same to look like the rest. Plain files, shipped as package data: no CDN, no inline style, so
a strict Content-Security-Policy (``style-src 'self'``) holds.
"""

from __future__ import annotations

from importlib import resources

#: The shared files, by name, with their content types: the only names :func:`read` answers.
FILES: dict[str, str] = {
    "base.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

__all__ = ["FILES", "read"]

_cache: dict[str, bytes] = {}


def read(name: str) -> bytes | None:
    """The bytes of shared file ``name`` (one of :data:`FILES`), or None for any other name: a fixed
    table, so no path from a request reaches the disk."""
    if name not in FILES:
        return None
    if name not in _cache:
        _cache[name] = resources.files(__package__).joinpath(name).read_bytes()
    return _cache[name]
