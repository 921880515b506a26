"""mysql_logging: one api_requests row per proxied request, written in batches off the request path,
on SQLite and MariaDB; a real database server stopped and restarted under traffic; retention."""

from __future__ import annotations

import inspect
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from sqlalchemy import URL, func, insert, pool, select
from sqlalchemy.dialects.mysql import aiomysql, asyncmy
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy import Exchange, ForwardRequest, Tunnel
from comzy.core import db
from comzy.plugins.mysql_logging import MysqlLogging, MysqlLoggingSettings
from comzy.plugins.mysql_logging.models import SCHEMA as LOG_SCHEMA
from comzy.plugins.mysql_logging.models import ApiRequest
from comzy.plugins.mysql_logging.plugin import (
    CUT_MARK,
    SQLITE_FEWER_ROWS,
    SQLITE_ROWS_PER_INSERT,
    BatchInsert,
    QueuedRequest,
    logged_path,
    to_row,
)
from tests.conftest import ROOT, make_settings, start_agent, start_server
from tests.helpers import scratch_database, wait_until
from tests.private_mariadb import PrivateMariaDB
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

LOGGER = "comzy.plugins.mysql_logging"
TABLE = ApiRequest.__table__
DATABASE_VARIABLES = ("COMZY_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME")


@pytest.fixture(autouse=True)
def _no_database_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DATABASE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in os.environ:
        if name.startswith("COMZY_MYSQL_LOGGING_"):
            monkeypatch.delenv(name)


def plugin(**settings: Any) -> MysqlLogging:
    """The plugin with fast test timings unless overridden."""
    values: dict[str, Any] = {"flush_seconds": 0.05, "retry_seconds": 0.05, "retry_max_seconds": 0.2}
    values.update(settings)
    return MysqlLogging(MysqlLoggingSettings(_env_file=None, **values))


