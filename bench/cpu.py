"""``python -m bench.cpu``: CPU time per request (and per GiB) of comzy-server and the agent.

Wall-clock req/s moves with whatever else the machine is doing; the CPU seconds the server
and the agent spend per request barely do. This starts the same stack as ``python -m bench``
(nginx, comzy-server, an agent), drives a fixed-duration wrk load through the tunnel, reads
both processes' user + system time from /proc before and after, and prints the medians over
rounds. Use it before and after a hot-path change; see docs/benchmarks.md.

With ``--cluster`` the same loads also go through a cluster started beside the single node
(nats-server, a control node, an edge, an agent on the control node): the lines ``cluster_*``
give the CPU per request of the edge, the control node, nats-server and the agent, measured in
the same rounds as the single node, which is where the NATS hop's time goes.

With ``--plugins each`` more servers run beside the harness's (``COMZY_PLUGINS=none``), each with
an agent exposing the same nginx: one with the default set (``COMZY_PLUGINS`` unset: every
built-in) and one per built-in plugin alone. The same loads go through all of them, in an order
that rotates each round, and a table gives each one's server CPU per request and req/s against
``none`` in the same round: what each plugin costs on its own.

With ``--policies`` one more server runs with the traffic-policy plugins (basic_auth, ip_filter,
rate_limit) and two agents exposing the same nginx: one without a policy and one with basic auth,
an allow list holding the client and a rate limit too high to trigger, and wrk sends the
credentials. A table gives the policy tunnel's req/s and server CPU against the plain one in the
same rounds (issue 14: at most 10% lost).

With ``--inspector`` one more server runs with two agents exposing the same nginx, one with the
agent's inspector on (``--inspect 127.0.0.1:0``: on for sure, where the default 4040-4049 may all be
taken) and one with ``--inspect off``. A table gives the agent's CPU per request and req/s of "on"
against "off" as the median of each round's ratio (they alternate: the order of the targets
rotates each round), and with ``--download-mib`` each agent's CPU per GiB and peak RSS for the
download: issue 15 allows at most 10% fewer req/s and the agent's 150 MiB RSS budget.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.procs import MIB, Proc
from bench.stack import (
    LARGE_FILE,
    SMALL_FILE,
    Endpoint,
    Stack,
    cluster_unavailable,
    comzy_env,
    running_stack,
    wait_serving,
)
from bench.tools import curl_download, require_tools, run_wrk

GIB = 1024 * MIB

#: The built-in plugins (pyproject.toml's ``comzy`` entry points), each measured alone by ``--plugins each``.
BUILTIN_PLUGINS = ("mysql_logging", "dashboard", "metrics", "auth_token", "custom_domains", "anonymous_timeout",
                   "basic_auth", "ip_filter", "headers", "rate_limit")
#: The label of the server started with ``COMZY_PLUGINS`` unset (every built-in plugin).
DEFAULT_SET = "default"
#: The label of a second ``COMZY_PLUGINS=none`` server, started as the plugin servers are: how far it lands from
#: ``none`` is that run's noise, the bar a plugin's difference must clear to mean anything.
CONTROL = "none_again"
#: A plugin costing more than this fraction of CPU or req/s on its own is flagged (issue 13).
PLUGIN_BUDGET = 0.10

Target = tuple[Endpoint, dict[str, Proc]]
#: What a ``cost_table`` appends to a row, from its label and its changes against the base.
Mark = Callable[[str, dict[str, float]], str]

#: ``--policies``: the server's plugins, and the policy tunnel's agent flags (the allow list holds
#: the loopback client; the rate limit, per client address, is far above what two cores can send).
POLICY_PLUGINS = "basic_auth,ip_filter,rate_limit"
POLICY_CREDENTIAL = ("bench", "bench-password")
POLICY_FLAGS = ("--basic-auth", ":".join(POLICY_CREDENTIAL), "--cidr-allow", "127.0.0.0/8", "--cidr-allow", "::1/128",
                "--rate-limit", "100000/s")
#: A policy costing more than this fraction of req/s or server CPU against no policy is flagged (issue 14).
POLICY_BUDGET = 0.10
#: ``--inspector``: the two agents' flags. "on" asks for a free port: with the default (4040-4049
#: taken by other agents) an agent would run without its inspector and the comparison would be void.
INSPECTOR_FLAGS = {"off": ("--inspect", "off"), "on": ("--inspect", "127.0.0.1:0")}
#: Issue 15: the inspector on may cost at most this fraction of req/s ...
INSPECTOR_BUDGET = 0.10
#: ... and the agent keeps to its RSS budget during a download with it on (tests/test_large_transfers.py).
AGENT_RSS_BUDGET_MIB = 150


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench.cpu``."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpu",
                                     description="CPU µs per request of comzy-server and the agent under wrk load.")
    parser.add_argument("--connections", default="50,1",
                        help="comma-separated wrk connection counts, one load per count (default 50,1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per load; medians are printed (default 3)")
    parser.add_argument("--download-mib", type=int, default=0,
                        help="also download a file of this many MiB through the tunnel per round: CPU s per GiB")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for comzy-server, e.g. COMZY_HTTP_SERVER=uvicorn (repeatable)")
    parser.add_argument("--cluster", action="store_true",
                        help="also measure through an edge and a control node on NATS (edge, control, nats-server, "
                             "agent CPU)")
    parser.add_argument("--plugins", choices=["each"],
                        help="each: also measure servers with the default plugin set and with each built-in plugin "
                             "alone, against COMZY_PLUGINS=none in the same rounds")
    parser.add_argument("--policies", action="store_true",
                        help="also measure a tunnel with basic auth, an allow list and a rate limit against one "
                             "without, on one more server with those plugins, in the same rounds")
    parser.add_argument("--inspector", action="store_true",
                        help="also measure an agent with its inspector on against one with it off (same server, "
                             "same nginx, same rounds)")
    parser.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = parser.parse_args(argv)
    bad = [item for item in args.server_env if "=" not in item]
    if bad:
        parser.error(f"--server-env needs NAME=VALUE, got {bad[0]!r}")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    return args


def single_node(stack: Stack) -> Target:
    """The single node's endpoint for nginx and its processes (server, agent)."""
    return stack.nginx_tunnel, {"server": stack.server, "agent": stack.nginx_agent}


