"""The agent's live status screen: what ``comzy 3000`` shows on a terminal (``--log`` or a pipe
gives the plain lines of comzy/agent/output.py instead).

The public URL stands out; below it the connection's state (online, reconnecting in N s), the
latency to the server, requests per minute, the server's notices and the last requests. Drawing
is rich's (Live on the terminal's alternate screen, which is given back as it was on exit); this
module only keeps the state and lays it out. The agent's events update the state and mark it
changed; a task redraws at most ``REDRAW_INTERVAL`` apart, so a busy tunnel costs the agent one
frame per interval, never one per request. Only this module imports rich, and only the CLI's
``make_output`` imports this module, on a terminal: piped and ``--log`` runs start without it.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from comzy import __version__
from comzy.agent.forward import Served
from comzy.agent.output import Printer, duration_label, policies_in_force, span, status_label, tunnel_lines
from comzy.core.control import Welcome
from comzy.core.logs import printable

if TYPE_CHECKING:
    from comzy.agent.tunnels import TunnelPlan

#: Least time between two frames, however many requests arrive (the agent's CPU per request is
#: benchmarked: drawing per request would cost more than forwarding).
REDRAW_INTERVAL = 0.25
#: A frame at least this often while nothing happens: countdowns, expiry and the rate move on.
IDLE_REDRAW = 1.0
#: Requests kept for the list (the screen shows as many as its height allows).
KEPT_REQUESTS = 100
#: Notices kept (the newest shown first).
KEPT_NOTICES = 3
#: Requests per minute are counted over this many one-second buckets.
RATE_WINDOW = 60


@dataclass(slots=True)
class _Request:
    at: float  # wall clock, when it finished
    served: Served


class RequestRate:
    """Requests over the last minute, in one-second buckets: constant memory and O(1) per request,
    however busy the tunnel (a timestamp per request would hold a minute of them)."""

    def __init__(self, window: int = RATE_WINDOW) -> None:
        self.window = window
        self._counts = [0] * window
        self._seconds = [-1] * window  # the second each bucket counts, so stale buckets are known

    def add(self, now: float) -> None:
        """Count one request at ``now`` (monotonic seconds)."""
        second = int(now)
        slot = second % self.window
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += 1

    def count(self, now: float) -> int:
        """Requests counted in the ``window`` seconds up to ``now``."""
        second = int(now)
        return sum(count for count, at in zip(self._counts, self._seconds, strict=True)
                   if 0 <= second - at < self.window)


class Screen:
    """The live status screen. Takes the agent's events as Printer does (the CLI's ``Output``);
    ``showing`` draws it for as long as the agent runs."""

    def __init__(self, target: str, out: TextIO | None = None, policies: dict[str, str] | None = None) -> None:
        self.out = out or sys.stdout
        self.target = target
        self.policies = policies or {}
        #: The policies the server confirmed (WELCOME ``enforced``), as described by the CLI.
        self.in_force: list[str] = []
        #: Errors and farewells go out as plain lines once the screen is gone.
        self._plain = Printer(target, out=self.out)
        self.url: str | None = None
        #: The tunnels of an agent that serves several, by name (empty: one tunnel, ``target``), and
        #: per tunnel its public URL, local address and confirmed policies, once connected.
        self.tunnels: dict[str, TunnelPlan] = {}
        self.several: list[tuple[str, str, list[str]]] = []
        self.user: str | None = None
        self.expires_at: float | None = None
        self.state = "connecting"
        self.reason = ""
        self._retry_at = 0.0  # monotonic: when the agent tries again (state "reconnecting")
        self.notices: deque[tuple[str, str, float]] = deque(maxlen=KEPT_NOTICES)
        self.requests: deque[_Request] = deque(maxlen=KEPT_REQUESTS)
        self.total = 0
        self.rate = RequestRate()
        self._latency: Callable[[], float | None] = lambda: None
        self._errors: list[str] = []
        self._live: Live | None = None
        #: The inspector's URL (``--inspect``), shown under the public URL; None when it is off.
        self.inspector: str | None = None
        self._changed = True

    # -- the agent's events (Output) ------------------------------------------------
    def connected(self, welcome: Welcome, first: bool) -> None:
        """The tunnel is up (again)."""
        self.url = printable(welcome.url)
        self.several = tunnel_lines(self.tunnels, welcome) if welcome.tunnels else []
        self.user = printable(welcome.user) if welcome.user else None
        self.expires_at = float(welcome.expires_at) if welcome.expires_at else None
        self.in_force = [printable(text) for text in policies_in_force(self.policies, welcome)]
        self.state, self.reason = "online", ""
        for notice in welcome.notices:
            self.notice("info", notice)
        self._changed = True

    def reconnecting(self, reason: str, delay: float) -> None:
        """The link dropped: the screen counts down to the next try."""
        self.state, self.reason = "reconnecting", printable(reason)
        self._retry_at = time.monotonic() + delay
        self._changed = True

    def notice(self, level: str, message: str) -> None:
        """A message from the server, or a warning of the agent's own."""
        self.notices.appendleft((level, printable(message), time.time()))
        self._changed = True

    def line(self, text: str) -> None:
        """A line of the CLI's own ("Stopping."): shown with the notices."""
        self.notice("info", text)

    def error(self, text: str) -> None:
        """An error: printed at once when no screen is up, else as soon as the screen is gone."""
        if self._live is None:
            self._plain.error(text)
        else:
            self._errors.append(text)

    def served(self, served: Served) -> None:
        """A request was answered: O(1), the next frame shows it."""
        self.requests.append(_Request(time.time(), served))
        self.total += 1
        self.rate.add(time.monotonic())
        self._changed = True

    # -- drawing ----------------------------------------------------------------------
    @asynccontextmanager
    async def showing(self, latency: Callable[[], float | None]) -> AsyncIterator[None]:
        """Draw the screen until the block ends; then give the terminal back as it was, and print
        where the tunnel was and any error as plain lines."""
        self._latency = latency
        # No markup, emoji codes or highlighting: a visitor's "[red]" or ":x:" is shown as sent.
        console = Console(file=self.out, markup=False, highlight=False, emoji=False)
        # Our own redraw task, not rich's refresh thread: frames are drawn only when something
        # changed, in the event loop that changes the state (no lock, no thread per agent).
        live = Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                    redirect_stderr=False, get_renderable=self.render)
        try:
            with _no_echo(), _logs_on(self), live:
                self._live = live
                live.refresh()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._redraw, live)
                    tg.start_soon(self._on_resize)
                    try:
                        yield
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            self._live = None
            if self.url:
                # The screen is gone with the terminal's alternate screen: say what ran, in the scrollback.
                where = ", ".join(f"{public} -> {local}" for public, local, _ in self.several) or \
                    f"{self.url} -> http://{self.target}"
                self._plain.line(f"Stopped forwarding {where} "
                                 f"({self.total} request{'' if self.total == 1 else 's'} served).")
            for error in self._errors:
                self._plain.error(error)

    async def _redraw(self, live: Live) -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(REDRAW_INTERVAL)
            now = time.monotonic()
            if self._changed or now - last >= IDLE_REDRAW:
                self._changed = False
                last = now
                live.refresh()

    async def _on_resize(self) -> None:
        if not hasattr(signal, "SIGWINCH"):  # Windows: the idle redraw catches up within a second
            return
        with anyio.open_signal_receiver(signal.SIGWINCH) as resizes:
            async for _ in resizes:
                self._changed = True

    def render(self, width: int | None = None, height: int | None = None) -> RenderableType:
        """One frame for a terminal of ``width`` x ``height`` (the live console's size when None).
        What peers sent is escaped with ``printable``, and Text is never parsed as markup."""
        size = self._live.console.size if self._live is not None else None
        width = width or (size.width if size else 80)
        height = height or (size.height if size else 24)
        title = Table.grid(expand=True)
        title.add_column(no_wrap=True, overflow="ellipsis")
        title.add_column(justify="right", no_wrap=True)
        title.add_row(Text.assemble(("comzy", "bold"), f" {__version__}"), Text("Ctrl-C to quit", "dim"))

        url = self.url or "-"
        latency = self._latency() if self.state == "online" else None
        rpm = self.rate.count(time.monotonic())
        style = "bold green" if self.state == "online" else "bold"
        # Several tunnels: a row per public URL, with where it leads and its policies under it.
        tunnels = [row for public, local, policies in self.several
                   for row in (("Public URL", Text.assemble((public, style), (f" -> {local}", "dim"))),
                               *(("  Policy", Text(policy, "green")) for policy in policies))]
        facts = [
            ("Session", self._state_text()),
            ("Account", self._account_text()),
            *(tunnels or [("Public URL", Text(url, style))]),
            *((("Inspector", Text(self.inspector, "cyan")),) if self.inspector else ()),
            *(() if tunnels else [("Forwarding", Text(f"{url} -> http://{self.target}"))]),
            *(() if tunnels else (("Policy", Text(policy, "green")) for policy in self.in_force)),
            ("Latency", Text(f"{latency * 1000:.0f} ms" if latency is not None else "-")),
            ("Requests", Text(f"{rpm} in the last minute, {self.total} in all")),
        ]
        parts: list[RenderableType] = [title, Text("")]
        for name, value in facts:
            # One line each, cut with an ellipsis on a narrow screen rather than wrapped.
            parts.append(Text.assemble((f"{name:<12}", "dim"), value, no_wrap=True, overflow="ellipsis"))
        used = len(parts)

        # What does not fit is left out, notices before requests: a short screen still shows the URL
        # and the state, and never scrolls.
        notices = list(self.notices)[:height - used - 2]
        if notices:
            parts += [Text(""), Text("Notices", "bold")]
            for level, message, at in notices:
                style = "yellow" if level in ("warning", "warn") else "cyan"
                parts.append(Text.assemble((time.strftime("%H:%M:%S ", time.localtime(at)), "dim"),
                                           (message, style), no_wrap=True, overflow="ellipsis"))
            used += 2 + len(notices)

        rows = height - used - 3  # a blank line, the table's header, and one spare against wrapping
        if rows > 0:
            parts += [Text(""), self._requests_table(rows, clock=width >= 60)]
        return Group(*parts)

    def _state_text(self) -> Text:
        if self.state == "online":
            return Text("online", "bold green")
        if self.state == "reconnecting":
            left = max(0, math.ceil(self._retry_at - time.monotonic()))
            head = f"reconnecting in {left} s" if left else "reconnecting..."
            return Text.assemble((head, "bold yellow"), (f" ({self.reason})", "yellow"))
        return Text("connecting...", "bold")

    def _account_text(self) -> Text:
        text = Text(self.user or "anonymous")
        if self.expires_at:
            left = max(0, int(self.expires_at - time.time()))
            at = time.strftime("%H:%M", time.localtime(self.expires_at))
            text.append(f", expires in {span(left)} (at {at})", "yellow")
        return text

    def _requests_table(self, rows: int, clock: bool) -> Table:
        table = Table(box=None, expand=True, padding=(0, 1), header_style="bold", show_edge=False)
        if clock:  # a narrow screen keeps its width for the path
            table.add_column("Time", style="dim", no_wrap=True, width=8)
        table.add_column("Method", no_wrap=True, overflow="ellipsis", max_width=8)
        # The path takes what is left and is cut with an ellipsis: a long one never wraps the screen.
        table.add_column("Path", no_wrap=True, overflow="ellipsis", ratio=1, min_width=4)
        table.add_column("Status", no_wrap=True, justify="right", width=6)
        table.add_column("Time taken", no_wrap=True, justify="right", width=10)
        for request in list(reversed(self.requests))[:rows]:
            served = request.served
            colour = "red" if served.status >= 500 or not served.status else \
                "yellow" if served.status >= 400 else "green"
            path = Text(printable(served.target))
            if served.tunnel is not None:
                path = Text.assemble((f"{printable(served.tunnel)} ", "cyan"), path)
            if served.error and served.status >= 500:
                path.append(f"  {printable(served.error)}", "dim")
            cells: list[RenderableType] = [time.strftime("%H:%M:%S", time.localtime(request.at))] if clock else []
            cells += [Text(printable(served.method)), path, Text(status_label(served), colour),
                      duration_label(served.duration)]
            table.add_row(*cells)
        return table


class _ScreenLog(logging.Handler):
    """The agent's warnings become notices while the screen is up (a line on stderr would draw
    over it)."""

    def __init__(self, screen: Screen) -> None:
        super().__init__(logging.WARNING)
        self.screen = screen

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()  # a traceback's first line says enough here
        self.screen.notice("warning", lines[0] if lines else record.levelname)


@contextmanager
def _logs_on(screen: Screen) -> Iterator[None]:
    logger = logging.getLogger("comzy")
    handler = _ScreenLog(screen)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@contextmanager
def _no_echo() -> Iterator[None]:
    """Keys typed while the screen shows are not echoed over it; Ctrl-C still stops the agent, and
    the terminal's settings are put back however the block ends."""
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):  # stdin is not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag; ISIG stays, so Ctrl-C still sends SIGINT
    termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
