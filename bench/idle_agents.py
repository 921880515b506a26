"""Many idle agents on one server: resident memory per tunnel and registration rate.

For each count a fresh ``comzy-server`` process starts (``COMZY_PLUGINS=none``, loopback, ports 0,
default heartbeat settings). Its RSS is read, then ``bench.idle_client`` processes connect that many
real protocol agents (WebSocket + HELLO -> WELCOME, each answering the server's PINGs), and the
harness reports:

- registration rate: agents per second from the first connect to the last WELCOME;
- RSS after every agent is registered and the server has been idle for a moment, and
  RSS per tunnel = (after - before) / agents;
- whether a request through one of the tunnels still works.

Standalone: ``python -m bench.idle_agents --counts 1000,10000`` prints a table (``--json`` for JSON).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import queue
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.idle_agents --counts 1000,10000``."""
    parser = argparse.ArgumentParser(description="Idle agents on one server: RSS per tunnel, registration rate.")
    parser.add_argument("--counts", default="1000,10000", help="comma-separated agent counts")
    parser.add_argument("--quick", action="store_true", help=f"cap counts at {QUICK_MAX_AGENTS} (smoke test)")
    parser.add_argument("--clients", type=int, default=None, help="client processes (default: by count and cores)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of a table")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
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
