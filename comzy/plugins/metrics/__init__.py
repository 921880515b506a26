"""Built-in plugin ``metrics``: Prometheus metrics at ``/metrics`` on the admin listener (see README.md)."""

from .plugin import Metrics

__all__ = ["Metrics"]
