"""The ``python -m bench.cpu`` cost tables (bench/cpu.py: ``--plugins each``, ``--policies``, ``--inspector``, all
made by ``cost_table``) from known rounds: each plugin's cost is the
median over rounds of the same round's ratio to ``COMZY_PLUGINS=none``, and a plugin over 10% on its own is
marked. Fast: no process is started (tests/test_bench.py runs bench.cpu itself)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from bench.cpu import (
    AGENT_RSS_BUDGET_MIB,
    BUILTIN_PLUGINS,
    CONTROL,
    DEFAULT_SET,
    INSPECTOR_FLAGS,
    POLICY_FLAGS,
    POLICY_PLUGINS,
    Column,
    cost_table,
    inspector_table,
    parse_args,
    plugin_configs,
    plugin_table,
    policy_table,
)


def run(server_us: float, rps: float) -> dict[str, Any]:
    """One wrk load's figures as ``measure_get`` returns them."""
    return {"requests_per_s": rps, "p50_ms": 1.0, "p99_ms": 4.0, "errors": 0, "server_us": server_us,
            "agent_us": 80.0}


def rows(lines: list[str]) -> dict[tuple[str, int], list[str]]:
    """The table's rows by (label, connections), split into columns."""
    return {(cells[0], int(cells[1])): cells for cells in (line.split() for line in lines[1:])}


def test_plugin_costs_are_paired_by_round_and_flagged_over_ten_percent() -> None:
    # The machine got busier each round: none went 100 -> 200 -> 400 µs, so unpaired medians would be 200 against
    # 200 for "cheap" (0%); paired, "cheap" costs +5% each round and "dear" +20% CPU, -15% req/s.
    none = [run(100, 1000), run(200, 500), run(400, 250)]
    rounds = {
        "get_50c": none,
        "plugins_default_get_50c": [run(150, 800), run(300, 400), run(600, 200)],
        "plugins_cheap_get_50c": [run(105, 1000), run(210, 500), run(420, 250)],
        "plugins_dear_get_50c": [run(120, 850), run(240, 425), run(480, 212.5)],
        "plugins_slow_get_50c": [run(100, 880), run(200, 440), run(400, 220)],  # same CPU, 12% fewer req/s
        "get_1c": [run(300, 100)] * 3,
        "plugins_default_get_1c": [run(330, 95)] * 3,
        "plugins_cheap_get_1c": [run(303, 99)] * 3,
        "plugins_dear_get_1c": [run(306, 98)] * 3,
        "plugins_slow_get_1c": [run(300, 100)] * 3,
    }
    lines = plugin_table(rounds, [DEFAULT_SET, "cheap", "dear", "slow"], [50, 1])
    assert lines[0].split()[:2] == ["plugins", "conns"]
    table = rows(lines)
    assert list(table) == [(label, conns) for conns in (50, 1) for label in ("none", DEFAULT_SET, "cheap", "dear",
                                                                              "slow")]
    assert table[("none", 50)] == ["none", "50", "200", "80", "500"]  # no cost column against itself
    assert table[("cheap", 50)] == ["cheap", "50", "210", "+5.0%", "80", "500", "+0.0%"]
    assert table[("dear", 50)] == ["dear", "50", "240", "+20.0%", "80", "425", "-15.0%", "<-", "over", "10%"]
    assert table[("slow", 50)][3:] == ["+0.0%", "80", "440", "-12.0%", "<-", "over", "10%"]
    # The whole default set costing 50% is the sum of the plugins, not one plugin over budget: not marked.
    assert table[(DEFAULT_SET, 50)] == [DEFAULT_SET, "50", "300", "+50.0%", "80", "400", "-20.0%"]
    assert table[("dear", 1)] == ["dear", "1", "306", "+2.0%", "80", "98", "-2.0%"]
    assert table[(DEFAULT_SET, 1)][3:] == ["+10.0%", "80", "95", "-5.0%"]


