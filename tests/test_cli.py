"""The real console programs, ``comzy`` and ``comzy-server``, run as subprocesses.

Readiness is always a line the program prints (``Public URL:``, the server's ``ready``
banner), never a sleep. Whatever a test starts it kills in a ``finally``.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from comzy.core import protocol as p
from comzy.core.websocket import Closed, connect, server_handshake
from tests.conftest import PYTHON, RecordingReporter, cli_env, start_server, visitor
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

AGENT = "comzy.agent.cli"
SERVER = "comzy.core.cli"
PUBLIC_URL = re.compile(r"^Public URL: (https?)://(client-[a-z0-9]+)\.localhost:(\d+)$")
ANSI = "\x1b["


# -- Running a console program -------------------------------------------------------------
class Cli:
    """A console program in a subprocess; its stdout and stderr are collected line by line."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.eof: dict[str, anyio.Event] = {"stdout": anyio.Event(), "stderr": anyio.Event()}
        self._changed = anyio.Event()

    def _append(self, name: str, line: str) -> None:
        self.lines[name].append(line)
        self._changed.set()
        self._changed = anyio.Event()

    async def pump(self, name: str, stream: anyio.abc.ByteReceiveStream) -> None:
        """Read ``stream`` to its end, one line at a time."""
        buffered = BufferedByteReceiveStream(stream)
        try:
            while True:
                raw = await buffered.receive_until(b"\n", 1 << 20)
                self._append(name, raw.decode(errors="replace").rstrip("\r"))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError, anyio.BrokenResourceError):
            if buffered.buffer:
                self._append(name, bytes(buffered.buffer).decode(errors="replace"))
        finally:
            self.eof[name].set()
            self._changed.set()

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines["stderr"])

    def describe(self) -> str:
        """Everything printed so far, for assertion messages."""
        return f"exit={self.process.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    async def wait_for(self, pattern: str | re.Pattern[str], stream: str = "stdout", within: float = 10.0,
                       start: int = 0) -> re.Match[str]:
        """The first line (from index ``start``) matching ``pattern``; fails if none comes ``within`` s."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            with anyio.fail_after(within):
                while True:
                    changed = self._changed
                    for line in self.lines[stream][start:]:
                        match = regex.search(line)
                        if match:
                            return match
                    if self.eof[stream].is_set():
                        break
                    await changed.wait()
        except TimeoutError:
            pass
        raise AssertionError(f"no line matching {regex.pattern!r} on {stream}\n{self.describe()}")

    async def wait_exit(self, within: float = 10.0) -> int:
        """Wait for the program to exit and its output to be read; returns the exit code."""
        try:
            with anyio.fail_after(within):
                code = await self.process.wait()
                await self.eof["stdout"].wait()
                await self.eof["stderr"].wait()
        except TimeoutError:
            raise AssertionError(f"still running after {within} s\n{self.describe()}") from None
        return code

    def signal(self, signum: int) -> None:
        """Send a signal to the program (only this process, by its PID)."""
        self.process.send_signal(signum)


@asynccontextmanager
async def run_cli(module: str, *args: str, env: dict[str, str], cwd: Path) -> AsyncIterator[Cli]:
    """Run ``python -m module args`` and collect its output; killed on the way out if still running."""
    process = await anyio.open_process([PYTHON, "-m", module, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    cli = Cli(process)
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None and process.stderr is not None
            tg.start_soon(cli.pump, "stdout", process.stdout)
            tg.start_soon(cli.pump, "stderr", process.stderr)
            try:
                yield cli
            finally:
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


def agent_env(**extra: str) -> dict[str, str]:
    """Environment for the agent: plain output, no server list unless given."""
    return cli_env(**extra)


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for comzy-server: loopback, free ports, no plugins, its own data dir."""
    values = {"COMZY_HOST": "127.0.0.1", "COMZY_HTTP_PORT": "0", "COMZY_WS_PORT": "0", "COMZY_ADMIN_PORT": "0",
              "COMZY_DATA_DIR": str(data_dir), "COMZY_PLUGINS": "none"}
    values.update(extra)
    return cli_env(**values)


@asynccontextmanager
async def run_agent(port: int, ws_port: int | None, cwd: Path, *args: str,
                    env: dict[str, str] | None = None) -> AsyncIterator[Cli]:
    """The ``comzy`` agent for local ``port`` against the agent listener on ``ws_port``."""
    server_args = ["--server", f"ws://127.0.0.1:{ws_port}"] if ws_port is not None else []
    async with run_cli(AGENT, str(port), "--local-host", "127.0.0.1", *server_args, *args,
                       env=env if env is not None else agent_env(), cwd=cwd) as cli:
        yield cli


