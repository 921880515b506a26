"""Everything a run needs, started once: nginx, the local app, comzy-server and two agents."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc
from bench.tools import WRK_SCRIPT, make_file, start_nginx

SMALL_FILE = "small.bin"
LARGE_FILE = "large.bin"


@dataclass
class Endpoint:
    """How a client reaches one app: the port to connect to and the Host header to send."""

    port: int
    host: str

    def url(self, path: str) -> str:
        """The URL for wrk and curl (always 127.0.0.1; the Host header picks the tunnel)."""
        return f"http://127.0.0.1:{self.port}{path}"


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


def comzy_env(**extra: str) -> dict[str, str]:
    """The environment for comzy-server and comzy: no inherited COMZY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMZY_", "HTTP_PORT", "WS_PORT"))}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.update(extra)
    return env


@contextlib.contextmanager
def running_stack(tools: dict[str, str], large_size: int, upload_size: int,
                  server_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Start every process (stopped again, by PID, when the block ends); yields a ``Stack``.

    ``server_env``: extra settings for comzy-server (e.g. ``COMZY_HTTP_SERVER``).
    """
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="comzy-bench-", dir=memory_backed_dir()) as tmp, \
            contextlib.ExitStack() as stack:
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
        yield Stack(
            root=root, tools=tools, wrk_script=wrk_script, upload_file=upload_file, large_size=large_size,
            nginx_direct=Endpoint(nginx_port, f"127.0.0.1:{nginx_port}"),
            nginx_tunnel=Endpoint(public_port, nginx_host),
            app_direct=Endpoint(app_port, f"127.0.0.1:{app_port}"),
            app_tunnel=Endpoint(public_port, app_host),
            server=server, nginx_agent=nginx_agent, app_agent=app_agent, procs=procs,
        )


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


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
