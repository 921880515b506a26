"""A light agent for the idle-tunnels benchmark: thousands of real protocol clients per process.

Each agent is a real Comzy protocol client (WebSocket handshake, HELLO -> WELCOME) built from
``comzy.core.websocket`` and ``comzy.core.protocol`` only, without the full agent's session,
forwarder and reporter, so thousands fit in one process. Once registered it stays connected:
it answers the server's PINGs (that is what keeps it alive past the heartbeat timeout) and
answers any REQUEST with a small canned 200 response, so the harness can check that a tunnel
still works.

Run by ``bench.idle_agents`` as ``python -m bench.idle_client --url ws://... --count N``. It prints
``ready`` once imported, waits for ``go`` on stdin, connects, prints one JSON line with its
results, then stays connected until stdin closes (or ``--lifetime`` seconds pass).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field

import anyio

from comzy.core import protocol as p
from comzy.core.control import Hello, Refusal, Welcome
from comzy.core.websocket import Closed, WebSocket, connect

#: Body of the canned response to a REQUEST.
RESPONSE_BODY = b"idle agent ok\n"
#: Largest message an idle agent accepts (it only ever gets control frames and small heads).
MAX_MESSAGE = 1024 * 1024
#: Tries per agent when the server answers REJECT ``throttled`` (e.g. its KV was slow to answer),
#: and the longest wait between them, as the stock agent bounds it (comzy/agent/client.py).
THROTTLED_TRIES = 10
THROTTLED_MAX = 30.0
#: Tunnel URLs each client process reports, drawn at random from all it registered, so the
#: harness can send a request through a random tunnel rather than always the first one.
URL_SAMPLE = 8


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to the hard limit; SystemExit with a clear message if below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise SystemExit(
            f"the open-file limit is {target} (hard limit {hard}) but {needed} descriptors are needed; "
            "raise it (e.g. `ulimit -Hn 65536` as root, or LimitNOFILE in systemd) or use fewer agents"
        )
    return target


@dataclass(slots=True)
class Results:
    """What one client process reports."""

    registered: int = 0
    failed: int = 0
    first_connect: float | None = None
    last_welcome: float | None = None
    url: str | None = None
    #: A uniform random sample (reservoir) of the registered agents' URLs, at most URL_SAMPLE.
    urls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests_answered: int = 0
    #: REJECT ``throttled`` answers, each followed by a wait and another try.
    throttled: int = 0

    def registered_url(self, url: str) -> None:
        """Count a registration and keep its URL in the random sample with the right chance."""
        self.registered += 1
        if self.url is None:
            self.url = url
        if len(self.urls) < URL_SAMPLE:
            self.urls.append(url)
        else:
            slot = random.randrange(self.registered)
            if slot < URL_SAMPLE:
                self.urls[slot] = url

    def failure(self, message: str) -> None:
        """Count a failed agent, keeping the first few reasons."""
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(message)


def _canned_response(stream: int) -> bytes:
    head = p.ResponseHead(200, [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(RESPONSE_BODY)).encode())])
    return b"".join((
        p.encode(p.FrameType.RESPONSE, stream, head.to_payload()),
        p.encode_data(stream, RESPONSE_BODY),
        p.encode(p.FrameType.END, stream),
    ))


class Throttled(Exception):
    """The server answered REJECT ``throttled``: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled; retry after {retry_after} s")
        self.retry_after = retry_after


async def register(url: str, index: int, results: Results) -> WebSocket | None:
    """Open one agent's WebSocket and complete HELLO -> WELCOME; None (and a recorded failure) if it
    fails; Throttled when the server asks to come back later (nothing recorded)."""
    started = time.monotonic()
    if results.first_connect is None or started < results.first_connect:
        results.first_connect = started
    try:
        ws = await connect(url, MAX_MESSAGE, connect_timeout=30)
    except Exception as exc:
        results.failure(f"connect: {exc!r}")
        return None
    try:
        await ws.send(Hello(agent="comzy-bench-idle/1", port=10000 + index % 50000).encode())
        with anyio.fail_after(30):
            message = await ws.receive()
        if not isinstance(message, bytes):
            raise RuntimeError(f"no WELCOME: {message!r}")
        frames = list(p.decode_message(message))
        if frames[0].type == p.FrameType.REJECT:
            reject = Refusal.from_payload(frames[0].payload)
            if reject.code == "throttled":  # the stock agent waits as told and tries again: so do we
                await ws.aclose()
                raise Throttled(reject.retry_after or THROTTLED_MAX)
        if frames[0].type != p.FrameType.WELCOME:
            raise RuntimeError(f"expected WELCOME, got {frames[0].type.name}: {frames[0].payload!r}")
        welcome = Welcome.from_payload(frames[0].payload)
    except Throttled:
        raise
    except Exception as exc:
        results.failure(f"handshake: {exc!r}")
        await ws.aclose()
        return None
    results.registered_url(welcome.url)
    results.last_welcome = time.monotonic()
    return ws


