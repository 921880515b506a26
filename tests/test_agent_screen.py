"""The agent's live status screen (comzy/agent/screen.py), read off a real terminal: ``comzy`` runs
in a tmux pane of a fixed size against a real server and local app, and the tests assert on what
the pane shows (``tmux capture-pane``), polled with a deadline, never after a sleep.

Without tmux these tests skip, except under CI=true where they fail (.ci/run installs it).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from rich.console import Console

from comzy.agent.forward import Served
from comzy.agent.output import Printer, make_output
from comzy.agent.screen import REDRAW_INTERVAL, RequestRate, Screen
from comzy.core.control import Welcome
from tests.conftest import PYTHON, cli_env, start_server, visitor
from tests.helpers import unavailable
from tests.test_cli import dead_port
from tests.upstream import Upstream

TMUX = shutil.which("tmux")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colour and style: the only escapes the screen itself may send


class Terminal:
    """A program in a tmux pane of a fixed size, on a tmux server of the test's own (its socket in a
    short temporary directory: a socket path is limited to about 100 bytes)."""

    def __init__(self, directory: Path) -> None:
        if TMUX is None:
            unavailable("tmux is not installed (apt-get install tmux)")
        assert TMUX is not None
        self.tmux_path = TMUX
        self.socket = directory / "tmux.sock"
        self.config = directory / "tmux.conf"
        # No status bar (the pane is the whole window); a finished program's last screen stays.
        self.config.write_text("set -g status off\nset -g remain-on-exit on\n")

    async def tmux(self, *args: str) -> str:
        """Run a tmux command on this server; its output."""
        result = await anyio.run_process([self.tmux_path, "-S", str(self.socket), "-f", str(self.config), *args])
        return result.stdout.decode()

    async def start(self, command: list[str], env: dict[str, str], width: int = 120, height: int = 30) -> None:
        """Run ``command`` in a new pane; a shell then prints its exit code and whether the terminal
        echoes keys (``echo`` or ``-echo``, as stty says it)."""
        script = '"$@"; echo "exit=$?"; stty -a | tr " " "\\n" | grep -x -e echo -e -echo'
        full = [self.tmux_path, "-S", str(self.socket), "-f", str(self.config), "new-session", "-d", "-s", "t",
                "-x", str(width), "-y", str(height), "--", "bash", "-c", script, "bash", *command]
        # The tmux server this starts passes its environment on to the pane.
        await anyio.run_process(full, env={k: v for k, v in env.items() if k != "TMUX"})

    async def screen(self, history: bool = False) -> str:
        """What the pane shows now (with its scrollback when ``history``)."""
        return await self.tmux("capture-pane", "-p", "-t", "t", *(["-S", "-"] if history else []))

    async def wait_for(self, pattern: str, within: float = 20.0, history: bool = False) -> re.Match[str]:
        """Poll the pane until ``pattern`` matches what it shows; fail with the last screen after ``within`` s."""
        regex = re.compile(pattern, re.MULTILINE)
        shown = ""
        with anyio.move_on_after(within):
            while True:
                shown = await self.screen(history)
                match = regex.search(shown)
                if match:
                    return match
                await anyio.sleep(0.05)
        raise AssertionError(f"the screen never showed {pattern!r} in {within} s; it shows:\n{shown}")

    async def value(self, name: str) -> str:
        """A tmux format of the pane (``pane_dead``, ``alternate_on``...)."""
        return (await self.tmux("display-message", "-p", "-t", "t", f"#{{{name}}}")).strip()

    async def close(self) -> None:
        """End the tmux server and whatever still runs in it."""
        with anyio.CancelScope(shield=True):
            await anyio.run_process([self.tmux_path, "-S", str(self.socket), "kill-server"], check=False)


@asynccontextmanager
async def terminal() -> AsyncIterator[Terminal]:
    with tempfile.TemporaryDirectory(prefix="comzy-tmux-") as directory:
        term = Terminal(Path(directory))
        try:
            yield term
        finally:
            await term.close()


def agent_command(port: int, ws_port: int, *args: str) -> list[str]:
    return [PYTHON, "-m", "comzy.agent.cli", str(port), "--local-host", "127.0.0.1",
            "--server", f"ws://127.0.0.1:{ws_port}", *args]


def agent_env(home: Path) -> dict[str, str]:
    """The agent's environment on a terminal: colour allowed (the pane is a terminal), no saved login."""
    env = cli_env(HOME=str(home))
    del env["NO_COLOR"]
    return env


