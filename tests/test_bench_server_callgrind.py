"""``python -m bench.server_callgrind`` (bench/server_callgrind.py) runs end to end on tiny numbers: a
comzy-server under callgrind behind nginx and an agent, and a line of positive instruction counts per
server kind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.server_callgrind import valgrind_missing
from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(\S+): c1 ([\d.]+) kIr/req \((\d+) req\); c50 ([\d.]+) kIr/req \((\d+) req\)$", re.M)


@pytest.mark.slow  # a benchmark smoke test under valgrind: about 30 s alone, longer on a busy machine
def test_server_callgrind_prints_positive_counts_per_kind() -> None:
    missing = valgrind_missing()
    if missing:
        unavailable(f"bench.server_callgrind needs valgrind: {missing}")
    done = subprocess.run([sys.executable, "-m", "bench.server_callgrind", "--http-server", "uvicorn-direct",
                           "--requests", "50", "--seconds", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = LINE.findall(done.stdout)
    assert [line[0] for line in lines] == ["uvicorn-direct"], done.stdout
    _, c1, c1_requests, c50, c50_requests = lines[0]
    assert int(c1_requests) == 50 and int(c50_requests) > 0, done.stdout
    # a proxied GET costs the server hundreds of thousands of instructions; 0 would mean an empty dump
    assert 10 < float(c1) < 100_000 and 10 < float(c50) < 100_000, done.stdout
