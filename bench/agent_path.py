"""The agent's path for a small GET, in process: CPU per request without sockets or a server.

What ``python -m bench.cpu`` reports for the agent includes the syscalls, the event loop and the
link; on a busy 2-core machine that moves ±10-30% from run to run. This runs only the agent's own
Python path for one request, as the agent does under load, so old and new code compare in one
quiet measurement (or under ``valgrind --tool=callgrind``, deterministically):

- a REQUEST (a GET, wrk's four fields) and its END reach ``LocalForwarder.start`` as the session
  reader delivers them; 50 requests are in flight at a time, a new one starting as one ends;
- the local connections are real ``_Connection`` protocols on a fake transport that answers each
  request with nginx's 1 KiB response on the next loop turn; 64 of them are pooled at the start;
- the session only counts the frames queued for the server; the inspector's capture is on, as by
  default.

    python -m bench.agent_path                        # 5 repeats of 20,000 requests on uvloop
    python -m bench.agent_path --loop asyncio --requests 5000 --repeats 3

It prints the CPU time (``time.process_time``) per request of each repeat, their minimum and
median, and how many requests were answered from callbacks without a task. Instructions per
request, the difference of two runs cancelling the start-up:

    valgrind --tool=callgrind python -m bench.agent_path --repeats 1 --requests 1000
    valgrind --tool=callgrind python -m bench.agent_path --repeats 1 --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from comzy.agent.capture import Capture
from comzy.agent.forward import LocalForwarder, Served, Serving
from comzy.agent.local_http import _Connection
from comzy.core import protocol as p
from comzy.core.memory import tune_gc, tune_malloc
from comzy.core.stream import Stream

#: nginx's answer to bench's ``/small`` (1 KiB), as it comes on the local connection.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Mon, 07 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
            b'ETag: "6579a0c0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024)
#: The fields of a REQUEST for wrk's GET as the edge sends it.
HEADERS = [(b"host", b"bench.comzy.test"), (b"x-forwarded-for", b"127.0.0.1"),
           (b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"bench.comzy.test")]
POOLED = 64


class _AnsweringTransport:
    """A local connection's transport: each write is answered with ``RESPONSE`` on the next turn."""

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, RESPONSE)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _CountingSession:
    """What a Stream needs of its session; frames are counted, not sent."""

    peer_window = p.DEFAULT_WINDOW
    window_budget = p.SESSION_WINDOW_BUDGET
    closed = None
    queued = 0
    #: No link message is being dispatched: a stream's events fire at once (``Session.events_due``).
    events_due: list[Stream] | None = None

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.frames = 0

    def send_nowait(self, frame: p.Queued) -> None:
        self.frames += 1

    def send_frames_nowait(self, frames: bytes, count: int) -> None:
        self.frames += count

    async def send(self, frame: p.Queued) -> None:
        self.frames += 1

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)


async def run_once(requests: int, workers: int) -> tuple[float, int]:
    """CPU seconds per request for ``requests`` requests, ``workers`` at a time; and how many were
    answered without a task."""
    loop = asyncio.get_running_loop()
    forwarder = LocalForwarder("127.0.0.1", 1, capture=Capture())
    idle_since = time.monotonic() + 3600  # never expires during the run
    for _ in range(POOLED):
        conn = _Connection()
        conn.connection_made(_AnsweringTransport(conn, loop))  # type: ignore[arg-type]
        conn.idle_since = idle_since
        forwarder.local._idle.append(conn)
    session = _CountingSession()
    serving = Serving()
    finished = loop.create_future()
    started = ended = 0

    def dispatch() -> None:
        nonlocal started
        started += 1
        head = p.RequestHead("GET", b"/small", HEADERS, "127.0.0.1")
        stream = Stream(session, started, p.DEFAULT_WINDOW)  # type: ignore[arg-type]
        session.streams[started] = stream
        forwarder.start(stream, head, serving)
        stream._on_end()  # END comes with REQUEST in one message

    def on_served(served: Served) -> None:
        nonlocal ended
        if served.status != 200:
            raise RuntimeError(f"unexpected answer: {served}")
        ended += 1
        if ended == requests:
            finished.set_result(None)
        elif started < requests:
            dispatch()

    forwarder.on_served = on_served
    cpu = time.process_time()
    for _ in range(min(workers, requests)):
        dispatch()
    await finished
    cpu = time.process_time() - cpu
    await serving.stop()
    return cpu / requests, forwarder.answered_without_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per repeat (default 20,000)")
    parser.add_argument("--workers", type=int, default=50, help="requests in flight (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; min and median printed (default 5)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, tuple[float, int]]], tuple[float, int]] = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    tune_malloc()  # as the agent does at start (comzy/agent/cli.py)
    tune_gc()
    per_request = []
    for _ in range(args.repeats):
        seconds, without_task = run(run_once(args.requests, args.workers))
        per_request.append(seconds * 1e6)
        print(f"{seconds * 1e6:.1f} µs/request ({without_task} of {args.requests} without a task)", flush=True)
    print(f"{args.loop}: min {min(per_request):.1f} median {statistics.median(per_request):.1f} µs/request")


if __name__ == "__main__":
    main()
