"""Request logging: one ``api_requests`` row per proxied request, written in batches off the request path.

``after_response`` only appends a tuple to a bounded in-memory queue. A writer task turns the
queue into multi-row INSERTs, one transaction per batch; while the database is down it keeps the
batch, retries with back-off and lets the queue fill up to its bound, beyond which new rows are
dropped and counted. A second task deletes rows older than the retention period.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
from sqlalchemy import String, delete, insert, select
from sqlalchemy.exc import DataError, IntegrityError

from comzy import Exchange, LoggedRequest, Schema, hookimpl
from comzy.db import describe_error, masked_url, prepare_database

from .models import SCHEMA, ApiRequest
from .settings import MysqlLoggingSettings

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncEngine

    from comzy import ServerContext

log = logging.getLogger("comzy.plugins.mysql_logging")


def _length(column: str) -> int:
    kind = ApiRequest.__table__.c[column].type
    assert isinstance(kind, String) and kind.length is not None
    return kind.length


# The columns' lengths: an alias is a DNS label and an address fits, so these cuts never happen in
# practice; a longer method is cut and marked (see :func:`cut_to_fit`).
ALIAS_LENGTH, METHOD_LENGTH, CLIENT_LENGTH = _length("alias"), _length("method"), _length("client_address")

#: What ends a method or a path that was cut. A whole one never ends so: a method is a token
#: (no spaces), and a logged path has its spaces %-escaped.
CUT_MARK = " [cut]"

# Printable ASCII stays as sent (existing %XX escapes included); spaces, control characters
# and non-ASCII bytes are %-escaped, so the column holds ASCII whatever the table's charset.
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))

#: What ``after_response`` queues: alias, port, method, target, status, bytes in, bytes out,
#: start (unix time), duration (s), client address. Converted to a row by the writer. The target
#: is the request's own, whose size COMZY_MAX_REQUEST_HEAD bounds.
QueuedRequest = tuple[str, int, str, bytes, int, int, int, float, float, str]


def cut_to_fit(text: str, limit: int) -> tuple[str, bool]:
    """``text`` if it has at most ``limit`` characters, else its start and :data:`CUT_MARK` in
    ``limit`` characters; and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[:limit - len(CUT_MARK)] + CUT_MARK, True


def logged_path(target: bytes, limit: int) -> tuple[str, bool]:
    """The path as logged, and whether it was cut: the target without its query string (queries can
    carry tokens and other secrets), non-ASCII and control bytes %-escaped, kept whole up to
    ``limit`` characters; a longer one is cut (at most ``limit`` characters with the mark)."""
    path = quote(target.split(b"?", 1)[0], safe=_PATH_SAFE)
    if len(path) <= limit:
        return path, False
    head = path[:limit - len(CUT_MARK)]
    escape = head.rfind("%", len(head) - 2)
    if escape >= 0:  # never half an escape (the "%F" of "%FF")
        head = head[:escape]
    return head + CUT_MARK, True


#: The columns a logged request fills (``to_row``'s keys); the rest have defaults.
ROW_COLUMNS = ("alias", "port", "method", "path", "status_code", "bytes_in", "bytes_out", "duration_ms",
               "client_address", "created_at", "cut")


def to_row(item: QueuedRequest, path_limit: int) -> dict[str, Any]:
    """The ``api_requests`` row of a queued request, its path kept up to ``path_limit`` characters."""
    alias, port, method, target, status, bytes_in, bytes_out, started_at, duration, client = item
    method, method_cut = cut_to_fit(method, METHOD_LENGTH)
    path, path_cut = logged_path(target, path_limit)
    return {
        "alias": alias[:ALIAS_LENGTH],
        "port": port,
        "method": method,
        "path": path,
        "status_code": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(duration * 1000.0, 3),
        "client_address": client[:CLIENT_LENGTH] or None,
        "created_at": datetime.fromtimestamp(started_at, UTC),
        "cut": method_cut or path_cut,
    }


