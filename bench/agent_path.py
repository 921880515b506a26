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

With ``--link`` the link is in the count too: each REQUEST and its END reach a real ``Session``
(attached, as the agent's is) as the WebSocket frame the server writes, read by a real
``WebSocket``'s frame parser, decoded, dispatched, and the answers go out through the session's
flush and the WebSocket's frame encoder to a transport that drops them. Only the sockets are
missing: what ``bench.cpu`` counts for the agent, less the syscalls and the event loop's own work.

    python -m bench.agent_path                        # 5 repeats of 20,000 requests on uvloop
    python -m bench.agent_path --loop asyncio --requests 5000 --repeats 3
    python -m bench.agent_path --link                 # the link's decoding and encoding too

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
from comzy.agent.client import MAX_LINK_MESSAGE
from comzy.agent.forward import LocalForwarder, Served, Serving
from comzy.agent.local_http import _Connection
from comzy.core import protocol as p
from comzy.core import wsframe
from comzy.core.memory import tune_gc, tune_malloc
from comzy.core.session import Session
from comzy.core.stream import Stream
from comzy.core.websocket import WebSocket

#: nginx's answer to bench's ``/small`` (1 KiB), as it comes on the local connection.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Mon, 07 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
            b'ETag: "6579a0c0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024)
#: The fields of a REQUEST for wrk's GET as the edge sends it.
HEADERS = [(b"host", b"bench.comzy.test"), (b"x-forwarded-for", b"127.0.0.1"),
           (b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"bench.comzy.test")]
POOLED = 64
#: Stream ids the server's messages take in turn with ``--link`` (more than are ever in flight).
LINK_IDS = 256


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


class _LinkTransport:
    """The agent link's transport: what the session writes is counted and dropped."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: list[bytes]) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _attached_session(loop: asyncio.AbstractEventLoop) -> tuple[Session, WebSocket]:
    """A real agent-side Session on a real WebSocket, attached (as ``Session.run`` leaves them) to a
    transport that drops what is written; bytes from the server go to ``WebSocket._data_received``."""
    ws = WebSocket(None, client=True, max_message=MAX_LINK_MESSAGE)  # type: ignore[arg-type]
    ws.zero_key = True  # a loopback link, as the agent's to a local server is
    session = Session(ws, name="agent")
    ws._transport = _LinkTransport()  # type: ignore[assignment]
    ws._sink = session
    session._loop = loop
    session._ended = loop.create_future()
    session._attached = True
    return session, ws


def _server_message(stream_id: int) -> bytes:
    """What the server writes on the link for wrk's GET: REQUEST and END in one WebSocket message."""
    frames = p.encode_bodyless_request(stream_id, "GET", b"/small", HEADERS, "127.0.0.1", "http", "1.1", None)
    return wsframe.encode_binary(frames, masked=False)


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


async def run_once(requests: int, workers: int, link: bool = False) -> tuple[float, int]:
    """CPU seconds per request for ``requests`` requests, ``workers`` at a time; and how many were
    answered without a task. ``link``: through a real Session and WebSocket (see ``--link``)."""
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
    if link:
        real, ws = _attached_session(loop)
        real.on_request = lambda stream, head: forwarder.start(stream, head, serving)
        # The server's messages are made once, before the clock starts (their encoding is the
        # server's work, and callgrind's difference of two runs must not count it): stream ids are
        # taken in turn from LINK_IDS, each closed long before its turn comes again.
        messages = [_server_message(stream_id) for stream_id in range(1, LINK_IDS + 1)]

    def dispatch() -> None:
        nonlocal started
        started += 1
        if link:
            index = (started - 1) % LINK_IDS
            if index + 1 in real.streams:
                raise RuntimeError(f"stream {index + 1} still open after {LINK_IDS} more requests")
            ws._data_received(messages[index])
            return
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
    if link and real._ended is not None and real._ended.done():
        real._ended.result()  # the session ended on an error: say which
    return cpu / requests, forwarder.answered_without_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per repeat (default 20,000)")
    parser.add_argument("--workers", type=int, default=50, help="requests in flight (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; min and median printed (default 5)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--link", action="store_true",
                        help="through a real Session and WebSocket: the link's decoding and encoding counted too")
    args = parser.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, tuple[float, int]]], tuple[float, int]] = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    tune_malloc()  # as the agent does at start (comzy/agent/cli.py)
    tune_gc()
    per_request = []
    for _ in range(args.repeats):
        seconds, without_task = run(run_once(args.requests, args.workers, args.link))
        per_request.append(seconds * 1e6)
        print(f"{seconds * 1e6:.1f} µs/request ({without_task} of {args.requests} without a task)", flush=True)
    print(f"{args.loop}: min {min(per_request):.1f} median {statistics.median(per_request):.1f} µs/request")


if __name__ == "__main__":
    main()
