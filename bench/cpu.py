"""``python -m bench.cpu``: CPU time per request (and per GiB) of comzy-server and the agent.

Wall-clock req/s moves with whatever else the machine is doing; the CPU seconds the server
and the agent spend per request barely do. This starts the same stack as ``python -m bench``
(nginx, comzy-server, an agent), drives a fixed-duration wrk load through the tunnel, reads
both processes' user + system time from /proc before and after, and prints the medians over
rounds. Use it before and after a hot-path change; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.procs import MIB
from bench.stack import LARGE_FILE, SMALL_FILE, Stack, running_stack
from bench.tools import curl_download, require_tools, run_wrk

GIB = 1024 * MIB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench.cpu``."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpu",
                                     description="CPU µs per request of comzy-server and the agent under wrk load.")
    parser.add_argument("--connections", default="50,1",
                        help="comma-separated wrk connection counts, one load per count (default 50,1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per load; medians are printed (default 3)")
    parser.add_argument("--download-mib", type=int, default=0,
                        help="also download a file of this many MiB through the tunnel per round: CPU s per GiB")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for comzy-server, e.g. COMZY_HTTP_SERVER=uvicorn (repeatable)")
    parser.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = parser.parse_args(argv)
    bad = [item for item in args.server_env if "=" not in item]
    if bad:
        parser.error(f"--server-env needs NAME=VALUE, got {bad[0]!r}")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    return args


def measure_get(stack: Stack, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run of small GETs through the tunnel, with server and agent CPU µs per request."""
    before = (stack.server.cpu_seconds(), stack.nginx_agent.cpu_seconds())
    result = run_wrk(stack.tools["wrk"], stack.wrk_script, stack.nginx_tunnel.url(f"/{SMALL_FILE}"),
                     stack.nginx_tunnel.host, connections, seconds)
    server = stack.server.cpu_seconds() - before[0]
    agent = stack.nginx_agent.cpu_seconds() - before[1]
    requests = max(result["requests"], 1)
    return {"requests_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "errors": result["errors"],
            "server_us": server / requests * 1e6, "agent_us": agent / requests * 1e6}


def measure_download(stack: Stack) -> dict[str, Any]:
    """One download of the large file through the tunnel, with server and agent CPU seconds per GiB."""
    before = (stack.server.cpu_seconds(), stack.nginx_agent.cpu_seconds())
    result = curl_download(stack.tools["curl"], stack.nginx_tunnel.url(f"/{LARGE_FILE}"), stack.nginx_tunnel.host,
                           stack.large_size, 600)
    gib = max(result["bytes"], 1) / GIB
    return {"mib_per_s": result["mib_per_s"], "errors": result["errors"],
            "server_s_per_gib": (stack.server.cpu_seconds() - before[0]) / gib,
            "agent_s_per_gib": (stack.nginx_agent.cpu_seconds() - before[1]) / gib,
            "server_peak_rss_mib": (stack.server.peak_rss() or 0) / MIB,
            "agent_peak_rss_mib": (stack.nginx_agent.peak_rss() or 0) / MIB}


def main(argv: list[str] | None = None) -> int:
    """Run the loads; returns 1 if any request failed."""
    args = parse_args(argv)
    tools = require_tools()
    large = max(args.download_mib, 1) * MIB
    failed = False
    with running_stack(tools, large, MIB, args.server_env) as stack:
        # Warm-up: imports, pools and caches stay out of the first round.
        run_wrk(tools["wrk"], stack.wrk_script, stack.nginx_tunnel.url(f"/{SMALL_FILE}"), stack.nginx_tunnel.host,
                max(args.connection_counts), 1)
        rounds: dict[str, list[dict[str, Any]]] = {f"get_{c}c": [] for c in args.connection_counts}
        if args.download_mib:
            rounds["download"] = []
        for _ in range(args.rounds):
            for connections in args.connection_counts:
                rounds[f"get_{connections}c"].append(measure_get(stack, connections, args.seconds))
            if args.download_mib:
                rounds["download"].append(measure_download(stack))
    for name, runs in rounds.items():
        failed = failed or any(run["errors"] for run in runs)
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "errors"}
        if name == "download":
            print(f"{name:10} server {medians['server_s_per_gib']:.2f} s/GiB  agent {medians['agent_s_per_gib']:.2f} "
                  f"s/GiB  ({medians['mib_per_s']:.0f} MiB/s; peak RSS server "
                  f"{max(run['server_peak_rss_mib'] for run in runs):.0f} MiB, agent "
                  f"{max(run['agent_peak_rss_mib'] for run in runs):.0f} MiB)")
        else:
            print(f"{name:10} server {medians['server_us']:6.0f} µs/req  agent {medians['agent_us']:6.0f} µs/req  "
                  f"({medians['requests_per_s']:.0f} req/s, p50 {medians['p50_ms']:.2f} ms, "
                  f"p99 {medians['p99_ms']:.1f} ms)")
        if args.json:
            print(json.dumps({name: runs}))
    if failed:
        print("some requests failed (non-2xx or socket errors): the figures above are not comparable")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
