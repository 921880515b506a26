"""``python -m bench.floor`` (bench/floor.py) runs end to end on tiny numbers: direct, two
do-nothing relays and the tunnel in the same rounds, a table per connection count with positive
figures, and the relays really carrying the requests (their CPU is counted); with
``--download-mib`` the same for a curl download."""

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


DOWNLOAD_ROW = re.compile(r"^\| (direct|relays|tunnel) \| ([\d,]+) \| ([\d.]+)% \| (.*) \|$", re.M)
DOWNLOAD_CPU = re.compile(r"^([\d.]+) / ([\d.]+) \((relay A / relay B|server / agent)\)$")


@pytest.mark.slow
def test_floor_download_alone_prints_mib_per_s_and_cpu_per_gib() -> None:
    # 128 MiB: enough CPU in each relay (about 0.5 s per GiB) to show above /proc's 10 ms ticks.
    done = subprocess.run([sys.executable, "-m", "bench.floor", "--rounds", "1", "--connections", "",
                           "--download-mib", "128"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "connection(s), medians" not in done.stdout, done.stdout  # no wrk loads asked for
    assert re.search(r"^download of 128 MiB \(curl\), medians of 1 rounds$", done.stdout, re.M), done.stdout
    rows = DOWNLOAD_ROW.findall(done.stdout)
    assert [row[0] for row in rows] == ["direct", "relays", "tunnel"], done.stdout
    for label, rate, share, cpu in rows:
        assert float(rate.replace(",", "")) > 0 and float(share) > 0, done.stdout
        if label == "direct":
            assert cpu == "-" and share == "100.0", done.stdout
        else:
            match = DOWNLOAD_CPU.match(cpu)
            assert match is not None and float(match[1]) > 0 and float(match[2]) > 0, done.stdout
    assert re.search(r"^the tunnel: [\d.]+% of the relays' rate, [\d.]+ s of CPU per GiB", done.stdout, re.M), \
        done.stdout


def test_floor_refuses_to_measure_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.floor", "--connections", ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "nothing to measure" in done.stderr, done.stdout + done.stderr