def through_cluster(stack: Stack) -> Target:
    """nginx through the edge, and the cluster's processes (edge, control, nats, agent)."""
    assert stack.cluster is not None
    return stack.cluster.nginx, stack.cluster.procs()


def start_plugin_node(stack: Stack, label: str, plugins: str | None, server_env: dict[str, str]) -> Target:
    """Another comzy-server (``COMZY_PLUGINS=plugins``, or unset when None: every built-in plugin) and an agent on it
    exposing the stack's nginx; both join ``stack.procs``, so the stack stops them by PID."""
    plugin_env = {} if plugins is None else {"COMZY_PLUGINS": plugins}
    server = Proc(f"comzy-server (plugins {label})", [sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
        COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
        COMZY_DATA_DIR=str(stack.root / f"comzy-plugins-{label}"), COMZY_SHUTDOWN_GRACE="2",
        **plugin_env, **server_env))
    stack.procs.append(server)
    public_port = int(server.wait_for(r"public\s+http://[\d.]+:(\d+)")[1])
    ws_port = int(server.wait_for(r"agents\s+ws://[\d.]+:(\d+)")[1])
    server.done_waiting()
    agent = Proc(f"agent (plugins {label})", [sys.executable, "-m", "comzy.agent.cli", str(stack.nginx_direct.port),
                                               "--local-host", "127.0.0.1", "--quiet", "--server",
                                               f"ws://127.0.0.1:{ws_port}"], env=comzy_env())
    stack.procs.append(agent)
    alias = agent.wait_for(r"Public URL: https?://([a-z0-9-]+)\.")[1]
    agent.done_waiting()
    endpoint = Endpoint(public_port, f"{alias}.localhost")
    wait_serving(endpoint, f"/{SMALL_FILE}", server)
    return endpoint, {"server": server, "agent": agent}


