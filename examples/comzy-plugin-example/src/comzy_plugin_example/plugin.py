"""The plugin: one class, hook methods marked with ``comzy.hookimpl``."""

from __future__ import annotations

from comzy import ForwardRequest, Reject, Tunnel, hookimpl

from comzy_plugin_example.settings import ExampleSettings


class HeaderStamp:
    """Adds a fixed header to every request a tunnel forwards, and refuses a path prefix.

    The server builds it with no arguments (settings come from the environment); tests may
    pass an ``ExampleSettings`` instead.
    """

    def __init__(self, settings: ExampleSettings | None = None) -> None:
        self.settings = settings or ExampleSettings()
        self._header = (self.settings.header_name.lower().encode("latin-1"),
                        self.settings.header_value.encode("latin-1"))

    def blocks(self, path: str) -> bool:
        """Whether ``path`` lies under the blocked prefix."""
        prefix = self.settings.blocked_prefix
        if not prefix:
            return False
        return prefix == "/" or path == prefix or path.startswith(prefix + "/")

    @hookimpl
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> None:
        """Refuse blocked paths with 403; stamp the header on everything else."""
        if self.blocks(request.path):
            raise Reject(f"{request.path} is blocked on {tunnel.alias}", status=403)
        name = self._header[0]
        # Replace, never append: a visitor must not be able to pre-set the stamp.
        request.headers[:] = [(n, v) for n, v in request.headers if n.lower() != name]
        request.headers.append(self._header)
