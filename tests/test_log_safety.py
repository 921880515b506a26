"""Logs an operator can trust (issue 10): what peers send cannot forge a line or drive a terminal,
and an error that repeats (accept() at the file limit) is one line per interval, never a crash."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from comzy.agent import cli
from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder, Served
from comzy.agent.output import Printer
from comzy.core import logs
from comzy.core import protocol as p
from comzy.core import server as server_module
from comzy.core.agent_listener import MAX_LINK_MESSAGE
from comzy.core.control import Refusal
from comzy.core.websocket import connect, server_handshake
from tests.conftest import start_server
from tests.helpers import DisconnectWatcher, serve_tcp

FORGED = "evil/1\n2026-12-06T00:00:00Z INFO comzy.agents tunnel admin registered\x1b[2J\u2028"


@pytest.fixture
def comzy_log() -> Iterator[io.StringIO]:
    """What the server writes through comzy's own formatter (caplog's would not escape)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def test_printable_escapes_every_control_character() -> None:
    assert logs.printable("a\nb\rc\x1b[31md\x7f\x85e\u2028f\u2029g") == \
        "a\\x0ab\\x0dc\\x1b[31md\\x7f\\x85e\\u2028f\\u2029g"
    assert logs.printable("plain café / 200 ✓") == "plain café / 200 ✓"


def test_a_log_record_stays_one_line_and_its_traceback_stays_readable(comzy_log: io.StringIO) -> None:
    log = logging.getLogger("comzy.test")
    log.warning("agent said %s", FORGED)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed for %s", "x\ny")
    lines = comzy_log.getvalue().splitlines()
    assert lines[0].endswith("WARNING comzy.test agent said evil/1\\x0a2026-12-06T00:00:00Z INFO comzy.agents "
                             "tunnel admin registered\\x1b[2J\\u2028")
    assert lines[1].endswith("ERROR comzy.test failed for x\\x0ay")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


@pytest.mark.anyio
async def test_a_forged_agent_name_is_logged_escaped(tmp_path: Path, comzy_log: io.StringIO) -> None:
    watcher = DisconnectWatcher()
    async with start_server(tmp_path / "data", [("watcher", watcher)]) as server:
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 * 1024 * 1024)
        try:
            await ws.send(p.encode(p.FrameType.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": FORGED, "port": 1}))
            welcome = await ws.receive()
            assert isinstance(welcome, bytes)
            alias = next(p.decode_message(welcome)).payload["alias"]
        finally:
            await ws.aclose()
        with anyio.fail_after(10):
            await watcher.wait_for(alias)
    text = comzy_log.getvalue()
    registered = [line for line in text.splitlines() if f"tunnel {alias} registered" in line]
    assert len(registered) == 1 and "agent=evil/1\\x0a2026-12-06T00:00:00Z" in registered[0]
    assert not any(line.startswith("2026-12-06T00:00:00Z") for line in text.splitlines())
    assert "\x1b" not in text


def test_the_agent_prints_a_visitors_path_escaped() -> None:
    out = io.StringIO()
    printer = Printer("localhost:3000", out=out)
    printer.served(Served("GET\x1b]0;owned\x07", "/x\x1b[2J\nFAKE 200", 502, 0.01, error="bad\x1b[1m"))
    line = out.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line and "\x07" not in line
    assert "/x\\x1b[2J\\x0aFAKE 200" in line


@pytest.mark.anyio
async def test_the_agent_prints_a_servers_refusal_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A REJECT reason is the server's text: printed on the agent's terminal, it must not drive it."""
    async def refusing_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            ws, _ = await server_handshake(stream, MAX_LINK_MESSAGE)
            await ws.receive()
            await ws.send(Refusal("rejected", "no\x1b]0;owned\x07\x1b[2J\nerror: forged").encode())
            await ws.close(1008, "registration refused")

    async with serve_tcp(refusing_server) as port:
        forwarder = LocalForwarder("127.0.0.1", 9)
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}"], port=9), forwarder, Printer("localhost:9"))
        with anyio.fail_after(10):
            assert await cli._run(agent, forwarder, Printer("localhost:9")) == 1
    err = capsys.readouterr().err
    assert err == "comzy: the server refused the tunnel: no\\x1b]0;owned\\x07\\x1b[2J\\x0aerror: forged\n"


class _FailingListener(anyio.abc.Listener[Any]):
    """A listener whose accept() fails as at the file-descriptor limit, then closes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def accept(self) -> Any:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        raise anyio.ClosedResourceError

    async def serve(self, handler: Any, task_group: Any = None) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_agent_accept_failing_at_the_file_limit_neither_ends_the_server_nor_floods_the_log(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(server_module, "ACCEPT_RETRY_DELAY", 0)
    listener = _FailingListener(failures=200)
    caplog.set_level(logging.ERROR, logger="comzy.server")
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await server_module._accept_agents(listener, None, tg)  # type: ignore[arg-type]
    assert listener.calls == 201  # it kept accepting through every failure, until closed
    records = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "Too many open files" in records[0].getMessage() and "ulimit -n" in records[0].getMessage()


@pytest.mark.anyio
async def test_asyncio_accept_errors_of_the_public_listener_are_rate_limited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    async with start_server(tmp_path / "data"):
        for _ in range(50):  # what asyncio reports, once a second, while the limit lasts
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
    assert loop.get_exception_handler() is before  # the server put the previous handler back
    records = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(records) == 1 and "Too many open files" in records[0].getMessage()


@pytest.mark.anyio
async def test_bad_agent_handshakes_are_logged_once_per_interval(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="comzy.agents")
    async with start_server(tmp_path / "data") as server:
        for _ in range(20):
            async with await anyio.connect_tcp("127.0.0.1", server.ports.ws) as stream:
                await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")  # no key
                with anyio.fail_after(5):
                    try:
                        while await stream.receive():
                            pass
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass
    lines = [r.getMessage() for r in caplog.records if "bad handshake" in r.getMessage()]
    assert len(lines) == 1, lines