def start_policy_node(stack: Stack, server_env: dict[str, str]) -> tuple[Target, Target]:
    """One more comzy-server with ``POLICY_PLUGINS`` and two agents on it exposing the stack's nginx: without a
    policy, and with ``POLICY_FLAGS`` (its endpoint sends the credentials). All join ``stack.procs``."""
    server = Proc("comzy-server (policies)", [sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
        COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
        COMZY_DATA_DIR=str(stack.root / "comzy-policies"), COMZY_SHUTDOWN_GRACE="2", COMZY_PLUGINS=POLICY_PLUGINS,
        **server_env))
    stack.procs.append(server)
    public_port = int(server.wait_for(r"public\s+http://[\d.]+:(\d+)")[1])
    ws_port = int(server.wait_for(r"agents\s+ws://[\d.]+:(\d+)")[1])
    server.done_waiting()
    credentials = base64.b64encode(":".join(POLICY_CREDENTIAL).encode()).decode()
    login = (f"Authorization: Basic {credentials}",)
    targets = []
    for label, flags, headers in (("plain", (), ()), ("policy", POLICY_FLAGS, login)):
        agent = Proc(f"agent (policies, {label})", [
            sys.executable, "-m", "comzy.agent.cli", str(stack.nginx_direct.port), "--local-host", "127.0.0.1",
            "--quiet", "--server", f"ws://127.0.0.1:{ws_port}", *flags], env=comzy_env())
        stack.procs.append(agent)
        alias = agent.wait_for(r"Public URL: https?://([a-z0-9-]+)\.")[1]
        agent.done_waiting()
        endpoint = Endpoint(public_port, f"{alias}.localhost", headers)
        wait_serving(endpoint, f"/{SMALL_FILE}", server)
        targets.append((endpoint, {"server": server, "agent": agent}))
    return targets[0], targets[1]


def start_inspector_node(stack: Stack, server_env: dict[str, str]) -> dict[str, Target]:
    """One more comzy-server and, on it, an agent per ``INSPECTOR_FLAGS`` exposing the stack's nginx (all join
    ``stack.procs``). The "on" agent must print its inspector's address and list a request through it."""
    server = Proc("comzy-server (inspector)", [sys.executable, "-m", "comzy.core.cli"], env=comzy_env(
        COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
        COMZY_DATA_DIR=str(stack.root / "comzy-inspector"), COMZY_SHUTDOWN_GRACE="2", COMZY_PLUGINS="none",
        **server_env))
    stack.procs.append(server)
    public_port = int(server.wait_for(r"public\s+http://[\d.]+:(\d+)")[1])
    ws_port = int(server.wait_for(r"agents\s+ws://[\d.]+:(\d+)")[1])
    server.done_waiting()
    targets = {}
    for label, flags in INSPECTOR_FLAGS.items():
        agent = Proc(f"agent (inspector {label})", [
            sys.executable, "-m", "comzy.agent.cli", str(stack.nginx_direct.port), "--local-host", "127.0.0.1",
            "--quiet", "--server", f"ws://127.0.0.1:{ws_port}", *flags], env=comzy_env())
        stack.procs.append(agent)
        alias = agent.wait_for(r"Public URL: https?://([a-z0-9-]+)\.")[1]
        api = agent.wait_for(r"Inspector: (http://\S+)")[1] if label == "on" else None
        agent.done_waiting()
        endpoint = Endpoint(public_port, f"{alias}.localhost")
        wait_serving(endpoint, f"/{SMALL_FILE}", server)
        if api is not None and not captured(api):
            raise SystemExit(f"bench.cpu --inspector: the agent's inspector at {api} lists no request")
        targets[label] = (endpoint, {"server": server, "agent": agent})
    return targets


