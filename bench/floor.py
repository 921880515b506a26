"""The floor under the tunnel's figures: two do-nothing Python relays in place of server and agent.

``wrk -> relay A -> relay B -> nginx`` has the tunnel's shape (two Python processes on uvloop
between the client and nginx, the same loopback hops, TCP_NODELAY) but no HTTP parsing, no framing,
no hooks, no multiplexing: each relay copies bytes from one socket to the other, one upstream
connection per visitor connection. What the relays add to direct is what this machine charges for
the hops themselves (syscalls, wake-ups, the event loop's turns); what the tunnel adds beyond the
relays is Comzy's own work. Measured in the same rounds as direct and the tunnel (single node,
plugins off, as in ``python -m bench``), order rotating each round:

    python -m bench.floor                              # 3 rounds, 1 and 50 connections, 5 s each
    python -m bench.floor --rounds 5 --seconds 3 --connections 1

It prints, per connection count, the median req/s, p50 and p99 of each target, the p50 added to
direct, and each Python process's CPU per request (user + system from /proc): relay A and B against
the tunnel's server and agent.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
from typing import Any

from bench.procs import Proc
from bench.stack import SMALL_FILE, Stack, comzy_env, running_stack
from bench.tools import require_tools, run_wrk

#: Bytes a relay holds for a peer that is not connected yet (the request, for one visitor).
PENDING_LIMIT = 64 * 1024


class _Half(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        # The upstream connection is still being made: hold the first bytes, bounded.
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def flush_to(self, peer: _Half) -> None:
        """The peer is connected: send what was held and read on."""
        assert peer.transport is not None and self.transport is not None
        peer.transport.writelines(self.pending)
        self.pending, self.pending_size = [], 0
        self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _relay(target: int) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps only weak ones)

    def accepted() -> _Half:
        front = _Half()

        async def connect() -> None:
            try:
                _transport, back = await loop.create_connection(_Half, "127.0.0.1", target)
            except OSError:
                if front.transport is not None:
                    front.transport.close()
                return
            front.peer, back.peer = back, front
            if front.transport is None:  # the visitor left meanwhile
                back.transport.close()  # type: ignore[union-attr]
                return
            front.flush_to(back)

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return front

    server = await loop.create_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


def run_relay(target: int) -> None:
    """A relay's process: listen on a free port, pipe every connection to ``target`` (uvloop if installed)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_relay(target))
    else:
        uvloop.run(_relay(target))


def start_relay(name: str, target: int, procs: list[Proc]) -> tuple[Proc, int]:
    """Start a relay subprocess towards ``target``; its process and port."""
    proc = Proc(name, [sys.executable, "-m", "bench.floor", "--relay", str(target)], env=comzy_env())
    procs.append(proc)
    port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
    proc.done_waiting()
    return proc, port


def measure(stack: Stack, targets: dict[str, tuple[int, str, list[Proc]]], connections: int,
            seconds: float) -> dict[str, dict[str, Any]]:
    """One wrk load through each target in turn: its figures and each of its processes' µs per request."""
    results: dict[str, dict[str, Any]] = {}
    for label, (port, host, procs) in targets.items():
        before = [proc.cpu_seconds() for proc in procs]
        run = run_wrk(stack.tools["wrk"], stack.wrk_script, f"http://127.0.0.1:{port}/{SMALL_FILE}", host,
                      connections, seconds)
        after = [proc.cpu_seconds() for proc in procs]
        requests = max(run["requests"], 1)
        run["cpu_us"] = [(b - a) / requests * 1e6 for a, b in zip(before, after, strict=True)]
        results[label] = run
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians printed; default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk load (default 5)")
    parser.add_argument("--connections", default="1,50", help="comma-separated connection counts (default 1,50)")
    parser.add_argument("--relay", type=int, metavar="PORT", help=argparse.SUPPRESS)  # a relay's own process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay is not None:
        run_relay(args.relay)
        return 0
    counts = [int(part) for part in args.connections.split(",") if part]
    tools = require_tools()
    with running_stack(tools, large_size=1024 * 1024, upload_size=1024 * 1024) as stack:
        relays: list[Proc] = []
        try:
            relay_b, port_b = start_relay("relay B", stack.nginx_direct.port, relays)
            relay_a, port_a = start_relay("relay A", port_b, relays)
            targets = {
                "direct": (stack.nginx_direct.port, stack.nginx_direct.host, []),
                "relays": (port_a, f"127.0.0.1:{port_a}", [relay_a, relay_b]),
                "tunnel": (stack.nginx_tunnel.port, stack.nginx_tunnel.host, [stack.server, stack.nginx_agent]),
            }
            run_wrk(tools["wrk"], stack.wrk_script, f"http://127.0.0.1:{port_a}/{SMALL_FILE}", None, 10, 1)  # warm-up
            run_wrk(tools["wrk"], stack.wrk_script, f"http://127.0.0.1:{stack.nginx_tunnel.port}/{SMALL_FILE}",
                    stack.nginx_tunnel.host, 10, 1)
            rounds: dict[int, list[dict[str, dict[str, Any]]]] = {count: [] for count in counts}
            labels = list(targets)
            for index in range(args.rounds):
                order = labels[index % len(labels):] + labels[:index % len(labels)]
                for count in counts:
                    rounds[count].append(measure(stack, {label: targets[label] for label in order}, count,
                                                 args.seconds))
                    print(f"[floor] round {index + 1}/{args.rounds}, {count} connection(s) done", flush=True)
        finally:
            for proc in relays:
                proc.stop()
    for count in counts:
        print(report(count, rounds[count]))
    return 0


def report(count: int, runs: list[dict[str, dict[str, Any]]]) -> str:
    """The table for one connection count: medians over rounds."""
    def median(label: str, key: str) -> float:
        return statistics.median(run[label][key] for run in runs)

    def cpu(label: str, index: int) -> float:
        return statistics.median(run[label]["cpu_us"][index] for run in runs)

    direct_p50 = median("direct", "p50_ms")
    direct_rate = median("direct", "requests_per_s")
    lines = [f"\n{count} connection(s), medians of {len(runs)} rounds",
             "| target | req/s | share of direct | p50 | p50 added | p99 | CPU µs/request (front / back) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, names in (("direct", ""), ("relays", "relay A / relay B"), ("tunnel", "server / agent")):
        rate, p50 = median(label, "requests_per_s"), median(label, "p50_ms")
        cpus = f"{cpu(label, 0):.0f} / {cpu(label, 1):.0f} ({names})" if names else "-"
        lines.append(f"| {label} | {rate:,.0f} | {100 * rate / direct_rate:.1f}% | {p50:.3f} ms | "
                     f"+{p50 - direct_p50:.3f} ms | {median(label, 'p99_ms'):.3f} ms | {cpus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