class Table:
    """Reads api_requests with its own engine, independent of the plugin's."""

    def __init__(self, url: URL) -> None:
        self.engine: AsyncEngine = db.create_engine(url, poolclass=pool.NullPool)

    async def rows(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(TABLE).order_by(TABLE.c.id))
            return [dict(row._mapping) for row in result]

    async def count(self) -> int:
        async with self.engine.connect() as connection:
            return int((await connection.execute(select(func.count()).select_from(TABLE))).scalar_one())

    async def has(self, count: int) -> bool:
        return await self.count() >= count

    async def aclose(self) -> None:
        await self.engine.dispose()


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
async def database(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Server settings selecting the database: the embedded SQLite default (upgrades itself), or a
    scratch MariaDB or PostgreSQL database migrated to head (as `comzy-server db upgrade` would).
    Each hands the rows to its own driver (BatchInsert: qmark, format, numeric_dollar)."""
    if request.param == "sqlite":
        yield {}
        return
    async for url in scratch_database(request.param):
        engine = db.create_engine(url)
        try:
            await db.upgrade_to_head(engine, [LOG_SCHEMA])
        finally:
            await engine.dispose()
        yield {"database_url": url.render_as_string(hide_password=False)}


def as_utc(moment: datetime) -> datetime:
    """MySQL and SQLite give times back naive (meaning UTC); PostgreSQL aware."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# -- End to end ---------------------------------------------------------------------------------
async def test_each_request_becomes_one_row(tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    logging_plugin = plugin(max_path_length=4096)
    long_path = "/long/" + "p" * 2000  # kept whole (VARCHAR(1024) cut it silently before)
    too_long = "/longer/" + "q" * 5000
    calls: list[tuple[str, str, bytes]] = [
        ("GET", "/hello?token=secret-token&x=1", b""),
        ("POST", "/upload", b"x" * 1000),
        ("PUT", "/status/201", b"abc"),
        ("DELETE", "/status/404", b""),
        ("PATCH", "/status/500", b""),
        ("HEAD", "/status/200", b""),
        ("OPTIONS", "/with%20space/%E2%82%AC", b""),
        ("PROPPATCH", "/webdav", b"<propertyupdate/>"),
        ("GET", long_path, b""),
        ("GET", too_long, b""),
    ]
    started = datetime.now(UTC)
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server, \
            start_agent(server, upstream.port) as running:
        table = Table(db.database_url(server.settings))
        try:
            responses: list[httpx.Response] = []
            async with running.visitor() as client:
                for method, path, body in calls:
                    responses.append(await client.request(method, path, content=body))
            assert [r.status_code for r in responses] == [200, 200, 201, 404, 500, 200, 200, 200, 200, 200]
            await wait_until(lambda: table.has(len(calls)))
            rows = await table.rows()
        finally:
            await table.aclose()
    finished = datetime.now(UTC)

    assert len(rows) == len(calls)
    assert logging_plugin.written == len(calls) and logging_plugin.dropped == 0 and logging_plugin.queued == 0
    for row, (method, _path, body), response in zip(rows, calls, responses, strict=True):
        assert row["alias"] == running.alias
        assert row["port"] == upstream.port  # the agent's local port
        assert row["method"] == method
        assert row["status_code"] == response.status_code
        assert row["bytes_in"] == len(body)
        assert row["bytes_out"] == len(response.content)
        assert row["client_address"] == "127.0.0.1"
        assert 0 < row["duration_ms"] < 30_000
        assert started <= as_utc(row["created_at"]) <= finished  # microseconds on MariaDB too
    paths = [row["path"] for row in rows]
    assert paths[0] == "/hello"  # the query string (a token here) is never logged
    assert paths[6] == "/with%20space/%E2%82%AC"
    assert paths[8] == long_path
    assert paths[9] == too_long[:4096 - len(CUT_MARK)] + " [cut]" and len(paths[9]) == 4096
    assert [row["cut"] for row in rows] == [False] * 9 + [True]
    assert rows[1]["bytes_in"] == 1000 and rows[5]["bytes_out"] == 0
    assert all("secret-token" not in str(value) for row in rows for value in row.values())


async def test_a_long_method_is_kept_or_cut_visibly(tmp_path: Path, upstream: Upstream) -> None:
    """hypercorn passes any token as a method (uvicorn's llhttp only the methods it knows, none
    longer than 11): the registered UPDATEREDIRECTREF (17, longer than the old column) is kept
    whole, a 70-character one is cut and marked."""
    logging_plugin = plugin()
    methods = ["UPDATEREDIRECTREF", "X" * 70]
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)],
                            http_server="hypercorn") as server, start_agent(server, upstream.port) as running:
        table = Table(db.database_url(server.settings))
        try:
            async with running.visitor() as client:
                for method in methods:
                    assert (await client.request(method, "/status/200")).status_code == 200
            await wait_until(lambda: table.has(len(methods)))
            rows = await table.rows()
        finally:
            await table.aclose()
    assert [(row["method"], row["cut"]) for row in rows] == [("UPDATEREDIRECTREF", False), ("X" * 58 + CUT_MARK, True)]


async def test_recent_requests_answers_from_the_table(tmp_path: Path, upstream: Upstream,
                                                     database: dict[str, Any]) -> None:
    """The request history other plugins ask for (the dashboard's /api/requests): newest first, by
    alias, bounded, with the times the database kept (naive UTC on SQLite and MariaDB, to the microsecond)."""
    logging_plugin = plugin()
    started = time.time()
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server, \
            start_agent(server, upstream.port) as running:
        async with running.visitor() as client:
            for path in ("/status/200?token=secret", "/status/404", "/echo"):
                await client.post(path, content=b"12345")
        await wait_until(lambda: logging_plugin.written == 3)
        newest = await server.hooks.recent_requests(running.alias, 2, server)
        assert newest is not None
        everything = await server.hooks.recent_requests(None, 10, server)
        assert await server.hooks.recent_requests("nobody", 10, server) == []
    finished = time.time()
    assert [(r.path, r.status) for r in newest] == [("/echo", 200), ("/status/404", 404)]
    assert everything is not None and [r.path for r in everything] == ["/echo", "/status/404", "/status/200"]
    for logged in everything:
        assert (logged.alias, logged.method, logged.port, logged.client) == (running.alias, "POST", upstream.port,
                                                                            "127.0.0.1")
        assert logged.bytes_in == 5 and logged.bytes_out > 0 and 0 < logged.duration < 30
        assert started <= logged.started_at <= finished  # microseconds on MariaDB too (DATETIME(6))
    # Stopped, it answers nothing (another plugin's log may answer instead).
    assert await logging_plugin.recent_requests(None, 10) is None


