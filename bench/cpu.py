"""``python -m bench.cpu``: CPU time per request (and per GiB) of comzy-server and the agent.

Wall-clock req/s moves with whatever else the machine is doing; the CPU seconds the server
and the agent spend per request barely do. This starts the same stack as ``python -m bench``
(nginx, comzy-server, an agent), drives a fixed-duration wrk load through the tunnel, reads
both processes' user + system time from /proc before and after, and prints the medians over
rounds. Use it before and after a hot-path change; see docs/benchmarks.md.

With ``--cluster`` the same loads also go through a cluster started beside the single node
(nats-server, a control node, an edge, an agent on the control node): the lines ``cluster_*``
give the CPU per request of the edge, the control node, nats-server and the agent, measured in
the same rounds as the single node, which is where the NATS hop's time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.procs import MIB, Proc
from bench.stack import LARGE_FILE, SMALL_FILE, Endpoint, Stack, cluster_unavailable, running_stack
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
    parser.add_argument("--cluster", action="store_true",
                        help="also measure through an edge and a control node on NATS (edge, control, nats-server, "
                             "agent CPU)")
    parser.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = parser.parse_args(argv)
    bad = [item for item in args.server_env if "=" not in item]
    if bad:
        parser.error(f"--server-env needs NAME=VALUE, got {bad[0]!r}")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    return args


def single_node(stack: Stack) -> tuple[Endpoint, dict[str, Proc]]:
    """The single node's endpoint for nginx and its processes (server, agent)."""
    return stack.nginx_tunnel, {"server": stack.server, "agent": stack.nginx_agent}


def through_cluster(stack: Stack) -> tuple[Endpoint, dict[str, Proc]]:
    """nginx through the edge, and the cluster's processes (edge, control, nats, agent)."""
    assert stack.cluster is not None
    return stack.cluster.nginx, stack.cluster.procs()


def measure_get(stack: Stack, target: tuple[Endpoint, dict[str, Proc]], connections: int,
                seconds: float) -> dict[str, Any]:
    """One wrk run of small GETs through ``target``, with every process's CPU µs per request (``<name>_us``)."""
    endpoint, procs = target
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    result = run_wrk(stack.tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                     connections, seconds)
    requests = max(result["requests"], 1)
    return {"requests_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "errors": result["errors"],
            **{f"{name}_us": (proc.cpu_seconds() - before[name]) / requests * 1e6 for name, proc in procs.items()}}


def measure_download(stack: Stack, target: tuple[Endpoint, dict[str, Proc]]) -> dict[str, Any]:
    """One download of the large file through ``target``, with every process's CPU s per GiB and peak RSS."""
    endpoint, procs = target
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    result = curl_download(stack.tools["curl"], endpoint.url(f"/{LARGE_FILE}"), endpoint.host, stack.large_size, 600)
    gib = max(result["bytes"], 1) / GIB
    return {"mib_per_s": result["mib_per_s"], "errors": result["errors"],
            **{f"{name}_s_per_gib": (proc.cpu_seconds() - before[name]) / gib for name, proc in procs.items()},
            **{f"{name}_peak_rss_mib": (proc.peak_rss() or 0) / MIB for name, proc in procs.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the loads; returns 1 if any request failed."""
    args = parse_args(argv)
    tools = require_tools()
    if args.cluster:
        why_not = cluster_unavailable()
        if why_not:
            raise SystemExit(f"bench.cpu: --cluster cannot run: {why_not}")
    large = max(args.download_mib, 1) * MIB
    targets = {"": single_node} | ({"cluster_": through_cluster} if args.cluster else {})
    with running_stack(tools, large, MIB, args.server_env, cluster=args.cluster) as stack:
        # Warm-up: imports, pools, caches and cluster links stay out of the first round.
        for pick in targets.values():
            endpoint, _ = pick(stack)
            run_wrk(tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                    max(args.connection_counts), 1)
        rounds: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for prefix, pick in targets.items():  # the single node and the cluster alternate within a round
                for connections in args.connection_counts:
                    rounds.setdefault(f"{prefix}get_{connections}c", []).append(
                        measure_get(stack, pick(stack), connections, args.seconds))
                if args.download_mib:
                    rounds.setdefault(f"{prefix}download", []).append(measure_download(stack, pick(stack)))
    failed = False
    for name, runs in rounds.items():
        failed = failed or any(run["errors"] for run in runs)
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "errors"}
        names = [key.removesuffix("_peak_rss_mib") for key in runs[0] if key.endswith("_peak_rss_mib")] or \
            [key.removesuffix("_us") for key in runs[0] if key.endswith("_us")]
        if name.endswith("download"):
            cpu = "  ".join(f"{who} {medians[f'{who}_s_per_gib']:.2f} s/GiB" for who in names)
            peaks = ", ".join(f"{who} {max(run[f'{who}_peak_rss_mib'] for run in runs):.0f} MiB" for who in names)
            print(f"{name:18} {cpu}  ({medians['mib_per_s']:.0f} MiB/s; peak RSS {peaks})")
        else:
            cpu = "  ".join(f"{who} {medians[f'{who}_us']:6.0f} µs/req" for who in names)
            print(f"{name:18} {cpu}  ({medians['requests_per_s']:.0f} req/s, p50 {medians['p50_ms']:.2f} ms, "
                  f"p99 {medians['p99_ms']:.1f} ms)")
        if args.json:
            print(json.dumps({name: runs}))
    if failed:
        print("some requests failed (non-2xx or socket errors): the figures above are not comparable")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
