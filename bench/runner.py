"""``python -m bench``: start everything, run the cases, write the results folder."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cases as bench_cases
from bench.cases import Case, MemoryWatch, Plan
from bench.procs import MIB
from bench.report import ClusterRow, Row, cluster_rows, problems, summarise, table_rows, write_results
from bench.stack import Stack, cluster_unavailable, running_stack
from bench.tools import require_tools, tool_version

CASES = ["small_get_1c", "small_get_50c", "download", "upload", "sse", "websocket", "fairness"]
IDLE_COUNTS_FULL = [1000, 10000]
IDLE_COUNTS_QUICK = [100]
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark Comzy against direct access to the same local apps (nginx, bench/localapp.py).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: every case with tiny sizes and 1 s runs; checks numbers are sane, not fast")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<timestamp>/)")
    parser.add_argument("--rounds", type=int, help="rounds per case, medians reported (default: full 3, quick 1)")
    parser.add_argument("--cases", help=f"comma-separated subset of: {','.join(CASES)},idle_agents")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts (no matplotlib needed)")
    parser.add_argument("--no-cluster", action="store_true",
                        help="skip the cluster variant (nats-server, a control node and an edge beside the single "
                             "node)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for comzy-server, e.g. COMZY_HTTP_SERVER=uvicorn (repeatable)")
    args = parser.parse_args(argv)
    selected = args.cases.split(",") if args.cases else [*CASES, "idle_agents"]
    unknown = sorted(set(selected) - {*CASES, "idle_agents"})
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    args.selected = selected
    bad = [item for item in args.server_env if "=" not in item]
    if bad:
        parser.error(f"--server-env needs NAME=VALUE, got {bad[0]!r}")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every case produced sane numbers, else 1."""
    args = parse_args(argv)
    tools = require_tools()
    plan = Plan.quick_plan(args.rounds or 1) if args.quick else Plan.full(args.rounds or 3)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.out or REPO / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    command = "python -m bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    results: dict[str, Any] = {"meta": meta(tools, plan, started, command), "cases": {}, "failures": {}}
    results["meta"]["server_env"] = args.server_env

    wanted = [name for name in CASES if name in args.selected]
    cluster = bool({"small_get_1c", "small_get_50c", "download"} & set(wanted)) and not args.no_cluster
    why_not = cluster_unavailable() if cluster else "--no-cluster" if args.no_cluster else "no cluster case selected"
    if cluster and why_not:
        log(f"cluster variant skipped: {why_not}")
        cluster = False
    results["meta"]["cluster"] = "measured" if cluster else f"skipped: {why_not}"
    out.mkdir(parents=True, exist_ok=True)
    if wanted:
        log(f"starting nginx, the local app, comzy-server and two agents"
            f"{', nats-server, a control node, an edge and an agent' if cluster else ''} "
            f"({'quick' if plan.quick else 'full'} mode, {plan.rounds} round{'s' if plan.rounds > 1 else ''})")
        try:
            with running_stack(tools, plan.download_size, plan.upload_size, args.server_env, cluster=cluster,
                               nats_store=out / "nats-store") as stack:
                run_cases(stack, plan, wanted, results)
        except Exception as exc:  # a process died: keep and write what was measured
            results["failures"]["processes"] = f"{type(exc).__name__}: {exc}"
            log(f"FAILED: {traceback.format_exc()}")
    if "idle_agents" in args.selected:
        results["idle_agents"] = idle_agents(plan.quick)
    results["meta"]["loadavg_after"] = loadavg()
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")

    issues = problems(results, wanted)
    if "processes" in results["failures"]:
        issues.insert(0, results["failures"]["processes"])
    results["problems"] = issues
    try:
        rows = table_rows(results)
        cluster_table = cluster_rows(results)
    except (KeyError, ZeroDivisionError) as exc:
        issues.append(f"table: {type(exc).__name__}: {exc}")
        rows, cluster_table = [], []
    written = write_results(out, results, rows, charts=not args.no_charts and charts_available(),
                            cluster_table=cluster_table)
    print(print_table(rows))
    if cluster_table:
        print("\ncluster (edge + control node on NATS) against direct nginx and the single node (role all):")
        print(print_cluster_table(cluster_table))
    log(f"results: {', '.join(str(path) for path in written)}")
    if issues:
        log("problems (results were written anyway):\n  " + "\n  ".join(issues))
        return 1
    return 0