async def test_queued_rows_are_written_at_shutdown(tmp_path: Path, upstream: Upstream,
                                                   database: dict[str, Any]) -> None:
    # The writer would wait an hour: only the shutdown flush can write these rows.
    logging_plugin = plugin(flush_seconds=3600, batch_size=1000)
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server, \
            start_agent(server, upstream.port) as running:
        url = db.database_url(server.settings)
        async with running.visitor() as client:
            for i in range(7):
                assert (await client.get(f"/queued/{i}")).status_code == 200
        await wait_until(lambda: logging_plugin.queued == 7)  # after_response follows the response
        assert logging_plugin.written == 0
    table = Table(url)
    try:
        assert [row["path"] for row in await table.rows()] == [f"/queued/{i}" for i in range(7)]
    finally:
        await table.aclose()
    assert logging_plugin.written == 7 and logging_plugin.queued == 0 and logging_plugin.dropped == 0


async def test_steady_traffic_is_written_once_per_flush_not_once_per_request(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:
    """Rows arriving while a batch is being written wait for the next tick (or a full batch): under steady
    traffic the writer commits at most one batch per ``flush_seconds``. Going on until the queue was empty
    wrote a transaction per request or two, which cost the server more CPU than proxying (issue 13)."""
    flush = 0.2
    requests = 150
    logging_plugin = plugin(flush_seconds=flush)  # batch_size 500: no batch is ever full here
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server, \
            start_agent(server, upstream.port) as running:
        started = time.monotonic()
        async with running.visitor() as client:
            for i in range(requests):
                assert (await client.get(f"/steady/{i}")).status_code == 200
        await wait_until(lambda: logging_plugin.written == requests)
        elapsed = time.monotonic() - started
        batches = logging_plugin.batches
    assert logging_plugin.dropped == 0
    # One tick at most per flush_seconds (plus the one under way when traffic started), one batch per tick.
    assert 1 <= batches <= elapsed / flush + 2, (batches, elapsed)


async def test_old_rows_are_deleted(tmp_path: Path, database: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    now = datetime.now(UTC)
    ages = {"old-a": 400, "old-b": 45, "old-c": 31, "old-d": 30.5, "old-e": 31, "old-f": 60, "old-g": 90,
            "recent-a": 29, "recent-b": 1, "recent-c": 0}
    engine = await db.prepare_database(make_settings(tmp_path / "data", **database), LOG_SCHEMA)  # SQLite: creates it
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(ApiRequest), [
                {"alias": alias, "port": 1, "method": "GET", "path": "/", "status_code": 200,
                 "created_at": now - timedelta(days=days)} for alias, days in ages.items()])
    finally:
        await engine.dispose()

    logging_plugin = plugin(retention_days=30)
    logging_plugin.delete_batch_size = 2  # 7 old rows: four DELETE transactions
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server:
        await wait_until(lambda: logging_plugin.purged == 7)  # the first run is at start-up
        table = Table(db.database_url(server.settings))
        try:
            assert sorted(row["alias"] for row in await table.rows()) == ["recent-a", "recent-b", "recent-c"]
        finally:
            await table.aclose()
        assert await logging_plugin.purge() == 0  # nothing older is left
    assert "deleted 7 rows older than 30 days" in caplog.text


async def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    engine = await db.prepare_database(make_settings(tmp_path / "data"), LOG_SCHEMA)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(ApiRequest).values(
                alias="ancient", port=1, method="GET", path="/", status_code=200,
                created_at=datetime.now(UTC) - timedelta(days=3650)))
    finally:
        await engine.dispose()
    keeper = plugin(retention_days=0)
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", keeper)]) as server:
        assert await keeper.purge() == 0
        table = Table(db.database_url(server.settings))
        try:
            assert await table.count() == 1
        finally:
            await table.aclose()


