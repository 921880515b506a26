"""``make demo`` (examples/demo.py) for real: a server, the sample app and an agent, one request
through the tunnel, Ctrl-C; its data lives in a directory of its own, never in the default data
directory a real server would later reuse."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, cli_env
from tests.test_large_transfers import popen, read_until

pytestmark = pytest.mark.anyio

DEMO = ROOT / "examples" / "demo.py"


def demo_env(home: Path, **extra: str) -> dict[str, str]:
    """A home of its own (where the default data directory would be) and free ports (the demo
    passes the environment on to its server)."""
    env = cli_env(HOME=str(home), COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0", **extra)
    env.pop("XDG_DATA_HOME", None)
    env.pop("COMZY_TOKEN", None)
    return env


async def run_demo(env: dict[str, str], stop: signal.Signals = signal.SIGINT) -> Path:
    """Run the demo until a request went through its tunnel, then stop it with ``stop`` (Ctrl-C's
    SIGINT, or SIGTERM); its data directory."""
    with popen([PYTHON, str(DEMO)], env) as demo:
        # A line that never comes must not hang the test: the killed demo's output ends, and
        # read_until fails showing what it printed.
        watchdog = threading.Timer(90, demo.kill)
        watchdog.start()
        try:
            return await exchange_and_stop(demo, stop)
        finally:
            watchdog.cancel()


async def exchange_and_stop(demo: subprocess.Popen[str], stop: signal.Signals) -> Path:
    """One request through the demo's tunnel, checked, then ``stop``; the demo's data directory."""
    data = Path((await read_until(demo, r"demo: the server's data \(database, admin token\) is in (\S+) "))[1])
    # What the server itself says at start-up (a log line, with a timestamp when piped).
    assert (await read_until(demo, r"(?:^|\s)data\s+(/\S+)\s*$"))[1] == str(data)
    tried = await read_until(demo, r"curl -H 'Host: (\S+)' http://127\.0\.0\.1:(\d+)/hello")
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{tried[2]}/hello", headers={"host": tried[1]})
    assert answer.status_code == 200 and "Hello from your local app" in answer.text
    assert (data / "comzy.db").is_file() and (data / "admin_token").is_file()
    demo.send_signal(stop)
    assert demo.wait(30) == 0
    return data


async def test_the_demo_keeps_its_data_apart_and_removes_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data = await run_demo(demo_env(home))
    assert not data.exists()
    assert not data.is_relative_to(home)
    assert not (home / ".local" / "share" / "comzy").exists()


async def test_the_demo_uses_and_keeps_comzy_data_dir(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    chosen = tmp_path / "demo-data"
    data = await run_demo(demo_env(home, COMZY_DATA_DIR=str(chosen)), signal.SIGTERM)
    assert data == chosen and (chosen / "comzy.db").is_file()
    assert not (home / ".local" / "share" / "comzy").exists()
    assert os.stat(chosen).st_mode & 0o077 == 0  # private, as the server makes it
