"""Everything a run needs, started once: nginx, the local app, comzy-server and two agents.

With ``cluster=True`` also a small cluster beside it: a nats-server of the harness's own (free
port, own store directory), one control node and one edge (``comzy-server`` processes with
``COMZY_ROLE=control`` / ``edge``) and a third agent, on the control node, exposing the same nginx.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, ProcessFailed
from bench.tools import WRK_SCRIPT, find_tool, make_file, start_nginx

SMALL_FILE = "small.bin"
LARGE_FILE = "large.bin"


@dataclass
class Endpoint:
    """How a client reaches one app: the port to connect to and the Host header to send."""

    port: int
    host: str
    #: Extra request headers (``Name: value``) every request to this app carries (credentials).
    headers: tuple[str, ...] = ()

    def url(self, path: str) -> str:
        """The URL for wrk and curl (always 127.0.0.1; the Host header picks the tunnel)."""
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Cluster:
    """The cluster beside the single node: nats-server, a control node, an edge and the agent on the control node."""

    nats: Proc
    control: Proc
    edge: Proc
    agent: Proc
    #: nginx through the edge (the agent holding the alias is on the control node).
    nginx: Endpoint

    def procs(self) -> dict[str, Proc]:
        """The cluster's processes by role, for CPU and memory figures."""
        return {"edge": self.edge, "control": self.control, "agent": self.agent, "nats": self.nats}


@dataclass
class Stack:
    """The running processes and the direct/tunnel endpoints of both local apps."""

    root: Path
    tools: dict[str, str]
    wrk_script: Path
    upload_file: Path
    large_size: int
    nginx_direct: Endpoint
    nginx_tunnel: Endpoint
    app_direct: Endpoint
    app_tunnel: Endpoint
    server: Proc
    nginx_agent: Proc
    app_agent: Proc
    procs: list[Proc] = field(default_factory=list)
    cluster: Cluster | None = None


def comzy_env(**extra: str) -> dict[str, str]:
    """The environment for comzy-server and comzy: no inherited COMZY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMZY_", "HTTP_PORT", "WS_PORT"))}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.update(extra)
    return env


def cluster_unavailable() -> str | None:
    """Why the cluster case cannot run here (no nats-server, no nats extra), or None when it can."""
    if find_nats_server() is None:
        override = os.environ.get("COMZY_BENCH_NATS_SERVER")
        if override:
            return f"COMZY_BENCH_NATS_SERVER={override} is not an executable file"
        return f"{NATS_SERVER} is not installed (apt-get install nats-server)"
    if importlib.util.find_spec("nats") is None:
        return "the nats extra is not installed (pip install -e '.[nats]')"
    return None


def find_nats_server() -> str | None:
    """Debian's nats-server (COMZY_BENCH_NATS_SERVER overrides the path)."""
    override = os.environ.get("COMZY_BENCH_NATS_SERVER")
    if override:
        return override if os.access(override, os.X_OK) else None
    return find_tool("nats-server", NATS_SERVER)


NATS_SERVER = "/usr/sbin/nats-server"