async def test_a_batch_the_database_refuses_is_dropped_and_logging_goes_on(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    logging_plugin = plugin()
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server, \
            start_agent(server, upstream.port) as running:
        bad: Any = ("app", None, *queued_request()[2:])  # port NOT NULL: refused for its content on every database
        assert await logging_plugin._write([bad, queued_request()]) is True  # done with: not retried
        assert logging_plugin.dropped == 2 and logging_plugin.failed_batches == 1
        async with running.visitor() as client:
            assert (await client.get("/after-refusal")).status_code == 200
        await wait_until(lambda: logging_plugin.written == 1)
    assert "refused a batch of 2 rows" in caplog.text and "dropped them" in caplog.text


def odd_requests(count: int) -> list[QueuedRequest]:
    """Queued requests of every shape a row is made from: plain, cut, escaped, whole seconds, no client."""
    odd: list[QueuedRequest] = [
        ("app", 3000, "GET", b"/p/\xc3\xa9 x?token=abc", 200, 5, 12, 1_700_000_000.25, 0.0123, "203.0.113.9"),
        ("a" * 300, 1, "M" * 70, b"/" + b"a" * 200, 0, 0, 0, 1_700_000_000.0, 0.0, ""),
        ("app", 1, "GET", b"/whole/second", 200, 0, 1024, 1_700_000_000.9999996, 0.00123456, "::1"),
        ("app", 1, "GET", b"/a [cut]?x", 404, 1, 2, 1_700_000_001.5, 1.5, "10.0.0.1"),
    ]
    plain = [("app", 3000, "GET", f"/n/{i}".encode(), 200, i, 2 * i, 1_765_000_000 + i * 0.0137, i / 1000, "127.0.0.1")
             for i in range(count - len(odd))]
    return [*odd, *plain]


@pytest.mark.parametrize("dialect", [aiosqlite.dialect(), aiomysql.dialect(), asyncmy.dialect(), asyncpg.dialect()],
                         ids=["sqlite", "aiomysql", "asyncmy", "postgresql"])
def test_driver_rows_are_what_to_row_gives(dialect: Any) -> None:
    """BatchInsert.driver_row (queued tuple straight to the driver's parameters) against the rows'
    definition, to_row through the column types' bind processors, for each driver's dialect."""
    inserter = BatchInsert(dialect, 100)
    items = odd_requests(3000)
    assert [inserter.driver_row(item) for item in items] == inserter.parameters([to_row(item, 100) for item in items])
    statements = inserter.statements(items)
    if dialect.name == "sqlite":  # several rows per INSERT, the parameters flattened in order
        assert [len(parameters) for _, parameters in statements][:2] == [SQLITE_ROWS_PER_INSERT * 11] * 2
        assert sum(len(parameters) for _, parameters in statements) == 3000 * 11
        assert statements[0][1][:11] == inserter.driver_row(items[0])
    else:  # one executemany: the drivers group the rows themselves
        assert statements == [(inserter.sql, [inserter.driver_row(item) for item in items])]


def test_a_sqlite_that_takes_fewer_parameters_gets_fewer_rows_per_insert() -> None:
    """A SQLite compiled with a lower SQLITE_MAX_VARIABLE_NUMBER refuses 500 rows a statement: the
    writer then sends 90 (the batch is retried); other errors, and other databases, change nothing."""
    sqlite_inserter = BatchInsert(aiosqlite.dialect())
    assert not sqlite_inserter.fewer_rows(sqlite3.OperationalError("database is locked"))
    assert sqlite_inserter.fewer_rows(sqlite3.OperationalError("too many SQL variables"))
    assert not sqlite_inserter.fewer_rows(sqlite3.OperationalError("too many SQL variables"))  # once
    statements = sqlite_inserter.statements(odd_requests(200))
    assert [len(parameters) // 11 for _, parameters in statements] == [SQLITE_FEWER_ROWS, SQLITE_FEWER_ROWS, 20]
    assert not BatchInsert(aiomysql.dialect()).fewer_rows(sqlite3.OperationalError("too many SQL variables"))


async def test_a_batch_of_several_inserts_is_written_whole(tmp_path: Path, database: dict[str, Any]) -> None:
    """More rows than one SQLite INSERT carries, in one batch: every row as to_row defines it, in order."""
    # The writer task stays asleep; retention off (these times are years old).
    logging_plugin = plugin(flush_seconds=3600, batch_size=5000, retention_days=0)
    items = odd_requests(2 * SQLITE_ROWS_PER_INSERT + 7)
    async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)], **database) as server:
        url = db.database_url(server.settings)
        assert await logging_plugin._write(items) is True
    table = Table(url)
    try:
        rows = await table.rows()
    finally:
        await table.aclose()
    assert logging_plugin.written == len(items) and logging_plugin.failed_batches == 0
    expected = [to_row(item, logging_plugin.settings.max_path_length) for item in items]
    for row in rows:
        row.pop("id")
        row["created_at"] = as_utc(row["created_at"])
        row["cut"] = bool(row["cut"])
    assert rows == expected


