"""Medians, ratios to direct, the targets table, sanity checks, and the files in the results folder."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Number = int | float

# Targets from issue 13, "fast by default" (ratios to direct nginx in the same run; they replace issue 3's
# 10% / 10x / 0.5 ms / 15%), plus the harness's own for fairness.
GET_50C_MIN_SHARE = 0.20
GET_50C_MAX_P99_FACTOR = 5.0
GET_1C_MAX_ADDED_P50_MS = 0.25
TRANSFER_MIN_SHARE = 0.40
RSS_MAX_MIB = 150.0
# Issue 13: CPU per proxied request at 50 connections (user + system, from /proc).
SERVER_MAX_CPU_US_50C = 100.0
AGENT_MAX_CPU_US_50C = 80.0
# Issue 12: the edge -> NATS -> control node hop, against the single node (role all) in the same run.
CLUSTER_MAX_ADDED_P50_MS = 0.5
CLUSTER_MIN_SHARE_OF_ALL = 0.5
IDLE_MAX_KIB_PER_TUNNEL = 40.0
IDLE_MIN_REGISTRATIONS_PER_S = 500.0
FAIR_MIN_RPS_SHARE = 0.8
FAIR_MAX_P99_FACTOR = 2.0


def summarise(case: dict[str, Any]) -> None:
    """Add ``median`` (per variant and metric) and ``max`` (for peak RSS) over the rounds."""
    case["median"], case["max"] = {}, {}
    for variant, runs in case["runs"].items():
        metrics = sorted({key for run in runs for key, value in run.items() if _is_number(value)})
        case["median"][variant] = {key: statistics.median(run[key] for run in runs if key in run) for key in metrics}
        case["max"][variant] = {key: max(run[key] for run in runs if key in run) for key in metrics}
    direct, tunnel = case["median"].get("direct", {}), case["median"].get("tunnel", {})
    case["ratio_to_direct"] = {key: tunnel[key] / direct[key] for key in tunnel
                               if key in direct and direct[key] and "error" not in key}


@dataclass
class Row:
    """One line of the results table."""

    case: str
    direct: str
    tunnel: str
    ratio: str
    target: str
    met: bool | None
    values: dict[str, Number | None]

    def as_dict(self) -> dict[str, Any]:
        """The row for results.json."""
        return {"case": self.case, "direct": self.direct, "tunnel": self.tunnel, "ratio": self.ratio,
                "target": self.target, "met": self.met, "values": self.values}


def table_rows(results: dict[str, Any]) -> list[Row]:
    """The rows of results.md, in case order; cases that did not run are left out."""
    cases = results["cases"]
    rows: list[Row] = []
    for key, conns in (("small_get_1c", 1), ("small_get_50c", 50)):
        if key not in cases:
            continue
        d, t = cases[key]["median"]["direct"], cases[key]["median"]["tunnel"]
        label = f"small GET 1 KiB, {conns}c"
        if conns == 50:
            rows.append(_share(f"{label}: req/s", d["requests_per_s"], t["requests_per_s"], "req/s",
                               GET_50C_MIN_SHARE))
            rows.append(_factor(f"{label}: p50", d["p50_ms"], t["p50_ms"], None))
            rows.append(_factor(f"{label}: p99", d["p99_ms"], t["p99_ms"], GET_50C_MAX_P99_FACTOR))
            server, agent = t.get("server_cpu_us_per_request"), t.get("agent_cpu_us_per_request")
            if server is not None and agent is not None:
                rows.append(Row(f"{label}: CPU per request, server / agent", "-", f"{server:,.0f} / {agent:,.0f} µs",
                                "-", f"≤ {SERVER_MAX_CPU_US_50C:.0f} / {AGENT_MAX_CPU_US_50C:.0f} µs",
                                server <= SERVER_MAX_CPU_US_50C and agent <= AGENT_MAX_CPU_US_50C,
                                {"server_us": server, "agent_us": agent}))
        else:
            rows.append(_share(f"{label}: req/s", d["requests_per_s"], t["requests_per_s"], "req/s", None))
            rows.append(_added(f"{label}: p50", d["p50_ms"], t["p50_ms"], GET_1C_MAX_ADDED_P50_MS))
            rows.append(_factor(f"{label}: p99", d["p99_ms"], t["p99_ms"], None))
        rows.append(_errors(f"{label}: errors (non-2xx + socket)", d["errors"], t["errors"]))
    for key in ("download", "upload"):
        if key not in cases:
            continue
        case = cases[key]
        d, t, peak = case["median"]["direct"], case["median"]["tunnel"], case["max"]["tunnel"]
        rows.append(_share(f"{case['title']}: MiB/s", d["mib_per_s"], t["mib_per_s"], "MiB/s", TRANSFER_MIN_SHARE))
        for who in ("server", "agent"):
            value = peak[f"{who}_peak_rss_mib"]
            rows.append(Row(f"{case['title']}: peak RSS {who}", "-", f"{value:.0f} MiB", "-",
                            f"< {RSS_MAX_MIB:.0f} MiB", value < RSS_MAX_MIB, {"tunnel": value}))
    if "sse" in cases:
        d, t = cases["sse"]["median"]["direct"], cases["sse"]["median"]["tunnel"]
        rows.append(_added("SSE first event: p50", d["first_event_p50_ms"], t["first_event_p50_ms"], None))
    if "websocket" in cases:
        d, t = cases["websocket"]["median"]["direct"], cases["websocket"]["median"]["tunnel"]
        rows.append(_share("WebSocket echo: round trips/s", d["round_trips_per_s"], t["round_trips_per_s"],
                           "/s", None))
        rows.append(_added("WebSocket echo: round trip p50", d["round_trip_p50_ms"], t["round_trip_p50_ms"], None))
    if "fairness" in cases:
        m = cases["fairness"]["median"]
        rows.append(_share("slow visitor + 50c small GETs: req/s", m["direct"]["requests_per_s"],
                           m["tunnel"]["requests_per_s"], "req/s", GET_50C_MIN_SHARE))
        d_rps = m["direct"]["requests_per_s"] / m["direct_alone"]["requests_per_s"]
        t_rps = m["tunnel"]["requests_per_s"] / m["tunnel_alone"]["requests_per_s"]
        rows.append(Row("slow visitor: req/s with ÷ without", f"{d_rps:.2f}", f"{t_rps:.2f}", "-",
                        f"tunnel ≥ {FAIR_MIN_RPS_SHARE:.1f}", t_rps >= FAIR_MIN_RPS_SHARE,
                        {"direct": d_rps, "tunnel": t_rps}))
        d_p99 = m["direct"]["p99_ms"] / m["direct_alone"]["p99_ms"]
        t_p99 = m["tunnel"]["p99_ms"] / m["tunnel_alone"]["p99_ms"]
        rows.append(Row("slow visitor: p99 with ÷ without", f"{d_p99:.2f}x", f"{t_p99:.2f}x", "-",
                        f"tunnel ≤ {FAIR_MAX_P99_FACTOR:.0f}x", t_p99 <= FAIR_MAX_P99_FACTOR,
                        {"direct": d_p99, "tunnel": t_p99}))
    idle = results.get("idle_agents")
    if isinstance(idle, dict) and "error" not in idle:
        rows.extend(idle_rows(idle))
    return rows


@dataclass
class ClusterRow:
    """One line of the cluster table: direct nginx, the single node (role ``all``) and the cluster side by side."""

    figure: str
    direct: str
    single: str
    cluster: str
    vs_direct: str
    vs_single: str
    target: str
    met: bool | None
    values: dict[str, Number | None]

    def as_dict(self) -> dict[str, Any]:
        """The row for results.json."""
        return {"figure": self.figure, "direct": self.direct, "all": self.single, "cluster": self.cluster,
                "vs_direct": self.vs_direct, "vs_all": self.vs_single, "target": self.target, "met": self.met,
                "values": self.values}


#: The cluster's processes as the cases name them (``<role>_peak_rss_mib``), with the table's label.
CLUSTER_PROCESSES = (("edge", "edge"), ("control", "control node"), ("agent", "agent"), ("nats", "nats-server"))


def cluster_rows(results: dict[str, Any]) -> list[ClusterRow]:
    """The cluster table: c1 p50, c50 req/s, download MiB/s and peak RSS per process, for cases with a cluster
    variant (none when the cluster was not measured)."""
    cases = results["cases"]
    rows: list[ClusterRow] = []
    one = cases.get("small_get_1c")
    if one is not None and "cluster" in one["median"]:
        d, a, c = (one["median"][v]["p50_ms"] for v in ("direct", "tunnel", "cluster"))
        rows.append(ClusterRow(
            "small GET 1 KiB, 1c: p50", f"{d:.3f} ms", f"{a:.3f} ms", f"{c:.3f} ms", f"{c - d:+.3f} ms",
            f"{c - a:+.3f} ms", f"hop adds ≤ {CLUSTER_MAX_ADDED_P50_MS} ms vs all", c - a <= CLUSTER_MAX_ADDED_P50_MS,
            {"direct": d, "all": a, "cluster": c, "added_vs_direct": c - d, "added_vs_all": c - a}))
    fifty = cases.get("small_get_50c")
    if fifty is not None and "cluster" in fifty["median"]:
        d, a, c = (fifty["median"][v]["requests_per_s"] for v in ("direct", "tunnel", "cluster"))
        rows.append(_cluster_share("small GET 1 KiB, 50c: req/s", d, a, c, "req/s", CLUSTER_MIN_SHARE_OF_ALL))
        d, a, c = (fifty["median"][v]["p99_ms"] for v in ("direct", "tunnel", "cluster"))
        rows.append(ClusterRow("small GET 1 KiB, 50c: p99", f"{d:.3f} ms", f"{a:.3f} ms", f"{c:.3f} ms",
                               f"{c / d if d else math.inf:.1f}x", f"{c / a if a else math.inf:.1f}x", "-", None,
                               {"direct": d, "all": a, "cluster": c}))
    download = cases.get("download")
    if download is not None and "cluster" in download["median"]:
        d, a, c = (download["median"][v]["mib_per_s"] for v in ("direct", "tunnel", "cluster"))
        rows.append(_cluster_share(f"{download['title']}: MiB/s", d, a, c, "MiB/s", None))
        single, cluster = download["max"]["tunnel"], download["max"]["cluster"]
        for role, label in CLUSTER_PROCESSES:
            value = cluster[f"{role}_peak_rss_mib"]
            # The single node's counterpart: its one server for edge and control, its agent for the agent.
            twin = single.get("agent_peak_rss_mib") if role == "agent" else \
                single.get("server_peak_rss_mib") if role in ("edge", "control") else None
            comzy = role != "nats"
            rows.append(ClusterRow(
                f"{download['title']}: peak RSS {label}", "-", "-" if twin is None else f"{twin:.0f} MiB",
                f"{value:.0f} MiB", "-", "-", f"< {RSS_MAX_MIB:.0f} MiB" if comzy else "-",
                value < RSS_MAX_MIB if comzy else None, {"all": twin, "cluster": value}))
    for key in ("small_get_1c", "small_get_50c", "download"):
        case = cases.get(key)
        if case is not None and "cluster" in case["runs"]:
            d, c = case["median"]["direct"]["errors"], case["median"]["cluster"]["errors"]
            a = case["median"]["tunnel"]["errors"]
            rows.append(ClusterRow(f"{case['title']}: errors", f"{d:.0f}", f"{a:.0f}", f"{c:.0f}", "-", "-", "0",
                                   d == a == c == 0, {"direct": d, "all": a, "cluster": c}))
    return rows


def _cluster_share(figure: str, direct: float, single: float, cluster: float, unit: str,
                   minimum: float | None) -> ClusterRow:
    of_direct = cluster / direct if direct else 0.0
    of_single = cluster / single if single else 0.0
    return ClusterRow(figure, f"{direct:,.0f} {unit}", f"{single:,.0f} {unit}", f"{cluster:,.0f} {unit}",
                      f"{of_direct:.1%}", f"{of_single:.1%}",
                      f"≥ {minimum:.0%} of all" if minimum is not None else "-",
                      None if minimum is None else of_single >= minimum,
                      {"direct": direct, "all": single, "cluster": cluster, "share_of_direct": of_direct,
                       "share_of_all": of_single})


def idle_rows(idle: dict[str, Any]) -> list[Row]:
    """Rows for the idle-agents case: RSS per tunnel and registration rate per agent count.

    bench.idle_agents returns ``{"runs": [{"agents", "rss_per_tunnel_kib", "registrations_per_second", ...}]}``;
    any other shape is searched by key name, and listed whole if nothing matches.
    """
    runs = idle.get("runs")
    if isinstance(runs, list) and all(isinstance(run, dict) and "agents" in run for run in runs):
        rows = []
        for run in runs:
            kib, rate = run.get("rss_per_tunnel_kib"), run.get("registrations_per_second")
            label = f"{run['agents']:,} idle agents"
            if _is_number(kib):
                rows.append(Row(f"{label}: RSS per tunnel", "-", f"{kib:.1f} KiB", "-",
                                f"< {IDLE_MAX_KIB_PER_TUNNEL:.0f} KiB", kib < IDLE_MAX_KIB_PER_TUNNEL,
                                {"tunnel": kib, "agents": run["agents"]}))
            if _is_number(rate):
                rows.append(Row(f"{label}: registrations/s", "-", f"{rate:,.0f}/s", "-",
                                f"≥ {IDLE_MIN_REGISTRATIONS_PER_S:.0f}/s", rate >= IDLE_MIN_REGISTRATIONS_PER_S,
                                {"tunnel": rate, "agents": run["agents"]}))
        return rows
    leaves = list(_numbers(idle))
    rows = []
    for path, value in leaves:
        name = path.lower()
        if "per_tunnel" in name and "rss" in name:
            kib = value / 1024 if name.endswith("bytes") else value * 1024 if "mib" in name else value
            rows.append(Row(f"idle agents {path}", "-", f"{kib:.1f} KiB", "-", f"< {IDLE_MAX_KIB_PER_TUNNEL:.0f} KiB",
                            kib < IDLE_MAX_KIB_PER_TUNNEL, {"tunnel": kib}))
        elif "regist" in name and ("per_s" in name or "rate" in name):
            rows.append(Row(f"idle agents {path}", "-", f"{value:,.0f}/s", "-",
                            f"≥ {IDLE_MIN_REGISTRATIONS_PER_S:.0f}/s", value >= IDLE_MIN_REGISTRATIONS_PER_S,
                            {"tunnel": value}))
    if not rows:
        rows = [Row(f"idle agents {path}", "-", f"{value:,.4g}", "-", "-", None, {"tunnel": value})
                for path, value in leaves[:12]]
    return rows


def _share(case: str, direct: float, tunnel: float, unit: str, minimum: float | None) -> Row:
    share = tunnel / direct if direct else 0.0
    target = f"≥ {minimum:.0%} of direct" if minimum is not None else "-"
    return Row(case, f"{direct:,.0f} {unit}", f"{tunnel:,.0f} {unit}", f"{share:.1%}", target,
               None if minimum is None else share >= minimum, {"direct": direct, "tunnel": tunnel, "ratio": share})


def _factor(case: str, direct: float, tunnel: float, maximum: float | None) -> Row:
    factor = tunnel / direct if direct else math.inf
    target = f"≤ {maximum:.0f}x direct" if maximum is not None else "-"
    return Row(case, f"{direct:.3f} ms", f"{tunnel:.3f} ms", f"{factor:.1f}x", target,
               None if maximum is None else factor <= maximum, {"direct": direct, "tunnel": tunnel, "ratio": factor})


def _added(case: str, direct: float, tunnel: float, maximum: float | None) -> Row:
    added = tunnel - direct
    target = f"added ≤ {maximum} ms" if maximum is not None else "-"
    return Row(case, f"{direct:.3f} ms", f"{tunnel:.3f} ms", f"{added:+.3f} ms", target,
               None if maximum is None else added <= maximum, {"direct": direct, "tunnel": tunnel, "added": added})


def _errors(case: str, direct: float, tunnel: float) -> Row:
    return Row(case, f"{direct:.0f}", f"{tunnel:.0f}", "-", "0", direct == 0 and tunnel == 0,
               {"direct": direct, "tunnel": tunnel})


def problems(results: dict[str, Any], expected_cases: list[str]) -> list[str]:
    """What makes this run's numbers unusable: a missing case, an error, a non-positive or odd number."""
    found = []
    for name in expected_cases:
        case = results["cases"].get(name)
        if case is None:
            found.append(f"{name}: did not run ({results.get('failures', {}).get(name, 'no result')})")
            continue
        for variant, runs in case["runs"].items():
            if not runs:
                found.append(f"{name}/{variant}: no rounds")
            for index, run in enumerate(runs):
                found.extend(f"{name}/{variant} round {index + 1}: {issue}" for issue in _run_issues(run))
    idle = results.get("idle_agents")
    if isinstance(idle, dict):
        found.extend(f"idle_agents: {issue}" for issue in idle_issues(idle))
    return found


