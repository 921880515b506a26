"""Logging set-up shared by the server and the agent: one greppable line per event."""

from __future__ import annotations

import logging
import sys
import time


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime


def configure(level: str = "INFO") -> None:
    """Log ``2026-01-02T03:04:05Z INFO comzy.edge message`` lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%SZ"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn's own start-up chatter repeats what our banner says.
    logging.getLogger("comzy.http").setLevel(max(logging.WARNING, root.level))
    # Alembic (comzy/core/db.py) logs its set-up at INFO; Comzy reports migrations itself.
    logging.getLogger("alembic").setLevel(logging.WARNING if root.level > logging.DEBUG else logging.NOTSET)