@contextlib.contextmanager
def running_stack(tools: dict[str, str], large_size: int, upload_size: int,
                  server_env: dict[str, str] | None = None, cluster: bool = False,
                  nats_store: Path | None = None) -> Iterator[Stack]:
    """Start every process (stopped again, by PID, when the block ends); yields a ``Stack``.

    ``server_env``: extra settings for comzy-server (e.g. ``COMZY_HTTP_SERVER``), the cluster's
    nodes included. ``cluster``: also start the cluster (``cluster_unavailable()`` must be None);
    ``nats_store``: nats-server's JetStream directory (default: in the temporary directory),
    removed when the block ends.
    """
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="comzy-bench-", dir=memory_backed_dir()) as tmp, \
            contextlib.ExitStack() as stack:
        stores: list[Path] = []
        stack.callback(_remove_all, stores)  # registered first, so it runs last: after nats-server has stopped
        stack.callback(_stop_all, procs)
        root = Path(tmp)
        www = root / "www"
        www.mkdir()
        www.chmod(0o755)
        small = www / SMALL_FILE
        small.write_bytes(b"comzy bench 1 KiB body\n".ljust(1024, b"."))
        small.chmod(0o644)
        # Read once: on a disk file system the first read of a sparse file fills the page cache
        # at disk-allocation speed (~130 MiB/s here), which would make round one's direct figure a lie.
        warm_page_cache(make_file(www / LARGE_FILE, large_size))
        upload_file = warm_page_cache(make_file(root / "upload.bin", upload_size))
        wrk_script = root / "report.lua"
        wrk_script.write_text(WRK_SCRIPT)

        nginx, nginx_port = start_nginx(tools["nginx"], root)
        procs.append(nginx)

        app = Proc("local app", [sys.executable, "-m", "bench.localapp"], env=comzy_env(), cwd=_repo_root())
        procs.append(app)
        app_port = int(app.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        app.done_waiting()

        data_dir = root / "comzy-data"
        server = Proc("comzy-server", [sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
            COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
            COMZY_DATA_DIR=str(data_dir), COMZY_PLUGINS="none", COMZY_SHUTDOWN_GRACE="2", **(server_env or {})))
        procs.append(server)
        public_port = int(server.wait_for(r"public\s+http://[\d.]+:(\d+)")[1])
        ws_port = int(server.wait_for(r"agents\s+ws://[\d.]+:(\d+)")[1])
        server.done_waiting()

        def agent(name: str, local_port: int) -> tuple[Proc, str]:
            proc = Proc(name, [sys.executable, "-m", "comzy.agent.cli", str(local_port), "--local-host", "127.0.0.1",
                               "--quiet", "--server", f"ws://127.0.0.1:{ws_port}"], env=comzy_env())
            procs.append(proc)
            alias = proc.wait_for(r"Public URL: https?://([a-z0-9-]+)\.")[1]
            proc.done_waiting()
            return proc, f"{alias}.localhost"

        nginx_agent, nginx_host = agent("agent (nginx)", nginx_port)
        app_agent, app_host = agent("agent (local app)", app_port)
        started_cluster = None
        if cluster:
            store = nats_store or root / "nats-store"
            stores.append(store)
            started_cluster = start_cluster(procs, root, store, nginx_port, server_env or {})
        yield Stack(
            root=root, tools=tools, wrk_script=wrk_script, upload_file=upload_file, large_size=large_size,
            nginx_direct=Endpoint(nginx_port, f"127.0.0.1:{nginx_port}"),
            nginx_tunnel=Endpoint(public_port, nginx_host),
            app_direct=Endpoint(app_port, f"127.0.0.1:{app_port}"),
            app_tunnel=Endpoint(public_port, app_host),
            server=server, nginx_agent=nginx_agent, app_agent=app_agent, procs=procs, cluster=started_cluster,
        )


def start_cluster(procs: list[Proc], root: Path, store: Path, nginx_port: int, server_env: dict[str, str]) -> Cluster:
    """nats-server (JetStream, free port, ``store``), a control node, an edge, and an agent for nginx on the control
    node; every process is appended to ``procs`` as it starts, so it is stopped by PID whatever fails later."""
    nats_server = find_nats_server()
    if nats_server is None:
        raise ProcessFailed(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    # Never the machine's 4222 service: port -1 is a free port, which nats-server prints.
    nats = Proc("nats-server", [nats_server, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(store)])
    procs.append(nats)
    nats_port = int(nats.wait_for(r"Listening for client connections on 127\.0\.0\.1:(\d+)")[1])
    nats.wait_for(r"Server is ready")
    nats.done_waiting()

    def node(role: str) -> Proc:
        proc = Proc(f"comzy-server ({role})", [sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
            COMZY_ROLE=role, COMZY_NATS_URL=f"nats://127.0.0.1:{nats_port}", COMZY_CLUSTER_NAME="bench",
            COMZY_NODE_NAME=role, COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0",
            COMZY_ADMIN_PORT="0", COMZY_DATA_DIR=str(root / f"comzy-{role}"), COMZY_PLUGINS="none",
            COMZY_SHUTDOWN_GRACE="2", **server_env), cwd=_repo_root())
        procs.append(proc)
        proc.wait_for(rf"ready as {role} node")
        return proc

    control = node("control")
    ws_port = int(control.wait_for(r"agents\s+ws://[\d.]+:(\d+)")[1])
    control.done_waiting()
    edge = node("edge")
    public_port = int(edge.wait_for(r"public\s+http://[\d.]+:(\d+)")[1])
    edge.done_waiting()
    agent = Proc("agent (nginx, cluster)", [sys.executable, "-m", "comzy.agent.cli", str(nginx_port), "--local-host",
                                            "127.0.0.1", "--quiet", "--server", f"ws://127.0.0.1:{ws_port}"],
                 env=comzy_env())
    procs.append(agent)
    alias = agent.wait_for(r"Public URL: https?://([a-z0-9-]+)\.")[1]
    agent.done_waiting()
    endpoint = Endpoint(public_port, f"{alias}.localhost")
    wait_serving(endpoint, f"/{SMALL_FILE}", edge)
    return Cluster(nats=nats, control=control, edge=edge, agent=agent, nginx=endpoint)


def wait_serving(endpoint: Endpoint, path: str, proc: Proc, timeout: float = 30.0) -> None:
    """GET ``path`` until it answers 200: right after the agent's WELCOME another NATS connection (the edge's)
    may not see the control node's alias subscription yet, and the first lookup would say 404."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and proc.alive():
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=5)
        try:
            extra = dict(header.split(": ", 1) for header in endpoint.headers)
            conn.request("GET", path, headers={"Host": endpoint.host, **extra})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"{response.status} {response.reason}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.02)  # a bounded poll of observable state, not a readiness guess
    raise ProcessFailed(f"{endpoint.host} through the edge did not answer 200 within {timeout:.0f} s "
                        f"(last: {last}):\n{proc.output()}")


def memory_backed_dir() -> str | None:
    """/dev/shm when it is a writable tmpfs (sparse files read at memory speed there), else the default."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def warm_page_cache(path: Path) -> Path:
    """Read a file once so later reads come from memory."""
    with path.open("rb", buffering=0) as file:
        buffer = bytearray(4 * 1024 * 1024)
        while file.readinto(buffer):
            pass
    return path


def _stop_all(procs: list[Proc]) -> None:
    # Agents first, so the server does not wait on them while draining.
    for proc in reversed(procs):
        proc.stop()


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
