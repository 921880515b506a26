"""Fixtures for cluster tests: a real nats-server of the test's own (port and store), and nodes.

Debian's ``nats-server`` runs on a free port (``-p -1``) with JetStream in the test's temporary
directory, never the machine's 4222 service. Its port and readiness come from its log lines, so
nothing sleeps. Without ``/usr/sbin/nats-server`` the tests skip, except under CI=true where
they fail (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.helpers import unavailable

NATS_SERVER = Path(os.environ.get("COMZY_TEST_NATS_SERVER", "/usr/sbin/nats-server"))
LISTENING = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
READY = "Server is ready"
#: How long nats-server may take to start (JetStream recovers its store first).
START_TIMEOUT = 20.0


class NatsServer:
    """One nats-server process with JetStream; restartable on the same port and store."""

    def __init__(self, store: Path, *extra: str) -> None:
        self.store = store
        self.extra = extra
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """The client URL (valid after start)."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it (on the port it had before, if any) and wait for its "ready" line."""
        assert self.process is None, "already running"
        port = str(self.port) if self.port else "-1"
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [str(NATS_SERVER), "-a", "127.0.0.1", "-p", port, "-js", "-sd", str(self.store), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        # A thread keeps reading its log, so a chatty server never blocks on a full pipe.
        self._thread = threading.Thread(target=self._pump, args=(self.process,), daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or not self.port:
            self.kill9()
            raise AssertionError("nats-server did not get ready:\n" + "\n".join(self.lines[-30:]))

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line.rstrip())
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
            if READY in line:
                self._ready.set()
        self._ready.set()  # it exited: wake start() so it reports the log

    def kill9(self) -> None:
        """``kill -9`` it (its own PID only) and reap it."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self._thread.join(5)  # it reads to the end of the log, which comes with the exit
            assert self.process.stderr is not None
            self.process.stderr.close()
            self.process = None

    def restart(self) -> None:
        """Start it again on the same port and store (after kill9)."""
        self.kill9()
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server with JetStream, on a free port, store under the test's tmp_path."""
    if not NATS_SERVER.is_file():
        unavailable(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill9()


def cluster_settings(nats: NatsServer, **overrides: Any) -> Any:
    """ClusterSettings for a node of a test cluster on ``nats`` (short TTLs: tests wait on them)."""
    from comzy.core.cluster.settings import ClusterSettings

    values: dict[str, Any] = {"nats_url": nats.url, "cluster_name": "test", "node_name": "t",
                              "cluster_node_ttl": 1.0, "cluster_link_timeout": 2.0}
    values.update(overrides)
    return ClusterSettings(_env_file=None, **values)


@asynccontextmanager
async def nats_node(nats: NatsServer, role: str = "control", **overrides: Any) -> AsyncIterator[Any]:
    """A started NatsNode (no links), stopped on the way out."""
    from comzy.core.cluster.connection import NatsNode

    node = NatsNode(cluster_settings(nats, **overrides), role, max_request_head=65536)
    async with anyio.create_task_group() as tg:
        await node.start(tg)
        try:
            yield node
        finally:
            await node.stop()
            tg.cancel_scope.cancel()


async def wait_linkable(opener: Any, acceptor: Any, timeout: float = 10.0) -> None:
    """Wait until ``opener``'s NATS connection sees ``acceptor``'s link subscription.

    Stock nats-py (2.16) writes ``flush()``'s PING ahead of a SUB still queued for its flusher, so
    the PONG can come before the server has the subscription, and another connection's publish
    then finds none (measured 2-4% of first publishes; tests/cluster/test_nats_flush.py).
    ``LinkClient`` orders them, but a test's other clients are stock nats-py, and after a NATS
    restart the replayed subscriptions arrive later still. A test that links two nodes it has just
    started waits for this; in a running cluster an edge
    links to a node only after that node answered a lookup, long after it subscribed. The probe
    is a BYE for no link, which the acceptor ignores; "no responders" means not yet.
    """
    import nats.errors

    from comzy.core.cluster.link import LinkKind, encode_header

    subject = opener.subjects.link(acceptor.node_id, "probe")
    with anyio.fail_after(timeout):
        while True:
            try:
                await opener.nc.request(subject, encode_header(LinkKind.BYE, 0, 0), timeout=0.2)
            except nats.errors.NoRespondersError:
                continue
            except nats.errors.TimeoutError:
                return  # delivered, and (as it should) not answered
            return


@asynccontextmanager
async def control_node(nats: NatsServer, data_dir: Path, plugins: Any = (), **overrides: Any) -> AsyncIterator[Any]:
    """An in-process control node (``run_server`` with role control) of a test cluster on ``nats``."""
    from comzy.core.server import run_server
    from tests.conftest import make_settings

    settings = make_settings(data_dir, role="control", public_url="http://{alias}.localhost", **overrides)
    async with run_server(settings, plugins, cluster_settings=cluster_settings(nats)) as server:
        yield server


async def raw_hello(server: Any, **hello: Any) -> tuple[Any, Any]:
    """A raw agent connection to ``server``: HELLO (``hello`` overrides its keys) and the first frame
    answered (WELCOME or REJECT), for tests that read exactly what the server sends."""
    from comzy.core import protocol as p
    from comzy.core.websocket import connect

    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", 4 * 1024 * 1024)
    await ws.send(p.encode(p.FrameType.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "raw/1", "port": 1, **hello}))
    message = await ws.receive()
    assert isinstance(message, bytes), message
    [frame] = p.decode_message(message)
    return ws, frame


async def read_record(node: Any, alias: str) -> Any:
    """The alias record as the test's own NATS client reads it."""
    import nats.js.errors

    from comzy.core.cluster.records import Record

    kv = await node.kv_aliases()
    try:
        entry = await kv.get(alias)
    except nats.js.errors.KeyNotFoundError:
        return None
    return Record.decode(alias, entry.value, entry.revision or 0)


async def wait_record(node: Any, alias: str, condition: Any, timeout: float = 10.0) -> Any:
    """Poll the alias record until ``condition(record)`` holds (it changes after an await elsewhere)."""
    with anyio.fail_after(timeout):
        while True:
            record = await read_record(node, alias)
            if condition(record):
                return record
            await anyio.sleep(0.01)


async def tunnel_request(node: Any, alias: str, op: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """An op on ``P.t.<alias>`` from ``node``'s client; its msgpack answer. "No responders" is
    retried until ``timeout``: right after a WELCOME another connection may not see the holder's
    subscription yet (the nats-server race of ``wait_linkable``)."""
    import msgpack
    import nats.errors

    with anyio.fail_after(timeout):
        while True:
            try:
                reply = await node.nc.request(node.subjects.tunnel(alias), msgpack.packb(op), timeout=5)
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.01)
                continue
            answer: dict[str, Any] = msgpack.unpackb(reply.data)
            return answer
