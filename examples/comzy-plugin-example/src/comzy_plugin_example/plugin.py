"""The plugin: one class, hook methods marked with ``comzy.hookimpl``.

It stamps a header on every forwarded request and refuses a path prefix; each refusal is
recorded in its own table, ``example_blocked``, without slowing the visitor down:
``before_forward`` only puts a record on a bounded in-memory queue (full: the record is dropped
and counted), and a writer task started in ``on_startup`` writes the queue in batches, trimming
each alias to its newest ``COMZY_EXAMPLE_KEEP_PER_ALIAS`` rows as it goes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from comzy import AdminRoute, Commands, ForwardRequest, Reject, Schema, Tunnel, hookimpl
from comzy.db import describe_error, prepare_database

from .admin import PREFIX, BlockedApi
from .cli import add_commands
from .models import SCHEMA
from .settings import ExampleSettings
from .store import BlockedRequest, delete_older_than, write_batch

if TYPE_CHECKING:
    from comzy import ServerContext
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("comzy_plugin_example")


class ExamplePlugin:
    """Stamps a header on forwarded requests, refuses a path prefix, and keeps what it refused.

    The server builds it with no arguments (settings come from the environment); tests may pass
    an ``ExampleSettings`` instead. Counters, for tests and the admin route: ``written`` (records
    committed), ``dropped`` (records lost: the queue was full or the database refused a batch).
    """

    #: Most records per INSERT: a burst is written in few transactions.
    batch_size = 200
    #: Seconds between deletions of rows older than ``keep_days`` (the first runs at start-up).
    prune_interval = 3600.0
    #: At shutdown, seconds the writer gets to write what is still queued.
    shutdown_seconds = 5.0

    def __init__(self, settings: ExampleSettings | None = None) -> None:
        self.settings = settings or ExampleSettings()
        self._header = (self.settings.header_name.lower().encode("latin-1"),
                        self.settings.header_value.encode("latin-1"))
        self.written = 0
        self.dropped = 0
        #: The database engine while the server runs (None before on_startup and after on_shutdown).
        self.engine: AsyncEngine | None = None
        # Made in on_startup (anyio objects belong to a running event loop), gone after on_shutdown.
        self._queue: MemoryObjectSendStream[BlockedRequest] | None = None
        self._writer_done: anyio.Event | None = None
        self._failing = False

    def blocks(self, path: str) -> bool:
        """Whether ``path`` lies under the blocked prefix."""
        prefix = self.settings.blocked_prefix
        if not prefix:
            return False
        return prefix == "/" or path == prefix or path.startswith(prefix + "/")

    # -- The request path: never waits ------------------------------------------------------------
    @hookimpl
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> None:
        """Refuse blocked paths with 403 (recording them); stamp the header on everything else."""
        if self.blocks(request.path):
            self._record(BlockedRequest.of(request, time.time()))
            raise Reject(f"{request.path} is blocked on {tunnel.alias}", status=403)
        name = self._header[0]
        # Replace, never append: a visitor must not be able to pre-set the stamp.
        request.headers[:] = [(n, v) for n, v in request.headers if n.lower() != name]
        request.headers.append(self._header)

    def _record(self, record: BlockedRequest) -> None:
        queue = self._queue
        if queue is None:  # not started (a test's bare object) or shutting down: nothing to write to
            return
        try:
            queue.send_nowait(record)
        except anyio.WouldBlock:
            # The database is slower than the refusals: losing a record beats slowing every visitor.
            self.dropped += 1

    # -- Tables, lifecycle, routes, commands ------------------------------------------------------
    @hookimpl
    def database_schema(self) -> Schema:
        """``example_blocked`` (models.py) and its migrations (migrations/)."""
        return SCHEMA

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        """Open the database (the embedded SQLite upgrades itself; another database must have had
        ``comzy-server db upgrade``) and start the writer."""
        self.engine = await prepare_database(server.settings, SCHEMA)
        send, receive = anyio.create_memory_object_stream[BlockedRequest](self.settings.queue_size)
        self._queue, self._writer_done = send, anyio.Event()
        server.task_group.start_soon(self._write_forever, receive)

    @hookimpl
    def admin_routes(self) -> list[AdminRoute]:
        """``GET /example/blocked`` (see admin.py); the admin listener asks for its token first."""
        return [AdminRoute(PREFIX, BlockedApi(self))]

    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        """``comzy-server example blocked|purge`` (see cli.py)."""
        add_commands(commands)

    @hookimpl
    async def on_shutdown(self) -> None:
        """Let the writer write what is queued (for at most ``shutdown_seconds``), then close the database."""
        queue, self._queue = self._queue, None
        if queue is None:
            return
        queue.close()  # the writer drains what is queued, then ends
        if self._writer_done is not None:
            with anyio.move_on_after(self.shutdown_seconds):
                await self._writer_done.wait()
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.dispose()

    # -- The writer -------------------------------------------------------------------------------
    async def _write_forever(self, queue: MemoryObjectReceiveStream[BlockedRequest]) -> None:
        assert self._writer_done is not None
        prune_due = anyio.current_time()
        try:
            async with queue:
                while True:
                    if self.settings.keep_days and anyio.current_time() >= prune_due:
                        await self._delete_old()
                        prune_due = anyio.current_time() + self.prune_interval
                    batch = await self._next_batch(queue, prune_due - anyio.current_time()
                                                   if self.settings.keep_days else None)
                    if batch is None:
                        return  # on_shutdown closed the queue and everything in it is written
                    if batch:
                        await self._write(batch)
        finally:
            self._writer_done.set()

    async def _next_batch(self, queue: MemoryObjectReceiveStream[BlockedRequest],
                          first_within: float | None) -> list[BlockedRequest] | None:
        """The records queued now (waiting up to ``first_within`` s for the first: ``[]`` when none
        came); None once the queue is closed and empty."""
        with anyio.move_on_after(first_within):
            try:
                batch = [await queue.receive()]
            except anyio.EndOfStream:
                return None
            while len(batch) < self.batch_size:
                try:
                    batch.append(queue.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            return batch
        return []

    async def _write(self, batch: list[BlockedRequest]) -> None:
        engine = self.engine
        if engine is None:  # shutdown gave up waiting and closed the database
            self.dropped += len(batch)
            return
        try:
            await write_batch(engine, batch, self.settings.keep_per_alias)
        except Exception as exc:  # any failure: a background task must never take the server down
            self.dropped += len(batch)
            if not self._failing:  # one warning per outage, not one per batch
                self._failing = True
                log.warning("example: cannot record blocked requests (%s); dropping them until the database "
                            "answers again", describe_error(exc, engine.url))
            return
        self.written += len(batch)
        if self._failing:
            self._failing = False
            log.info("example: recording blocked requests again (%d dropped since start-up)", self.dropped)

    async def _delete_old(self) -> None:
        engine = self.engine
        if engine is None:
            return
        try:
            deleted = await delete_older_than(engine, self.settings.keep_days)
        except Exception as exc:  # retried at the next interval
            log.warning("example: cannot delete blocked requests older than %g days (%s)",
                        self.settings.keep_days, describe_error(exc, engine.url))
            return
        if deleted:
            log.info("example: deleted %d blocked requests older than %g days", deleted, self.settings.keep_days)
