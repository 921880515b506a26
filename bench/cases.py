"""The benchmark cases. Each measures its variants (direct, tunnel, ...) alternately, round by round.

With a cluster in the stack, small GETs and the download add a ``cluster`` variant: the same
nginx through the edge, whose agent sits on the control node. It alternates with the others, so
the single node (``tunnel``, role ``all``) and the cluster are compared within one run.

A case returns ``{"title", "params", "runs": {variant: [one dict per round]}}``; the report
takes medians over rounds. Every run dict has an ``errors`` count that must be 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from bench.clients import SlowVisitor, sse_latencies, ws_echo
from bench.procs import MIB, Proc
from bench.stack import LARGE_FILE, SMALL_FILE, Endpoint, Stack
from bench.tools import curl_download, curl_upload, run_wrk

Run = dict[str, Any]
Case = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """Sizes, durations and round counts for one harness run."""

    quick: bool
    rounds: int
    warmup_seconds: float
    get_1c_seconds: float
    get_50c_seconds: float
    download_size: int
    upload_size: int
    sse_samples: int
    ws_seconds: float
    fairness_seconds: float
    slow_visitor_rate: int
    connections: int = 50

    @classmethod
    def full(cls, rounds: int = 3) -> Plan:
        """The real benchmark: 1 GiB down, 256 MiB up, 5-10 s per load run."""
        return cls(quick=False, rounds=rounds, warmup_seconds=3, get_1c_seconds=5, get_50c_seconds=10,
                   download_size=1024 * MIB, upload_size=256 * MIB, sse_samples=200, ws_seconds=5,
                   fairness_seconds=5, slow_visitor_rate=MIB)

    @classmethod
    def quick_plan(cls, rounds: int = 1) -> Plan:
        """The smoke test: every case, tiny sizes, one-second runs."""
        return cls(quick=True, rounds=rounds, warmup_seconds=1, get_1c_seconds=1, get_50c_seconds=1,
                   download_size=32 * MIB, upload_size=16 * MIB, sse_samples=20, ws_seconds=0.5,
                   fairness_seconds=1, slow_visitor_rate=MIB)

    def as_dict(self) -> dict[str, Any]:
        """The plan for results.json."""
        return asdict(self)


class MemoryWatch:
    """Peak RSS of the server and agents, over the whole run and over windows (one transfer, one case).

    Opening a window folds the current peaks into every open window, then resets the kernel's
    peak (VmHWM) to the current RSS, so a window sees only what happened inside it.
    """

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.whole_run: dict[str, int] = dict.fromkeys(procs, 0)
        self._open: list[dict[str, int]] = [self.whole_run]
        self.resettable = all(proc.reset_peak_rss() for proc in procs.values())

    def _fold(self) -> None:
        for name, proc in self.procs.items():
            peak = proc.peak_rss() or 0
            for window in self._open:
                window[name] = max(window[name], peak)

    def peaks(self) -> dict[str, int]:
        """Peak RSS in bytes per process over the whole run so far."""
        self._fold()
        return dict(self.whole_run)

    @contextlib.contextmanager
    def window(self) -> Iterator[dict[str, int]]:
        """Yields a dict of peak RSS in bytes per process, filled in when the block ends."""
        self._fold()
        window = dict.fromkeys(self.procs, 0)
        self._open.append(window)
        for proc in self.procs.values():
            proc.reset_peak_rss()
        try:
            yield window
        finally:
            self._fold()
            self._open = [open_window for open_window in self._open if open_window is not window]


def alternate(rounds: int, variants: dict[str, Callable[[], Run]]) -> dict[str, list[Run]]:
    """Run every variant once per round, reversing the order each round so neither always goes first."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            runs[name].append(variants[name]())
    return runs


def with_cpu(procs: dict[str, Proc], measure: Callable[[], Run], work: Callable[[Run], float],
             unit: str) -> Callable[[], Run]:
    """Wrap a tunnel measurement to add each process's CPU seconds, and per unit of work.

    CPU per request is the figure that other load on the machine disturbs least, so it is the
    one to compare between runs and between versions. Clock ticks are 10 ms: short quick-mode
    runs may read 0.
    """
    def run() -> Run:
        before = {name: proc.cpu_seconds() for name, proc in procs.items()}
        result = measure()
        done = work(result)
        for name, proc in procs.items():
            used = proc.cpu_seconds() - before[name]
            result[f"{name}_cpu_s"] = used
            if done > 0:
                result[f"{name}_cpu_{unit}"] = used / done
        return result
    return run


