"""``python -m bench.nats_rtt`` (bench/nats_rtt.py) runs end to end on a tiny count: its own nats-server
on a free port, a responder per client, and a row of sane figures for each of stock, direct and tcp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import NATS_SERVER
from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a benchmark smoke test, like tests/test_bench.py
def test_nats_rtt_prints_a_sane_row_per_client() -> None:
    if not NATS_SERVER.is_file():
        unavailable(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    env = {**os.environ, "COMZY_BENCH_NATS_SERVER": str(NATS_SERVER)}
    done = subprocess.run([sys.executable, "-m", "bench.nats_rtt", "--rounds", "1", "--count", "200"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {cells[0]: cells for cells in (line.split() for line in done.stdout.splitlines()) if cells}
    for client in ("stock", "direct", "tcp"):
        p50, p90, responder_us = (float(cell) for cell in rows[client][1:4])
        assert 0 < p50 <= p90 < 1000, rows[client]  # milliseconds
        assert responder_us >= 0, rows[client]  # CPU comes in clock ticks: 200 round trips may read 0
    assert float(rows["direct"][4]) >= 0 and rows["tcp"][4] == "-"  # nats-server CPU: none without it