#: Bytes a logged path keeps as sent (``_PATH_SAFE``): a target made only of these needs no escaping.
_PATH_SAFE_BYTES = _PATH_SAFE.encode()
#: Most rows one SQLite INSERT carries, at 11 parameters a row: under SQLite's default limit of
#: 32,766 parameters since 3.32, and under 999 before it.
SQLITE_ROWS_PER_INSERT = 500 if sqlite3.sqlite_version_info >= (3, 32) else 90
#: Rows per SQLite INSERT once a build refused :data:`SQLITE_ROWS_PER_INSERT` ("too many SQL
#: variables": SQLITE_MAX_VARIABLE_NUMBER set lower when SQLite was compiled): 990 parameters.
SQLITE_FEWER_ROWS = 90


class BatchInsert:
    """The request log's INSERT, compiled once for a database's dialect, and a batch of queued
    requests as its driver takes them.

    ``connection.execute(insert(ApiRequest), rows)`` compiles nothing per batch but walks each
    row's parameters through SQLAlchemy's generic processing: 22 µs of CPU per row against about
    9 µs for the same rows handed to the driver (SQLite, measured). The log writes a row per
    proxied request, so the difference was a tenth of the server's CPU per request at 50
    connections. :meth:`statements` goes further: it builds each driver row straight from the
    queued tuple (no ``to_row`` dict), and on SQLite it sends up to
    :data:`SQLITE_ROWS_PER_INSERT` rows per multi-row ``INSERT ... VALUES``: Python's sqlite3
    ``executemany`` binds, steps and resets the statement once per row, releasing the GIL around
    each step. The types' own bind processors (public API) still convert each value as SQLAlchemy
    would (booleans to integers, times to SQLite's text), and the driver's errors still arrive as
    SQLAlchemy's (IntegrityError, DataError). :func:`to_row` stays the definition of a row: the
    tests check that both give the same parameters.
    """

    def __init__(self, dialect: Dialect, path_limit: int = 8192) -> None:
        table = ApiRequest.__table__
        compiled = insert(table).compile(dialect=dialect, column_keys=list(ROW_COLUMNS))
        #: The statement, in the driver's own parameter style.
        self.sql = compiled.string
        self.path_limit = path_limit
        # Positional styles (qmark, format, numeric): values in the order the statement names them;
        # named styles (named, pyformat): a dict per row, keyed by column.
        order = list(compiled.positiontup or ()) if compiled.positional else list(ROW_COLUMNS)
        if sorted(order) != sorted(ROW_COLUMNS):
            raise RuntimeError(f"unexpected parameters in the request log's INSERT: {order}")
        self._order = order
        self._named = not compiled.positional
        self._values = itemgetter(*order)
        processors = {name: processor for name in ROW_COLUMNS
                      if (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect))}
        self._convert = [(index, processors[name]) for index, name in enumerate(order) if name in processors]
        # Built from ROW_COLUMNS' order, then put in the statement's when that differs.
        self._reorder = None if order == list(ROW_COLUMNS) else itemgetter(*(ROW_COLUMNS.index(n) for n in order))
        self._duration = processors.get("duration_ms")
        self._cut = processors.get("cut")
        self._time = processors.get("created_at")
        self._time_text = self._time is not None and _formats_by_second(self._time)
        self._second = -1
        self._second_text = ""
        # SQLite: several rows per statement (qmark only: "(?, ..., ?)" repeats as is).
        self._values_group = ""
        if dialect.name == "sqlite" and dialect.paramstyle == "qmark" and self.sql.count("VALUES (") == 1:
            head, group = self.sql.split("VALUES ", 1)
            if group.startswith("(") and group.endswith(")") and group.count("?") == len(order):
                self._head, self._values_group = head + "VALUES ", group
        self._multi_sql: dict[int, str] = {}
        #: Rows per multi-row INSERT (SQLite); :meth:`fewer_rows` lowers it.
        self.rows_per_insert = SQLITE_ROWS_PER_INSERT

    def parameters(self, rows: list[dict[str, Any]]) -> list[Any]:
        """``rows`` (``to_row``'s dicts) as the driver's parameters, converted by the column types."""
        out: list[Any] = []
        for row in rows:
            values = list(self._values(row))
            for index, convert in self._convert:
                if values[index] is not None:
                    values[index] = convert(values[index])
            out.append(dict(zip(self._order, values, strict=True)) if self._named else tuple(values))
        return out

    def driver_row(self, item: QueuedRequest) -> Any:
        """A queued request as the driver's parameters: what ``parameters([to_row(item, path_limit)])[0]``
        gives, without the dict, with the time's text made once per second (SQLite) and the common
        cases (a printable ASCII path, a short method) taken without a call."""
        alias, port, method, target, status, bytes_in, bytes_out, started_at, duration, client = item
        cut = False
        if len(method) > METHOD_LENGTH:
            method, cut = cut_to_fit(method, METHOD_LENGTH)
        path = target.split(b"?", 1)[0]
        # Most paths are printable ASCII, which quote() would keep as is: checked in C, not quoted.
        if len(path) <= self.path_limit and not path.translate(None, _PATH_SAFE_BYTES):
            text = path.decode("ascii")
        else:
            text, path_cut = logged_path(target, self.path_limit)
            cut = cut or path_cut
        milliseconds = round(duration * 1000.0, 3)
        if self._duration is not None:
            milliseconds = self._duration(milliseconds)
        created: Any = datetime.fromtimestamp(started_at, UTC)
        if self._time is not None:
            micro = created.microsecond
            # Microsecond 0 may be a time rounded up into the next second: formatted whole.
            if self._time_text and micro and int(started_at) == self._second:
                created = f"{self._second_text}.{micro:06d}"
            else:
                created = self._time_of(created, started_at)
        values = (alias[:ALIAS_LENGTH], port, method, text, status, bytes_in, bytes_out, milliseconds,
                  client[:CLIENT_LENGTH] or None, created, self._cut(cut) if self._cut is not None else cut)
        if self._named:
            return dict(zip(ROW_COLUMNS, values, strict=True))
        return values if self._reorder is None else self._reorder(values)

    def _time_of(self, created: datetime, started_at: float) -> Any:
        """``created`` as the time column's processor writes it; with a text format, the second's
        text is kept for the next rows."""
        assert self._time is not None
        if not self._time_text or not created.microsecond:
            return self._time(created)
        self._second = int(started_at)
        self._second_text = self._time(created.replace(microsecond=0))[:-7]
        return f"{self._second_text}.{created.microsecond:06d}"

    def statements(self, items: list[QueuedRequest]) -> list[tuple[str, Any]]:
        """``items`` as ``(statement, parameters)`` pairs for ``exec_driver_sql``: on SQLite, rows
        grouped in multi-row INSERTs (parameters flattened); elsewhere one ``executemany``."""
        rows = [self.driver_row(item) for item in items]
        if not self._values_group:
            return [(self.sql, rows)]
        out: list[tuple[str, Any]] = []
        step = self.rows_per_insert
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            # Only the full-size statement is kept: one per batch length would be up to 500
            # strings of up to ~20 KB, as many as the traffic's batch sizes happen to vary.
            sql = self._multi_sql.get(len(chunk)) if len(chunk) == step else None
            if sql is None:
                sql = self._head + ", ".join([self._values_group] * len(chunk))
                if len(chunk) == step:
                    self._multi_sql[step] = sql
            out.append((sql, tuple(chain.from_iterable(chunk))))
        return out

    def fewer_rows(self, error: BaseException) -> bool:
        """After ``error``: whether it was SQLite refusing a statement's number of parameters, now
        met by sending fewer rows per INSERT (the batch is worth retrying at once)."""
        if not self._values_group or self.rows_per_insert <= SQLITE_FEWER_ROWS:
            return False
        if "too many SQL variables" not in str(error):
            return False
        self.rows_per_insert = SQLITE_FEWER_ROWS
        return True


