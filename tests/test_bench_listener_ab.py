"""``python -m bench.listener_ab`` (bench/listener_ab.py) runs end to end on tiny numbers: two
in-process servers behind nginx and agents, wrk alternating between them, and a line per connection
count with positive CPU per request and ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^c(\d+): uvicorn ([\d.]+) µs/req \(min ([\d.]+)\), uvicorn-direct ([\d.]+) \(min ([\d.]+)\); "
                  r"per-round uvicorn-direct/uvicorn median ([\d.]+) \[([\d., ]+)\]$", re.M)


@pytest.mark.slow  # a benchmark smoke test, like tests/test_bench.py
def test_listener_ab_prints_a_line_per_connection_count() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.listener_ab", "--rounds", "2", "--seconds", "1",
                           "--connections", "4,1"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = LINE.findall(done.stdout)
    assert [line[0] for line in lines] == ["4", "1"], done.stdout
    for _, a_median, a_min, b_median, b_min, ratio, rounds in lines:
        assert 0 < float(a_min) <= float(a_median) and 0 < float(b_min) <= float(b_median), done.stdout
        assert float(ratio) > 0 and len(rounds.split(", ")) == 2, done.stdout