@dataclass
class Banner:
    """What comzy-server said at start-up."""

    http: int
    ws: int
    admin: int
    lines: list[str]


async def wait_banner(cli: Cli) -> Banner:
    """Wait for the server's start-up lines and read the ports it bound."""
    await cli.wait_for(r"comzy-server \S+ ready", stream="stderr")
    await cli.wait_for(r"\bdata\s+\S", stream="stderr")
    ports = {}
    for name in ("public", "agents", "admin"):
        match = await cli.wait_for(rf"\b{name}\s+(?:https?|wss?)://127\.0\.0\.1:(\d+)", stream="stderr")
        ports[name] = int(match.group(1))
    return Banner(ports["public"], ports["agents"], ports["admin"], list(cli.lines["stderr"]))


@contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port where nothing listens (bound, not listening: connections are refused)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def eventually(check: Callable[[], Any], what: str, within: float = 5.0) -> Any:
    """Poll ``check`` briefly until it returns something truthy; fails after ``within`` s."""
    with anyio.move_on_after(within):
        while True:
            if result := check():
                return result
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def request_line(method: str, target: str, status: int) -> str:
    """The agent's per-request line: method, path, status, duration."""
    return rf"^{method}\s+{re.escape(target)} {status} \d+(?:\.\d)? ms$"