def run_cases(stack: Stack, plan: Plan, wanted: list[str], results: dict[str, Any]) -> None:
    """Run the wanted cases in order, each inside a memory window; a failing case is recorded, not fatal."""
    watched = {"server": stack.server, "nginx_agent": stack.nginx_agent, "app_agent": stack.app_agent}
    if stack.cluster is not None:
        watched |= {f"cluster_{role}": proc for role, proc in stack.cluster.procs().items()}
    memory = MemoryWatch(watched)
    results["meta"]["peak_rss_resettable"] = memory.resettable
    runners: dict[str, Callable[[], Case]] = {
        "small_get_1c": lambda: bench_cases.small_get(stack, plan, 1),
        "small_get_50c": lambda: bench_cases.small_get(stack, plan, plan.connections),
        "download": lambda: bench_cases.download(stack, plan, memory),
        "upload": lambda: bench_cases.upload(stack, plan, memory),
        "sse": lambda: bench_cases.sse(stack, plan),
        "websocket": lambda: bench_cases.websocket(stack, plan),
        "fairness": lambda: bench_cases.fairness(stack, plan),
    }
    log("warming up")
    bench_cases.warm_up(stack, plan)
    for name in wanted:
        log(f"case {name}")
        began = time.monotonic()
        try:
            with memory.window() as peaks:
                case = runners[name]()
            case["peak_rss_mib"] = {who: peak / MIB for who, peak in peaks.items()}
            case["wall_seconds"] = time.monotonic() - began
            summarise(case)
            results["cases"][name] = case
            log("  " + brief(case))
        except Exception as exc:  # one broken case must not lose the others' numbers
            results["failures"][name] = "".join(traceback.format_exception_only(exc)).strip()
            log(f"  FAILED: {traceback.format_exc()}")
        for proc in watched.values():
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during case {name}:\n{proc.output()}")
    results["peak_rss_mib_whole_run"] = {who: peak / MIB for who, peak in memory.peaks().items()}


def idle_agents(quick: bool) -> dict[str, Any] | None:
    """The idle-agents case from bench/idle_agents.py, if that module exists (None if not)."""
    try:
        from bench.idle_agents import run_idle_agents  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        if exc.name == "bench.idle_agents":
            log("idle agents: bench/idle_agents.py not present, skipped")
            return None
        return {"error": f"bench.idle_agents could not be imported: {exc}"}
    counts = IDLE_COUNTS_QUICK if quick else IDLE_COUNTS_FULL
    log(f"case idle_agents {counts}")
    try:
        result = run_idle_agents(counts, quick)
    except Exception as exc:
        log(f"  FAILED: {traceback.format_exc()}")
        return {"error": f"run_idle_agents failed: {type(exc).__name__}: {exc}"}
    return result if isinstance(result, dict) else {"error": f"run_idle_agents returned {type(result).__name__}"}


def brief(case: Case) -> str:
    """One progress line: the headline metric, direct vs tunnel."""
    median = case["median"]
    for metric, unit in (("requests_per_s", "req/s"), ("mib_per_s", "MiB/s"), ("first_event_p50_ms", "ms"),
                         ("round_trips_per_s", "round trips/s")):
        if metric in median.get("tunnel", {}):
            extra = median.get("cluster", {})
            cluster = f", cluster {extra[metric]:,.2f} {unit}" if metric in extra else ""
            return (f"{metric}: direct {median['direct'][metric]:,.2f} {unit}, "
                    f"tunnel {median['tunnel'][metric]:,.2f} {unit}{cluster}")
    return ""


def print_table(rows: list[Row]) -> str:
    """The table as plain text for the terminal."""
    header = ("case", "direct", "tunnel", "ratio", "target", "met?")
    cells = [header, *[(r.case, r.direct, r.tunnel, r.ratio, r.target,
                        "-" if r.met is None else "yes" if r.met else "NO") for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)


def print_cluster_table(rows: list[ClusterRow]) -> str:
    """The cluster table as plain text for the terminal."""
    header = ("figure", "direct", "all", "cluster", "vs direct", "vs all", "target", "met?")
    cells = [header, *[(r.figure, r.direct, r.single, r.cluster, r.vs_direct, r.vs_single, r.target,
                        "-" if r.met is None else "yes" if r.met else "NO") for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)


def meta(tools: dict[str, str], plan: Plan, started: str, command: str) -> dict[str, Any]:
    """Where and how this run was made."""
    from comzy import __version__

    return {
        "started": started, "command": command, "quick": plan.quick, "plan": plan.as_dict(),
        "cpus": os.cpu_count(), "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "comzy": __version__, "git": git_revision(),
        "nginx": tool_version([tools["nginx"], "-v"]), "wrk": tool_version([tools["wrk"], "-v"]).split(" Copyright")[0],
        "curl": tool_version([tools["curl"], "--version"]).split(" (")[0], "loadavg_before": loadavg(),
    }


def git_revision() -> str:
    """The checked-out commit, with ``+changes`` when the tree differs from it (read-only git calls)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def loadavg() -> str:
    """The 1-minute load average (other work on the machine skews every figure)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def charts_available() -> bool:
    """Whether matplotlib is installed (the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no charts")
        return False
    return True


def log(text: str) -> None:
    """Progress on stderr."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)
