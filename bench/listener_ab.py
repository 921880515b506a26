"""Two public listener servers in one process, their loads alternating: CPU per request, A against B.

The servers' CPU from /proc moves with the machine's load by 10-30% run to run; two servers in
the same process, measured in the same rounds and alternating, share that noise. This starts one
in-process comzy-server per kind (``COMZY_HTTP_SERVER``, default uvicorn and uvicorn-direct), on
uvloop with the servers' GC thresholds, each with an agent subprocess on one nginx serving the
1 KiB file. Each round runs a wrk load (a subprocess) through each server in turn, order reversed
every other round, and records this process's CPU (``time.process_time``: both servers, only one
of them loaded) per request completed.

    python -m bench.listener_ab                                  # 5 rounds of 3 s, 50 and 1 connections
    python -m bench.listener_ab --rounds 7 --seconds 5 --connections 50

It prints, per connection count, each kind's median and minimum µs per request and the medians
of the per-round ratios of the second kind to the first, with every round's ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from bench.procs import Proc
from bench.stack import SMALL_FILE, comzy_env
from bench.tools import require_tools, run_wrk, serve_small_file
from comzy.core.eventloop import backend_options
from comzy.core.memory import tune_gc
from comzy.core.server import run_server
from comzy.core.settings import ServerSettings


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


async def _run(kinds: list[str], connections: list[int], rounds: int, seconds: float,
               tools: dict[str, str]) -> dict[tuple[str, int], list[float]]:
    """Every round's µs per request for each (kind, connections)."""
    results: dict[tuple[str, int], list[float]] = {(kind, conns): [] for kind in kinds for conns in connections}
    procs: list[Proc] = []
    try:
        with tempfile.TemporaryDirectory(prefix="comzy-ab-") as tmp:
            root = Path(tmp)
            nginx, nginx_port, script = serve_small_file(tools["nginx"], root, SMALL_FILE)
            procs.append(nginx)
            async with AsyncExitStack() as servers:
                targets: dict[str, tuple[str, str]] = {}
                for kind in kinds:
                    settings = ServerSettings(
                        _env_file=None, host="127.0.0.1", http_port=0, ws_port=0, admin_port=0,
                        admin_host="127.0.0.1", data_dir=root / kind, plugins="none", shutdown_grace=2.0,
                        http_server=kind)
                    server = await servers.enter_async_context(run_server(settings))
                    agent = Proc(f"comzy ({kind})", [
                        sys.executable, "-m", "comzy.agent.cli", str(nginx_port), "--local-host", "127.0.0.1",
                        "--quiet", "--server", f"ws://127.0.0.1:{server.ports.ws}"], env=comzy_env())
                    procs.append(agent)
                    # the agent registers with the server running on this loop: wait in a thread
                    match = await anyio.to_thread.run_sync(agent.wait_for, r"Public URL: https?://([a-z0-9-]+)\.")
                    agent.done_waiting()
                    targets[kind] = (f"http://127.0.0.1:{server.ports.http}/{SMALL_FILE}", f"{match[1]}.localhost")
                for round_no in range(rounds):
                    order = kinds if round_no % 2 == 0 else kinds[::-1]
                    for conns in connections:
                        for kind in order:
                            url, host = targets[kind]
                            started = time.process_time()
                            load = await anyio.to_thread.run_sync(
                                lambda: run_wrk(tools["wrk"], script, url, host, conns, seconds))  # noqa: B023
                            used = time.process_time() - started
                            if load["errors"] or load["requests"] <= 0:
                                raise RuntimeError(f"wrk through {kind} at {conns} connections: {load}")
                            results[(kind, conns)].append(used / load["requests"] * 1e6)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one line per connection count."""
    parser = argparse.ArgumentParser(prog="python -m bench.listener_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5); medians printed")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each wrk load (default 3)")
    parser.add_argument("--connections", type=_ints, default=[50, 1], help="one load per count (default 50,1)")
    parser.add_argument("--kinds", type=_names, default=["uvicorn", "uvicorn-direct"],
                        help="two COMZY_HTTP_SERVER values, A,B (default uvicorn,uvicorn-direct); ratios are B/A")
    args = parser.parse_args(argv)
    if len(args.kinds) != 2 or args.rounds < 1 or args.seconds < 1 or not args.connections:
        parser.error("--kinds takes two servers; --rounds, --seconds and --connections must be positive")
    tools = require_tools()
    tune_gc()  # the servers' thresholds, as comzy-server sets them
    results = anyio.run(_run, args.kinds, args.connections, args.rounds, args.seconds, tools,
                        backend_options=backend_options("auto"))  # uvloop when installed, as the servers
    first, second = args.kinds
    for conns in args.connections:
        a, b = results[(first, conns)], results[(second, conns)]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(f"c{conns}: {first} {statistics.median(a):.0f} µs/req (min {min(a):.0f}), {second} "
              f"{statistics.median(b):.0f} (min {min(b):.0f}); per-round {second}/{first} median "
              f"{statistics.median(ratios):.3f} [{', '.join(f'{x:.2f}' for x in ratios)}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