def captured(api: str) -> bool:
    """Whether the inspector at ``api`` lists at least one exchange."""
    with urllib.request.urlopen(f"{api}/api/requests/http?limit=1", timeout=10) as answer:
        return bool(json.load(answer)["requests"])


@dataclass(frozen=True)
class Column:
    """A column of a cost table: the median over rounds of one figure of each run (``key``), or with
    ``versus`` that figure's change against the base row as the median of each round's ratio."""

    heading: str
    key: str
    versus: bool = False
    decimals: int = 0
    width: int = 0  # 0: the heading's

    def cell(self, runs: list[dict[str, Any]], change: float | None) -> str:
        """This column's text for one row (blank in the base row for a ``versus`` column)."""
        width = self.width or len(self.heading)
        if not self.versus:
            return f"{statistics.median(run[self.key] for run in runs):{width}.{self.decimals}f}"
        return " " * width if change is None else f"{change:+{width}.1%}"


def cost_table(rounds: dict[str, list[dict[str, Any]]], connection_counts: list[int], title: tuple[str, int],
               rows: list[tuple[str, str]], columns: list[Column], mark: Mark) -> list[str]:
    """What each target costs against a base, per connection count: a heading line (``title`` is the first
    column's heading and width), then a row per ``(label, prefix)`` of ``rows`` from the runs
    ``rounds[f"{prefix}get_{connections}c"]``, the first row being the base. A ``versus`` column is the median
    over rounds of the same round's ratio to the base (so a round the machine was busier cancels out);
    ``mark(label, changes)`` (``changes``: each versus column's change, by key) is appended to a row
    that is not the base (``"  <- over 10%"``, or "")."""
    name, width = title
    lines = [" ".join([f"{name:{width}}", f"{'conns':>5}",
                       *(f"{column.heading:>{column.width or len(column.heading)}}" for column in columns)])]
    for connections in connection_counts:
        base = rounds[f"{rows[0][1]}get_{connections}c"]
        for index, (label, prefix) in enumerate(rows):
            runs = rounds[f"{prefix}get_{connections}c"]
            pairs = list(zip(runs, base, strict=True))
            changes = {} if index == 0 else {
                column.key: statistics.median(run[column.key] / other[column.key] - 1 for run, other in pairs)
                for column in columns if column.versus}
            cells = [f"{label:{width}}", f"{connections:5d}",
                     *(column.cell(runs, changes.get(column.key) if index else None) for column in columns)]
            lines.append(" ".join(cells).rstrip() + (mark(label, changes) if index else ""))
    return lines


def over_budget(budget: float, cpu_key: str | None = "server_us") -> Mark:
    """A ``cost_table`` mark: ``<- over 10%`` when req/s fell, or (with ``cpu_key``) that CPU grew, past ``budget``."""
    def mark(_label: str, changes: dict[str, float]) -> str:
        worst = max(changes[cpu_key], -changes["requests_per_s"]) if cpu_key else -changes["requests_per_s"]
        return f"  <- over {budget:.0%}" if worst > budget else ""
    return mark


def inspector_table(rounds: dict[str, list[dict[str, Any]]], connection_counts: list[int],
                    download: bool) -> list[str]:
    """The ``--inspector`` table: per connection count the medians of the agent with its inspector off and on,
    and the cost of "on" as the median over rounds of the same round's ratio (req/s lost over
    ``INSPECTOR_BUDGET`` is marked); with ``download``, each agent's CPU per GiB and peak RSS (over
    ``AGENT_RSS_BUDGET_MIB`` is marked)."""
    lines = cost_table(rounds, connection_counts, ("inspector", 9),
                       [(label, f"inspector_{label}_") for label in ("off", "on")],
                       [Column("agent µs/req", "agent_us"), Column("CPU vs off", "agent_us", versus=True),
                        Column("req/s", "requests_per_s", width=8),
                        Column("req/s vs off", "requests_per_s", versus=True),
                        Column("p50 ms", "p50_ms", decimals=2, width=7)],
                       over_budget(INSPECTOR_BUDGET, cpu_key=None))
    if download:
        for label in INSPECTOR_FLAGS:
            runs = rounds[f"inspector_{label}_download"]
            per_gib = statistics.median(run["agent_s_per_gib"] for run in runs)
            peak = max(run["agent_peak_rss_mib"] for run in runs)
            lines.append(f"{label:9} download: agent {per_gib:.2f} s/GiB, peak RSS {peak:.0f} MiB" +
                         (f"  <- over the {AGENT_RSS_BUDGET_MIB} MiB budget" if peak > AGENT_RSS_BUDGET_MIB else ""))
    return lines


