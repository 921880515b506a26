"""Small helpers several test modules share."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from sqlalchemy import URL, make_url, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from comzy import Tunnel, hookimpl
from comzy.core import db
from comzy.core import protocol as p
from comzy.core.websocket import Closed, WebSocket


def install_metadata(site: Path, dist: str, entry_points: dict[str, str], version: str = "0.1.0") -> None:
    """Write ``site/<dist>-<version>.dist-info`` declaring ``entry_points`` in the ``comzy`` group:
    what pip writes, so a package on a path with ``site`` is an installed plugin."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[comzy]\n{lines}")


class DisconnectWatcher:
    """A plugin that records every ended tunnel and its reason, so tests can wait for clean-up."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self._changed = anyio.Event()

    @hookimpl
    def on_disconnect(self, tunnel: Tunnel, reason: str) -> None:
        self.ended[tunnel.alias] = reason
        self._changed.set()

    async def wait_for(self, *aliases: str) -> list[str]:
        """Wait until every alias has ended; their reasons, in order."""
        while not set(aliases) <= self.ended.keys():
            self._changed = anyio.Event()
            await self._changed.wait()
        return [self.ended[alias] for alias in aliases]


async def receive_until_closed(ws: WebSocket) -> tuple[Closed, list[p.Frame]]:
    """Every frame the peer sends (or had buffered) before it closes, and how it closed."""
    frames: list[p.Frame] = []
    with anyio.fail_after(5):
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                return message, frames
            assert isinstance(message, bytes)
            frames.extend(p.decode_message(message))


async def wait_until(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll ``condition`` (sync or async) until it is truthy; fail after ``timeout`` seconds.

    For state another task or process changes with no event to wait on (a map swapped by a
    refresher, a queue's size, a row in a database).
    """
    with anyio.fail_after(timeout):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(interval)


async def upgrade_status_line(port: int, host: str, target: str = "/ws", extra: str = "") -> bytes:
    """The status line a WebSocket upgrade for ``host`` (with ``extra`` header lines, each ending
    in CRLF) gets from the listener on ``port``."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Upgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        head = b""
        with anyio.fail_after(10):
            while b"\r\n" not in head:
                head += await stream.receive()
    return head.split(b"\r\n", 1)[0]


@asynccontextmanager
async def serve_tcp(handler: Callable[[anyio.abc.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port; yields the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield port
        tg.cancel_scope.cancel()


# -- Database services (MariaDB, PostgreSQL) ---------------------------------------------------
#: The database services the tests use: the variable that overrides each URL, and its default.
SERVICES = {
    "mariadb": ("COMZY_TEST_MARIADB_URL", "mysql+aiomysql://root@127.0.0.1:3306/test"),
    "postgres": ("COMZY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
}
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip with ``reason``; under CI=true, where the services are required, fail instead."""
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


async def admin_engine(service: str) -> tuple[AsyncEngine, URL]:
    """An autocommit engine on ``service`` and its URL; skips (fails under CI) when unreachable."""
    variable, default = SERVICES[service]
    url = make_url(os.environ.get(variable, default))
    timeout = {"connect_timeout": 5} if service == "mariadb" else {"timeout": 5}
    try:
        engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=timeout,
                                     isolation_level="AUTOCOMMIT")
    except ModuleNotFoundError as exc:
        unavailable(f"{service} driver {exc.name} not installed (pip install -e '.[dev]')")
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        await engine.dispose()
        unavailable(f"{service} not reachable at {db.masked_url(url)}: {db.describe_error(exc, url)}; "
                    f"start it (DEVELOPERS.md) or set {variable}")
    return engine, url


async def scratch_database(service: str) -> AsyncIterator[URL]:
    """A new empty database on ``service`` for one test (``async for url in ...``); dropped afterwards."""
    admin, url = await admin_engine(service)
    name = f"comzy_test_{uuid.uuid4().hex[:12]}"
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield url.set(database=name)
        finally:
            async with admin.connect() as connection:
                if service == "postgres":
                    await connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                else:
                    await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        await admin.dispose()
