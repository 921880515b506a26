"""Logging set-up shared by the server and the agent: one greppable line per event."""

from __future__ import annotations

import logging
import sys
import time

#: Characters that could end a log line or drive a terminal: C0 and C1 controls, DEL, and the
#: Unicode line and paragraph separators. Each becomes a visible escape.
_UNPRINTABLE = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_UNPRINTABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\x0a``...): what a visitor or an
    agent wrote (a path, an agent name) can then neither forge a log line nor send escape
    sequences to a terminal."""
    return text.translate(_UNPRINTABLE)


class _UTCFormatter(logging.Formatter):
    """One line per record: the message (which may quote what peers sent) is escaped; a traceback
    that follows is the only thing allowed to span lines."""

    converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def formatter() -> logging.Formatter:
    """The formatter of every comzy log line: ``2026-01-02T03:04:05Z INFO comzy.edge message``."""
    return _UTCFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")


def configure(level: str = "INFO") -> None:
    """Log ``2026-01-02T03:04:05Z INFO comzy.edge message`` lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn's own start-up chatter repeats what our banner says.
    logging.getLogger("comzy.http").setLevel(max(logging.WARNING, root.level))
    # Alembic (comzy/core/db.py) logs its set-up at INFO; Comzy reports migrations itself.
    logging.getLogger("alembic").setLevel(logging.WARNING if root.level > logging.DEBUG else logging.NOTSET)


class RateLimitedLog:
    """Logs a repeated event at most once per ``interval`` seconds, with how many were held back.

    The first event is logged at once; later ones within ``interval`` of the last line are only
    counted, and the next line logged (the first event after the interval) says how many there
    were. No timer runs, so the count of a burst that simply stops is never logged. A peer that
    repeats an error (a local app sending malformed responses, accept() failing at the file
    limit) thus costs one log line per interval, not one per event. Keep one instance per source
    (a tunnel, a listener), so one noisy source does not hide another. Not thread-safe: one loop.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._last: float | None = None  # time.monotonic() of the last line logged
        self._held_back = 0

    def __call__(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line was logged within the interval; True if logged."""
        now = time.monotonic()
        last = self._last
        if last is not None and now - last < self.interval:
            self._held_back += 1
            return False
        if self._held_back and last is not None:
            message += " (and %d more like it in the %.0f s before, not logged)"
            args = (*args, self._held_back, now - last)
        self._last = now
        self._held_back = 0
        self.logger.log(self.level, message, *args)
        return True
