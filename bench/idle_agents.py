"""Many idle agents: resident memory per tunnel and registration rate, on one server or a cluster.

For each count a fresh ``comzy-server`` process starts (``COMZY_PLUGINS=none``, loopback, ports 0,
default heartbeat settings). Its RSS is read, then ``bench.idle_client`` processes connect that many
real protocol agents (WebSocket + HELLO -> WELCOME, each answering the server's PINGs), and the
harness reports:

- registration rate: agents per second from the first connect to the last WELCOME;
- RSS after every agent is registered and the server has been idle for a moment, and
  RSS per tunnel = (after - before) / agents;
- whether a request through one of the tunnels still works.

Standalone: ``python -m bench.idle_agents --counts 1000,10000`` prints a table (``--json`` for JSON).

Cluster mode (``--cluster``, issue 12): one process may hold fewer descriptors than a large
count needs, so the agents are spread over several control nodes. The harness starts its own
``nats-server`` (JetStream, free client and monitoring ports, its own store; never the machine's
4222 service), ``--nodes`` control nodes (default: enough for AGENTS_PER_NODE each, at least 2) and
one edge, all ``comzy-server`` processes on loopback ports 0, then one ``bench.idle_client`` per
control node. It reports the registration rate, each node's RSS and RSS per tunnel, nats-server's
RSS, the NATS traffic per registration and per tunnel per second while idle (nats-server's
``/varz`` counters before and after), the JetStream store (``/jsz``), and a request through a
random tunnel of every control node via the edge. ``--quick`` is a smoke test: 200 agents on 2
control nodes. ``python -m bench.idle_agents --cluster --counts 100000`` is the issue's run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Quick mode (CI smoke test) caps every count at this many agents.
QUICK_MAX_AGENTS = 200
#: Agents per client process; more processes only where spare cores can run them (measured on
#: 2 cores: one client process spends ~0.6 ms of CPU per registration, less than the server, and
#: 10,000 agents registered ~20% faster from one process than from two or four competing ones).
AGENTS_PER_CLIENT = 2500
#: Client processes at most.
MAX_CLIENTS = 4
#: Handshakes in flight per client process.
CLIENT_CONCURRENCY = 64
#: Descriptors the server needs beyond one per agent (listeners, logs, epoll...).
FD_SLACK = 128


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMZY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    # The children import bench and comzy from this checkout even when run from elsewhere.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _fd_hard_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return sys.maxsize if hard == resource.RLIM_INFINITY else hard


def _raise_fd_limit() -> None:
    """preexec_fn for the server: soft RLIMIT_NOFILE up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a live process from /proc (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


class _Lines:
    """A process's stdout lines, read by a thread so waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, deadline: float) -> str:
        """The next line; RuntimeError at EOF or past ``deadline`` (time.monotonic)."""
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError("timed out waiting for an idle client") from None
        if line is None:
            raise RuntimeError("an idle client exited early")
        return line


@contextmanager
def _process(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """A child process that is always ended (by its own PID) and reaped on exit."""
    proc = subprocess.Popen(args, text=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _wait_banner(log_path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, int]:
    """The (public, agents) ports from the server's start-up banner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        public = re.search(r"public\s+http://[\d.]+:(\d+)", text)
        agents = re.search(r"agents\s+ws://[\d.]+:(\d+)", text)
        if public and agents:
            return int(public[1]), int(agents[1])
        if proc.poll() is not None:
            raise RuntimeError(f"comzy-server exited ({proc.returncode}) before its banner:\n{text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError("comzy-server printed no banner within 30 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _check_request(public_port: int, url: str) -> tuple[bool, str]:
    """GET through the tunnel at ``url``; (worked, detail)."""
    host = urlsplit(url).netloc
    conn = http.client.HTTPConnection("127.0.0.1", public_port, timeout=15)
    try:
        conn.request("GET", "/idle-check", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        return False, f"request failed: {exc!r}"
    finally:
        conn.close()
    return response.status == 200 and body == b"idle agent ok\n", f"{response.status} {body[:60]!r}"


def measure(count: int, *, clients: int | None = None, settle: float = 3.0, timeout: float = 300,
            profile: Path | None = None, server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a fresh server, connect ``count`` idle agents, and measure (see the module docstring).

    ``server_env``: extra environment for the server (e.g. ``COMZY_HEARTBEAT_INTERVAL``).
    ``profile``: write a py-spy profile of the server during registration there (a flame graph if
    it ends in ``.svg``, else collapsed stacks).
    """
    hard = _fd_hard_limit()
    if hard < count + FD_SLACK:
        raise RuntimeError(
            f"the open-file hard limit is {hard} but {count} agents need about {count + FD_SLACK} "
            "descriptors in the server; raise it (e.g. `ulimit -Hn 65536` as root) or use fewer agents"
        )
    spare_cores = max(1, (os.cpu_count() or 2) - 1)  # one core for the server
    clients = clients or max(1, min(MAX_CLIENTS, spare_cores, math.ceil(count / AGENTS_PER_CLIENT)))
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comzy-idle-")))
        log_path = tmp / "server.log"
        log_file = stack.enter_context(log_path.open("w"))
        env = _env(COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                   COMZY_DATA_DIR=str(tmp / "data"), COMZY_PLUGINS="none", **(server_env or {}))
        server = stack.enter_context(_process(
            [sys.executable, "-m", "comzy.core.cli"], env=env, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_raise_fd_limit))
        public_port, ws_port = _wait_banner(log_path, server)
        time.sleep(0.5)  # let start-up allocations settle before the baseline
        rss_before = rss_kib(server.pid)
        cpu_before = cpu_seconds(server.pid)
        procs, lines = [], []
        for share in shares:
            proc = stack.enter_context(_process(
                [sys.executable, "-m", "bench.idle_client", "--url", f"ws://127.0.0.1:{ws_port}",
                 "--count", str(share), "--concurrency", str(CLIENT_CONCURRENCY), "--lifetime", str(timeout + 60)],
                env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            procs.append(proc)
            lines.append(_Lines(proc))
        deadline = time.monotonic() + 60
        for reader in lines:
            if reader.next(deadline).strip() != "ready":
                raise RuntimeError("an idle client did not start")
        spy = None
        if profile is not None:
            spy_format = "flamegraph" if profile.suffix == ".svg" else "raw"
            spy = stack.enter_context(_process(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(server.pid), "--rate", "100",
                 "--output", str(profile), "--nonblocking", "--format", spy_format],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)  # py-spy attaches
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout
        reports = [json.loads(reader.next(deadline)) for reader in lines]
        cpu_registering = cpu_seconds(server.pid) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes the SVG on SIGINT
            spy.wait(30)
        time.sleep(settle)
        if server.poll() is not None:
            raise RuntimeError(f"comzy-server exited ({server.returncode}) under {count} agents")
        rss_after = rss_kib(server.pid)
        peak = rss_kib(server.pid, "VmHWM")
        registered = sum(r["registered"] for r in reports)
        starts = [r["first_connect"] for r in reports if r["first_connect"] is not None]
        ends = [r["last_welcome"] for r in reports if r["last_welcome"] is not None]
        elapsed = max(ends) - min(starts) if starts and ends else float("nan")
        url = next((r["url"] for r in reports if r["url"]), None)
        request_ok, request_detail = _check_request(public_port, url) if url else (False, "no agent registered")
        for proc in procs:  # closing stdin lets each client report and exit
            assert proc.stdin is not None
            proc.stdin.close()
        return {
            "agents": count,
            "registered": registered,
            "failed": sum(r["failed"] for r in reports),
            "errors": [e for r in reports for e in r["errors"]][:5],
            "client_processes": clients,
            "registration_seconds": round(elapsed, 3),
            "registrations_per_second": round(registered / elapsed, 1) if elapsed > 0 else None,
            "server_cpu_ms_per_registration": round(cpu_registering * 1000 / registered, 3) if registered else None,
            # Near 1.0: the server was the bottleneck (one core busy), not the clients.
            "server_cpu_share": round(cpu_registering / elapsed, 2) if elapsed > 0 else None,
            "client_cpu_ms_per_registration": round(sum(r["cpu_seconds"] for r in reports) * 1000 / registered, 3)
            if registered else None,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "peak_rss_kib": peak,
            "rss_per_tunnel_kib": round((rss_after - rss_before) / registered, 2) if registered else None,
            "request_ok": request_ok,
            "request_detail": request_detail,
            "settle_seconds": settle,
            "heartbeat": "server defaults (COMZY_HEARTBEAT_INTERVAL 10 s, TIMEOUT 30 s); agents answer PINGs",
        }


def run_idle_agents(counts: list[int], quick: bool, clients: int | None = None) -> dict[str, Any]:
    """Measure each count on a fresh server; quick mode caps counts at QUICK_MAX_AGENTS and settles briefly.

    Returns ``{"case": "idle_agents", "quick": ..., "runs": [one dict per count, see measure()]}``.
    """
    runs = []
    for requested in counts:
        count = min(requested, QUICK_MAX_AGENTS) if quick else requested
        run = measure(count, clients=clients, settle=0.5 if quick else 3.0, timeout=60 if quick else 300)
        run["requested_agents"] = requested
        runs.append(run)
    return {"case": "idle_agents", "quick": quick, "runs": runs}


# -- cluster mode ------------------------------------------------------------------------------

#: Agents per control node in cluster mode by default: under this machine's 20,000-descriptor
#: hard limit with room to spare (100,000 agents -> 7 nodes).
AGENTS_PER_NODE = 15000
#: Debian's nats-server (COMZY_BENCH_NATS_SERVER overrides the path).
NATS_SERVER = "/usr/sbin/nats-server"
#: Cluster name of the benchmark's nodes (subjects comzy.bench.*, buckets comzy_bench_*).
CLUSTER_NAME = "bench"
#: Stop registering (and fail the run) when the machine's available memory falls below this.
MIN_AVAILABLE_KIB = 1024 * 1024
#: Quick cluster mode: agents and control nodes.
QUICK_CLUSTER_AGENTS = 200
QUICK_CLUSTER_NODES = 2
#: Seconds a node may take to start: several start at once, on a machine other jobs may share.
START_TIMEOUT = 180.0
#: Seconds a client may take to report once asked (its handshakes in flight finish first: <= 30 s).
REPORT_TIMEOUT = 120.0
#: Seconds between progress lines (on stderr) while agents register in cluster mode.
PROGRESS_INTERVAL = 10.0


def nats_server_path() -> str | None:
    """The nats-server executable, or None when it is not installed."""
    path = os.environ.get("COMZY_BENCH_NATS_SERVER", NATS_SERVER)
    return path if os.access(path, os.X_OK) else None


def available_kib() -> int:
    """MemAvailable from /proc/meminfo, in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _wait_log(log_path: Path, proc: subprocess.Popen[str], patterns: dict[str, str], what: str,
              timeout: float = 30) -> dict[str, str]:
    """Poll a process's log file until every regex in ``patterns`` matched; {name: first group}."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        found = {name: re.search(pattern, text) for name, pattern in patterns.items()}
        if all(found.values()):
            return {name: match[1] for name, match in found.items() if match}
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready:\n{text[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:.0f} s:\n{text[-2000:]}")
        time.sleep(0.05)


def _monitor(port: int, path: str) -> dict[str, Any]:
    """One JSON document from nats-server's monitoring endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"nats-server monitoring {path}: HTTP {response.status}")
    document: dict[str, Any] = json.loads(body)
    return document


TRAFFIC = ("in_msgs", "out_msgs", "in_bytes", "out_bytes")


def _traffic(port: int) -> dict[str, int]:
    varz = _monitor(port, "/varz")
    return {key: int(varz[key]) for key in TRAFFIC}


def _delta(before: dict[str, int], after: dict[str, int], per: float) -> dict[str, float]:
    return {key: round((after[key] - before[key]) / per, 4) if per else 0.0 for key in TRAFFIC}


def _jetstream(port: int) -> dict[str, Any]:
    """nats-server's JetStream totals and, per stream, messages and bytes (from /jsz)."""
    jsz = _monitor(port, "/jsz?streams=true")
    streams = {
        stream["name"]: {"messages": stream["state"]["messages"], "bytes": stream["state"]["bytes"]}
        for account in jsz.get("account_details") or [] for stream in account.get("stream_detail") or []
    }
    return {"memory": jsz.get("memory", 0), "storage": jsz.get("storage", 0), "streams": streams}


def _health(admin_port: int, data_dir: Path, timeout: float = 120) -> dict[str, Any]:
    """A node's /healthz (tunnels held, role, NATS state), read with its admin token."""
    token = (data_dir / "admin_token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
    try:
        conn.request("GET", "/healthz", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/healthz on admin port {admin_port}: HTTP {response.status} {body[:200]!r}")
    health: dict[str, Any] = json.loads(body)
    return health


def _check_edge_request(edge_port: int, url: str) -> tuple[bool, str]:
    """GET through the edge to the tunnel at ``url`` (its Host without the control node's port 0)."""
    host = urlsplit(url).hostname or ""
    conn = http.client.HTTPConnection("127.0.0.1", edge_port, timeout=15)
    try:
        conn.request("GET", "/idle-check", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        return False, f"{host}: request failed: {exc!r}"
    finally:
        conn.close()
    return response.status == 200 and body == b"idle agent ok\n", f"{host}: {response.status} {body[:60]!r}"


class _Node:
    """One comzy-server of the benchmark's cluster: its process, ports and measurements."""

    def __init__(self, name: str, role: str, proc: subprocess.Popen[str], log_path: Path, data_dir: Path) -> None:
        self.name = name
        self.role = role
        self.proc = proc
        self.log_path = log_path
        self.data_dir = data_dir
        self.ports: dict[str, int] = {}
        self.rss_before = 0
        self.cpu_before = 0.0

    def wait_ready(self) -> None:
        listener = r"public\s+http://127\.0\.0\.1:(\d+)" if self.role == "edge" else r"agents\s+ws://127\.0\.0\.1:(\d+)"
        found = _wait_log(self.log_path, self.proc, {
            "node": rf"ready as {self.role} node (\S+)", "listener": listener,
            "admin": r"admin\s+http://127\.0\.0\.1:(\d+)", "data": r"\bdata\s+(\S+)"}, f"comzy-server {self.name}",
            timeout=START_TIMEOUT)
        self.ports = {"listener": int(found["listener"]), "admin": int(found["admin"])}

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"comzy-server {self.name} exited ({self.proc.returncode}):\n"
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")


def _progress(node: _Node) -> int | None:
    """Tunnels a node holds now, or None when it is too busy to say within a few seconds."""
    try:
        return int(_health(node.ports["admin"], node.data_dir, timeout=5)["tunnels"])
    except (OSError, RuntimeError):
        return None


def _wait_reports(readers: list[_Lines], watched: list[subprocess.Popen[str]], nodes: list[_Node],
                  cut_off_at: float) -> tuple[list[dict[str, Any]], str | None]:
    """Each client's JSON report and why registration was cut short (None: it was not).

    At ``cut_off_at`` (time.monotonic), or when the machine's available memory falls below
    MIN_AVAILABLE_KIB, every client is told to ``report``: it stops starting agents and reports
    those registered. Meanwhile every node must stay alive.
    """
    reports: list[dict[str, Any] | None] = [None] * len(readers)
    started = last_progress = time.monotonic()
    cut_off: str | None = None
    deadline = math.inf  # for the reports, once they are asked for
    while None in reports:
        now = time.monotonic()
        if now - last_progress >= PROGRESS_INTERVAL:
            last_progress = now
            held = [_progress(node) for node in nodes]
            print(f"idle agents: {sum(n or 0 for n in held):,} registered after {now - started:.0f} s "
                  f"({', '.join('?' if n is None else f'{n:,}' for n in held)}); "
                  f"{available_kib() // 1024:,} MiB available", file=sys.stderr, flush=True)
        available = available_kib()
        if cut_off is None and (now > cut_off_at or available < MIN_AVAILABLE_KIB):
            cut_off = (f"only {available // 1024} MiB of memory was left" if available < MIN_AVAILABLE_KIB
                       else f"the registration time limit ({cut_off_at - started:.0f} s) passed")
            print(f"idle agents: registration cut short: {cut_off}", file=sys.stderr, flush=True)
            deadline = now + REPORT_TIMEOUT
            for index, proc in enumerate(watched):
                if reports[index] is None and proc.stdin is not None:
                    proc.stdin.write("report\n")
                    proc.stdin.flush()
        for index, reader in enumerate(readers):
            if reports[index] is None:
                try:
                    reports[index] = json.loads(reader.next(min(deadline, time.monotonic() + 0.5)))
                except RuntimeError:
                    if watched[index].poll() is not None:
                        raise RuntimeError(f"idle client {index + 1} exited ({watched[index].returncode}) "
                                           "before it reported") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"idle client {index + 1} did not report within {REPORT_TIMEOUT:.0f} s "
                                           "of being asked") from None
        for node in nodes:
            node.alive()
    return [report for report in reports if report is not None], cut_off


def measure_cluster(count: int, *, nodes: int | None = None, settle: float = 3.0, quiet: float = 30.0,
                    timeout: float | None = None, server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start nats-server, control nodes and an edge; register ``count`` idle agents; measure.

    ``nodes``: control nodes (default: ``count / AGENTS_PER_NODE`` rounded up, at least 2); one
    client process per node connects its share. ``quiet``: seconds of idle cluster over which the
    steady-state NATS traffic is read. ``server_env``: extra settings for every comzy-server.
    """
    nats_path = nats_server_path()
    if nats_path is None:
        raise RuntimeError(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    nodes = nodes or max(2, math.ceil(count / AGENTS_PER_NODE))
    shares = [count // nodes + (1 if i < count % nodes else 0) for i in range(nodes)]
    hard = _fd_hard_limit()
    if hard < shares[0] + FD_SLACK:
        raise RuntimeError(
            f"the open-file hard limit is {hard} but {shares[0]} agents per control node need about "
            f"{shares[0] + FD_SLACK} descriptors; use more nodes (--nodes {math.ceil(count / (hard - FD_SLACK))})")
    # Generous: on a 2-core machine other jobs share, registration has run at 20-100 agents/s.
    # Past it the agents registered so far are measured, and the run says it was cut short.
    timeout = timeout or max(120.0, count / 20)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comzy-idle-cluster-")))
        nats_log = tmp / "nats.log"
        nats = stack.enter_context(_process(
            [nats_path, "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js", "-sd", str(tmp / "nats")],
            stdin=subprocess.DEVNULL, stdout=stack.enter_context(nats_log.open("w")), stderr=subprocess.STDOUT))
        found = _wait_log(nats_log, nats, {"client": r"client connections on 127\.0\.0\.1:(\d+)",
                                           "monitor": r"http monitor on 127\.0\.0\.1:(\d+)",
                                           "ready": r"(Server is ready)"}, "nats-server", timeout=START_TIMEOUT)
        nats_url, monitor = f"nats://127.0.0.1:{found['client']}", int(found["monitor"])

        def start_node(name: str, role: str) -> _Node:
            log_path, data_dir = tmp / f"{name}.log", tmp / f"data-{name}"
            env = _env(COMZY_ROLE=role, COMZY_NATS_URL=nats_url, COMZY_CLUSTER_NAME=CLUSTER_NAME, COMZY_NODE_NAME=name,
                       COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                       COMZY_DATA_DIR=str(data_dir), COMZY_PLUGINS="none", **(server_env or {}))
            proc = stack.enter_context(_process(
                [sys.executable, "-m", "comzy.core.cli"], env=env, stdin=subprocess.DEVNULL,
                stdout=stack.enter_context(log_path.open("w")), stderr=subprocess.STDOUT, preexec_fn=_raise_fd_limit))
            return _Node(name, role, proc, log_path, data_dir)

        controls = [start_node(f"ctl{i + 1}", "control") for i in range(nodes)]
        edge = start_node("edge", "edge")
        for node in [*controls, edge]:
            node.wait_ready()
        time.sleep(0.5)  # let start-up allocations settle before the baseline
        for node in [*controls, edge]:
            node.rss_before, node.cpu_before = rss_kib(node.proc.pid), cpu_seconds(node.proc.pid)
        nats_rss_before, nats_cpu_before = rss_kib(nats.pid), cpu_seconds(nats.pid)
        available_before = available_kib()
        procs, readers = [], []
        for node, share in zip(controls, shares, strict=True):
            proc = stack.enter_context(_process(
                [sys.executable, "-m", "bench.idle_client", "--url", f"ws://127.0.0.1:{node.ports['listener']}",
                 "--count", str(share), "--concurrency", str(CLIENT_CONCURRENCY),
                 "--lifetime", str(timeout + settle + quiet + 600)],
                env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            procs.append(proc)
            readers.append(_Lines(proc))
        deadline = time.monotonic() + 60
        for reader in readers:
            if reader.next(deadline).strip() != "ready":
                raise RuntimeError("an idle client did not start")
        traffic_start = _traffic(monitor)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports, cut_off = _wait_reports(readers, procs, controls, time.monotonic() + timeout)
        traffic_registered = _traffic(monitor)
        cpu_registering = {node.name: cpu_seconds(node.proc.pid) - node.cpu_before for node in [*controls, edge]}
        nats_cpu_registering = cpu_seconds(nats.pid) - nats_cpu_before
        time.sleep(settle)
        for node in [*controls, edge]:
            node.alive()
        traffic_quiet_start = _traffic(monitor)
        cpu_quiet_start = {node.name: cpu_seconds(node.proc.pid) for node in controls}
        nats_cpu_quiet_start = cpu_seconds(nats.pid)
        time.sleep(quiet)
        traffic_quiet_end = _traffic(monitor)
        # Idle CPU: mostly the heartbeats (a PING to every agent each COMZY_HEARTBEAT_INTERVAL).
        cpu_quiet = {node.name: cpu_seconds(node.proc.pid) - cpu_quiet_start[node.name] for node in controls}
        nats_cpu_quiet = cpu_seconds(nats.pid) - nats_cpu_quiet_start
        jetstream = _jetstream(monitor)
        registered = sum(r["registered"] for r in reports)
        per_node = []
        for node, report in zip(controls, reports, strict=True):
            rss_after = rss_kib(node.proc.pid)
            held = _health(node.ports["admin"], node.data_dir)["tunnels"]
            per_node.append({
                "node": node.name, "agents": report["registered"], "failed": report["failed"], "held": held,
                "rss_before_kib": node.rss_before, "rss_after_kib": rss_after,
                "peak_rss_kib": rss_kib(node.proc.pid, "VmHWM"),
                "rss_per_tunnel_kib": round((rss_after - node.rss_before) / report["registered"], 2)
                if report["registered"] else None,
                "cpu_ms_per_registration": round(cpu_registering[node.name] * 1000 / report["registered"], 3)
                if report["registered"] else None,
                # CPU share of one core while idle, and per tunnel (µs of CPU per tunnel per second).
                "idle_cpu_share": round(cpu_quiet[node.name] / quiet, 4),
                "idle_cpu_us_per_tunnel_second": round(cpu_quiet[node.name] * 1e6 / quiet / report["registered"], 3)
                if report["registered"] else None,
            })
        # A request through a random tunnel of every control node, via the edge.
        checks = []
        chooser = random.Random()
        for report in reports:
            if report.get("urls"):
                checks.append(_check_edge_request(edge.ports["listener"], chooser.choice(report["urls"])))
        edge_rss_after = rss_kib(edge.proc.pid)
        nats_rss_after = rss_kib(nats.pid)
        clients_rss = [rss_kib(proc.pid) for proc in procs]
        starts = [r["first_connect"] for r in reports if r["first_connect"] is not None]
        ends = [r["last_welcome"] for r in reports if r["last_welcome"] is not None]
        elapsed = max(ends) - min(starts) if starts and ends else float("nan")
        aliases = jetstream["streams"].get(f"KV_comzy_{CLUSTER_NAME}_aliases", {"messages": 0, "bytes": 0})
        for proc in procs:  # closing stdin lets each client report and exit
            assert proc.stdin is not None
            proc.stdin.close()
        return {
            "agents": count,
            "control_nodes": nodes,
            "registered": registered,
            "failed": sum(r["failed"] for r in reports),
            # Registration stopped before every agent was started (time limit or memory), and why.
            "cut_off": cut_off,
            "skipped": sum(r.get("skipped", 0) for r in reports),
            # REJECT "throttled" answers (the node's KV was slow): the agent waited and tried again.
            "throttled": sum(r.get("throttled", 0) for r in reports),
            "errors": [e for r in reports for e in r["errors"]][:5],
            "held": sum(n["held"] for n in per_node),
            "registration_seconds": round(elapsed, 3),
            "registrations_per_second": round(registered / elapsed, 1) if elapsed > 0 else None,
            "nodes": per_node,
            "control_rss_total_kib": sum(n["rss_after_kib"] for n in per_node),
            "edge": {"rss_before_kib": edge.rss_before, "rss_after_kib": edge_rss_after,
                     "cpu_seconds_registering": round(cpu_registering["edge"], 3)},
            "nats": {
                "rss_before_kib": nats_rss_before, "rss_after_kib": nats_rss_after,
                "rss_per_tunnel_kib": round((nats_rss_after - nats_rss_before) / registered, 3) if registered else None,
                "cpu_ms_per_registration": round(nats_cpu_registering * 1000 / registered, 3) if registered else None,
                "per_registration": _delta(traffic_start, traffic_registered, registered),
                "quiet_seconds": quiet,
                "idle_cpu_share": round(nats_cpu_quiet / quiet, 4),
                "quiet_per_second": _delta(traffic_quiet_start, traffic_quiet_end, quiet),
                "quiet_per_tunnel_per_second": _delta(traffic_quiet_start, traffic_quiet_end, quiet * registered)
                if registered else None,
                "jetstream": jetstream,
                "alias_records": aliases["messages"],
                "bytes_per_alias_record": round(aliases["bytes"] / aliases["messages"], 1)
                if aliases["messages"] else None,
            },
            "clients_rss_kib": clients_rss,
            "memory_used_kib": available_before - available_kib(),
            "requests_ok": sum(ok for ok, _ in checks),
            "requests": len(checks),
            "request_details": [detail for _, detail in checks],
            "settle_seconds": settle,
        }


def run_idle_cluster(counts: list[int], quick: bool, nodes: int | None = None,
                     server_env: dict[str, str] | None = None, quiet: float = 30.0,
                     timeout: float | None = None) -> dict[str, Any]:
    """Cluster mode for each count (quick: QUICK_CLUSTER_AGENTS agents on QUICK_CLUSTER_NODES nodes).

    Returns ``{"case": "idle_cluster", "quick": ..., "runs": [one dict per count, see measure_cluster()]}``.
    """
    runs = []
    for requested in counts:
        if quick:
            run = measure_cluster(min(requested, QUICK_CLUSTER_AGENTS), nodes=nodes or QUICK_CLUSTER_NODES,
                                  settle=0.5, quiet=5.0, timeout=90, server_env=server_env)
        else:
            run = measure_cluster(requested, nodes=nodes, server_env=server_env, quiet=quiet, timeout=timeout)
        run["requested_agents"] = requested
        runs.append(run)
    return {"case": "idle_cluster", "quick": quick, "runs": runs}


def format_cluster_table(result: dict[str, Any]) -> str:
    """Markdown: a summary per run, then one row per control node."""
    out = []
    for r in result["runs"]:
        nats = r["nats"]
        reg, quiet = nats["per_registration"], nats["quiet_per_tunnel_per_second"] or {}
        out += [
            f"{r['registered']:,} of {r['agents']:,} agents registered on {r['control_nodes']} control nodes "
            f"({r['failed']} failed, {r['throttled']} throttled and retried, {r['held']:,} held by the nodes, "
            f"{nats['alias_records']:,} alias records"
            f"{'; cut short: ' + r['cut_off'] if r.get('cut_off') else ''}) "
            f"in {r['registration_seconds']} s: {r['registrations_per_second']} registrations/s; "
            f"requests through the edge: {r['requests_ok']}/{r['requests']} ok",
            "",
            "| node | agents | RSS before | RSS after | per tunnel | CPU/registration | idle CPU |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n in r["nodes"]:
            out.append(f"| {n['node']} | {n['agents']:,} | {n['rss_before_kib'] / 1024:.1f} MiB "
                       f"| {n['rss_after_kib'] / 1024:.1f} MiB | {n['rss_per_tunnel_kib']} KiB "
                       f"| {n['cpu_ms_per_registration']} ms | {n['idle_cpu_share']:.1%} |")
        edge = r["edge"]
        out += [
            f"| all control nodes | {r['registered']:,} | | {r['control_rss_total_kib'] / 1024:.1f} MiB | | | |",
            f"| edge | - | {edge['rss_before_kib'] / 1024:.1f} MiB | {edge['rss_after_kib'] / 1024:.1f} MiB | | | |",
            f"| nats-server | - | {nats['rss_before_kib'] / 1024:.1f} MiB | {nats['rss_after_kib'] / 1024:.1f} MiB "
            f"| {nats['rss_per_tunnel_kib']} KiB | {nats['cpu_ms_per_registration']} ms "
            f"| {nats['idle_cpu_share']:.1%} |",
            "",
            f"NATS per registration: {reg['in_msgs']} msgs / {reg['in_bytes']:.0f} B in, "
            f"{reg['out_msgs']} msgs / {reg['out_bytes']:.0f} B out. "
            f"Idle ({nats['quiet_seconds']} s): {nats['quiet_per_second']['in_msgs']} msgs/s in, "
            f"{nats['quiet_per_second']['out_msgs']} msgs/s out in all; per tunnel "
            f"{quiet.get('in_bytes', 0)} B/s in, {quiet.get('out_bytes', 0)} B/s out. "
            f"JetStream: {nats['bytes_per_alias_record']} B per alias record, "
            f"{nats['jetstream']['storage'] / 1048576:.1f} MiB stored.",
            "",
        ]
    return "\n".join(out)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the runs."""
    rows = ["| agents | registered | reg/s | server CPU/reg | RSS before | RSS after | per tunnel | request |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["runs"]:
        rows.append(
            f"| {r['agents']:,} | {r['registered']:,} | {r['registrations_per_second']} "
            f"| {r['server_cpu_ms_per_registration']} ms "
            f"| {r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_after_kib'] / 1024:.1f} MiB "
            f"| {r['rss_per_tunnel_kib']} KiB | {'ok' if r['request_ok'] else 'FAILED: ' + r['request_detail']} |"
        )
    return "\n".join(rows)


def _cluster_problems(run: dict[str, Any]) -> list[str]:
    """Why a cluster run does not count (empty when every agent registered and every request worked)."""
    problems = []
    if run["cut_off"]:
        problems.append(f"registration was cut short ({run['cut_off']}): {run['skipped']} agents not started")
    if run["failed"] or run["registered"] + run["skipped"] != run["agents"]:
        problems.append(f"{run['failed']} agents failed to register {run['errors']}")
    if run["held"] != run["registered"]:
        problems.append(f"the control nodes hold {run['held']} tunnels, not {run['registered']}")
    if not run["requests"] or run["requests_ok"] != run["requests"]:
        problems.append(f"requests through the edge: {run['requests_ok']}/{run['requests']} ok "
                        f"{run['request_details']}")
    return problems


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.idle_agents --counts 1000,10000`` (``--cluster`` for cluster mode)."""
    parser = argparse.ArgumentParser(description="Idle agents on one server or a cluster: RSS per tunnel, "
                                     "registration rate (cluster: also NATS's costs).")
    parser.add_argument("--counts", default=None, help="comma-separated agent counts (default 1000,10000; "
                        "cluster: 100000)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: counts capped at {QUICK_MAX_AGENTS} (cluster: {QUICK_CLUSTER_AGENTS} "
                        f"agents on {QUICK_CLUSTER_NODES} control nodes)")
    parser.add_argument("--clients", type=int, default=None, help="client processes (default: by count and cores)")
    parser.add_argument("--cluster", action="store_true",
                        help="nats-server, control nodes and an edge instead of one server")
    parser.add_argument("--nodes", type=int, default=None,
                        help=f"cluster: control nodes (default: {AGENTS_PER_NODE:,} agents each, at least 2)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="cluster: seconds the agents may take to register (default: 1 per 20 agents); "
                        "past it, registration stops and the agents registered so far are measured")
    parser.add_argument("--quiet", type=float, default=30.0,
                        help="cluster: seconds of idle cluster over which NATS's steady traffic is read")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra setting for every comzy-server (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of a table")
    args = parser.parse_args(argv)
    server_env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("COMZY_"):
            parser.error(f"--server-env {item!r}: expected COMZY_NAME=VALUE")
        server_env[name] = value
    default_counts = "100000" if args.cluster else "1000,10000"
    counts = [int(c) for c in (args.counts or default_counts).split(",") if c.strip()]
    if args.cluster:
        result = run_idle_cluster(counts, args.quick, args.nodes, server_env, args.quiet, args.timeout)
        print(json.dumps(result, indent=2) if args.json else format_cluster_table(result))
        problems = [f"{r['agents']} agents: {problem}" for r in result["runs"] for problem in _cluster_problems(r)]
        if problems:
            print("\n".join(problems), file=sys.stderr)
            raise SystemExit(1)
        return
    result = run_idle_agents(counts, args.quick, args.clients)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    failed = [r for r in result["runs"] if r["failed"] or not r["request_ok"]]
    if failed:
        for r in failed:
            print(f"{r['agents']} agents: {r['failed']} failed {r['errors']}; request: {r['request_detail']}",
                  file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
