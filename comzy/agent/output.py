"""What the agent prints when piped or with ``--log``: the public URL stands out, then one line per
request. On a terminal the CLI draws the live screen of comzy/agent/screen.py instead
(:func:`make_output` chooses); both take the same events (:class:`Output`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, TextIO

from comzy.agent.forward import Served
from comzy.core.control import Welcome
from comzy.core.logs import printable

if TYPE_CHECKING:
    from comzy.agent.tunnels import TunnelPlan

_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
_RED = "\033[31m"
_GREEN = "\033[32m"
_YELLOW = "\033[33m"
_CYAN = "\033[36m"

#: What starts every error line the agent prints (``comzy-server:`` is the server's).
ERROR_PREFIX = "comzy:"


def use_colour(stream: TextIO) -> bool:
    """Colour on a terminal, plain text when piped or when NO_COLOR is set."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


class Output(Protocol):
    """What the agent's CLI reports to: :class:`Printer` (plain lines) or the live ``Screen``."""

    def line(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def connected(self, welcome: Welcome, first: bool) -> None: ...
    def reconnecting(self, reason: str, delay: float) -> None: ...
    def notice(self, level: str, message: str) -> None: ...
    def served(self, served: Served) -> None: ...

    #: The inspector's URL (``--inspect``), shown under the public URL; None when it is off.
    inspector: str | None

    def showing(self, latency: Callable[[], float | None]) -> AbstractAsyncContextManager[None]:
        """Show the output for as long as the agent runs; ``latency`` reads the agent's round trip
        to the server (seconds, None while unknown)."""
        ...


def wants_screen(stream: TextIO) -> bool:
    """Whether ``stream`` can show the live screen: a terminal that moves its cursor."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def make_output(target: str, *, log: bool = False, quiet: bool = False, out: TextIO | None = None,
                policies: dict[str, str] | None = None, tunnels: list[TunnelPlan] | None = None) -> Output:
    """The live screen on a terminal; plain lines when piped, with ``--log`` or with ``--quiet``.
    ``policies``: what each policy plugin the agent required enforces, shown once the server
    confirmed it (WELCOME ``enforced``). ``tunnels``: the tunnels of an agent that serves several
    (each with its local address and policies), shown a line each."""
    out = out or sys.stdout
    if log or quiet or not wants_screen(out):
        printer = Printer(target, quiet=quiet, out=out, policies=policies)
        printer.tunnels = {plan.name: plan for plan in tunnels or []}
        return printer
    # Imported here: rich costs start-up time that a piped or --log agent need not pay.
    from comzy.agent.screen import Screen

    screen = Screen(target, out=out, policies=policies)
    screen.tunnels = {plan.name: plan for plan in tunnels or []}
    return screen


def policies_in_force(policies: dict[str, str], welcome: Welcome) -> list[str]:
    """The descriptions of the policies the server confirmed it enforces, in the agent's order."""
    return [text for name, text in policies.items() if name in welcome.enforced]


def tunnel_lines(tunnels: dict[str, TunnelPlan], welcome: Welcome) -> list[tuple[str, str, list[str]]]:
    """Per tunnel of a WELCOME for several: its public URL, its local address and name, and the
    policies the server confirmed for it; escaped, in the WELCOME's order."""
    lines = []
    for tunnel in welcome.tunnels:
        plan = tunnels.get(tunnel.name)
        target = plan.target if plan is not None else "?"
        described = plan.policies.described if plan is not None else {}
        policies = [printable(text) for name, text in described.items() if name in tunnel.enforced]
        lines.append((printable(tunnel.url), f"http://{printable(target)} ({printable(tunnel.name)})", policies))
    return lines


class Printer:
    """Formats agent events for a person (colour) or a pipe (plain)."""

    def __init__(self, target: str, quiet: bool = False, out: TextIO | None = None,
                 policies: dict[str, str] | None = None) -> None:
        self.out = out or sys.stdout
        self.colour = use_colour(self.out)
        self.target = target
        self.quiet = quiet
        self.policies = policies or {}
        #: The tunnels of an agent that serves several, by name (empty: one tunnel, ``target``).
        self.tunnels: dict[str, TunnelPlan] = {}
        self._down = False  # between a lost connection and the next successful one
        self.inspector: str | None = None

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    @asynccontextmanager
    async def showing(self, latency: Callable[[], float | None]) -> AsyncIterator[None]:
        """Lines need nothing drawn around them (see :class:`Output`)."""
        yield

    def line(self, text: str) -> None:
        """Print one line and flush (a pipe sees it at once)."""
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        """An error line on stderr, escaped: it often quotes the server (a REJECT or GOAWAY reason),
        whose words must not drive the terminal. ``comzy:`` is every agent error's prefix
        (:data:`ERROR_PREFIX`), the commands' and the usage errors' too."""
        prefix = self._c(_RED + _BOLD, ERROR_PREFIX) if use_colour(sys.stderr) else ERROR_PREFIX
        print(f"{prefix} {printable(text)}", file=sys.stderr, flush=True)

    # -- Reporter ------------------------------------------------------------------
    def connected(self, welcome: Welcome, first: bool) -> None:
        """The tunnel is up: show the public URL prominently."""
        self._down = False
        url = printable(welcome.url)
        several = tunnel_lines(self.tunnels, welcome) if welcome.tunnels else []
        if first:
            if several:
                # One line per public URL, each with where it leads.
                for public, local, policies in several:
                    self.line(self._c(_BOLD + _GREEN, f"Public URL: {public}") + self._c(_DIM, f" -> {local}"))
                    for policy in policies:
                        self.line(self._c(_GREEN, f"  Policy: {policy}"))
            else:
                self.line(self._c(_DIM, f"Forwarding {url} -> http://{self.target}"))
                self.line(self._c(_BOLD + _GREEN, f"Public URL: {url}"))
                for policy in policies_in_force(self.policies, welcome):
                    self.line(self._c(_GREEN, f"Policy: {printable(policy)}"))
            if self.inspector:
                self.line(self._c(_CYAN, f"Inspector: {self.inspector}"))
            user = printable(welcome.user) if welcome.user else None
            who = f"Logged in as {user}" if user else "Anonymous tunnel"
            expires = welcome.expires_at
            if expires:
                # The one place the expiry is said: a plugin's notice gives the advice, not the time again.
                left = max(0, int(float(expires) - time.time()))
                at = time.strftime("%H:%M", time.localtime(expires))
                self.line(self._c(_YELLOW, f"{who}: expires in {span(left)} (at {at})"))
            else:
                self.line(self._c(_DIM, who))
            self.line(self._c(_DIM, "Press Ctrl-C to stop."))
        else:
            self.line(self._c(_GREEN, f"Reconnected: {', '.join(public for public, _, _ in several) or url}"))
        for notice in welcome.notices:
            self.notice("info", notice)

    def reconnecting(self, reason: str, delay: float) -> None:
        """The link dropped; say why and when we retry."""
        what = "Still down" if self._down else "Connection lost"
        self._down = True
        self.line(self._c(_YELLOW, f"{what} ({printable(reason)}); reconnecting in {delay:.1f} s"))

    def notice(self, level: str, message: str) -> None:
        """A message from the server (expiry warnings, GOAWAY)."""
        colour = _YELLOW if level in ("warning", "warn") else _CYAN
        self.line(self._c(colour, printable(message)))

    def served(self, served: Served) -> None:
        """One line per request: method, path, status, duration."""
        if self.quiet:
            return
        status = status_label(served)
        if served.status >= 500 or not served.status:
            status_text = self._c(_RED, status)
        elif served.status >= 400:
            status_text = self._c(_YELLOW, status)
        else:
            status_text = self._c(_GREEN, status)
        duration = duration_label(served.duration)
        # The method and path are the visitor's: escaped, they cannot drive this terminal.
        line = f"{printable(served.method):<7} {printable(served.target)} {status_text} {duration}"
        if served.tunnel is not None:
            line = f"{self._c(_CYAN, printable(served.tunnel))} {line}"
        if served.error and served.status >= 500:
            line += "  " + self._c(_DIM, printable(served.error))
        self.line(line)


def status_label(served: Served) -> str:
    """A request's status as shown: the code, ``WS`` for an accepted WebSocket, ``---`` for none."""
    return "WS" if served.websocket and served.status == 101 else str(served.status or "---")


def duration_label(seconds: float) -> str:
    """A request's duration as shown: ``12 ms``, or ``1.5 ms`` under ten."""
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def span(seconds: int) -> str:
    """A time left, as a person says it: ``2 h 5 min``, ``12 min``, ``40 s``."""
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"
