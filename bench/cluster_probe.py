"""``python -m bench.cluster_probe``: what one request at 1 connection costs the cluster's nodes.

It starts the harness's stack with its cluster (``bench.stack``: nginx, nats-server, a control node,
an edge, an agent) and, through the edge, either

- drives wrk at 1 connection for ``--seconds`` and prints, per request, the NATS messages and
  bytes each node sent and received (nats-server's monitoring port, ``/connz``) and the CPU of
  every process (from /proc), or
- with ``--callgrind N``, runs the edge and the control node under valgrind's callgrind and prints
  the instructions per request each spent on N sequential keep-alive requests, counted between a
  zeroing after a warm-up and a dump (``callgrind_control``): a figure the machine's load does not
  move, for before/after comparisons of the relay and the link (docs/benchmarks.md, "The relay
  from the frames' bytes").

Take the benchmark lock around it (``flock -x /tmp/bench.lock``), as for every benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import bench.stack as stack
from bench.procs import Proc
from bench.tools import free_port, require_tools, run_wrk

#: The cluster's comzy nodes, by the names bench.stack gives their processes.
NODES = ("edge", "control")
#: Seconds a node under valgrind may take to start (imports run about 50 times slower).
VALGRIND_START = 900.0


@contextlib.contextmanager
def wrapped_processes(monitor_port: int, callgrind_dir: str | None) -> Iterator[None]:
    """While the block runs, bench.stack starts nats-server with a monitoring port and, with
    ``callgrind_dir``, the edge and the control node under callgrind (with a start-up timeout
    that allows for it). bench.stack has no option for either; this wraps its ``Proc``."""
    original, wait_for, serving = stack.Proc, Proc.wait_for, stack.wait_serving.__defaults__

    def make(name: str, args: list[str], *rest: Any, **options: Any) -> Proc:
        if name == "nats-server":
            args = [*args, "-m", str(monitor_port)]
        elif callgrind_dir is not None and name in {f"comzy-server ({role})" for role in NODES}:
            role = name[len("comzy-server ("):-1]
            args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind_dir}/{role}.%p", *args]
        return original(name, args, *rest, **options)

    stack.Proc = make  # type: ignore[assignment,misc]
    if callgrind_dir is not None:
        Proc.wait_for = lambda self, pattern, timeout=30.0: wait_for(self, pattern, max(timeout, VALGRIND_START))  # type: ignore[method-assign]
        stack.wait_serving.__defaults__ = (VALGRIND_START,)
    try:
        yield
    finally:
        stack.Proc = original  # type: ignore[misc]
        Proc.wait_for = wait_for  # type: ignore[method-assign]
        stack.wait_serving.__defaults__ = serving


def connections(monitor_port: int) -> dict[str, dict[str, int]]:
    """Messages and bytes each comzy node has sent to (``in``) and received from (``out``) nats-server."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=1024", timeout=10) as answer:
        data = json.load(answer)
    counts = {}
    for connection in data["connections"]:
        name = connection.get("name", "")
        for role in NODES:
            if f"comzy {role} " in name:
                counts[role] = {key: connection[key] for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
    return counts


def wrk_probe(tools: dict[str, str], cluster: stack.Cluster, wrk_script: Any, seconds: float,
              monitor_port: int) -> None:
    """NATS messages and bytes per request each way, and CPU per request of every process."""
    endpoint = cluster.nginx
    url = endpoint.url(f"/{stack.SMALL_FILE}")
    run_wrk(tools["wrk"], wrk_script, url, endpoint.host, 1, 1)  # warm-up
    before, cpu_before = connections(monitor_port), {k: p.cpu_seconds() for k, p in cluster.procs().items()}
    result = run_wrk(tools["wrk"], wrk_script, url, endpoint.host, 1, seconds)
    after, cpu_after = connections(monitor_port), {k: p.cpu_seconds() for k, p in cluster.procs().items()}
    requests = result["requests"]
    print(f"{requests} requests at 1 connection, p50 {result['p50_ms']:.3f} ms, load {os.getloadavg()[0]:.1f}")
    for role in NODES:
        d = {key: (after[role][key] - before[role][key]) / requests for key in after[role]}
        print(f"  {role:8s} sent {d['in_msgs']:.2f} NATS messages ({d['in_bytes']:.0f} B), "
              f"received {d['out_msgs']:.2f} ({d['out_bytes']:.0f} B) per request")
    print("  CPU per request: " + ", ".join(
        f"{role} {(cpu_after[role] - cpu_before[role]) / requests * 1e6:.0f} µs" for role in cpu_after))


def callgrind_probe(cluster: stack.Cluster, requests: int, callgrind_dir: str) -> None:
    """Instructions per request of the edge and the control node over ``requests`` sequential GETs."""
    endpoint = cluster.nginx
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=120)

    def get() -> None:
        connection.request("GET", f"/{stack.SMALL_FILE}", headers={"Host": endpoint.host})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET through the edge answered {response.status}")

    for _ in range(100):  # warm-up: the link, the route cache, the first allocations
        get()
    pids = {role: getattr(cluster, role).pid for role in NODES}
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    started = time.monotonic()
    for _ in range(requests):
        get()
    took = time.monotonic() - started
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    print(f"{requests} requests at 1 connection under callgrind ({took / requests * 1000:.1f} ms each)")
    for role, pid in pids.items():
        deadline = time.monotonic() + 30
        while not (dumps := sorted(glob.glob(f"{callgrind_dir}/{role}.{pid}.*"))) and time.monotonic() < deadline:
            time.sleep(0.1)  # the dump is written by the node's own valgrind, a moment later
        with open(dumps[-1]) as dump:
            summary = next(int(line.split()[1]) for line in dump if line.startswith("summary:"))
        print(f"  {role:8s} {summary / requests:,.0f} instructions per request")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the wrk run (default 5)")
    parser.add_argument("--callgrind", type=int, metavar="N", help="count instructions over N requests instead")
    parser.add_argument("--keep", metavar="DIR", help="with --callgrind: copy the nodes' dumps into DIR "
                        "(for callgrind_annotate)")
    args = parser.parse_args(argv)
    unavailable = stack.cluster_unavailable()
    if unavailable:
        print(f"cluster_probe: {unavailable}", file=sys.stderr)
        return 2
    tools = require_tools()
    monitor_port = free_port()
    with tempfile.TemporaryDirectory(prefix="comzy-probe-") as callgrind_dir, \
            wrapped_processes(monitor_port, callgrind_dir if args.callgrind else None), \
            stack.running_stack(tools, 1024 * 1024, 1024 * 1024, cluster=True) as running:
        assert running.cluster is not None
        if args.callgrind:
            callgrind_probe(running.cluster, args.callgrind, callgrind_dir)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                for dump in glob.glob(f"{callgrind_dir}/*"):
                    shutil.copy(dump, args.keep)
        else:
            wrk_probe(tools, running.cluster, running.wrk_script, args.seconds, monitor_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