def server_columns(base: str) -> list[Column]:
    """The columns of the server-side tables (``--plugins each``, ``--policies``): CPU and req/s against ``base``."""
    return [Column("server µs/req", "server_us"), Column(f"CPU vs {base}", "server_us", versus=True),
            Column("agent µs/req", "agent_us"), Column("req/s", "requests_per_s", width=8),
            Column(f"req/s vs {base}", "requests_per_s", versus=True)]


def policy_table(rounds: dict[str, list[dict[str, Any]]], connection_counts: list[int]) -> list[str]:
    """The ``--policies`` table: per connection count, the medians of the plain and the policy tunnel, and the
    policy's cost as the median over rounds of the same round's ratio; over ``POLICY_BUDGET`` is marked."""
    return cost_table(rounds, connection_counts, ("tunnel", 18),
                      [("no policy", "policies_plain_"), ("auth+allow+limit", "policies_policy_")],
                      server_columns("plain"), over_budget(POLICY_BUDGET))


def plugin_configs() -> dict[str, str | None]:
    """``--plugins each``: the label of every extra server and its ``COMZY_PLUGINS`` (None: unset)."""
    return {CONTROL: "none", DEFAULT_SET: None} | {name: name for name in BUILTIN_PLUGINS}


def plugin_table(rounds: dict[str, list[dict[str, Any]]], labels: list[str], connection_counts: list[int]) -> list[str]:
    """The ``--plugins each`` table: per label and connection count, the medians of server and agent µs per request
    and req/s, and the cost against ``COMZY_PLUGINS=none`` (``get_<n>c``) as the median over rounds of the
    same round's ratio (so a round the machine was busier cancels out): CPU +x% and req/s -y%. A row costing more
    than ``PLUGIN_BUDGET`` either way is marked ``<- over 10%`` (``default`` is every plugin at once, never marked;
    ``CONTROL``, a second server without plugins, is marked ``<- noise`` instead).
    """
    over = over_budget(PLUGIN_BUDGET)

    def mark(label: str, changes: dict[str, float]) -> str:
        if label == DEFAULT_SET or not over(label, changes):
            return ""
        return "  <- noise" if label == CONTROL else over(label, changes)

    return cost_table(rounds, connection_counts, ("plugins", 18),
                      [("none", ""), *((label, f"plugins_{label}_") for label in labels)],
                      server_columns("none"), mark)


def measure_get(stack: Stack, target: Target, connections: int,
                seconds: float) -> dict[str, Any]:
    """One wrk run of small GETs through ``target``, with every process's CPU µs per request (``<name>_us``)."""
    endpoint, procs = target
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    result = run_wrk(stack.tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                     connections, seconds, headers=endpoint.headers)
    requests = max(result["requests"], 1)
    return {"requests_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "errors": result["errors"],
            **{f"{name}_us": (proc.cpu_seconds() - before[name]) / requests * 1e6 for name, proc in procs.items()}}