def test_the_control_server_shows_the_noise_and_is_never_called_over_budget() -> None:
    # A second server without plugins measured 15% dearer than the first: that is the run's noise, said as such.
    rounds = {"get_50c": [run(100, 1000)] * 3, f"plugins_{CONTROL}_get_50c": [run(115, 900)] * 3,
              "plugins_cheap_get_50c": [run(104, 990)] * 3}
    table = rows(plugin_table(rounds, [CONTROL, "cheap"], [50]))
    assert table[(CONTROL, 50)][3:] == ["+15.0%", "80", "900", "-10.0%", "<-", "noise"]
    assert table[("cheap", 50)][3:] == ["+4.0%", "80", "990", "-1.0%"]


def test_plugins_each_measures_the_default_set_and_every_builtin_alone() -> None:
    # Every plugin the comzy distribution ships (pyproject.toml's entry points) is measured alone.
    shipped = {point.name for point in entry_points(group="comzy") if point.value.startswith("comzy.plugins.")}
    assert set(BUILTIN_PLUGINS) == shipped
    configs = plugin_configs()
    assert configs[DEFAULT_SET] is None  # COMZY_PLUGINS unset: every built-in plugin
    assert configs[CONTROL] == "none"  # a second server without plugins: the run's noise, in the same table
    assert {name: value for name, value in configs.items() if name not in (DEFAULT_SET, CONTROL)} == \
        {name: name for name in BUILTIN_PLUGINS}
    assert parse_args(["--plugins", "each"]).plugins == "each"
    assert parse_args([]).plugins is None


def test_the_policy_cost_is_paired_by_round_and_flagged_over_ten_percent() -> None:
    # issue 14: a tunnel with basic auth, an allow list and a rate limit loses at most 10% against one without.
    plain = [run(100, 1000), run(200, 500), run(400, 250)]
    rounds = {
        "policies_plain_get_50c": plain,
        "policies_policy_get_50c": [run(104, 970), run(208, 485), run(416, 242.5)],  # +4% CPU, -3% req/s
        "policies_plain_get_1c": [run(300, 100)] * 3,
        "policies_policy_get_1c": [run(300, 85)] * 3,  # 15% fewer req/s: over budget
    }
    lines = policy_table(rounds, [50, 1])
    assert lines[0].split()[:2] == ["tunnel", "conns"]
    assert [line.split()[0] for line in lines[1:]] == ["no", "auth+allow+limit"] * 2
    assert lines[1].split() == ["no", "policy", "50", "200", "80", "500"]
    assert lines[2].split() == ["auth+allow+limit", "50", "208", "+4.0%", "80", "485", "-3.0%"]
    assert lines[4].split() == ["auth+allow+limit", "1", "300", "+0.0%", "80", "85", "-15.0%", "<-", "over", "10%"]


def test_the_policy_tunnel_asks_for_every_policy_plugin() -> None:
    # Each plugin the server runs for --policies is exercised by a flag of the policy tunnel.
    assert set(POLICY_PLUGINS.split(",")) == {"basic_auth", "ip_filter", "rate_limit"}
    assert {"--basic-auth", "--cidr-allow", "--rate-limit"} <= set(POLICY_FLAGS)
    # ...and the agent accepts them (6000000/min was past --rate-limit's 1,000,000 per period).
    from comzy.agent.cli import parse_args as agent_args

    assert agent_args(["3000", *POLICY_FLAGS]).rate_limit is not None
    assert parse_args(["--policies"]).policies and not parse_args([]).policies


def download(agent_s_per_gib: float, peak_mib: float) -> dict[str, Any]:
    """One download's figures as ``measure_download`` returns them (the agent's only)."""
    return {"mib_per_s": 300.0, "errors": 0, "agent_s_per_gib": agent_s_per_gib, "agent_peak_rss_mib": peak_mib}


