"""The outside tools: nginx (the local app for GETs), wrk (small GETs) and curl (big transfers)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import MIB, Proc, ProcessFailed

INSTALL_HINT = "install them with: apt-get install nginx-light wrk curl"

# wrk calls done() once at the end; one JSON line is easier to trust than its text report.
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeout_errors": %d, "status_errors": %d, "p50_us": %.1f, "p90_us": %.1f, ' ..
    '"p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def find_tool(name: str, *fallbacks: str) -> str | None:
    """The path of a program on PATH, or at one of ``fallbacks`` (Debian puts nginx in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    return None


def require_tools() -> dict[str, str]:
    """Paths of nginx, wrk and curl; exits with the install command when one is missing."""
    tools = {"nginx": find_tool("nginx", "/usr/sbin/nginx"), "wrk": find_tool("wrk"), "curl": find_tool("curl")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not found; {INSTALL_HINT}")
    return {name: path for name, path in tools.items() if path is not None}


def tool_version(args: list[str]) -> str:
    """The first line a program prints for its version flag."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for nginx, which cannot report port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` different ports on 127.0.0.1 that were free a moment ago: every probe stays bound
    until all are chosen (``free_port()`` called in a row may give the same port twice, the kernel
    being free to hand a just-released port out again)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def make_file(path: Path, size: int) -> Path:
    """A sparse file of ``size`` zero bytes (no disk space, reads as fast as the page cache)."""
    with path.open("wb") as file:
        file.truncate(size)
    path.chmod(0o644)
    return path


def nginx_config(root: Path, port: int) -> str:
    """A one-worker static file server on 127.0.0.1:``port`` with everything under ``root``."""
    return f"""\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        server_name _;
        root {root}/www;
    }}
}}
"""


def serve_small_file(nginx: str, root: Path, name: str, size: int = 1024) -> tuple[Proc, int, Path]:
    """nginx serving one ``size``-byte file ``name`` from ``root/www``, and ``root/wrk.lua``
    (WRK_SCRIPT) written for the loads against it: the master, its port and the script's path."""
    (root / "www").mkdir()
    (root / "www").chmod(0o755)
    make_file(root / "www" / name, size)
    script = root / "wrk.lua"
    script.write_text(WRK_SCRIPT)
    proc, port = start_nginx(nginx, root)
    return proc, port, script


def start_nginx(nginx: str, root: Path, attempts: int = 3) -> tuple[Proc, int]:
    """Start nginx on a free port with files in ``root/www``; returns the master and its port."""
    (root / "tmp").mkdir(exist_ok=True)
    root.chmod(0o755)  # as root, nginx's workers run as an unprivileged user that must read www/
    conf = root / "nginx.conf"
    for attempt in range(attempts):
        port = free_port()
        conf.write_text(nginx_config(root, port))
        proc = Proc("nginx", [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)])
        if wait_listening(port, proc, timeout=10.0):
            return proc, port
        proc.stop()
        if attempt == attempts - 1:
            log = (root / "error.log").read_text() if (root / "error.log").exists() else ""
            raise ProcessFailed(f"nginx did not start:\n{proc.output()}\n{log}")
    raise AssertionError("unreachable")


def wait_listening(port: int, proc: Proc, timeout: float) -> bool:
    """Whether a connection to ``port`` succeeds before ``proc`` exits or ``timeout`` passes.

    nginx prints nothing when ready, so this is the one place that polls.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.01)
    return False


def run_wrk(wrk: str, script: Path, url: str, host: str | None, connections: int, duration: float,
            threads: int | None = None, headers: Sequence[str] = ()) -> dict[str, Any]:
    """One wrk run: req/s, latency percentiles (ms) and error counts; ``headers`` (``Name: value``) go on every
    request."""
    threads = threads or min(connections, 2)
    args = [wrk, "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{max(duration, 1):.0f}s",
            "-s", str(script)]
    if host:
        args += ["-H", f"Host: {host}"]
    for header in headers:
        args += ["-H", header]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    seconds = raw["duration_us"] / 1e6
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeout_errors"]
    return {
        "requests_per_s": raw["requests"] / seconds,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "seconds": seconds,
        "errors": socket_errors + raw["status_errors"],
        "socket_errors": socket_errors,
        "status_errors": raw["status_errors"],
    }


def curl_download(curl: str, url: str, host: str | None, expected: int, max_time: float) -> dict[str, Any]:
    """GET ``url`` into /dev/null; MiB/s over the whole exchange (connect to last byte)."""
    args = [curl, "-sS", "-o", "/dev/null", "--max-time", f"{max_time:.0f}",
            "-w", "%{http_code} %{size_download} %{time_total}"]
    if host:
        args += ["-H", f"Host: {host}"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=max_time + 30, check=False)
    return _transfer_result(done, expected, "download")


def curl_upload(curl: str, url: str, host: str | None, path: Path, max_time: float) -> dict[str, Any]:
    """POST the file at ``path`` (streamed, Content-Length); the receiver answers with the byte count."""
    size = path.stat().st_size
    args = [curl, "-sS", "-X", "POST", "-T", str(path), "-H", "Expect:", "--max-time", f"{max_time:.0f}",
            "-w", "\n%{http_code} %{size_upload} %{time_total}"]
    if host:
        args += ["-H", f"Host: {host}"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=max_time + 30, check=False)
    result = _transfer_result(done, size, "upload")
    body = done.stdout.rsplit("\n", 1)[0].strip()
    if body != str(size):
        result["errors"] += 1
        result["error"] = f"receiver counted {body!r} bytes, sent {size}"
    return result


def _transfer_result(done: subprocess.CompletedProcess[str], expected: int, what: str) -> dict[str, Any]:
    fields = done.stdout.strip().rsplit("\n", 1)[-1].split()
    if done.returncode != 0 or len(fields) != 3:
        return {"mib_per_s": 0.0, "seconds": 0.0, "bytes": 0, "errors": 1,
                "error": f"curl {what} failed ({done.returncode}): {done.stderr.strip()}"}
    status, size, seconds = int(fields[0]), int(float(fields[1])), float(fields[2])
    errors = int(status != 200) + int(size != expected)
    result: dict[str, Any] = {"mib_per_s": size / MIB / seconds if seconds > 0 else 0.0, "seconds": seconds,
                              "bytes": size, "status": status, "errors": errors}
    if errors:
        result["error"] = f"status {status}, {size} of {expected} bytes"
    return result
