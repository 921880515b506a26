"""``python -m bench.agent_path`` (bench/agent_path.py) runs on a tiny count and says every request of
a pooled small GET was answered without a task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_agent_path_prints_cpu_per_request_and_the_callback_path() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.agent_path", "--repeats", "1", "--requests", "300",
                           "--loop", "asyncio"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, summary = done.stdout.splitlines()
    assert first.endswith("µs/request (300 of 300 without a task)"), first
    assert summary.startswith("asyncio: min ") and float(summary.split()[2]) > 0, summary


def test_agent_path_through_the_link() -> None:
    """``--link``: REQUESTs come as the server's WebSocket messages through a real Session, and every
    one is still answered from callbacks (stream ids taken in turn are never still open)."""
    done = subprocess.run([sys.executable, "-m", "bench.agent_path", "--repeats", "1", "--requests", "600",
                           "--loop", "asyncio", "--link"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, _ = done.stdout.splitlines()
    assert first.endswith("µs/request (600 of 600 without a task)"), first
    assert not done.stderr, done.stderr
