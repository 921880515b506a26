"""A job a plugin runs every few seconds for the server's lifetime: re-reading a database, say."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc


class Periodic:
    """Runs ``job()`` every ``seconds`` in a task group until :meth:`stop`.

    A stop cancels the wait between runs, never a run: a database query cut off half-way can leave
    a connection that hangs the engine's disposal (aiosqlite's thread), so a run in progress is
    finished first. ``job`` should bound its own time (a query under the database's timeout); an
    exception from it ends the task group like any other task's, so catch what a run may survive
    (a database that is away) inside ``job``.
    """

    __slots__ = ("_cancel", "_done", "job", "seconds")

    def __init__(self, job: Callable[[], Awaitable[object]], seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds must be positive (got {seconds!r})")
        self.job = job
        self.seconds = seconds
        self._cancel: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Begin: the first run comes ``seconds`` from now (run ``job`` yourself before, if the
        server must not start without its result)."""
        if self._cancel is not None:
            raise RuntimeError("this Periodic has already been started")
        self._cancel, self._done = anyio.CancelScope(), anyio.Event()
        task_group.start_soon(self._run, name=f"periodic {getattr(self.job, '__qualname__', self.job)}")

    async def stop(self) -> None:
        """End the runs and wait for the one in progress, if any (a no-op when never started)."""
        if self._cancel is None or self._done is None:
            return
        self._cancel.cancel()
        await self._done.wait()

    async def _run(self) -> None:
        assert self._cancel is not None and self._done is not None
        try:
            with self._cancel:
                while True:
                    await anyio.sleep(self.seconds)
                    with anyio.CancelScope(shield=True):
                        await self.job()
        finally:
            self._done.set()