def test_the_inspector_cost_is_paired_by_round_and_flagged_over_budget() -> None:
    # issue 15: the agent with its inspector on loses at most 10% of req/s, and keeps to 150 MiB in a download.
    off = [run(100, 1000), run(200, 500), run(400, 250)]
    for figures in off:
        figures["agent_us"] = figures.pop("server_us")
    on = [run(0, rps) | {"agent_us": us} for us, rps in ((113, 970), (226, 485), (452, 242.5))]  # +13% CPU, -3% req/s
    rounds = {
        "inspector_off_get_50c": off, "inspector_on_get_50c": on,
        "inspector_off_get_1c": [run(0, 100) | {"agent_us": 300.0}] * 3,
        "inspector_on_get_1c": [run(0, 85) | {"agent_us": 300.0}] * 3,  # 15% fewer req/s: over budget
        "inspector_off_download": [download(1.5, 50), download(1.7, 52), download(1.6, 51)],
        "inspector_on_download": [download(1.6, 60), download(1.8, 151), download(1.7, 58)],
    }
    lines = inspector_table(rounds, [50, 1], download=True)
    assert lines[0].split()[:2] == ["inspector", "conns"]
    assert lines[1].split() == ["off", "50", "200", "500", "1.00"]
    assert lines[2].split() == ["on", "50", "226", "+13.0%", "485", "-3.0%", "1.00"]
    assert lines[4].split() == ["on", "1", "300", "+0.0%", "85", "-15.0%", "1.00", "<-", "over", "10%"]
    assert lines[5] == "off       download: agent 1.60 s/GiB, peak RSS 52 MiB"
    assert lines[6] == ("on        download: agent 1.70 s/GiB, peak RSS 151 MiB"
                        f"  <- over the {AGENT_RSS_BUDGET_MIB} MiB budget")
    assert len(inspector_table(rounds, [50], download=False)) == 3


def test_the_inspector_comparison_asks_for_it_on_and_off_for_sure() -> None:
    # "on" on a free port of its own: the default 4040-4049 may all be taken, and the agent would then run without.
    assert INSPECTOR_FLAGS == {"off": ("--inspect", "off"), "on": ("--inspect", "127.0.0.1:0")}
    assert parse_args(["--inspector"]).inspector and not parse_args([]).inspector


def test_the_cost_table_pairs_each_row_with_the_base_row_of_the_same_round() -> None:
    # The one table the three options print: rows by prefix (the first is the base), median columns, and
    # "versus" columns paired by round with the base, blank on the base row; the mark sees the changes by key.
    rounds = {
        "base_get_8c": [run(100, 1000), run(200, 500), run(400, 250)],
        "dear_get_8c": [run(150, 900), run(300, 450), run(600, 225)],  # +50% CPU, -10% req/s each round
        "same_get_8c": [run(100, 1000), run(200, 500), run(400, 250)],
    }
    seen: dict[str, dict[str, float]] = {}

    def mark(label: str, changes: dict[str, float]) -> str:
        seen[label] = changes
        return "  <- dear" if changes["server_us"] > 0.25 else ""

    columns = [Column("p50 ms", "p50_ms", decimals=2, width=7), Column("CPU vs base", "server_us", versus=True),
               Column("req/s", "requests_per_s", width=8)]
    lines = cost_table(rounds, [8], ("target", 6), [("base", "base_"), ("dear", "dear_"), ("same", "same_")],
                       columns, mark)
    assert lines[0] == "target conns  p50 ms CPU vs base    req/s"
    assert lines[1] == "base       8    1.00                  500"  # no change against itself
    assert lines[2] == "dear       8    1.00      +50.0%      450  <- dear"
    assert lines[3] == "same       8    1.00       +0.0%      500"
    assert set(seen) == {"dear", "same"}  # never asked about the base row
    assert seen["dear"] == {"server_us": 0.5}  # only the versus columns' figures
    # A trailing versus column is left out of the base row rather than padded.
    tail = cost_table(rounds, [8], ("target", 6), [("base", "base_"), ("dear", "dear_")],
                      [Column("req/s vs base", "requests_per_s", versus=True)], lambda label, changes: "")
    assert tail[1:] == ["base       8", "dear       8        -10.0%"]