async def stay_connected(ws: WebSocket, results: Results) -> None:
    """Answer PINGs and REQUESTs until the server closes the connection or says GOAWAY."""
    try:
        while True:
            message = await ws.receive()
            if isinstance(message, (Closed, str)):
                return
            for frame in p.decode_message(message):
                if frame.type == p.FrameType.PING:
                    await ws.send(p.encode(p.FrameType.PONG, 0, frame.payload))
                elif frame.type == p.FrameType.REQUEST:
                    results.requests_answered += 1
                    await ws.send(_canned_response(frame.stream))
                elif frame.type == p.FrameType.GOAWAY:
                    return
    except Exception:  # a dropped idle agent shows up in the server's RSS and the request check
        return
    finally:
        await ws.aclose()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_client(url: str, count: int, concurrency: int, lifetime: float) -> None:
    """Wait for ``go``, register ``count`` agents, report, then idle until stdin closes.

    A ``report`` line on stdin while agents register cuts the run short: agents not yet started
    are skipped, those in flight finish, and the report says ``cut_off`` (the harness's deadline
    on a machine too busy to register them all).
    """
    print("ready", flush=True)
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if line.strip() != "go":
        return
    results = Results()
    cpu_at_go = _cpu_seconds()
    limit = anyio.Semaphore(concurrency)
    registered = anyio.Event()
    done = anyio.Event()
    remaining = count
    skipped = 0
    cut_off = False

    async def agent(index: int) -> None:
        nonlocal remaining, skipped
        ws = None
        for attempt in range(THROTTLED_TRIES):
            async with limit:
                if cut_off:
                    skipped += 1
                    break
                try:
                    ws = await register(url, index, results)
                    break
                except Throttled as exc:
                    results.throttled += 1
                    if attempt == THROTTLED_TRIES - 1:
                        results.failure(f"handshake: still {exc} after {THROTTLED_TRIES} tries")
                        break
                    wait = min(exc.retry_after, THROTTLED_MAX) + random.uniform(0, 1)
            await anyio.sleep(wait)  # outside the handshake limit: other agents go on meanwhile
        remaining -= 1
        if not remaining:
            registered.set()
        if ws is not None:
            await stay_connected(ws, results)

    async def read_commands() -> None:
        # Until stdin closes (or says "stop"); the thread is abandoned if the lifetime ends first.
        nonlocal cut_off
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if line.strip() == "report":
                cut_off = True
            elif not line or line.strip() == "stop":
                break
        done.set()

    with anyio.move_on_after(lifetime):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_commands)
            for index in range(count):
                tg.start_soon(agent, index)
            await registered.wait()
            print(json.dumps({
                "registered": results.registered, "failed": results.failed, "skipped": skipped, "cut_off": cut_off,
                "throttled": results.throttled,
                "first_connect": results.first_connect, "last_welcome": results.last_welcome,
                "url": results.url, "urls": results.urls, "errors": results.errors,
                "cpu_seconds": _cpu_seconds() - cpu_at_go,
            }), flush=True)
            await done.wait()  # idle until the harness closes stdin
            print(json.dumps({"requests_answered": results.requests_answered}), flush=True)
            tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.idle_client --url ws://127.0.0.1:PORT --count N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's agent listener, ws://HOST:PORT")
    parser.add_argument("--count", type=int, required=True, help="agents to connect")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--lifetime", type=float, default=900, help="exit after this many seconds regardless")
    args = parser.parse_args(argv)
    raise_fd_limit(args.count + 64)
    anyio.run(run_client, args.url, args.count, args.concurrency, args.lifetime)


if __name__ == "__main__":
    main()
