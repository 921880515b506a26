"""The embedded SQLite database file: created private, and watched for being deleted under us.

SQLite keeps using a database file that was deleted (or replaced) while it is open: this server
would go on reading and writing the unlinked file, while ``comzy-server users ...`` or another
server create a new, empty one at the same path. Each side then sees a different database, and
whatever the server wrote since vanishes when it stops. :func:`watch` notices this on each use
of the engine and reports it once, loudly; see :class:`FileWatch` for what it does then.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy.core.datadir import DIR_MODE, FILE_MODE, create_private_file, make_private

log = logging.getLogger("comzy.db")

#: The files SQLite keeps next to a database: WAL mode's log and index, the rollback journal.
SIDE_FILES = ("-wal", "-shm", "-journal")

#: Files already reported as lost, (path, device, inode): one report per file and process,
#: however many engines (one per plugin) notice it.
_reported: set[tuple[str, int, int]] = set()


def prepare(path: Path) -> None:
    """Create the database file 0600 (its directory 0700) unless it exists; tighten a loose one.

    SQLite gives its -wal, -shm and -journal files the database file's mode, so they are
    private too. Runs before SQLite opens the file, so no row is ever written to a file
    others can read.
    """
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    create_private_file(path)  # an existing file is tightened on the first connection (FileWatch)


def use_wal(path: Path, timeout: float = 30.0) -> None:
    """Put the database file ``path`` in WAL mode (SQLite keeps it in the file), waiting up to
    ``timeout`` seconds for other connections; raises :class:`sqlite3.OperationalError` after that.

    Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is locked"
    at once, without its busy timeout, to a connection that asks while another is switching or
    writing. Engines (one per plugin, and `comzy-server users ...` in another process) that
    opened one new file together then failed at random. Done once here, before the engine's
    first connection, and retried; a file already in WAL mode costs one read. Any other failure
    (not a database, no permission) is left for the engine's connections to report, where
    the plugin that uses them says what it was doing.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    try:
        connection = sqlite3.connect(path, timeout=timeout)
    except sqlite3.Error:
        return
    try:
        while True:
            try:
                if str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    # Whatever mode SQLite agrees to is kept (an in-memory or odd file system may refuse WAL).
                    connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.Error as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    return
            if time.monotonic() + delay > deadline:
                raise sqlite3.OperationalError(f"the file stayed locked by another connection for {timeout:g} s "
                                               "while it was being switched to WAL mode")
            time.sleep(delay)  # milliseconds, and only while another connection switches a new file
            delay = min(delay * 2, 0.05)
    finally:
        connection.close()


def make_files_private(path: Path) -> None:
    """Take group and other access away from the database file and its side files (warning once each)."""
    for file in (path, *(Path(f"{path}{suffix}") for suffix in SIDE_FILES)):
        make_private(file, FILE_MODE, "SQLite file")


def watch(engine: AsyncEngine, path: Path) -> FileWatch:
    """Watch ``engine``'s database file ``path`` (see :class:`FileWatch`); the watch."""
    watcher = FileWatch(path)
    # Before the engine's own connect listeners (pragmas): a refused connection runs nothing.
    event.listen(engine.sync_engine, "connect", watcher.on_connect, insert=True)
    event.listen(engine.sync_engine, "checkout", watcher.on_checkout)
    return watcher


class FileWatch:
    """Compares the file at ``path`` with the one the engine's connections opened, on each use.

    One ``stat`` per checkout from the pool: cheaper than the transaction it guards, and only
    when a plugin uses the database, never on a visitor's request. So a server that writes
    notices before its next write, and the auth and domain plugins' refreshers (every few
    seconds) notice within their interval.

    Once the file is gone (``lost``), the engine stops writing: committed data is moved out of
    the WAL into the deleted file, each connection becomes ``query_only`` (writes fail, so plugins
    report them instead of acknowledging data that cannot last), and new connections, which would
    open the other file at the path, are refused. The open connections keep the deleted file
    alive, so an operator can still copy it back while the server runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: (device, inode) of the file the engine's connections opened; None before the first.
        self.identity: tuple[int, int] | None = None
        self.lost = False
        self._replaced = False

    def _at_path(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def _changed(self) -> bool:
        """Whether the file at the path is no longer the one the engine opened (sets ``lost``)."""
        if not self.lost and self.identity is not None:  # None: SQLite opened no file we could see
            current = self._at_path()
            if current != self.identity:
                self.lost, self._replaced = True, current is not None
        return self.lost

    def on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        """A new pooled connection: remember which file it opened, or refuse it once that changed."""
        if self.identity is None:
            self.identity = self._at_path()
            # Before any statement runs: a file made before this version, or by hand, gets 0600.
            make_files_private(self.path)
            return
        if self._changed():
            self._report()
            dbapi_connection.close()  # a refused connection must not linger (ResourceWarning)
            raise sqlite3.OperationalError(f"the SQLite database {self.path} was deleted or replaced while this "
                                           "server used it; restart the server (see the error logged)")

    def on_checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """A pooled connection is about to be used: check the file first."""
        if not self._changed():
            return
        if not record.info.get("comzy_query_only"):
            cursor = dbapi_connection.cursor()
            try:
                try:
                    # Committed pages into the deleted file itself, so a copy of it is whole; and out
                    # of the -wal at the path, which a new database there may pick up.
                    cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:  # best effort: stopping the writes matters more
                    log.warning("could not checkpoint the deleted SQLite database %s: %s", self.path, exc)
                cursor.execute("PRAGMA query_only=ON")
            finally:
                cursor.close()
            record.info["comzy_query_only"] = True
        self._report()  # after the checkpoint: the copy the report offers is whole once it is read

    def _report(self) -> None:
        assert self.identity is not None
        key = (str(self.path), *self.identity)
        if key in _reported:
            return
        _reported.add(key)
        log.error(lost_message(self.path, self.identity, replaced=self._replaced))


def lost_message(path: Path, identity: tuple[int, int], replaced: bool) -> str:
    """What happened to the database file and what the operator should do, for the log."""
    what = "replaced by another file" if replaced else "deleted"
    copy = _still_open(identity)
    if copy:
        keep = (f"Its data is still readable at {copy} while this server runs: stop other comzy-server processes, "
                f"delete {path}-wal and {path}-shm, copy it back with `cp {copy} {path}`, then restart this server. "
                "Restarting without that loses everything the file held (unless you restore a backup)")
    else:
        keep = ("Its data lives on only in this server's open file: restarting the server loses everything it "
                "held, unless you restore a backup")
    return (f"the SQLite database {path} was {what} while this server had it open. Other processes "
            "(comzy-server users/domains, another server) now use a different database than this server does, "
            "and what this server writes from now on would be lost when it stops. So it no longer writes to it: "
            f"changes that need the database (new users' aliases, request logs) fail until it restarts. {keep}.")


def _still_open(identity: tuple[int, int]) -> str | None:
    """A /proc path through which this process's open descriptor of the deleted file can be read."""
    fd_dir = Path("/proc/self/fd")
    try:
        descriptors = os.listdir(fd_dir)
    except OSError:  # no /proc (not Linux): no way to name it
        return None
    for name in descriptors:
        try:
            info = os.stat(fd_dir / name)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == identity:
            return f"/proc/{os.getpid()}/fd/{name}"
    return None
