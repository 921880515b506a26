"""The benchmark harness's quick mode: every case runs and returns sane numbers (never a speed check).

Runs ``python -m bench --quick`` as a subprocess, exactly as CI and docs/benchmarks.md do. It needs
nginx, wrk and curl from the system: without them the test skips, except in CI (``CI=true``), where
a missing tool is a failure so the smoke test can never silently stop running. The cluster variant
needs nats-server and the nats extra too: without them its checks skip, except in CI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: The cases measured through the cluster too (variant ``cluster``), beside direct and the single node.
CLUSTER_CASES = {"small_get_1c", "small_get_50c", "download"}
CLUSTER_PROCESSES = ("edge", "control", "agent", "nats")
CASES = ["small_get_1c", "small_get_50c", "download", "upload", "sse", "websocket", "fairness"]
HEADLINE = {
    "small_get_1c": ["requests_per_s", "p50_ms", "p99_ms"],
    "small_get_50c": ["requests_per_s", "p50_ms", "p99_ms"],
    "download": ["mib_per_s"],
    "upload": ["mib_per_s"],
    "sse": ["first_event_p50_ms"],
    "websocket": ["round_trips_per_s"],
    "fairness": ["requests_per_s", "p99_ms"],
}


def missing_tools() -> list[str]:
    """The system programs the harness needs that are not installed."""
    found = {
        "nginx": shutil.which("nginx") or (os.access("/usr/sbin/nginx", os.X_OK) and "/usr/sbin/nginx"),
        "wrk": shutil.which("wrk"),
        "curl": shutil.which("curl"),
    }
    return [name for name, path in found.items() if not path]


def numbers(data: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON tree, with its path."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from numbers(value, f"{path}[{index}]")
    elif isinstance(data, int | float) and not isinstance(data, bool):
        yield path, float(data)


def require_bench_tools() -> None:
    """Skip without nginx, wrk or curl; fail instead under CI=true, where the smoke test is required."""
    missing = missing_tools()
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install nginx-light wrk curl)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the benchmark smoke test: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    require_bench_tools()
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=360, check=False)
    return out, done


def test_quick_mode_exits_cleanly(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = quick_run
    assert done.returncode == 0, f"python -m bench --quick failed:\n{done.stdout}\n{done.stderr}"
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["quick"] is True
    assert results["problems"] == []
    assert results["failures"] == {}


def cluster_measured(results: dict[str, Any]) -> bool:
    """Whether the run measured the cluster; a skip is allowed only off CI, for a missing nats-server or extra."""
    status = results["meta"]["cluster"]
    if status == "measured":
        return True
    assert status.startswith("skipped: ") and "not installed" in status, status
    assert os.environ.get("CI") != "true", f"CI must run the benchmark's cluster variant: {status}"
    return False


def test_every_case_ran_with_sane_numbers(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = quick_run
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cases"]) == sorted(CASES), done.stderr
    cluster = cluster_measured(results)
    for name, case in results["cases"].items():
        variants = {"direct", "tunnel"} | ({"direct_alone", "tunnel_alone"} if name == "fairness" else set())
        variants |= {"cluster"} if cluster and name in CLUSTER_CASES else set()
        assert set(case["runs"]) == variants, name
        for variant in variants:
            assert case["runs"][variant], f"{name}/{variant} has no rounds"
            for metric in HEADLINE[name]:
                value = case["median"][variant][metric]
                assert math.isfinite(value) and value > 0, f"{name}/{variant} {metric} = {value}"
        for path, value in numbers(case["runs"]):
            assert math.isfinite(value), f"{name}{path} = {value}"
            if "error" in path:
                assert value == 0, f"{name}{path} = {value}"
            elif "cpu" in path:  # 10 ms clock ticks: a one-second run may read 0
                assert value >= 0, f"{name}{path} = {value}"
            else:
                assert value > 0, f"{name}{path} = {value}"
    for case in ("download", "upload"):
        for who in ("server", "agent"):
            assert results["cases"][case]["max"]["tunnel"][f"{who}_peak_rss_mib"] > 1


def test_cluster_rows_are_there_and_sane(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    if not cluster_measured(results):
        pytest.skip(results["meta"]["cluster"])
    cases = results["cases"]
    for name in CLUSTER_CASES:
        [run] = cases[name]["runs"]["cluster"]  # quick mode: one round
        assert run["errors"] == 0, run
        for who in ("edge", "control", "agent"):  # each Python process on the path spends well over a 10 ms tick
            assert math.isfinite(run[f"{who}_cpu_s"]) and run[f"{who}_cpu_s"] > 0, (name, who, run)
        assert math.isfinite(run["nats_cpu_s"]) and run["nats_cpu_s"] >= 0, (name, run)
    download = cases["download"]["max"]["cluster"]
    assert download["bytes"] == cases["download"]["params"]["bytes"]
    for who in CLUSTER_PROCESSES:
        assert download[f"{who}_peak_rss_mib"] > 1, (who, download)
    rows = {row["figure"]: row for row in results["cluster_table"]}
    p50 = rows["small GET 1 KiB, 1c: p50"]["values"]
    assert min(p50["direct"], p50["all"], p50["cluster"]) > 0
    assert p50["added_vs_all"] == pytest.approx(p50["cluster"] - p50["all"])
    assert rows["small GET 1 KiB, 1c: p50"]["met"] == (p50["added_vs_all"] <= 0.5)
    c50 = rows["small GET 1 KiB, 50c: req/s"]["values"]
    assert c50["cluster"] > 0 and c50["share_of_all"] == pytest.approx(c50["cluster"] / c50["all"])
    assert rows["small GET 1 KiB, 50c: req/s"]["met"] == (c50["share_of_all"] >= 0.5)
    assert rows["download 32 MiB: MiB/s"]["values"]["cluster"] > 0
    for label in ("edge", "control node", "agent", "nats-server"):
        assert rows[f"download 32 MiB: peak RSS {label}"]["values"]["cluster"] > 1, label
    table = (out / "results.md").read_text()
    assert "| figure | direct | all | cluster | vs direct | vs all | target | met? |" in table
    assert "| edge | control node | nats-server | agent |" in table
    assert "nats-store" not in {path.name for path in out.iterdir()}  # nats-server's store is removed


def test_idle_agents_case_is_included_when_present(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    if importlib.util.find_spec("bench.idle_agents") is None:
        assert results.get("idle_agents") is None
        return
    idle = results["idle_agents"]
    assert "error" not in idle, idle
    assert idle["runs"]
    for run in idle["runs"]:
        assert run["registered"] == run["agents"] > 0
        assert run["failed"] == 0
        assert run["request_ok"], run["request_detail"]
        assert math.isfinite(run["registrations_per_second"]) and run["registrations_per_second"] > 0
        assert math.isfinite(run["rss_per_tunnel_kib"])


def test_table_and_charts_are_written(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    table = (out / "results.md").read_text()
    assert "| case | direct | tunnel | ratio | target | met? |" in table
    for row in ("small GET 1 KiB, 50c: req/s", "download 32 MiB: MiB/s", "upload 16 MiB: MiB/s",
                "SSE first event", "WebSocket echo", "slow visitor"):
        assert row in table
    if importlib.util.find_spec("matplotlib") is not None:
        for chart in ("summary.png", "latency.png", "fairness.png"):
            assert (out / chart).stat().st_size > 1000, chart


def test_cpu_script_prints_cpu_per_request_and_per_gib() -> None:
    """``python -m bench.cpu`` (docs/benchmarks.md): one short round, every figure present and positive;
    with ``--cluster`` also through an edge, per cluster process; with ``--inspector`` the agents with their
    inspector on and off (the "on" one has listed a request) and the table comparing them."""
    require_bench_tools()
    from bench.stack import cluster_unavailable

    missing = cluster_unavailable()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run bench.cpu --cluster: {missing}")
    cluster = ["--cluster"] if missing is None else []
    done = subprocess.run([sys.executable, "-m", "bench.cpu", "--rounds", "1", "--seconds", "1",
                           "--connections", "4", "--download-mib", "16", "--json", "--inspector", *cluster],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"python -m bench.cpu failed:\n{done.stdout}\n{done.stderr}"
    runs = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            runs.update(json.loads(line))
    expected = {"get_4c", "download"}
    inspector = {f"inspector_{label}_{name}" for label in ("on", "off") for name in expected}
    assert set(runs) == expected | inspector | ({f"cluster_{name}" for name in expected} if cluster else set()), \
        done.stdout
    for label in ("off", "on"):
        [get] = runs[f"inspector_{label}_get_4c"]
        assert get["errors"] == 0 and get["agent_us"] > 0
        assert re.search(rf"(?m)^{label} +4 +\d+ ", done.stdout), done.stdout
        assert re.search(rf"(?m)^{label} +download: agent [\d.]+ s/GiB, peak RSS \d+ MiB$", done.stdout), done.stdout
    if cluster:
        [get] = runs["cluster_get_4c"]
        assert get["errors"] == 0 and get["requests_per_s"] > 0
        for who in ("edge", "control", "agent"):  # each Python process spends well over a clock tick
            assert get[f"{who}_us"] > 0, (who, get)
        assert get["nats_us"] >= 0
        [download] = runs["cluster_download"]
        assert download["errors"] == 0 and download["mib_per_s"] > 0
        for who in ("edge", "control", "agent", "nats"):
            assert download[f"{who}_peak_rss_mib"] > 1, (who, download)
    [get] = runs["get_4c"]
    assert get["errors"] == 0 and get["requests_per_s"] > 0
    assert get["server_us"] > 0 and get["agent_us"] > 0  # a second of requests uses well over a clock tick
    [download] = runs["download"]
    assert download["errors"] == 0 and download["mib_per_s"] > 0
    assert download["server_peak_rss_mib"] > 1 and download["agent_peak_rss_mib"] > 1