# -- The agent -----------------------------------------------------------------------------
async def test_agent_prints_public_url_and_a_line_per_request(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server, run_agent(upstream.port, server.ports.ws, tmp_path) as cli:
        match = await cli.wait_for(PUBLIC_URL)
        scheme, alias, port = match.groups()
        assert scheme == "http"
        assert int(port) == server.ports.http
        assert server.tunnel(alias) is not None
        async with visitor(server, alias) as client:
            assert (await client.get("/hello?x=1")).status_code == 200
            assert (await client.post("/submit", content=b"body")).status_code == 200
            assert (await client.get("/status/404")).status_code == 404
        await cli.wait_for(request_line("GET", "/hello?x=1", 200))
        await cli.wait_for(request_line("POST", "/submit", 200))
        await cli.wait_for(request_line("GET", "/status/404", 404))
        assert ANSI not in cli.stdout


async def test_agent_warns_when_nothing_listens_locally(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server:
        with dead_port() as port:
            async with run_agent(port, server.ports.ws, tmp_path) as cli:
                await cli.wait_for(rf"Nothing is listening on 127\.0\.0\.1:{port} yet")
                await cli.wait_for(PUBLIC_URL)
        async with run_agent(upstream.port, server.ports.ws, tmp_path) as cli:
            await cli.wait_for(PUBLIC_URL)
            assert "Nothing is listening" not in cli.stdout


async def test_output_is_plain_when_piped_and_coloured_when_forced(tmp_path: Path, upstream: Upstream) -> None:
    piped = agent_env()
    del piped["NO_COLOR"]
    piped.pop("FORCE_COLOR", None)
    forced = dict(piped, FORCE_COLOR="1")
    async with start_server(tmp_path / "data") as server:
        for env, coloured in ((piped, False), (forced, True)):
            async with run_agent(upstream.port, server.ports.ws, tmp_path, env=env) as cli:
                alias = (await cli.wait_for(r"Public URL: \S*?(client-[a-z0-9]+)\.")).group(1)
                async with visitor(server, alias) as client:
                    assert (await client.get("/colour")).status_code == 200
                await cli.wait_for(r"/colour")
                assert (ANSI in cli.stdout) is coloured, cli.describe()
                if not coloured:
                    assert ANSI not in cli.stderr
                    await cli.wait_for(request_line("GET", "/colour", 200))


async def test_quiet_prints_no_request_lines(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server, \
            run_agent(upstream.port, server.ports.ws, tmp_path, "--quiet") as cli:
        alias = (await cli.wait_for(PUBLIC_URL)).group(2)
        async with visitor(server, alias) as client:
            for path in ("/one", "/two", "/status/404"):
                assert (await client.get(path)).status_code in (200, 404)
        cli.signal(signal.SIGINT)
        assert await cli.wait_exit() == 0
    assert not re.search(r"/one|/two|/status/404", cli.stdout), cli.describe()
    assert "Public URL:" in cli.stdout


async def test_unreachable_server_is_one_clear_line_and_a_failure(tmp_path: Path) -> None:
    with dead_port() as port:
        async with run_agent(3000, port, tmp_path) as cli:
            code = await cli.wait_exit(within=8)
    assert code != 0
    lines = [line for line in cli.lines["stderr"] if line.strip()]
    assert len(lines) == 1, cli.describe()
    assert f"ws://127.0.0.1:{port}" in lines[0]
    assert "Is comzy-server running" in lines[0]
    assert "Public URL" not in cli.stdout


async def test_server_rejects_an_agent_of_another_protocol_version(tmp_path: Path) -> None:
    async with start_server(tmp_path / "data") as server:
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}", 1 << 20)
        try:
            await ws.send(p.encode(p.FrameType.HELLO, 0, {"v": 99, "agent": "fake/0", "port": 3000}))
            with anyio.fail_after(5):
                message = await ws.receive()
                assert isinstance(message, bytes)
                frame = next(p.decode_message(message))
                after = await ws.receive()
        finally:
            await ws.aclose()
        assert frame.type == p.FrameType.REJECT
        assert frame.payload["code"] == "version"
        reason = frame.payload["reason"]
        assert f"v{p.PROTOCOL_VERSION}" in reason and "v99" in reason
        assert "upgrade" in reason
        assert isinstance(after, Closed)
        assert server.tunnels() == []


async def test_agent_exits_on_a_version_reject(tmp_path: Path) -> None:
    hellos: list[dict[str, Any]] = []
    reason = "this server speaks protocol v2 but the agent speaks v1; pip install --upgrade comzy"

    async def fake_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            ws, _ = await server_handshake(stream, 1 << 20)
            message = await ws.receive()
            assert isinstance(message, bytes)
            hellos.append(next(p.decode_message(message)).payload)
            await ws.send(p.encode(p.FrameType.REJECT, 0, {"code": "version", "reason": reason}))
            await ws.close(1008, "registration refused")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, fake_server)
        async with run_agent(3000, port, tmp_path) as cli:
            code = await cli.wait_exit(within=8)
        tg.cancel_scope.cancel()
    assert code != 0
    assert hellos and hellos[0]["v"] == p.PROTOCOL_VERSION
    lines = [line for line in cli.lines["stderr"] if line.strip()]
    assert len(lines) == 1, cli.describe()
    assert "protocol v2" in lines[0] and "upgrade" in lines[0]
    assert "Public URL" not in cli.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_ctrl_c_closes_the_tunnel_cleanly(tmp_path: Path, upstream: Upstream, signum: int) -> None:
    async with start_server(tmp_path / "data") as server, run_agent(upstream.port, server.ports.ws, tmp_path) as cli:
        alias = (await cli.wait_for(PUBLIC_URL)).group(2)
        assert server.tunnel(alias) is not None
        cli.signal(signum)
        assert await cli.wait_exit(within=5) == 0, cli.describe()
        # Quitting is said once, and nothing after it announces a reconnect that will never happen.
        assert cli.lines["stdout"][-1] == "Stopping.", cli.describe()
        assert "Connection lost" not in cli.stdout and "reconnecting" not in cli.stdout, cli.describe()
        assert cli.stderr == "", cli.describe()
        await eventually(lambda: not server.registry.entries(), what="the server to drop the tunnel")


class AgentHolder:
    """Runs one agent in its own task, so that it can outlive the server it first connects to."""

    def __init__(self, cwd: Path, tg: anyio.abc.TaskGroup) -> None:
        self.cwd = cwd
        self.tg = tg
        self.cli: Cli | None = None
        self.done = anyio.Event()

    async def start(self, port: int, ws_port: int) -> Cli:
        """Start the agent; it runs until the holder's block ends."""
        ready = anyio.Event()

        async def keep() -> None:
            async with run_agent(port, ws_port, self.cwd) as cli:
                self.cli = cli
                ready.set()
                await self.done.wait()

        self.tg.start_soon(keep)
        await ready.wait()
        assert self.cli is not None
        return self.cli


@asynccontextmanager
async def run_agent_holder(cwd: Path) -> AsyncIterator[AgentHolder]:
    """An :class:`AgentHolder`; the agent is killed when the block ends."""
    async with anyio.create_task_group() as tg:
        holder = AgentHolder(cwd, tg)
        try:
            yield holder
        finally:
            holder.done.set()


async def test_agent_survives_a_server_restart(tmp_path: Path, upstream: Upstream) -> None:
    async with run_agent_holder(tmp_path) as holder:
        async with start_server(tmp_path / "data") as first:
            ports = first.ports
            cli = await holder.start(upstream.port, ports.ws)
            alias = (await cli.wait_for(PUBLIC_URL)).group(2)
            async with visitor(first, alias) as client:
                assert (await client.get("/before")).status_code == 200
        await cli.wait_for(r"^Connection lost \(.+\); reconnecting in [\d.]+ s$")
        assert cli.process.returncode is None
        mark = len(cli.lines["stdout"])
        async with start_server(tmp_path / "data", http_port=ports.http, ws_port=ports.ws) as second:
            await cli.wait_for(rf"^Reconnected: http://{alias}\.localhost:{ports.http}$", start=mark)
            assert second.tunnel(alias) is not None
            async with visitor(second, alias) as client:
                response = await client.get("/after")
            assert response.status_code == 200
            assert response.json()["raw_path"] == "/after"


async def test_agent_tries_each_server_in_the_list(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server:
        with dead_port() as dead:
            env = agent_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{dead},ws://127.0.0.1:{server.ports.ws}")
            async with run_agent(upstream.port, None, tmp_path, env=env) as cli:
                alias = (await cli.wait_for(PUBLIC_URL)).group(2)
                assert server.tunnel(alias) is not None
                async with visitor(server, alias) as client:
                    assert (await client.get("/via-list")).status_code == 200


# -- The server ----------------------------------------------------------------------------
async def test_server_start_up_says_where_everything_is(tmp_path: Path) -> None:
    data_dir = tmp_path / "server-data"
    async with run_cli(SERVER, env=server_env(data_dir), cwd=tmp_path) as cli:
        banner = await wait_banner(cli)
        text = "\n".join(banner.lines)
        assert 0 not in (banner.http, banner.ws, banner.admin)
        assert len({banner.http, banner.ws, banner.admin}) == 3
        assert re.search(rf"tunnels at http://<alias>\.localhost:{banner.http}\b", text), text
        assert re.search(r"\bdomain\s+localhost$", text, re.M), text
        assert re.search(r"\bplugins\s+none$", text, re.M), text
        assert re.search(rf"\bdata\s+{re.escape(str(data_dir))}$", text, re.M), text
        assert data_dir.is_dir()
        # The ports named are the ones really listening.
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{banner.http}/", headers={"host": "nobody.localhost"})
            assert response.status_code == 404 and "Tunnel Not Active" in response.text
            admin = await client.get(f"http://127.0.0.1:{banner.admin}/")
            assert admin.status_code < 500
        ws = await connect(f"ws://127.0.0.1:{banner.ws}", 1 << 20)
        await ws.aclose()
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0, cli.describe()


async def test_server_accepts_the_seed_variable_names(tmp_path: Path) -> None:
    env = cli_env(COMZY_HOST="127.0.0.1", HTTP_PORT="0", WS_PORT="0", ADMIN_WS_PORT="0",
                  BASE_DOMAIN="example.test", COMZY_DATA_DIR=str(tmp_path / "data"), COMZY_PLUGINS="none")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        banner = await wait_banner(cli)
        text = "\n".join(banner.lines)
        assert re.search(r"\bdomain\s+example\.test$", text, re.M), text
        assert re.search(rf"tunnels at http://<alias>\.example\.test:{banner.http}\b", text), text
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{banner.http}/", headers={"host": "x.example.test"})
        assert response.status_code == 404
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0, cli.describe()


@pytest.mark.parametrize(("name", "value"), [
    ("COMZY_HTTP_PORT", "abc"),
    ("HTTP_PORT", "99999"),
    ("COMZY_PUBLIC_URL", "https://tunnel.example.com"),
])
async def test_a_bad_setting_fails_start_up_naming_the_variable(tmp_path: Path, name: str, value: str) -> None:
    env = server_env(tmp_path / "data")
    if not name.startswith("COMZY_"):
        env.pop(f"COMZY_{name}", None)
    env[name] = value
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code != 0
    assert name in cli.stderr, cli.describe()
    assert value in cli.stderr
    assert "Traceback" not in cli.stderr
    assert "ready" not in cli.stderr


async def test_sigterm_drains_in_flight_requests_then_exits(tmp_path: Path, upstream: Upstream) -> None:
    env = server_env(tmp_path / "data", COMZY_SHUTDOWN_GRACE="10")
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", upstream.port, on_served=reporter.served.append)
    try:
        async with run_cli(SERVER, env=env, cwd=tmp_path) as cli, anyio.create_task_group() as tg:
            banner = await wait_banner(cli)
            agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{banner.ws}"], port=upstream.port),
                          forwarder, reporter)
            tg.start_soon(agent.run)
            alias = (await reporter.wait_connected())["alias"]
            base = f"http://127.0.0.1:{banner.http}"
            headers = {"host": f"{alias}.localhost"}
            results: list[httpx.Response] = []
            answered = anyio.Event()

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=base, headers=headers, timeout=15) as client:
                    results.append(await client.get("/hang"))
                answered.set()

            tg.start_soon(in_flight)
            await eventually(lambda: any(s["path"] == "/hang" for s in upstream.requests),
                             what="the /hang request to reach the upstream")
            cli.signal(signal.SIGTERM)
            notice = await eventually(lambda: [m for _, m in reporter.notices if "shutting down" in m],
                                      what="the agent to get GOAWAY")
            assert "reconnect" in notice[0]

            # A new visitor is turned away (listener closed) while the old request is still served.
            with anyio.fail_after(5):
                while True:
                    if isinstance(await _try_new_request(base, headers), httpx.ConnectError):
                        break
                    await anyio.sleep(0.05)
            assert not results and cli.process.returncode is None
            upstream.gate("hang").set()
            with anyio.fail_after(10):
                await answered.wait()
            assert results[0].status_code == 200
            assert results[0].content == b"late\n"
            assert await cli.wait_exit() == 0, cli.describe()
            assert "SIGTERM" in cli.stderr
            await eventually(lambda: reporter.reconnects, what="the agent to start reconnecting")
            await agent.close()
            tg.cancel_scope.cancel()
    finally:
        await forwarder.aclose()


