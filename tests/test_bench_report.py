"""The benchmark's cluster table (bench/report.py) from known medians: the issue 12 targets are
applied to the cluster against the single node (role ``all``), not against direct nginx, and a run
without the cluster says why. Fast: no process is started (tests/test_bench.py runs the harness)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import cluster_rows, markdown, summarise, table_rows


def case(title: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    built = {"title": title, "params": {}, "runs": runs}
    summarise(built)
    return built


def results(c1_p50: tuple[float, float, float], c50_rps: tuple[float, float, float]) -> dict[str, Any]:
    """A run with direct / all / cluster medians for the three cluster cases (one round each)."""
    def get(p50: float, rps: float) -> dict[str, Any]:
        return {"p50_ms": p50, "p99_ms": p50 * 4, "requests_per_s": rps, "errors": 0}

    rss = {"edge_peak_rss_mib": 56.0, "control_peak_rss_mib": 52.0, "agent_peak_rss_mib": 51.0,
           "nats_peak_rss_mib": 34.0}
    return {
        "meta": {"started": "2026-12-07 05:50:19", "command": "python -m bench", "quick": False,
                 "plan": {"rounds": 1}, "cpus": 2, "kernel": "Linux", "python": "3.11", "nginx": "nginx",
                 "wrk": "wrk", "comzy": "0", "git": "abc", "loadavg_before": "1", "cluster": "measured"},
        "cases": {
            "small_get_1c": case("small GET (1 KiB), 1 connection", {
                "direct": [get(c1_p50[0], 9000)], "tunnel": [get(c1_p50[1], 900)],
                "cluster": [get(c1_p50[2], 400) | {"edge_cpu_us_per_request": 800.0,
                                                    "control_cpu_us_per_request": 700.0,
                                                    "nats_cpu_us_per_request": 300.0,
                                                    "agent_cpu_us_per_request": 600.0}]}),
            "small_get_50c": case("small GET (1 KiB), 50 connections", {
                "direct": [get(3.0, c50_rps[0])], "tunnel": [get(40.0, c50_rps[1])],
                "cluster": [get(50.0, c50_rps[2])]}),
            "download": case("download 1 GiB", {
                "direct": [{"mib_per_s": 1500.0, "bytes": 1 << 30, "errors": 0}],
                "tunnel": [{"mib_per_s": 200.0, "bytes": 1 << 30, "errors": 0, "server_peak_rss_mib": 52.0,
                            "agent_peak_rss_mib": 50.0}],
                "cluster": [{"mib_per_s": 50.0, "bytes": 1 << 30, "errors": 0, **rss}]}),
        },
        "failures": {},
    }


def by_figure(run: dict[str, Any]) -> dict[str, Any]:
    return {row.figure: row for row in cluster_rows(run)}


def test_the_targets_compare_the_cluster_with_the_single_node() -> None:
    rows = by_figure(results(c1_p50=(0.1, 1.0, 1.4), c50_rps=(12000, 1000, 600)))
    p50 = rows["small GET 1 KiB, 1c: p50"]
    assert p50.met is True and p50.vs_single == "+0.400 ms" and p50.vs_direct == "+1.300 ms"
    rps = rows["small GET 1 KiB, 50c: req/s"]
    assert rps.met is True and rps.vs_single == "60.0%" and rps.vs_direct == "5.0%"
    download = rows["download 1 GiB: MiB/s"]
    assert download.met is None and download.vs_single == "25.0%"  # the issue sets no download target
    assert rows["download 1 GiB: peak RSS nats-server"].cluster == "34 MiB"
    assert rows["download 1 GiB: peak RSS edge"].single == "52 MiB"  # the single node's server
    assert rows["download 1 GiB: peak RSS agent"].single == "50 MiB"
    assert all(row.met for figure, row in rows.items() if "errors" in figure)


@pytest.mark.parametrize(("c1", "c50", "p50_met", "rps_met"), [
    ((0.1, 1.0, 1.5), (12000, 1000, 500), True, True),     # exactly at both limits
    ((0.1, 1.0, 1.51), (12000, 1000, 499), False, False),  # just past them
])
def test_the_limits_are_inclusive(c1: tuple[float, float, float], c50: tuple[float, float, float],
                                  p50_met: bool, rps_met: bool) -> None:
    rows = by_figure(results(c1_p50=c1, c50_rps=c50))
    assert rows["small GET 1 KiB, 1c: p50"].met is p50_met
    assert rows["small GET 1 KiB, 50c: req/s"].met is rps_met


def test_results_md_has_the_cluster_table_and_cpu_per_process() -> None:
    run = results(c1_p50=(0.1, 1.0, 2.0), c50_rps=(12000, 1000, 900))
    text = markdown(run, table_rows(run), cluster_rows(run))
    assert "| small GET 1 KiB, 1c: p50 | 0.100 ms | 1.000 ms | 2.000 ms | +1.900 ms | +1.000 ms |" in text
    assert "**no**" in text.split("## Cluster")[1]
    assert "| small GET (1 KiB), 1 connection, per request | 800 µs | 700 µs | 300 µs | 600 µs |" in text


def test_a_run_without_the_cluster_says_why() -> None:
    run = results(c1_p50=(0.1, 1.0, 2.0), c50_rps=(12000, 1000, 900))
    for name in run["cases"]:
        del run["cases"][name]["runs"]["cluster"]
        summarise(run["cases"][name])
    run["meta"]["cluster"] = "skipped: /usr/sbin/nats-server is not installed (apt-get install nats-server)"
    assert cluster_rows(run) == []
    text = markdown(run, table_rows(run), [])
    assert "## Cluster" not in text
    assert "Cluster: skipped: /usr/sbin/nats-server is not installed (apt-get install nats-server)." in text