def idle_issues(idle: dict[str, Any]) -> Iterator[str]:
    """What is wrong with an idle-agents result: an error, failed agents, a broken tunnel, odd numbers."""
    if "error" in idle:
        yield str(idle["error"])
        return
    runs = idle.get("runs")
    if not isinstance(runs, list) or not runs:
        yield from _run_issues(idle)
        return
    for run in runs:
        label = f"{run.get('agents')} agents"
        if run.get("failed") or run.get("registered") != run.get("agents"):
            yield f"{label}: {run.get('registered')} registered, {run.get('failed')} failed {run.get('errors')}"
        if run.get("request_ok") is False:
            yield f"{label}: request through a tunnel failed: {run.get('request_detail')}"
        rate, kib = run.get("registrations_per_second"), run.get("rss_per_tunnel_kib")
        if not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
            yield f"{label}: registrations_per_second = {rate}"
        if not _is_number(kib) or not math.isfinite(kib):
            yield f"{label}: rss_per_tunnel_kib = {kib}"


def _run_issues(run: dict[str, Any]) -> Iterator[str]:
    if "error" in run:
        yield str(run["error"])
    for path, value in _numbers(run):
        if "error" in path.lower():
            if value != 0:
                yield f"{path} = {value}"
        elif "cpu" in path.lower():  # 10 ms clock ticks: a short run may read 0
            if not math.isfinite(value) or value < 0:
                yield f"{path} = {value}"
        elif not math.isfinite(value) or value <= 0:
            yield f"{path} = {value} (expected a positive number)"