def warm_up(stack: Stack, plan: Plan) -> None:
    """Short wrk runs every way, so first-use costs (imports, pools, caches, links) stay out of round one."""
    endpoints = [stack.nginx_direct, stack.nginx_tunnel] + ([stack.cluster.nginx] if stack.cluster else [])
    for endpoint in endpoints:
        run_wrk(stack.tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                plan.connections, plan.warmup_seconds)


def small_get(stack: Stack, plan: Plan, connections: int) -> Case:
    """wrk GETs of a 1 KiB static file from nginx: req/s, latency percentiles, errors."""
    seconds = plan.get_1c_seconds if connections == 1 else plan.get_50c_seconds

    def measure(endpoint: Endpoint) -> Callable[[], Run]:
        return lambda: run_wrk(stack.tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                               connections, seconds)

    variants = {"direct": measure(stack.nginx_direct),
                "tunnel": with_cpu({"server": stack.server, "agent": stack.nginx_agent}, measure(stack.nginx_tunnel),
                                   _millions_of_requests, "us_per_request")}
    if stack.cluster is not None:
        variants["cluster"] = with_cpu(stack.cluster.procs(), measure(stack.cluster.nginx),
                                       _millions_of_requests, "us_per_request")
    return {"title": f"small GET (1 KiB), {connections} connection{'s' if connections > 1 else ''}",
            "params": {"connections": connections, "threads": min(connections, 2), "seconds": seconds,
                       "tool": "wrk"},
            "runs": alternate(plan.rounds, variants)}


def download(stack: Stack, plan: Plan, memory: MemoryWatch) -> Case:
    """curl GETs the large static file into /dev/null: MiB/s; peak RSS of server and agent per transfer."""
    size = plan.download_size
    max_time = 600.0

    def direct() -> Run:
        return curl_download(stack.tools["curl"], stack.nginx_direct.url(f"/{LARGE_FILE}"), None, size, max_time)

    def tunnel() -> Run:
        with memory.window() as peaks:
            run = curl_download(stack.tools["curl"], stack.nginx_tunnel.url(f"/{LARGE_FILE}"),
                                stack.nginx_tunnel.host, size, max_time)
        return run | {"server_peak_rss_mib": peaks["server"] / MIB, "agent_peak_rss_mib": peaks["nginx_agent"] / MIB}

    variants = {"direct": direct,
                "tunnel": with_cpu({"server": stack.server, "agent": stack.nginx_agent}, tunnel, _gib, "s_per_gib")}
    cluster = stack.cluster
    if cluster is not None:
        def through_edge() -> Run:
            with memory.window() as peaks:
                run = curl_download(stack.tools["curl"], cluster.nginx.url(f"/{LARGE_FILE}"), cluster.nginx.host,
                                    size, max_time)
            return run | {f"{role}_peak_rss_mib": peaks[f"cluster_{role}"] / MIB for role in cluster.procs()}

        variants["cluster"] = with_cpu(cluster.procs(), through_edge, _gib, "s_per_gib")
    return {"title": f"download {_size(size)}", "params": {"bytes": size, "tool": "curl"},
            "runs": alternate(plan.rounds, variants)}


def upload(stack: Stack, plan: Plan, memory: MemoryWatch) -> Case:
    """curl POSTs a file (Content-Length) to the receiver, which counts and drops it: MiB/s, peak RSS."""
    max_time = 600.0

    def direct() -> Run:
        return curl_upload(stack.tools["curl"], stack.app_direct.url("/upload"), None, stack.upload_file, max_time)

    def tunnel() -> Run:
        with memory.window() as peaks:
            run = curl_upload(stack.tools["curl"], stack.app_tunnel.url("/upload"), stack.app_tunnel.host,
                              stack.upload_file, max_time)
        return run | {"server_peak_rss_mib": peaks["server"] / MIB, "agent_peak_rss_mib": peaks["app_agent"] / MIB}

    measured = with_cpu({"server": stack.server, "agent": stack.app_agent}, tunnel,
                        lambda run: run["bytes"] / (1024 * MIB), "s_per_gib")
    return {"title": f"upload {_size(plan.upload_size)}", "params": {"bytes": plan.upload_size, "tool": "curl"},
            "runs": alternate(plan.rounds, {"direct": direct, "tunnel": measured})}