# -- A real database stopped and restarted under traffic ----------------------------------------
async def test_database_down_traffic_flows_rows_queue_then_drop_and_logging_resumes(
        tmp_path: Path, upstream: Upstream, private_mariadb: PrivateMariaDB, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    password = "s3cret-pw"
    await private_mariadb.execute("CREATE DATABASE comzy_log")
    url = private_mariadb.url(password, "comzy_log")
    engine = db.create_engine(url)
    try:
        await db.upgrade_to_head(engine, [LOG_SCHEMA])
    finally:
        await engine.dispose()
    logging_plugin = plugin(queue_size=20, batch_size=5, drop_log_seconds=3600, shutdown_seconds=1)
    table = Table(url)

    def warnings(fragment: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and fragment in r.getMessage()]

    try:
        async with start_server(tmp_path / "data", plugins=[("mysql_logging", logging_plugin)],
                                database_url=url.render_as_string(hide_password=False)) as server, \
                start_agent(server, upstream.port) as running, running.visitor() as client:
            for i in range(5):
                assert (await client.get(f"/before/{i}")).status_code == 200
            await wait_until(lambda: logging_plugin.written == 5)

            await private_mariadb.stop()
            # Traffic flows as before, each request as fast as ever: nothing waits for the database.
            for i in range(30):
                with anyio.fail_after(5):
                    assert (await client.get(f"/during/{i}")).status_code == 200
            # after_response runs just after the visitor has the response: wait for the last one's.
            await wait_until(lambda: logging_plugin.queued + logging_plugin.dropped == 30)
            # The bound holds: 20 rows wait (the batch being retried included), the 10 newest are dropped.
            assert logging_plugin.queued == 20 and logging_plugin.dropped == 10
            await wait_until(lambda: logging_plugin.failed_batches >= 3)  # it keeps retrying...
            assert len(warnings("cannot write to the database")) == 1  # ...with one warning, not one per retry
            [down] = warnings("cannot write to the database")
            assert f"root:***@127.0.0.1:{private_mariadb.port}/comzy_log" in down
            await wait_until(lambda: len(warnings("dropped")) == 1)
            assert "the queue of 20 rows was full" in warnings("dropped")[0]

            await private_mariadb.start()  # same data directory and port
            await wait_until(lambda: logging_plugin.written == 25)
            assert logging_plugin.queued == 0
            paths = [row["path"] for row in await table.rows()]
            assert paths == [f"/before/{i}" for i in range(5)] + [f"/during/{i}" for i in range(20)]
            [back] = [r.getMessage() for r in caplog.records if "again after" in r.getMessage()]
            assert r"10 rows were dropped meanwhile" in back

            for i in range(3):
                assert (await client.get(f"/after/{i}")).status_code == 200
            await wait_until(lambda: logging_plugin.written == 28)

            # Down again at shutdown: the server still stops, within COMZY_MYSQL_LOGGING_SHUTDOWN_SECONDS.
            await private_mariadb.stop()
            for i in range(2):
                assert (await client.get(f"/last/{i}")).status_code == 200
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 8
        assert logging_plugin.dropped == 12 and logging_plugin.queued == 0
        assert "2 rows not written" in warnings("shutdown")[0]
        assert password not in caplog.text

        await private_mariadb.start()
        assert await table.count() == 28  # nothing written twice, nothing from after the last stop
    finally:
        await table.aclose()


# -- The request path, settings, enabling ---------------------------------------------------------
def queued_request(path: bytes = b"/x") -> QueuedRequest:
    return ("app", 3000, "GET", path, 200, 0, 12, time.time(), 0.004, "127.0.0.1")


def an_exchange(path: bytes = b"/x?q=1") -> Exchange:
    tunnel = Tunnel("app", "http://app.localhost", 3000, "127.0.0.1")
    request = ForwardRequest("app", "GET", path, [], "app.localhost", "203.0.113.9", "http")
    return Exchange(request, tunnel, 200, 5, 12, 1_700_000_000.25, 0.0123)


def test_after_response_only_appends_to_a_bounded_queue() -> None:
    logging_plugin = plugin(queue_size=10_000)
    assert not inspect.iscoroutinefunction(logging_plugin.after_response)  # the edge never awaits it
    exchange = an_exchange()
    begun = time.perf_counter()
    for _ in range(20_000):
        logging_plugin.after_response(exchange)
    elapsed = time.perf_counter() - begun
    assert logging_plugin.queued == 10_000 and logging_plugin.dropped == 10_000
    assert logging_plugin.written == 0
    # A few microseconds per call on any machine; a database round trip would be far slower.
    assert elapsed < 1.0, f"{elapsed / 20_000 * 1e6:.1f} µs per after_response"


def test_the_queue_holds_targets_cut_to_what_a_row_keeps() -> None:
    """A visitor's 60 KiB targets are held cut to the path limit (plus one byte), so the queue a
    database outage fills is bounded in bytes; the row still says the path was cut."""
    logging_plugin = plugin(max_path_length=100)
    logging_plugin.after_response(an_exchange(b"/" + b"a" * 60_000))
    logging_plugin.after_response(an_exchange(b"/" + b"a" * 99))
    long, short = list(logging_plugin._queue)
    assert len(long[3]) == 101 and short[3] == b"/" + b"a" * 99
    assert to_row(long, 100)["path"] == "/" + "a" * 93 + " [cut]" and to_row(long, 100)["cut"] is True
    assert to_row(short, 100)["cut"] is False


def test_row_of_an_exchange() -> None:
    logging_plugin = plugin()
    logging_plugin.after_response(an_exchange(b"/p/\xc3\xa9 x?token=abc"))
    [item] = list(logging_plugin._queue)
    assert to_row(item, 8192) == {
        "alias": "app", "port": 3000, "method": "GET", "path": "/p/%C3%A9%20x", "status_code": 200,
        "bytes_in": 5, "bytes_out": 12, "duration_ms": 12.3, "client_address": "203.0.113.9",
        "created_at": datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC), "cut": False}
    assert logged_path(b"/a%2Fb?x", 100) == ("/a%2Fb", False)  # existing escapes are kept as sent
    assert logged_path(b"/" + b"a" * 99, 100) == ("/" + "a" * 99, False)
    assert logged_path(b"/" + b"a" * 100, 100) == ("/" + "a" * 93 + " [cut]", True)
    # The limit applies to the path as logged: an escaped byte takes three characters.
    assert logged_path(b"/" + b"\xff" * 40, 100) == ("/" + "%FF" * 31 + " [cut]", True)
    assert logged_path(b"/a" + b"\xff" * 40, 100) == ("/a" + "%FF" * 30 + " [cut]", True)  # no half escape
    # A visitor cannot forge the marker: the space a whole path would need is escaped.
    assert logged_path(b"/a [cut]", 100) == ("/a%20[cut]", False)
    assert to_row(("a" * 300, 1, "M" * 40, b"/", 0, 0, 0, 0.0, 0.0, ""), 100)["alias"] == "a" * 255
    assert to_row(("a", 1, "UPDATEREDIRECTREF", b"/", 0, 0, 0, 0.0, 0.0, ""), 100)["method"] == "UPDATEREDIRECTREF"
    long_method = to_row(("a", 1, "M" * 65, b"/", 0, 0, 0, 0.0, 0.0, ""), 100)
    assert (long_method["method"], long_method["cut"]) == ("M" * 58 + " [cut]", True)
    assert to_row(("a", 1, "GET", b"/", 0, 0, 0, 0.0, 0.0, ""), 100)["client_address"] is None