# -- On a real terminal ------------------------------------------------------------------------
@pytest.mark.anyio
async def test_the_screen_shows_the_tunnel_its_requests_and_a_lost_server(tmp_path: Path, upstream: Upstream) -> None:
    async with terminal() as term:
        async with start_server(tmp_path / "data") as server:
            await term.start(agent_command(upstream.port, server.ports.ws), agent_env(tmp_path))
            match = await term.wait_for(r"^Public URL\s+http://(client-[a-z0-9]+)\.localhost:(\d+)\s*$")
            alias, port = match.groups()
            assert int(port) == server.ports.http
            await term.wait_for(r"^Session\s+online")
            await term.wait_for(rf"^Forwarding\s+http://{alias}\.localhost:{port} -> http://127\.0\.0\.1:{upstream.port}")
            # Measured by a PING at connect: shown at once, not a heartbeat interval (10 s) later.
            await term.wait_for(r"^Latency\s+\d+ ms", within=5)
            assert await term.value("alternate_on") == "1"  # drawn on the alternate screen
            tty = await term.value("pane_tty")
            settings = (await anyio.run_process(["stty", "-F", tty, "-a"])).stdout.decode().split()
            assert "-echo" in settings  # typed keys do not draw over the screen

            async with visitor(server, alias) as client:
                assert (await client.get("/hello?x=1")).status_code == 200
                assert (await client.get("/status/404")).status_code == 404
            await term.wait_for(r"^\s*\d\d:\d\d:\d\d\s+GET\s+/hello\?x=1\s+200\s+\d+(\.\d)? ms")
            await term.wait_for(r"^\s*\d\d:\d\d:\d\d\s+GET\s+/status/404\s+404\s+\d+(\.\d)? ms")
            await term.wait_for(r"^Requests\s+2 in the last minute, 2 in all")
            shown = await term.screen()
            assert shown.index("/status/404") < shown.index("/hello?x=1")  # the newest first

        # The server is gone: the screen says so and counts down to the next try.
        await term.wait_for(r"^Session\s+reconnecting")
        await term.wait_for(r"^Latency\s+-\s*$")

        # A server on the same agent port again: the agent is back by itself (a new public port).
        async with start_server(tmp_path / "data", ws_port=server.ports.ws) as again:
            url = (await term.wait_for(rf"^Public URL\s+(http://client-[a-z0-9]+\.localhost:{again.ports.http})\s*$",
                                       within=30)).group(1)
            await term.wait_for(r"^Session\s+online")
            await term.wait_for(r"^Requests\s+\d in the last minute, 2 in all")  # the count outlives the link

            await term.tmux("send-keys", "-t", "t", "C-c")
            await term.wait_for(r"^exit=0$", history=True)
        # The terminal is given back as it was: main screen, keys echoed again.
        assert await term.value("alternate_on") == "0"
        after = await term.screen(history=True)
        assert re.search(r"^echo$", after, re.MULTILINE), after
        assert f"Stopped forwarding {url} -> http://127.0.0.1:{upstream.port} (2 requests served)." in after


@pytest.mark.anyio
async def test_a_small_window_cuts_long_lines_and_a_resize_redraws(tmp_path: Path, upstream: Upstream) -> None:
    long_path = "/" + "a" * 300
    async with terminal() as term, start_server(tmp_path / "data") as server:
        await term.start(agent_command(upstream.port, server.ports.ws), agent_env(tmp_path), width=120, height=30)
        alias = (await term.wait_for(r"^Public URL\s+http://(client-[a-z0-9]+)\.")).group(1)
        async with visitor(server, alias) as client:
            assert (await client.get(long_path)).status_code == 200
        await term.wait_for(r"GET\s+/a{20,}…\s+200 ")

        await term.tmux("resize-window", "-t", "t", "-x", "44", "-y", "14")
        # Redrawn for the new size: the title's right edge moves in, the path is cut shorter.
        await term.wait_for(r"^comzy \S+ {1,30}Ctrl-C to quit$")
        await term.wait_for(r"^ ?GET\s+/a+…\s+200\s")
        screen = await term.screen()
        lines = screen.splitlines()
        assert len(lines) <= 14 and all(len(line) <= 44 for line in lines), screen
        assert lines[0].startswith("comzy "), screen  # nothing scrolled the top away


@pytest.mark.anyio
async def test_an_unreachable_server_leaves_one_error_line_on_the_terminal(tmp_path: Path) -> None:
    """The screen is gone before the error is printed, so the error stays readable after the exit."""
    with dead_port() as port:
        async with terminal() as term:
            await term.start(agent_command(3000, port), agent_env(tmp_path))
            await term.wait_for(r"^exit=1$", history=True)
            assert await term.value("alternate_on") == "0"
            after = await term.screen(history=True)
    errors = [line for line in after.splitlines() if line.startswith("comzy:")]
    assert len(errors) == 1 and f"ws://127.0.0.1:{port}" in errors[0] and "Is comzy-server running" in errors[0], after
    assert "Stopped forwarding" not in after  # it never forwarded anything


@pytest.mark.anyio
async def test_log_prints_plain_lines_on_a_terminal(tmp_path: Path, upstream: Upstream) -> None:
    async with terminal() as term, start_server(tmp_path / "data") as server:
        await term.start(agent_command(upstream.port, server.ports.ws, "--log"), agent_env(tmp_path))
        alias = (await term.wait_for(r"^Public URL: http://(client-[a-z0-9]+)\.")).group(1)
        assert await term.value("alternate_on") == "0"
        async with visitor(server, alias) as client:
            assert (await client.get("/plain")).status_code == 200
        await term.wait_for(r"^GET\s+/plain 200 \d+(\.\d)? ms$")
        assert "Session" not in await term.screen()