def sse(stack: Stack, plan: Plan) -> Case:
    """Time from starting a request (connect included) to the first server-sent event, sequentially."""
    def measure(endpoint: Endpoint) -> Callable[[], Run]:
        return lambda: sse_latencies(endpoint.port, endpoint.host, plan.sse_samples)

    tunnel = with_cpu({"server": stack.server, "agent": stack.app_agent}, measure(stack.app_tunnel),
                      lambda run: run["samples"] / 1e6, "us_per_request")
    return {"title": "SSE first event", "params": {"samples_per_round": plan.sse_samples, "tool": "bench.clients"},
            "runs": alternate(plan.rounds, {"direct": measure(stack.app_direct), "tunnel": tunnel})}


def websocket(stack: Stack, plan: Plan) -> Case:
    """One client, sequential 32-byte WebSocket echo round trips for a fixed time."""
    def measure(endpoint: Endpoint) -> Callable[[], Run]:
        return lambda: ws_echo(endpoint.port, endpoint.host, plan.ws_seconds)

    tunnel = with_cpu({"server": stack.server, "agent": stack.app_agent}, measure(stack.app_tunnel),
                      lambda run: run["round_trips"] / 1e6, "us_per_round_trip")
    return {"title": "WebSocket echo", "params": {"seconds": plan.ws_seconds, "message_bytes": 32,
                                                  "tool": "bench.clients"},
            "runs": alternate(plan.rounds, {"direct": measure(stack.app_direct), "tunnel": tunnel})}


def fairness(stack: Stack, plan: Plan) -> Case:
    """wrk small GETs alone, then while one visitor downloads the large file at a trickle on the same app.

    The slow visitor goes through the same tunnel (one agent, one multiplexed WebSocket), so
    a stalled stream that held up the others would show in the small GETs' latency.
    """
    seconds = plan.fairness_seconds

    def measure(endpoint: Endpoint, slow: bool) -> Callable[[], Run]:
        def wrk() -> Run:
            return run_wrk(stack.tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                           plan.connections, seconds)

        def run() -> Run:
            if not slow:
                return wrk()
            visitor = SlowVisitor(endpoint.port, endpoint.host, f"/{LARGE_FILE}", plan.slow_visitor_rate)
            visitor.start()
            try:
                visitor.started_reading.wait(30)
                result = wrk()
                still_reading = visitor.is_alive() and visitor.error is None
            finally:
                visitor.stop()
            healthy = visitor.status_ok and still_reading and 0 < visitor.received < stack.large_size
            result["slow_visitor_kib"] = visitor.received / 1024
            if not healthy:
                result["errors"] += 1
                result["error"] = (f"slow visitor: status ok {visitor.status_ok}, still reading {still_reading}, "
                                   f"{visitor.received} bytes, {visitor.error}")
            return result
        return run

    return {"title": "fairness: small GETs beside a slow visitor",
            "params": {"connections": plan.connections, "seconds": seconds,
                       "slow_visitor_bytes_per_s": plan.slow_visitor_rate, "slow_visitor_file_bytes": stack.large_size},
            "runs": alternate(plan.rounds, {
                "direct_alone": measure(stack.nginx_direct, False), "direct": measure(stack.nginx_direct, True),
                "tunnel_alone": measure(stack.nginx_tunnel, False), "tunnel": measure(stack.nginx_tunnel, True)})}


def _millions_of_requests(run: Run) -> float:
    return float(run["requests"]) / 1e6


def _gib(run: Run) -> float:
    return float(run["bytes"]) / (1024 * MIB)


def _size(size: int) -> str:
    return f"{size // (1024 * MIB)} GiB" if size >= 1024 * MIB else f"{size // MIB} MiB"