async def test_drop_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    logging_plugin = plugin(queue_size=1, drop_log_seconds=0.3)
    for _ in range(4):
        logging_plugin.after_response(an_exchange())
    logging_plugin._report_drops()
    logging_plugin.after_response(an_exchange())
    logging_plugin._report_drops()  # within drop_log_seconds: silent
    assert [r.getMessage() for r in caplog.records] == [
        "request log: dropped 3 rows: the queue of 1 rows was full (3 dropped since start)"]
    await anyio.sleep(0.35)  # the interval under test, not a readiness wait
    logging_plugin._report_drops()
    assert caplog.records[-1].getMessage() == \
        "request log: dropped 1 rows: the queue of 1 rows was full (4 dropped since start)"


async def test_disabled_it_opens_no_database_and_enabled_by_name_it_logs(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from comzy.core.hooks import builtin_names, load_plugins, select_plugins

    assert "mysql_logging" in builtin_names() and "mysql_logging" in select_plugins(None)
    assert load_plugins(select_plugins("none")) == []
    async with start_server(tmp_path / "bare", plugins=load_plugins(select_plugins("none"))) as server, \
            start_agent(server, upstream.port) as running, running.visitor() as client:
        assert (await client.get("/not-logged")).status_code == 200
    assert not (tmp_path / "bare" / "comzy.db").exists()  # no database was created, or opened

    monkeypatch.setenv("COMZY_MYSQL_LOGGING_FLUSH_SECONDS", "0.05")
    [(name, loaded)] = load_plugins(["mysql_logging"])  # through the entry point, settings from the environment
    assert name == "mysql_logging" and isinstance(loaded, MysqlLogging)
    async with start_server(tmp_path / "data", plugins=[(name, loaded)]) as server, \
            start_agent(server, upstream.port) as running, running.visitor() as client:
        assert (await client.get("/logged")).status_code == 200
        await wait_until(lambda: loaded.written == 1)
    assert (tmp_path / "data" / "comzy.db").is_file()


async def test_a_database_whose_schema_is_behind_stops_start_up(tmp_path: Path) -> None:
    from comzy import PluginError

    async for url in scratch_database("mariadb"):  # empty: `comzy-server db upgrade` never ran
        with pytest.raises(BaseExceptionGroup) as refused:
            async with start_server(tmp_path / "data", plugins=[("mysql_logging", plugin())],
                                    database_url=url.render_as_string(hide_password=False)):
                pass
        assert refused.group_contains(
            PluginError, match=r"the plugin mysql_logging's schema in the database .* has no tables yet: "
                               r"run `comzy-server db upgrade`")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_MYSQL_LOGGING_QUEUE_SIZE", "50")
    monkeypatch.setenv("COMZY_MYSQL_LOGGING_RETENTION_DAYS", "0")
    monkeypatch.setenv("COMZY_MYSQL_LOGGING_FLUSH_SECONDS", "0.5")
    loaded = MysqlLogging()
    assert (loaded.settings.queue_size, loaded.settings.retention_days, loaded.settings.flush_seconds) == (50, 0, 0.5)
    defaults = MysqlLoggingSettings(_env_file=None, queue_size=10000, retention_days=30, flush_seconds=1)
    assert (defaults.batch_size, defaults.shutdown_seconds) == (500, 5.0)
    monkeypatch.setenv("COMZY_MYSQL_LOGGING_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="batch_size"):
        MysqlLoggingSettings(_env_file=None)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "comzy" / "plugins" / "mysql_logging" / "README.md").read_text()
    for name, field in MysqlLoggingSettings.model_fields.items():
        variable = f"COMZY_MYSQL_LOGGING_{name.upper()}"
        assert f"| `{variable}` | `{field.default:g}` | {field.description} |" in readme, variable
