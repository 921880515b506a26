"""PNG charts of a run (matplotlib, headless): direct vs tunnel side by side."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.report import IDLE_MAX_KIB_PER_TUNNEL, IDLE_MIN_REGISTRATIONS_PER_S, RSS_MAX_MIB, idle_rows

DIRECT, TUNNEL = "#7f8c8d", "#2e86de"


def draw_charts(out: Path, results: dict[str, Any]) -> list[Path]:
    """Draw every chart the run has data for; returns the files written."""
    cases = results["cases"]
    written = []
    idle = results.get("idle_agents")
    charts: list[tuple[str, Callable[[], Figure | None]]] = [
        ("summary.png", lambda: _summary(cases, results)),
        ("latency.png", lambda: _latency(cases)),
        ("fairness.png", lambda: _fairness(cases)),
        ("idle_agents.png", lambda: _idle(idle) if isinstance(idle, dict) and "error" not in idle else None),
    ]
    for name, draw in charts:
        try:
            figure = draw()
            if figure is not None:
                figure.savefig(out / name, dpi=110)
                plt.close(figure)
                written.append(out / name)
        except Exception as exc:  # a chart must never cost the numbers
            print(f"[bench] chart {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            plt.close("all")
    return written


def _bars(ax: Axes, labels: list[str], series: dict[str, list[float]], colors: list[str], title: str,
          unit: str, log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    if not labels:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    width = 0.8 / max(len(series), 1)
    for index, ((name, values), color) in enumerate(zip(series.items(), colors, strict=False)):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, values, width, label=name, color=color)
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(unit, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.legend(fontsize=7)


def _short(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.3g}"


def _pairs(cases: dict[str, Any], keys: list[str], metric: str) -> tuple[list[str], dict[str, list[float]]]:
    labels, direct, tunnel = [], [], []
    for key in keys:
        if key in cases:
            labels.append(cases[key]["title"].replace("small GET (1 KiB), ", "GET "))
            direct.append(cases[key]["median"]["direct"][metric])
            tunnel.append(cases[key]["median"]["tunnel"][metric])
    return labels, {"direct": direct, "tunnel": tunnel}


def _summary(cases: dict[str, Any], results: dict[str, Any]) -> Figure | None:
    if not any(key in cases for key in ("small_get_1c", "small_get_50c", "download", "upload")):
        return None
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    mode = "quick mode (not meaningful)" if results["meta"]["quick"] else results["meta"]["started"]
    figure.suptitle(f"Comzy through the tunnel vs direct: {mode}", fontsize=11)
    labels, series = _pairs(cases, ["small_get_1c", "small_get_50c"], "requests_per_s")
    _bars(axes[0][0], labels, series, [DIRECT, TUNNEL], "small GET 1 KiB: requests/s (higher is better)", "req/s")
    labels, series = _pairs(cases, ["small_get_1c", "small_get_50c"], "p99_ms")
    _bars(axes[0][1], labels, series, [DIRECT, TUNNEL], "small GET 1 KiB: p99 latency (lower is better)", "ms",
          log=True)
    labels, series = _pairs(cases, ["download", "upload"], "mib_per_s")
    _bars(axes[1][0], labels, series, [DIRECT, TUNNEL], "large transfers: MiB/s (higher is better)", "MiB/s")
    rss_labels, server, agent = [], [], []
    for key in ("download", "upload"):
        if key in cases:
            rss_labels.append(cases[key]["title"])
            server.append(cases[key]["max"]["tunnel"]["server_peak_rss_mib"])
            agent.append(cases[key]["max"]["tunnel"]["agent_peak_rss_mib"])
    _bars(axes[1][1], rss_labels, {"server": server, "agent": agent}, ["#8e44ad", "#27ae60"],
          "peak RSS during the transfer (budget dashed)", "MiB")
    axes[1][1].axhline(RSS_MAX_MIB, color="#c0392b", linestyle="--", linewidth=1)
    figure.tight_layout()
    return figure


def _latency(cases: dict[str, Any]) -> Figure | None:
    if "sse" not in cases and "websocket" not in cases:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels, direct, tunnel = [], [], []
    if "sse" in cases:
        labels.append("SSE first event")
        direct.append(cases["sse"]["median"]["direct"]["first_event_p50_ms"])
        tunnel.append(cases["sse"]["median"]["tunnel"]["first_event_p50_ms"])
    if "websocket" in cases:
        labels.append("WebSocket round trip")
        direct.append(cases["websocket"]["median"]["direct"]["round_trip_p50_ms"])
        tunnel.append(cases["websocket"]["median"]["tunnel"]["round_trip_p50_ms"])
    _bars(axes[0], labels, {"direct": direct, "tunnel": tunnel}, [DIRECT, TUNNEL], "median latency (lower is better)",
          "ms")
    labels, series = _pairs(cases, ["websocket"], "round_trips_per_s")
    _bars(axes[1], labels, series, [DIRECT, TUNNEL], "WebSocket echo, one client (higher is better)",
          "round trips/s")
    figure.tight_layout()
    return figure


def _fairness(cases: dict[str, Any]) -> Figure | None:
    if "fairness" not in cases:
        return None
    m = cases["fairness"]["median"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    figure.suptitle("small GETs (50 connections) alone and beside one slow visitor", fontsize=11)
    labels = ["direct", "tunnel"]
    alone = [m["direct_alone"]["p99_ms"], m["tunnel_alone"]["p99_ms"]]
    slow = [m["direct"]["p99_ms"], m["tunnel"]["p99_ms"]]
    _bars(axes[0], labels, {"alone": alone, "with slow visitor": slow}, ["#95a5a6", "#e67e22"], "p99 latency", "ms")
    alone = [m["direct_alone"]["requests_per_s"], m["tunnel_alone"]["requests_per_s"]]
    slow = [m["direct"]["requests_per_s"], m["tunnel"]["requests_per_s"]]
    _bars(axes[1], labels, {"alone": alone, "with slow visitor": slow}, ["#95a5a6", "#e67e22"], "requests/s",
          "req/s")
    figure.tight_layout()
    return figure


def _idle(idle: dict[str, Any]) -> Figure | None:
    rows = [row for row in idle_rows(idle) if "agents" in row.values]
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    figure.suptitle("idle agents on one server (targets dashed)", fontsize=11)
    for ax, suffix, title, unit, target in (
        (axes[0], "RSS per tunnel", "server RSS per idle tunnel (lower is better)", "KiB", IDLE_MAX_KIB_PER_TUNNEL),
        (axes[1], "registrations/s", "registration rate (higher is better)", "agents/s", IDLE_MIN_REGISTRATIONS_PER_S),
    ):
        picked = [row for row in rows if row.case.endswith(suffix)]
        labels = [f"{int(row.values['agents'] or 0):,} agents" for row in picked]
        _bars(ax, labels, {"tunnel": [float(row.values["tunnel"] or 0) for row in picked]}, [TUNNEL], title, unit)
        ax.axhline(target, color="#c0392b", linestyle="--", linewidth=1)
    figure.tight_layout()
    return figure
