"""The data directory and the private files in it: created 0700/0600, loosened ones tightened.

The directory (COMZY_DATA_DIR) holds token hashes, client addresses and the admin token, so
nobody but the server's user may list or read it. Kept apart from ``db`` so the server can
prepare the directory without loading SQLAlchemy.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("comzy.datadir")

DIR_MODE = 0o700
FILE_MODE = 0o600


def prepare_data_dir(path: Path) -> None:
    """Create ``path`` (mode 0700), or take group and other access away from an existing one.

    A directory this process does not own is left alone, with a warning that says what to
    run. Raises OSError when the directory can be neither found nor created.
    """
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    make_private(path, DIR_MODE, "data directory")


def make_private(path: Path, mode: int, what: str, then: str = "") -> bool:
    """Give ``path`` ``mode`` if group or others have any access to it; whether it is private now.

    Warns (naming ``what`` and the command to run, and ``then``, what else to do) when it was
    loose: whatever it held may have been read already. A missing file counts as private.
    """
    if os.name != "posix":  # Windows has no group/other bits; its ACLs are the operator's
        return True
    try:
        info = path.stat()
    except FileNotFoundError:
        return True
    loose = stat.S_IMODE(info.st_mode)
    if not loose & 0o077:
        return True
    command = f"chmod {mode:o} {path}"
    if info.st_uid != os.geteuid():
        # Not ours: changing another user's file (as root, say) could lock its owner out.
        log.warning("%s %s is open to other users (mode %03o) and belongs to uid %d, not to this server's user "
                    "(uid %d); it holds private data: make it private with `%s`", what, path, loose,
                    info.st_uid, os.geteuid(), command)
        return False
    try:
        path.chmod(mode)
    except OSError as exc:
        log.warning("%s %s is open to other users (mode %03o) and cannot be made private (%s); fix it with `%s`",
                    what, path, loose, exc.strerror, command)
        return False
    log.warning("%s %s was open to other users (mode %03o); made it %03o%s", what, path, loose, mode,
                f"; {then}" if then else "")
    return True


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; whether this call created it.

    Created before anything else opens it, so the file is never readable by others, not even
    for a moment (a reader that opened it then would keep its access after a chmod).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    try:
        if os.name == "posix":
            os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)
    return True
