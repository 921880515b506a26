"""Cluster mode (``COMZY_ROLE=edge|control``): nodes joined by NATS (docs/design/cluster.md).

Nothing here runs in role ``all``, and the NATS client (the ``nats`` extra) is imported only by
the modules that talk to NATS (connection, link, node): this package's own import is free.
"""

from __future__ import annotations


class ClusterError(Exception):
    """The cluster cannot run as configured (a NATS too small for our messages, a bucket that
    cannot be made). The message is one line that says what to change."""