async def _try_new_request(base: str, headers: dict[str, str]) -> httpx.Response | httpx.HTTPError:
    """One request on a fresh connection; the response, or the error it ended with."""
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=2) as client:
        try:
            return await client.get("/fresh")
        except httpx.HTTPError as exc:
            return exc


async def test_tls_on_the_public_listener(tmp_path: Path, upstream: Upstream) -> None:
    cert, key = await self_signed_certificate(tmp_path)
    env = server_env(tmp_path / "data", SSL_CERT_PATH=str(cert), SSL_KEY_PATH=str(key))
    async with run_cli(SERVER, env=env, cwd=tmp_path) as server_cli:
        banner = await wait_banner(server_cli)
        assert re.search(rf"public\s+https://127\.0\.0\.1:{banner.http}\b", "\n".join(banner.lines))
        # The agent listener speaks TLS too: the agent trusts the self-signed certificate.
        async with run_agent(upstream.port, None, tmp_path, "--server", f"wss://localhost:{banner.ws}",
                             env=agent_env(SSL_CERT_FILE=str(cert))) as cli:
            scheme, alias, port = (await cli.wait_for(PUBLIC_URL)).groups()
            assert scheme == "https" and int(port) == banner.http
            async with httpx.AsyncClient(verify=False, timeout=10) as client:
                response = await client.get(f"https://127.0.0.1:{banner.http}/over-tls?q=1",
                                            headers={"host": f"{alias}.localhost"})
            assert response.status_code == 200
            info = response.json()
            assert info["raw_path"] == "/over-tls" and info["query_string"] == "q=1"
            forwarded = dict((k.lower(), v) for k, v in info["headers"])
            assert forwarded.get("x-forwarded-proto") == "https"
            await cli.wait_for(request_line("GET", "/over-tls?q=1", 200))
            # Plain HTTP on the TLS port does not reach the tunnel.
            async with httpx.AsyncClient(timeout=5) as client:
                with pytest.raises(httpx.HTTPError):
                    await client.get(f"http://127.0.0.1:{banner.http}/plain", headers={"host": f"{alias}.localhost"})
        server_cli.signal(signal.SIGTERM)
        assert await server_cli.wait_exit() == 0, server_cli.describe()


async def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost, made with ``openssl req``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl binary is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    await anyio.run_process([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                             "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
                             "subjectAltName=DNS:localhost,DNS:*.localhost,IP:127.0.0.1",
                             "-keyout", str(key), "-out", str(cert)])
    return cert, key