def _formats_by_second(process: Any) -> bool:
    """Whether the time bind processor ``process`` writes a time as text ending in a dot and six digits
    of microseconds (SQLite's default storage format): then a row's text is its second's (formatted
    once per second) with its own microseconds."""
    probe = datetime(2026, 12, 7, 14, 40, 5, 123456, tzinfo=UTC)
    try:
        whole = process(probe.replace(microsecond=0))
        return isinstance(whole, str) and whole.endswith(".000000") and process(probe) == f"{whole[:-7]}.123456"
    except Exception:  # a processor of another shape: call it for every row
        return False


def logged_request(row: Any) -> LoggedRequest:
    """An ``api_requests`` row as the ``recent_requests`` hook answers it."""
    created: datetime = row["created_at"]
    if created.tzinfo is None:  # MySQL and SQLite give UTC back without a zone
        created = created.replace(tzinfo=UTC)
    return LoggedRequest(alias=row["alias"], method=row["method"], path=row["path"], status=row["status_code"],
                         bytes_in=row["bytes_in"], bytes_out=row["bytes_out"], started_at=created.timestamp(),
                         duration=row["duration_ms"] / 1000.0, client=row["client_address"], port=row["port"])


class MysqlLogging:
    """Writes one ``api_requests`` row per proxied request to the server's database.

    Counters for tests and metrics: ``written`` (rows committed), ``batches`` (INSERT transactions
    committed), ``dropped`` (rows lost: queue full, refused by the database, or still queued when
    shutdown ran out of time),
    ``failed_batches`` (failed INSERT attempts, retries included), ``purged`` (rows deleted by
    retention) and ``queued`` (rows waiting, the batch being written included).
    """

    #: Rows deleted per transaction by retention, so one DELETE never holds locks for long.
    delete_batch_size = 5000

    def __init__(self, settings: MysqlLoggingSettings | None = None) -> None:
        self.settings = settings or MysqlLoggingSettings()
        self.written = 0
        self.batches = 0
        self.dropped = 0
        self.failed_batches = 0
        self.purged = 0
        self._queue: deque[QueuedRequest] = deque()
        self._batch: list[QueuedRequest] = []  # taken from the queue, not yet committed
        self._inserter: tuple[AsyncEngine, BatchInsert] | None = None  # compiled for the engine in use
        self._engine: AsyncEngine | None = None
        self._closing = False
        # anyio objects need the event loop: made in on_startup.
        self._wake: anyio.Event | None = None
        self._closing_event: anyio.Event | None = None
        self._writer_done: anyio.Event | None = None
        self._purger_done: anyio.Event | None = None
        self._failing_since: float | None = None
        self._dropped_when_failing = 0
        self._drops_reported = 0
        self._drops_reported_at: float | None = None

    @property
    def queued(self) -> int:
        """Rows waiting to be written, including the batch being written."""
        return len(self._queue) + len(self._batch)

    # -- The request path -----------------------------------------------------------------------
    @hookimpl
    def after_response(self, exchange: Exchange) -> None:
        """Queue the exchange's row; never waits. A full queue drops the row and counts it."""
        if len(self._queue) + len(self._batch) >= self.settings.queue_size:
            self.dropped += 1  # the writer reports drops, at most every drop_log_seconds
            return
        request, tunnel = exchange.request, exchange.tunnel
        # Held cut to what the row can keep (one byte more, so the row still says it was cut): the
        # queue is bounded in bytes, not only in rows, whatever targets visitors send while the
        # database is away (queue_size x (max_path_length + METHOD_LENGTH + a few hundred bytes)).
        target, method = request.target, request.method
        limit = self.settings.max_path_length + 1
        if len(target) > limit:
            target = target[:limit]
        if len(method) > METHOD_LENGTH + 1:
            method = method[:METHOD_LENGTH + 1]
        self._queue.append((tunnel.alias, tunnel.port, method, target, exchange.status,
                            exchange.bytes_in, exchange.bytes_out, exchange.started_at, exchange.duration,
                            request.client))
        wake = self._wake
        if wake is not None and len(self._queue) >= self.settings.batch_size and not wake.is_set():
            wake.set()  # a full batch is written now rather than at the next flush tick

    # -- The request history other plugins read (the dashboard's /api/requests) -----------------
    @hookimpl
    async def recent_requests(self, alias: str | None, limit: int) -> list[LoggedRequest] | None:
        """The newest rows of ``api_requests``, newest first (``limit`` at most, of ``alias`` only
        unless None); None while the plugin is not running. A database error goes to the caller."""
        engine = self._engine
        if engine is None:
            return None
        query = select(ApiRequest).order_by(ApiRequest.id.desc()).limit(limit)
        if alias is not None:
            query = query.where(ApiRequest.alias == alias)
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).mappings().all()
        return [logged_request(row) for row in rows]

    # -- Lifecycle ------------------------------------------------------------------------------
    @hookimpl
    def database_schema(self) -> Schema:
        """``api_requests`` (models.py), with its migrations."""
        return SCHEMA

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        """Open the database (its schema must be current) and start the writer and retention tasks."""
        self._engine = await prepare_database(server.settings, SCHEMA)
        self._closing = False
        self._wake, self._closing_event = anyio.Event(), anyio.Event()
        self._writer_done, self._purger_done = anyio.Event(), anyio.Event()
        server.task_group.start_soon(self._write_forever)
        server.task_group.start_soon(self._purge_forever)
        kept = f"{self.settings.retention_days:g} days" if self.settings.retention_days else "forever"
        log.info("request log: api_requests in %s, kept %s", masked_url(self._engine.url), kept)

    @hookimpl
    async def on_shutdown(self) -> None:
        """Write what is queued (for at most ``shutdown_seconds``), stop the tasks, dispose of the engine."""
        if self._engine is None:
            return
        self._closing = True
        for event in (self._closing_event, self._wake):
            if event is not None:
                event.set()
        # The writer bounds its own flush; the margin covers a query already in flight.
        with anyio.move_on_after(self.settings.shutdown_seconds + 5):
            for done in (self._writer_done, self._purger_done):
                if done is not None:
                    await done.wait()
        engine, self._engine = self._engine, None
        await engine.dispose()

    # -- The writer -----------------------------------------------------------------------------
    async def _write_forever(self) -> None:
        assert self._writer_done is not None
        try:
            while not self._closing:
                assert self._wake is not None
                with anyio.move_on_after(self.settings.flush_seconds):
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self._drain()
            await self._flush_at_shutdown()
        finally:
            self._writer_done.set()

    async def _drain(self) -> None:
        """Write what is queued, then more batches while full ones are waiting; while the database
        fails, retry with back-off.

        Rows that came in during a write wait for the next tick unless they make a full batch: going
        on until the queue was empty wrote a transaction per request or two under steady traffic
        (a write outlasts the gap between requests), which cost more server CPU than proxying them.
        """
        assert self._closing_event is not None
        delay = self.settings.retry_seconds
        longest = max(self.settings.retry_max_seconds, self.settings.retry_seconds)
        while (self._batch or self._queue) and not self._closing:
            if not self._batch:
                self._batch = self._take()
            if await self._write(self._batch):
                self._batch = []
                delay = self.settings.retry_seconds
                if len(self._queue) < self.settings.batch_size:
                    break  # a partial batch: the next tick writes it with what comes in meanwhile
                continue
            self._report_drops()
            with anyio.move_on_after(delay):
                await self._closing_event.wait()  # shutdown cuts the back-off short
            delay = min(delay * 2, longest)
        self._report_drops()

    async def _flush_at_shutdown(self) -> None:
        with anyio.move_on_after(self.settings.shutdown_seconds):
            while self._batch or self._queue:
                if not self._batch:
                    self._batch = self._take()
                if await self._write(self._batch):
                    self._batch = []
                else:
                    await anyio.sleep(self.settings.retry_seconds)
        left = self.queued
        if left:
            self.dropped += left
            self._queue.clear()
            self._batch = []
            log.warning("request log: %d rows not written: the database %s did not take them within %g s of "
                        "shutdown (COMZY_MYSQL_LOGGING_SHUTDOWN_SECONDS)", left, self._where(),
                        self.settings.shutdown_seconds)

    def _take(self) -> list[QueuedRequest]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), self.settings.batch_size))]

    async def _write(self, rows: list[QueuedRequest]) -> bool:
        """The batch's INSERTs in one transaction. True when the batch is done with (written, or
        refused for its content and dropped); False when it must be retried."""
        engine = self._engine
        if engine is None:  # disposed: shutdown gave up waiting for this writer
            return False
        try:
            inserter = self._inserter
            if inserter is None or inserter[0] is not engine:
                inserter = self._inserter = (engine, BatchInsert(engine.dialect, self.settings.max_path_length))
            statements = inserter[1].statements(rows)
            async with engine.begin() as connection:
                for sql, parameters in statements:
                    await connection.exec_driver_sql(sql, parameters)
        except (IntegrityError, DataError) as exc:
            # Retrying cannot help a batch the database refuses for its content; keep logging the rest.
            self.failed_batches += 1
            self.dropped += len(rows)
            log.error("request log: the database %s refused a batch of %d rows (%s); dropped them",
                      self._where(), len(rows), describe_error(exc, engine.url))
            return True
        except Exception as exc:  # unreachable, timed out, a driver's own error: all worth a retry
            self.failed_batches += 1
            if self._inserter is not None and self._inserter[1].fewer_rows(exc):
                log.info("request log: this SQLite takes fewer parameters per statement; writing %d rows "
                         "per INSERT", SQLITE_FEWER_ROWS)
                return await self._write(rows)
            if self._failing_since is None:  # one warning per outage, not one per retry
                self._failing_since = time.monotonic()
                self._dropped_when_failing = self.dropped
                log.warning("request log: cannot write to the database %s (%s); keeping up to %d rows in "
                            "memory (COMZY_MYSQL_LOGGING_QUEUE_SIZE) and retrying", self._where(),
                            describe_error(exc, engine.url), self.settings.queue_size)
            return False
        self.written += len(rows)
        self.batches += 1
        if self._failing_since is not None:
            log.info("request log: writing to the database %s again after %.1f s; %d rows were dropped meanwhile",
                     self._where(), time.monotonic() - self._failing_since, self.dropped - self._dropped_when_failing)
            self._failing_since = None
        return True

    def _report_drops(self) -> None:
        new = self.dropped - self._drops_reported
        if new <= 0:
            return
        now = time.monotonic()
        if self._drops_reported_at is not None and now - self._drops_reported_at < self.settings.drop_log_seconds:
            return
        log.warning("request log: dropped %d rows: the queue of %d rows was full (%d dropped since start)",
                    new, self.settings.queue_size, self.dropped)
        self._drops_reported, self._drops_reported_at = self.dropped, now

    def _where(self) -> str:
        return masked_url(self._engine.url) if self._engine is not None else "(closed)"

    # -- Retention ------------------------------------------------------------------------------
    async def _purge_forever(self) -> None:
        assert self._closing_event is not None and self._purger_done is not None
        try:
            while self.settings.retention_days > 0 and not self._closing:
                await self.purge()
                with anyio.move_on_after(self.settings.retention_interval_seconds):
                    await self._closing_event.wait()
        finally:
            self._purger_done.set()

    async def purge(self) -> int:
        """Delete rows older than ``retention_days``, ``delete_batch_size`` per transaction; how many
        were deleted. A database error is logged (the next run retries), never raised."""
        engine, days = self._engine, self.settings.retention_days
        if engine is None or days <= 0:
            return 0
        cutoff = datetime.now(UTC) - timedelta(days=days)
        deleted = 0
        try:
            while not self._closing:
                async with engine.begin() as connection:
                    # The created_at of the batch's last row: portable, unlike DELETE ... LIMIT.
                    edge = (await connection.execute(
                        select(ApiRequest.created_at).where(ApiRequest.created_at < cutoff)
                        .order_by(ApiRequest.created_at).offset(self.delete_batch_size - 1).limit(1))).scalar()
                    older = ApiRequest.created_at < cutoff if edge is None else ApiRequest.created_at <= edge
                    deleted += (await connection.execute(delete(ApiRequest).where(older))).rowcount
                if edge is None:
                    break
        except Exception as exc:  # a background task must never take the server down
            log.warning("request log: cannot delete rows older than %g days from %s (%s); retrying in %g s",
                        days, self._where(), describe_error(exc, engine.url),
                        self.settings.retention_interval_seconds)
        self.purged += deleted
        if deleted:
            log.info("request log: deleted %d rows older than %g days", deleted, days)
        return deleted