def measure_download(stack: Stack, target: Target) -> dict[str, Any]:
    """One download of the large file through ``target``, with every process's CPU s per GiB and peak RSS."""
    endpoint, procs = target
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    result = curl_download(stack.tools["curl"], endpoint.url(f"/{LARGE_FILE}"), endpoint.host, stack.large_size, 600)
    gib = max(result["bytes"], 1) / GIB
    return {"mib_per_s": result["mib_per_s"], "errors": result["errors"],
            **{f"{name}_s_per_gib": (proc.cpu_seconds() - before[name]) / gib for name, proc in procs.items()},
            **{f"{name}_peak_rss_mib": (proc.peak_rss() or 0) / MIB for name, proc in procs.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the loads; returns 1 if any request failed."""
    args = parse_args(argv)
    tools = require_tools()
    if args.cluster:
        why_not = cluster_unavailable()
        if why_not:
            raise SystemExit(f"bench.cpu: --cluster cannot run: {why_not}")
    large = max(args.download_mib, 1) * MIB
    targets: dict[str, Callable[[Stack], Target]] = \
        {"": single_node} | ({"cluster_": through_cluster} if args.cluster else {})
    labels = list(plugin_configs()) if args.plugins else []
    with running_stack(tools, large, MIB, args.server_env, cluster=args.cluster) as stack:
        for label, plugins in (plugin_configs() if args.plugins else {}).items():
            started = start_plugin_node(stack, label, plugins, args.server_env)
            targets[f"plugins_{label}_"] = lambda _stack, started=started: started
        if args.policies:
            plain, policy = start_policy_node(stack, args.server_env)
            targets["policies_plain_"] = lambda _stack: plain
            targets["policies_policy_"] = lambda _stack: policy
        if args.inspector:
            for label, target in start_inspector_node(stack, args.server_env).items():
                targets[f"inspector_{label}_"] = lambda _stack, target=target: target
        # Warm-up: imports, pools, caches and cluster links stay out of the first round.
        for pick in targets.values():
            endpoint, _ = pick(stack)
            run_wrk(tools["wrk"], stack.wrk_script, endpoint.url(f"/{SMALL_FILE}"), endpoint.host,
                    max(args.connection_counts), 1, headers=endpoint.headers)
        rounds: dict[str, list[dict[str, Any]]] = {}
        order = list(targets.items())
        for number in range(args.rounds):
            # The targets alternate within a round, in an order rotating each round, so no target always
            # goes first.
            shift = number % len(order)
            for prefix, pick in order[shift:] + order[:shift]:
                for connections in args.connection_counts:
                    rounds.setdefault(f"{prefix}get_{connections}c", []).append(
                        measure_get(stack, pick(stack), connections, args.seconds))
                if args.download_mib:
                    rounds.setdefault(f"{prefix}download", []).append(measure_download(stack, pick(stack)))
    failed = False
    for name, runs in rounds.items():
        failed = failed or any(run["errors"] for run in runs)
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "errors"}
        names = [key.removesuffix("_peak_rss_mib") for key in runs[0] if key.endswith("_peak_rss_mib")] or \
            [key.removesuffix("_us") for key in runs[0] if key.endswith("_us")]
        if name.startswith(("plugins_", "policies_", "inspector_")):  # in the tables below
            pass
        elif name.endswith("download"):
            cpu = "  ".join(f"{who} {medians[f'{who}_s_per_gib']:.2f} s/GiB" for who in names)
            peaks = ", ".join(f"{who} {max(run[f'{who}_peak_rss_mib'] for run in runs):.0f} MiB" for who in names)
            print(f"{name:18} {cpu}  ({medians['mib_per_s']:.0f} MiB/s; peak RSS {peaks})")
        else:
            cpu = "  ".join(f"{who} {medians[f'{who}_us']:6.0f} µs/req" for who in names)
            print(f"{name:18} {cpu}  ({medians['requests_per_s']:.0f} req/s, p50 {medians['p50_ms']:.2f} ms, "
                  f"p99 {medians['p99_ms']:.1f} ms)")
        if args.json:
            print(json.dumps({name: runs}))
    if labels:
        print("\n".join(plugin_table(rounds, labels, args.connection_counts)))
    if args.policies:
        print("\n".join(policy_table(rounds, args.connection_counts)))
    if args.inspector:
        print("\n".join(inspector_table(rounds, args.connection_counts, bool(args.download_mib))))
    if failed:
        print("some requests failed (non-2xx or socket errors): the figures above are not comparable")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
