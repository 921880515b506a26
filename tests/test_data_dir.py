"""The data directory and the embedded SQLite database: private modes, and a deleted file reported."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import OperationalError

from comzy.core import db
from comzy.core.datadir import prepare_data_dir
from comzy.plugins.auth_token.store import create_user
from tests.conftest import start_server
from tests.helpers import wait_until
from tests.test_plugin_auth_token import auth

pytestmark = pytest.mark.anyio

SIDE_FILES = ("-wal", "-shm", "-journal")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(data_dir: Path) -> list[Path]:
    """The SQLite database and whichever of its side files exist now."""
    main = data_dir / db.SQLITE_FILE
    return [main, *(p for p in (Path(f"{main}{suffix}") for suffix in SIDE_FILES) if p.exists())]


@pytest.fixture
def open_umask() -> Iterator[None]:
    """No umask at all: the modes must come from Comzy, not from a careful shell."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(autouse=True)
def _no_database_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMZY_DATABASE_URL", "DB_PASSWORD", "COMZY_DB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


# -- modes -------------------------------------------------------------------------------
@pytest.mark.usefixtures("open_umask")
async def test_embedded_default_is_private_from_the_start(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    plugin = auth(refresh_seconds=3600)
    async with start_server(data, plugins=[("auth_token", plugin)]):
        await create_user(plugin.engine, "ana")
        files = database_files(data)
        assert {f.name for f in files} >= {"comzy.db", "comzy.db-wal", "comzy.db-shm"}  # WAL mode, in use
        assert mode(data) == 0o700
        for file in files:
            assert mode(file) == 0o600, file
        assert mode(data / "admin_token") == 0o600


async def test_loose_data_dir_and_database_are_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    database = data / db.SQLITE_FILE
    sqlite3.connect(database).close()  # made by hand, before this version: readable by everyone
    database.chmod(0o644)
    caplog.set_level(logging.WARNING)
    plugin = auth(refresh_seconds=3600)
    async with start_server(data, plugins=[("auth_token", plugin)]):
        await create_user(plugin.engine, "ana")
        assert mode(data) == 0o700
        for file in database_files(data):
            assert mode(file) == 0o600, file
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"data directory {data} was open to other users (mode 755); made it 700" in w for w in warnings)
    assert any(f"SQLite file {database} was open to other users (mode 644); made it 600" in w for w in warnings)


def test_data_dir_of_another_user_is_left_alone_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o750)
    monkeypatch.setattr(os, "geteuid", lambda: data.stat().st_uid + 1)  # as if another user ran the server
    prepare_data_dir(data)
    assert mode(data) == 0o750
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"data directory {data} is open to other users (mode 750)" in warning
    assert f"`chmod 700 {data}`" in warning


# -- a deleted database file -------------------------------------------------------------------
def lost_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and "was deleted" in r.getMessage()]


async def test_deleted_database_is_reported_and_no_longer_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    database = data / db.SQLITE_FILE
    # The refresher reads the database every 50 ms; each read is a use the watch checks.
    plugin = auth(refresh_seconds=0.05)
    async with start_server(data, plugins=[("auth_token", plugin)]):
        await create_user(plugin.engine, "ana")
        database.unlink()
        await wait_until(lambda: lost_reports(caplog))
        [report] = lost_reports(caplog)
        assert f"the SQLite database {database} was deleted while this server had it open" in report
        assert "restart" in report
        # Nothing more is acknowledged and then lost with the deleted file: the pooled connection
        # is read-only, and a new one (when the refresher holds that) is refused.
        with pytest.raises(OperationalError, match=r"readonly|deleted or replaced"):
            await create_user(plugin.engine, "bob")
        # The recovery the report offers works: the deleted file, copied back, holds everything.
        found = re.search(r"`cp (/proc/\d+/fd/\d+) ", report)
        assert found, report
        recovered = tmp_path / "recovered.db"
        shutil.copyfile(found.group(1), recovered)
        with sqlite3.connect(recovered) as connection:
            assert connection.execute("SELECT name FROM users").fetchall() == [("ana",)]
        connection.close()
        refreshes = plugin.refreshes
        await wait_until(lambda: plugin.refreshes > refreshes + 2)  # still in use: reported once only
        assert len(lost_reports(caplog)) == 1


async def test_new_connection_to_a_replaced_file_is_refused(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "comzy.db"
    engine = db.create_engine(URL.create("sqlite+aiosqlite", database=str(path)))
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        path.unlink()
        path.touch()  # another process made a new database at the path
        # Two at once: the second needs a new connection, which would open the new file.
        async with engine.connect() as first:
            with pytest.raises(OperationalError, match="deleted or replaced"):
                async with engine.connect():
                    pass
            with pytest.raises(OperationalError, match="readonly"):
                await first.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        await engine.dispose()
    [report] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"the SQLite database {path} was replaced by another file" in report
