"""1 GiB down and 256 MiB up through real server and agent processes, with bounded memory.

The server and the agent run as separate processes so each one's peak resident memory
(VmHWM from /proc) can be checked against the 150 MiB budget.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import cli_env
from tests.upstream import pattern_block, serve_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

GIB = 1024**3
MIB = 1024**2
RSS_BUDGET = 150 * MIB


def peak_rss(pid: int) -> int:
    """Peak resident set size of a live process, in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


@contextmanager
def popen(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    """Read the process's output until a line matches ``pattern``."""
    assert proc.stdout is not None
    regex = re.compile(pattern)
    seen = []
    with anyio.fail_after(timeout):
        while True:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            if not line:
                raise AssertionError("process ended before printing " + pattern + ":\n" + "".join(seen))
            seen.append(line)
            match = regex.search(line)
            if match:
                return match


@asynccontextmanager
async def tunnel_processes(tmp_path: Path, upstream_port: int) -> AsyncIterator[tuple[int, int, int, str]]:
    """Yields (server pid, agent pid, public port, alias) for processes serving the upstream."""
    env = cli_env(COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                  COMZY_DATA_DIR=str(tmp_path), COMZY_PLUGINS="none")
    with popen([sys.executable, "-m", "comzy.core.cli"], env) as server:
        http_port = int((await read_until(server, r"public\s+http://[\d.]+:(\d+)"))[1])
        ws_port = int((await read_until(server, r"agents\s+ws://[\d.]+:(\d+)"))[1])
        agent_cmd = [sys.executable, "-m", "comzy.agent.cli", str(upstream_port), "--local-host", "127.0.0.1",
                     "--server", f"ws://127.0.0.1:{ws_port}"]
        with popen(agent_cmd, cli_env()) as agent:
            alias = (await read_until(agent, r"Public URL: http://([a-z0-9-]+)\."))[1]
            async with anyio.create_task_group() as tg:
                # Keep both pipes drained so neither process blocks on a full pipe.
                tg.start_soon(anyio.to_thread.run_sync, server.stdout.read)  # type: ignore[union-attr]
                tg.start_soon(anyio.to_thread.run_sync, agent.stdout.read)  # type: ignore[union-attr]
                yield server.pid, agent.pid, http_port, alias
                agent.terminate()
                server.terminate()


def expected_sha256(total: int) -> str:
    block = pattern_block()
    digest = hashlib.sha256()
    for _ in range(total // len(block)):
        digest.update(block)
    digest.update(block[: total % len(block)])
    return digest.hexdigest()


async def test_one_gib_download_and_256_mib_upload_with_bounded_memory(tmp_path: Path) -> None:
    async with serve_upstream() as upstream, tunnel_processes(tmp_path, upstream.port) as (spid, apid, port, alias):
        headers = {"host": f"{alias}.localhost"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as client:
            digest = hashlib.sha256()
            received = 0
            started = time.perf_counter()
            async with client.stream("GET", f"/bytes/{GIB}") as response:
                assert response.status_code == 200
                assert response.headers["content-length"] == str(GIB)
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    received += len(chunk)
            download_s = time.perf_counter() - started
            assert received == GIB
            assert digest.hexdigest() == expected_sha256(GIB)

            upload_size = 256 * MIB
            block = pattern_block()

            async def body() -> AsyncIterator[bytes]:
                for _ in range(upload_size // len(block)):
                    yield block

            started = time.perf_counter()
            response = await client.post("/upload", content=body(),
                                         headers={"content-length": str(upload_size)})
            upload_s = time.perf_counter() - started
            assert response.status_code == 200
            assert response.json()["body_size"] == upload_size
            assert response.json()["body_sha256"] == expected_sha256(upload_size)

            server_peak, agent_peak = peak_rss(spid), peak_rss(apid)
        print(f"\n1 GiB download {GIB / MIB / download_s:.0f} MiB/s, 256 MiB upload {upload_size / MIB / upload_s:.0f} "
              f"MiB/s; peak RSS server {server_peak / MIB:.0f} MiB, agent {agent_peak / MIB:.0f} MiB")
        assert server_peak < RSS_BUDGET, f"server peak RSS {server_peak / MIB:.0f} MiB"
        assert agent_peak < RSS_BUDGET, f"agent peak RSS {agent_peak / MIB:.0f} MiB"