# -- The parts, without a terminal -------------------------------------------------------------
def test_the_screen_is_drawn_only_on_a_terminal_without_log_or_quiet() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty, os.fdopen(leader, "rb", buffering=0):
        assert isinstance(make_output("localhost:3000", out=tty), Screen)
        assert isinstance(make_output("localhost:3000", out=tty, log=True), Printer)
        assert isinstance(make_output("localhost:3000", out=tty, quiet=True), Printer)
    assert isinstance(make_output("localhost:3000", out=io.StringIO()), Printer)


def test_requests_per_minute_counts_a_sliding_minute() -> None:
    rate = RequestRate()
    for second in (1000.1, 1000.5, 1030.0, 1059.9):
        rate.add(second)
    assert rate.count(1059.9) == 4
    assert rate.count(1060.0) == 2  # second 1000 has left the minute
    assert rate.count(1089.9) == 2
    assert rate.count(1090.0) == 1
    rate.add(1120.0)  # second 1000's bucket, reused: its two old requests are not added to it
    assert rate.count(1120.0) == 1
    assert rate.count(1179.0) == 1
    assert rate.count(2000.0) == 0


def _frame(screen: Screen, width: int, height: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, height=height, force_terminal=True, color_system="standard",
            markup=False, highlight=False, emoji=False).print(screen.render(width, height))
    return out.getvalue()


def _screen_with_traffic() -> Screen:
    screen = Screen("localhost:3000", out=io.StringIO())
    screen.connected(Welcome(alias="a", url="http://client-abc.localhost:8190", expires_at=time.time() + 3000,
                             notices=["evil\x1b]0;owned\x07 notice"]), True)
    screen.served(Served("GET\x1b[31m", "/x\x1b[2J\nFAKE [red]200[/red] :x:" + "/b" * 200, 502, 0.012,
                         error="bad\x1b[1m"))
    return screen


def test_a_visitors_path_cannot_drive_the_terminal() -> None:
    frame = _frame(_screen_with_traffic(), 120, 30)
    assert "\x1b" not in SGR.sub("", frame) and "\x07" not in frame
    text = SGR.sub("", frame)
    assert "/x\\x1b[2J\\x0aFAKE [red]200[/red] :x:" in text  # escaped, never markup or emoji
    assert "GET\\x1b" in text and "evil\\x1b]0;owned\\x07 notice" in text


@pytest.mark.parametrize(("width", "height"), [(120, 30), (40, 14), (20, 5)])
def test_every_frame_fits_its_window(width: int, height: int) -> None:
    text = SGR.sub("", _frame(_screen_with_traffic(), width, height))
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= max(height, 8), text  # 8: the title and the facts, cut by the terminal below that
    assert all(len(line) <= width for line in lines), text
    if height >= 30:
        assert re.search(r"(/b)+/?…", text), text  # the long path is cut, not wrapped


@pytest.mark.anyio
async def test_a_busy_tunnel_redraws_at_a_bounded_rate_and_the_terminal_is_given_back() -> None:
    """Thousands of requests a second cost a few frames, not a frame each (the agent's CPU per
    request is benchmarked); leaving restores the main screen and the cursor."""
    leader, follower = os.openpty()
    written: list[bytes] = []

    def drain() -> None:  # a terminal reads what it is sent: else the writes would block
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the other end closed
                return
            if not data:
                return
            written.append(data)

    with os.fdopen(follower, "w") as tty:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, drain)
            screen = Screen("localhost:3000", out=tty)
            served = 0
            async with screen.showing(lambda: 0.004):
                screen.connected(Welcome(alias="a", url="http://client-abc.localhost:8190"), True)
                started = time.monotonic()
                while time.monotonic() - started < 1.0:
                    screen.served(Served("GET", f"/{served}", 200, 0.001))
                    served += 1
                    await anyio.lowlevel.checkpoint()  # the redraw task gets its turns
            tty.flush()
            tty.close()  # the drain ends
    os.close(leader)
    output = b"".join(written)
    frames = output.count(b"\x1b[H") - 1  # entering the alternate screen homes the cursor once too
    assert served > 1000
    assert 1 <= frames <= 1 + 1.0 / REDRAW_INTERVAL + 1, frames  # the first frame, then one per interval
    assert output.index(b"\x1b[?1049h") < output.rindex(b"\x1b[?1049l")  # alternate screen in, then out
    assert output.rindex(b"\x1b[?25h") > output.rindex(b"\x1b[?25l")  # the cursor is shown again
    assert f"Stopped forwarding http://client-abc.localhost:8190 -> http://localhost:3000 ({served} requests " \
           "served)." in output.decode(errors="replace")


def test_a_piped_agent_does_not_import_rich() -> None:
    """rich's import is paid only when the screen is drawn: piped and --log agents start as before."""
    code = ("import io, sys\nfrom comzy.agent import cli\nfrom comzy.agent.output import make_output\n"
            "make_output('localhost:3000', out=io.StringIO())\nprint('rich' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False", result.stderr
