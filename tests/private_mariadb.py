"""A MariaDB server of a test's own, which the test may stop and start (databases going down)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from sqlalchemy import URL, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import unavailable


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/libexec") / name) if p.is_file()), None)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateMariaDB:
    """A MariaDB server of the test's own (own data directory, socket and port), so stopping it
    disturbs nobody. No grant tables: any user and password are let in."""

    def __init__(self, root: Path, server: str, installer: str) -> None:
        self.root, self.server, self.installer = root, server, installer
        self.datadir = root / "data"
        self.error_log = root / "mariadbd.err"
        # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="comzy-mdb-"))
        self.port = _free_port()
        self.process: anyio.abc.Process | None = None
        self._as_root = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root otherwise

    def url(self, password: str, database: str | None = None) -> URL:
        return URL.create("mysql+aiomysql", username="root", password=password, host="127.0.0.1", port=self.port,
                          database=database)

    async def install(self) -> None:
        result = await anyio.run_process(
            [self.installer, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--innodb-log-file-size=4M", *self._as_root], check=False)
        if result.returncode != 0:
            pytest.fail(f"{self.installer} failed ({result.returncode}): {result.stderr.decode()[-2000:]}")

    async def start(self) -> None:
        """Start on the data directory and port (the same ones on a restart); return once it answers."""
        self.process = await anyio.open_process(
            [self.server, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket_dir / 'sock'}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-name-resolve",
             "--innodb-log-file-size=4M", "--innodb-buffer-pool-size=32M",
             "--innodb-buffer-pool-load-at-startup=0", "--innodb-buffer-pool-dump-at-shutdown=0",
             f"--log-error={self.error_log}", f"--pid-file={self.root / 'mariadbd.pid'}", *self._as_root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        engine = create_async_engine(self.url("any"), poolclass=pool.NullPool, connect_args={"connect_timeout": 2})
        try:
            with anyio.fail_after(60):
                while True:
                    if self.process.returncode is not None:
                        pytest.fail(f"mariadbd exited with {self.process.returncode}: {self._log_tail()}")
                    try:
                        async with engine.connect() as connection:
                            await connection.execute(text("SELECT 1"))
                        return
                    except Exception:  # not listening yet
                        await anyio.sleep(0.05)
        finally:
            await engine.dispose()

    async def stop(self) -> None:
        """SIGTERM by PID, then wait until the process has exited."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)
        with anyio.fail_after(60):
            await self.process.wait()
        await self.process.aclose()
        self.process = None

    async def execute(self, statement: str) -> None:
        engine = create_async_engine(self.url("any"), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with anyio.move_on_after(30):
                await self.process.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _log_tail(self) -> str:
        return self.error_log.read_text(errors="replace")[-2000:] if self.error_log.exists() else "(no log)"


@pytest.fixture
async def private_mariadb(tmp_path: Path) -> AsyncIterator[PrivateMariaDB]:
    server, installer = _binary("mariadbd", "mysqld"), _binary("mariadb-install-db", "mysql_install_db")
    if server is None or installer is None:
        unavailable("mariadbd / mariadb-install-db not installed (apt-get install mariadb-server)")
    try:
        import aiomysql  # noqa: F401
    except ModuleNotFoundError:
        unavailable("the aiomysql driver is not installed (pip install -e '.[dev]')")
    assert server is not None and installer is not None
    instance = PrivateMariaDB(tmp_path / "mariadb", server, installer)
    try:
        await instance.install()
        await instance.start()
        yield instance
    finally:
        await instance.cleanup()
