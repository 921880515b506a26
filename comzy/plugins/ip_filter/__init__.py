"""Built-in plugin ``ip_filter``: a tunnel's agent allows or denies client networks (see README.md)."""

from .plugin import IpFilter

__all__ = ["IpFilter"]
