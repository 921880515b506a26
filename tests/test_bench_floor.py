"""``python -m bench.floor`` (bench/floor.py) runs end to end on tiny numbers: direct, two
do-nothing relays and the tunnel in the same rounds, a table per connection count with positive
figures, and the relays really carrying the requests (their CPU is counted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (direct|relays|tunnel) \| ([\d,]+) \| ([\d.]+)% \| ([\d.]+) ms \| \+(-?[\d.]+) ms \| "
                 r"([\d.]+) ms \| (.*) \|$", re.M)
CPU = re.compile(r"^(\d+) / (\d+) \((relay A / relay B|server / agent)\)$")


@pytest.mark.slow  # a benchmark smoke test, like tests/test_bench.py
def test_floor_prints_direct_relays_and_tunnel_per_connection_count() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.floor", "--rounds", "1", "--seconds", "1",
                           "--connections", "4,1"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"^(\d+) connection\(s\), medians of 1 rounds$", done.stdout, re.M) == ["4", "1"], done.stdout
    rows = ROW.findall(done.stdout)
    assert [row[0] for row in rows] == ["direct", "relays", "tunnel"] * 2, done.stdout
    for label, rate, _share, p50, _added, p99, cpu in rows:
        assert float(rate.replace(",", "")) > 0 and 0 < float(p50) <= float(p99), done.stdout
        if label == "direct":
            assert cpu == "-"
        else:
            match = CPU.match(cpu)
            assert match is not None and int(match[1]) > 0 and int(match[2]) > 0, done.stdout
