"""Instructions per proxied request of comzy-server, counted by callgrind: a figure load cannot move.

For each public listener server (``COMZY_HTTP_SERVER``), this starts nginx with the 1 KiB file, a
comzy-server under ``valgrind --tool=callgrind --instr-atstart=no`` and an agent (not under
valgrind), then counts the server's instructions over two loads, instrumentation switched on and
counters zeroed and dumped with ``callgrind_control``:

- at 1 connection: N sequential GETs on one keep-alive connection (after a warm-up);
- at 50 connections: wrk for S seconds; the count is divided by the requests wrk completed.

    python -m bench.server_callgrind                                   # uvicorn and uvicorn-direct
    python -m bench.server_callgrind --http-server uvicorn-direct --requests 2000 --seconds 10
    python -m bench.server_callgrind --http-server uvicorn-direct --plugins builtin  # the default install's plugins

It needs valgrind (``valgrind`` and ``callgrind_control``: ``apt-get install valgrind``) besides
nginx and wrk. Under valgrind the server runs about 50 times slower: the wrk load completes few
requests (a few hundred in 5 s), which is enough since the count does not vary run to run.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import Proc
from bench.stack import SMALL_FILE, comzy_env
from bench.tools import require_tools, run_wrk, serve_small_file

#: Public listener servers measured when none is named.
DEFAULT_KINDS = ("uvicorn", "uvicorn-direct")
#: Seconds the server under valgrind may take to start (imports run about 50 times slower).
STARTUP_TIMEOUT = 300.0
#: Requests before counting, uninstrumented then instrumented: first allocations, caches, the link.
WARM_UP, WARM_UP_INSTRUMENTED = 50, 20


def valgrind_missing() -> str | None:
    """Why callgrind cannot run here, or None when ``valgrind`` and ``callgrind_control`` are on PATH."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found; install them with: apt-get install valgrind"
    return None


def _control(pid: int, *args: str) -> None:
    """One ``callgrind_control`` command to the valgrind running as ``pid``."""
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _dump_total(out_dir: Path, pid: int, before: set[Path]) -> int:
    """The instruction total of the dump ``callgrind_control -d`` just asked ``pid`` to write."""
    deadline = time.monotonic() + 60
    while True:
        new = sorted(set(out_dir.glob(f"cg.out.{pid}*")) - before)
        if new:
            text = new[-1].read_text(errors="replace")
            # the dump is complete once its totals line is written
            for line in text.splitlines():
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"no complete callgrind dump from {pid} in {out_dir}")
        time.sleep(0.1)  # written by the server's own valgrind, a moment after callgrind_control returns


def measure(kind: str, requests: int, seconds: float, tools: dict[str, str],
            plugins: str = "none", keep: Path | None = None) -> tuple[float, float, int, int]:
    """Instructions per request at 1 and 50 connections for ``kind``, with the request counts of each;
    ``plugins`` is COMZY_PLUGINS (``builtin``: left unset, every built-in plugin, as installed);
    ``keep``: a folder the two dumps are copied to (for ``callgrind_annotate``)."""
    procs: list[Proc] = []
    try:
        with tempfile.TemporaryDirectory(prefix="comzy-callgrind-") as tmp:
            root = Path(tmp)
            nginx, nginx_port, script = serve_small_file(tools["nginx"], root, SMALL_FILE)
            procs.append(nginx)
            settings = {} if plugins == "builtin" else {"COMZY_PLUGINS": plugins}
            server = Proc("comzy-server", [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={root}/cg.out.%p", "--instr-atstart=no",
                sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
                    COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                    COMZY_DATA_DIR=str(root / "data"), COMZY_SHUTDOWN_GRACE="2",
                    COMZY_HTTP_SERVER=kind, COMZY_HEARTBEAT_INTERVAL="600", **settings))
            procs.append(server)
            public_port = int(server.wait_for(r"public\s+http://[\d.]+:(\d+)", timeout=STARTUP_TIMEOUT)[1])
            ws_port = int(server.wait_for(r"agents\s+ws://[\d.]+:(\d+)", timeout=STARTUP_TIMEOUT)[1])
            server.done_waiting()
            agent = Proc("comzy", [sys.executable, "-m", "comzy.agent.cli", str(nginx_port), "--local-host",
                                   "127.0.0.1", "--quiet", "--server", f"ws://127.0.0.1:{ws_port}"], env=comzy_env())
            procs.append(agent)
            host = agent.wait_for(r"Public URL: https?://([a-z0-9-]+)\.", timeout=STARTUP_TIMEOUT)[1] + ".localhost"
            agent.done_waiting()
            connection = http.client.HTTPConnection("127.0.0.1", public_port, timeout=120)

            def get() -> None:
                connection.request("GET", f"/{SMALL_FILE}", headers={"Host": host})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET through {kind} answered {response.status}")

            for _ in range(WARM_UP):
                get()
            _control(server.pid, "-i", "on")
            for _ in range(WARM_UP_INSTRUMENTED):
                get()
            _control(server.pid, "-z")
            for _ in range(requests):
                get()
            before = set(root.glob("cg.out.*"))
            _control(server.pid, "-d", "c1")
            c1 = _dump_total(root, server.pid, before) / requests
            connection.close()
            _control(server.pid, "-z")
            load = run_wrk(tools["wrk"], script, f"http://127.0.0.1:{public_port}/{SMALL_FILE}", host, 50, seconds)
            before = set(root.glob("cg.out.*"))
            _control(server.pid, "-d", "c50")
            _control(server.pid, "-i", "off")
            if load["requests"] <= 0:
                raise RuntimeError(f"wrk completed no request through {kind} in {seconds} s")
            c50 = _dump_total(root, server.pid, before) / load["requests"]
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for dump in root.glob(f"cg.out.{server.pid}*"):
                    shutil.copy(dump, keep / f"{kind}.{dump.name}")
            return c1, c50, load["requests"], load["status_errors"]
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: list[str] | None = None) -> int:
    """Measure each server kind in turn and print one line per kind."""
    parser = argparse.ArgumentParser(prog="python -m bench.server_callgrind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-server", action="append", dest="kinds", metavar="KIND",
                        help="a COMZY_HTTP_SERVER value, repeatable (default: uvicorn and uvicorn-direct)")
    parser.add_argument("--requests", type=int, default=1000,
                        help="sequential requests counted at 1 connection (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the 50-connection wrk load (default 5)")
    parser.add_argument("--plugins", default="none",
                        help="COMZY_PLUGINS for the server (default none; builtin: unset, every built-in plugin)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the c1 and c50 dumps to DIR (read them with callgrind_annotate)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.seconds < 1:
        parser.error("--requests and --seconds must be at least 1")
    missing = valgrind_missing()
    if missing:
        print(f"server_callgrind: {missing}", file=sys.stderr)
        return 2
    tools = require_tools()
    for kind in args.kinds or DEFAULT_KINDS:
        c1, c50, done, non_2xx = measure(kind, args.requests, args.seconds, tools, args.plugins, args.keep)
        errors = f", non-2xx {non_2xx}" if non_2xx else ""
        print(f"{kind}: c1 {c1 / 1e3:.1f} kIr/req ({args.requests} req); "
              f"c50 {c50 / 1e3:.1f} kIr/req ({done} req{errors})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
