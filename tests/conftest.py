"""Shared fixtures: a real server, a real agent and a real upstream, all on port 0."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder, Served
from comzy.core.control import Welcome
from comzy.core.server import ServerContext, run_server
from comzy.core.settings import ServerSettings
from tests.private_mariadb import private_mariadb  # noqa: F401 (a fixture: a MariaDB a test may stop)
from tests.upstream import Upstream, serve_upstream

ROOT = Path(__file__).resolve().parent.parent

# Property tests check behaviour, never speed (speed is the benchmark's job, bench/): Hypothesis's
# 200 ms deadline per example failed a codec test at load 10 on a shared machine.
hypothesis_settings.register_profile("comzy", deadline=None)
hypothesis_settings.load_profile("comzy")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings for a test server: loopback, free ports, no plugins, no .env."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": 0,
        "ws_port": 0,
        "admin_port": 0,
        "admin_host": "127.0.0.1",
        "data_dir": data_dir,
        "plugins": "none",
        "shutdown_grace": 5.0,
    }
    if os.environ.get("COMZY_TEST_HTTP_SERVER"):  # run the suite on another public listener server
        values["http_server"] = os.environ["COMZY_TEST_HTTP_SERVER"]
    values.update(overrides)
    return ServerSettings(_env_file=None, **values)


class RecordingReporter:
    """An agent reporter that records events and signals the first connection."""

    def __init__(self) -> None:
        self.welcomes: list[dict[str, Any]] = []
        self.notices: list[tuple[str, str]] = []
        self.reconnects: list[str] = []
        self.served: list[Served] = []
        self._connected = anyio.Event()

    def connected(self, welcome: Welcome, first: bool) -> None:
        # Kept as the wire map: tests read the documented WELCOME keys (docs/protocol.md).
        self.welcomes.append(welcome.to_payload())
        self._connected.set()

    def reconnecting(self, reason: str, delay: float) -> None:
        self.reconnects.append(reason)
        self._connected = anyio.Event()

    def notice(self, level: str, message: str) -> None:
        self.notices.append((level, message))

    async def wait_connected(self) -> dict[str, Any]:
        await self._connected.wait()
        return self.welcomes[-1]


class RunningAgent:
    """A live in-process agent and what it reported."""

    def __init__(self, agent: Agent, reporter: RecordingReporter, server: ServerContext) -> None:
        self.agent = agent
        self.reporter = reporter
        #: The server the agent connected to (a control node, in a cluster).
        self.server = server
        #: Where visitors reach the tunnel: ``server`` itself, or an edge (tests/stack.py).
        self.public = server

    @property
    def alias(self) -> str:
        assert self.agent.alias is not None
        return self.agent.alias

    @property
    def url(self) -> str:
        return str(self.reporter.welcomes[-1]["url"])

    def visitor(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client that reaches this tunnel through the public listener."""
        return visitor(self.public, self.alias, **kwargs)


def visitor(server: ServerContext, alias: str, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client for ``alias`` on ``server``'s public listener."""
    kwargs.setdefault("timeout", 30.0)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.http}",
                             headers={"host": f"{alias}.{server.settings.base_domain}"}, **kwargs)


@asynccontextmanager
async def start_server(data_dir: Path, plugins: Any = (), **overrides: Any) -> AsyncIterator[ServerContext]:
    """A running in-process server."""
    async with run_server(make_settings(data_dir, **overrides), plugins) as server:
        yield server


@asynccontextmanager
async def start_agent(server: ServerContext, port: int, rewrite_host: bool = False,
                      **config: Any) -> AsyncIterator[RunningAgent]:
    """A running in-process agent for local ``port``, connected when the block starts."""
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", port, rewrite_host=rewrite_host, on_served=reporter.served.append)
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=port, **config),
                  forwarder, reporter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        await reporter.wait_connected()
        yield RunningAgent(agent, reporter, server)
        await agent.close()
        tg.cancel_scope.cancel()
    await forwarder.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with serve_upstream() as app:
        yield app


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerContext]:
    async with start_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
async def tunnel(server: ServerContext, upstream: Upstream) -> AsyncIterator[RunningAgent]:
    async with start_agent(server, upstream.port) as running:
        yield running


def admin_client(server: ServerContext, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client for the admin listener, with the admin token."""
    assert server.admin_token is not None
    kwargs.setdefault("timeout", 30.0)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.admin}",
                             headers={"authorization": f"Bearer {server.admin_token.value}"}, **kwargs)


#: Where COMZY_NATS_URL points unless a test gives its own nats-server (tests/cluster/conftest.py):
#: the discard port, so a test that forgets fails fast and never reaches the machine's 4222 service.
DEAD_NATS_URL = "nats://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _no_machine_nats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_NATS_URL", DEAD_NATS_URL)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the console scripts in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMZY_", "HTTP_PORT", "WS_PORT"))}
    env["COMZY_NATS_URL"] = DEAD_NATS_URL  # a cluster node a test starts needs the test's own NATS
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    if os.environ.get("COMZY_TEST_HTTP_SERVER"):
        env["COMZY_HTTP_SERVER"] = os.environ["COMZY_TEST_HTTP_SERVER"]
    env.update(extra)
    return env


PYTHON = sys.executable