def _numbers(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _numbers(value, f"{prefix}[{index}]")
    elif _is_number(data):
        yield prefix, float(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def markdown(results: dict[str, Any], rows: list[Row], cluster_table: list[ClusterRow] | None = None) -> str:
    """results.md: how the run was made, then the table."""
    meta = results["meta"]
    lines = [
        f"# Comzy benchmark, {meta['started']}",
        "",
        f"Command: `{meta['command']}` ({'quick mode: smoke test, figures not meaningful' if meta['quick'] else 'full'}"
        f", {meta['plan']['rounds']} round{'s' if meta['plan']['rounds'] != 1 else ''}, medians).",
        f"Machine: {meta['cpus']} CPUs, {meta['kernel']}, Python {meta['python']}; {meta['nginx']}; {meta['wrk']}; "
        f"comzy {meta['comzy']} ({meta['git']}). Load average before/after: {meta['loadavg_before']} / "
        f"{meta.get('loadavg_after', '?')}.",
        "",
        "| case | direct | tunnel | ratio | target | met? |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.case} | {row.direct} | {row.tunnel} | {row.ratio} | {row.target} | {met} |")
    cpu = cpu_rows(results)
    if cpu:
        lines += ["", "CPU time through the tunnel (user + system, median over rounds; the figure other load on "
                  "the machine disturbs least):", "", "| case | server | agent |", "|---|---:|---:|",
                  *(f"| {case} | {server} | {agent} |" for case, server, agent in cpu)]
    if results.get("problems"):
        lines += ["", "Problems:", *(f"- {p}" for p in results["problems"])]
    idle = results.get("idle_agents")
    if isinstance(idle, dict) and "error" in idle:
        lines += ["", f"Idle agents: {idle['error']}"]
    elif "idle_agents" in results and idle is None:
        lines += ["", "Idle agents: not measured (bench/idle_agents.py is not present)."]
    lines += ["", "Direct: the same local app (nginx, or bench/localapp.py for upload/SSE/WebSocket) without the "
              "tunnel. Ratio: tunnel ÷ direct (share of direct throughput, latency factor, or added ms). "
              "Raw numbers for every round are in results.json.", ""]
    if cluster_table:
        lines += ["## Cluster", "",
                  "The same nginx through an edge whose agent is on a control node (nats-server, a control node and "
                  "an edge started by the harness, each its own process), alternating round by round with direct "
                  "and the single node (role `all`). **vs direct**: share of direct throughput or ms added; "
                  "**vs all**: the same against the single node, i.e. what the NATS hop costs.", "",
                  "| figure | direct | all | cluster | vs direct | vs all | target | met? |",
                  "|---|---:|---:|---:|---:|---:|---|:---:|"]
        for crow in cluster_table:
            met = "-" if crow.met is None else ("yes" if crow.met else "**no**")
            lines.append(f"| {crow.figure} | {crow.direct} | {crow.single} | {crow.cluster} | {crow.vs_direct} | "
                         f"{crow.vs_single} | {crow.target} | {met} |")
        ccpu = cluster_cpu_rows(results)
        if ccpu:
            lines += ["", "CPU time through the cluster (user + system, median over rounds):", "",
                      "| case | edge | control node | nats-server | agent |", "|---|---:|---:|---:|---:|",
                      *(f"| {' | '.join(cells)} |" for cells in ccpu)]
        lines.append("")
    elif results["meta"].get("cluster", "").startswith("skipped"):
        lines += [f"Cluster: {results['meta']['cluster']}.", ""]
    return "\n".join(lines)


def cpu_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(case, server, agent) CPU per unit of work for every tunnel case that measured it."""
    rows = []
    for case in results["cases"].values():
        tunnel = case["median"].get("tunnel", {})
        for unit, label, fmt in (("us_per_request", "per request", "{:,.0f} µs"),
                                 ("us_per_round_trip", "per round trip", "{:,.0f} µs"),
                                 ("s_per_gib", "per GiB", "{:.2f} s")):
            server, agent = tunnel.get(f"server_cpu_{unit}"), tunnel.get(f"agent_cpu_{unit}")
            if server is not None and agent is not None:
                rows.append((f"{case['title']}, {label}", fmt.format(server), fmt.format(agent)))
    return rows


def cluster_cpu_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(case, edge, control, nats, agent) CPU per unit of work for every case with a cluster variant."""
    rows = []
    for case in results["cases"].values():
        cluster = case["median"].get("cluster", {})
        for unit, label, fmt in (("us_per_request", "per request", "{:,.0f} µs"), ("s_per_gib", "per GiB", "{:.2f} s")):
            values = [cluster.get(f"{role}_cpu_{unit}") for role, _ in CLUSTER_PROCESSES]
            if all(value is not None for value in values):
                edge, control, agent, nats = (fmt.format(value) for value in values)
                rows.append((f"{case['title']}, {label}", edge, control, nats, agent))
    return rows


def write_results(out: Path, results: dict[str, Any], rows: list[Row], charts: bool = True,
                  cluster_table: list[ClusterRow] | None = None) -> list[Path]:
    """Write results.json, results.md and (with matplotlib) the PNG charts; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    results["table"] = [row.as_dict() for row in rows]
    results["cluster_table"] = [row.as_dict() for row in cluster_table or []]
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    written[1].write_text(markdown(results, rows, cluster_table))
    if charts:
        from bench.charts import draw_charts

        written += draw_charts(out, results)
    return written
