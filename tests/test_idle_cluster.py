"""The idle-agents benchmark's cluster mode, quick: it must not rot between the 100k runs.

Runs ``python -m bench.idle_agents --cluster --quick --json`` as a subprocess, as docs/benchmarks.md
does: a nats-server of the harness's own, 2 control nodes and an edge, 200 real protocol agents,
a request through a random tunnel of each control node via the edge. Checks that every agent
registered and is held, that the figures are there and sane, and the table renders. Without
``/usr/sbin/nats-server`` (or the nats extra) it skips, except under CI=true where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.idle_agents import QUICK_CLUSTER_AGENTS, QUICK_CLUSTER_NODES, format_cluster_table, nats_server_path
from tests.conftest import cli_env
from tests.helpers import unavailable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: The quick run takes ~20 s on an idle 2-core machine; this bounds a loaded one.
RUN_TIMEOUT = 300


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_cluster_run_registers_every_agent_and_reaches_them_through_the_edge() -> None:
    if nats_server_path() is None:
        unavailable("/usr/sbin/nats-server is not installed (apt-get install nats-server)")
    if importlib.util.find_spec("nats") is None:
        unavailable("the nats extra is not installed (pip install -e '.[nats]')")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.idle_agents", "--cluster", "--quick", "--json"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["case"] == "idle_cluster" and result["quick"] is True
    [run] = result["runs"]
    assert run["control_nodes"] == QUICK_CLUSTER_NODES
    assert run["registered"] == run["agents"] == QUICK_CLUSTER_AGENTS and run["failed"] == 0, run["errors"]
    assert run["cut_off"] is None and run["skipped"] == 0
    # Every agent is held by a node and has a live record in the cluster's KV.
    assert run["held"] == QUICK_CLUSTER_AGENTS
    assert run["nats"]["alias_records"] == QUICK_CLUSTER_AGENTS
    share = QUICK_CLUSTER_AGENTS // QUICK_CLUSTER_NODES
    assert [(n["agents"], n["held"]) for n in run["nodes"]] == [(share, share)] * QUICK_CLUSTER_NODES
    # One request per control node through the edge, each answered by the idle agent.
    assert run["requests"] == QUICK_CLUSTER_NODES and run["requests_ok"] == QUICK_CLUSTER_NODES, run["request_details"]
    assert positive(run["registrations_per_second"])
    for node in run["nodes"]:
        assert positive(node["rss_before_kib"]) and node["rss_after_kib"] > node["rss_before_kib"], node
        assert positive(node["cpu_ms_per_registration"]), node
    nats = run["nats"]
    assert positive(nats["rss_after_kib"])
    # Registering writes KV and publishes an event: both show in nats-server's own counters.
    assert nats["per_registration"]["in_msgs"] >= 1 and nats["per_registration"]["in_bytes"] > 0, nats
    assert nats["quiet_per_second"]["in_msgs"] > 0, nats  # the node leases are refreshed while idle
    assert positive(nats["bytes_per_alias_record"])
    table = format_cluster_table(result)
    assert f"{QUICK_CLUSTER_AGENTS} of {QUICK_CLUSTER_AGENTS} agents registered on {QUICK_CLUSTER_NODES}" in table
    assert "| ctl1 | 100 |" in table and "| nats-server |" in table
