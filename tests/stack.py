"""The fidelity suites' stack: the same tests on role ``all`` and through an edge of a cluster.

A test module imports the fixtures below (``stacks``, ``stack``, ``tunnel``, which replaces the
conftest's); each of its tests then runs twice (docs/design/cluster.md 5, scenario 9):

- ``all``: one in-process server, as every other test uses (no NATS);
- ``cluster``: a real nats-server of the test's own (port and store), an edge and a control node
  in the test's loop. Visitors talk to the edge's public listener; the agent connects to the
  control node; every stream crosses NATS over a link and the control node's relay.

Without ``/usr/sbin/nats-server`` the cluster variants skip, except under CI=true where they fail
(``tests.helpers.unavailable``), as tests/cluster does.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.core.cluster.settings import ClusterSettings
from comzy.core.server import ServerContext, run_server
from tests.cluster.conftest import NATS_SERVER, NatsServer, cluster_settings
from tests.conftest import RunningAgent, make_settings, start_agent, visitor
from tests.helpers import unavailable
from tests.upstream import Upstream

KINDS = ["all", "cluster"]
DEFAULT_NODE_TTL = ClusterSettings.model_fields["cluster_node_ttl"].default
DEFAULT_LINK_TIMEOUT = ClusterSettings.model_fields["cluster_link_timeout"].default
_names = itertools.count()


@dataclass
class Stack:
    """A running stack: where visitors go (``public``) and where agents connect (``control``).

    On role ``all`` both are the same server. Through an edge, ``public`` is the edge (it holds no
    tunnels: its ``tunnel(alias)`` is a route snapshot) and ``control`` the node that holds the
    tunnels and counts their streams.
    """

    kind: str
    public: ServerContext
    control: ServerContext

    @asynccontextmanager
    async def agent(self, port: int, rewrite_host: bool = False, **config: Any) -> AsyncIterator[RunningAgent]:
        """An agent for local ``port`` on the control side, reachable through ``public`` when the block starts."""
        async with start_agent(self.control, port, rewrite_host, **config) as running:
            running.public = self.public
            if self.public is not self.control:
                await reachable(self.public, running.alias)
            yield running

    def visitor(self, alias: str, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client for ``alias`` on the public listener."""
        return visitor(self.public, alias, **kwargs)


class Stacks:
    """Starts stacks of one kind for a test (``stacks.start(...)``); the ``stack`` fixture is one
    with the default settings."""

    def __init__(self, kind: str, tmp_path: Path, nats: NatsServer | None = None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        #: A running nats-server the caller gave (and stops), else the test's own, started on first use.
        self._nats = nats
        self._own = nats is None

    def nats(self) -> NatsServer:
        """The nats-server the cluster nodes use."""
        if self._nats is None:
            if not NATS_SERVER.is_file():
                unavailable(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
            self._nats = NatsServer(self.tmp_path / "nats")
            self._nats.start()
        return self._nats

    @asynccontextmanager
    async def start(self, plugins: Any = (), edge_plugins: Any = None, **overrides: Any) -> AsyncIterator[Stack]:
        """A running stack; ``overrides`` (ServerSettings fields) and ``plugins`` apply to every node,
        as a deployment gives each node the same configuration (``edge_plugins``, when given, the
        edge's instead: a cluster configured unevenly)."""
        number = next(_names)
        data = self.tmp_path / f"stack{number}"
        if self.kind == "all":
            async with run_server(make_settings(data, **overrides), plugins) as server:
                yield Stack("all", server, server)
            return
        nats = self.nats()
        # A cluster name per stack: two stacks of one test (or a leftover lease) never share subjects.
        # The default lease and link timeouts, not the failover tests' short ones: these tests wait on
        # no expiry, and on a loaded machine a 1 s lease (refreshed every 0.33 s by a loop that also
        # runs the agent, the upstream and the visitors) can lapse, which fences the node's tunnels.
        cluster = {"cluster_name": f"fid{number}", "cluster_node_ttl": DEFAULT_NODE_TTL,
                   "cluster_link_timeout": DEFAULT_LINK_TIMEOUT}
        edge_settings = make_settings(data / "edge", role="edge", **overrides)
        async with run_server(edge_settings, plugins if edge_plugins is None else edge_plugins,
                              cluster_settings(nats, node_name="edge", **cluster)) as edge:
            control_settings = make_settings(data / "ctl", role="control",
                                             public_url=f"http://{{alias}}.localhost:{edge.ports.http}", **overrides)
            async with run_server(control_settings, plugins, cluster_settings(nats, node_name="ctl", **cluster)) \
                    as control:
                # No wait_linkable (0.2 s a stack): the edge opens its link to the control node
                # only once that node has answered for a tunnel (``reachable``), long after it
                # subscribed to its link subject, as in a running cluster.
                yield Stack("cluster", edge, control)

    def close(self) -> None:
        """Stop the nats-server this factory started."""
        if self._own and self._nats is not None:
            self._nats.kill9()


async def reachable(edge: ServerContext, alias: str, timeout: float = 10.0) -> None:
    """Wait until ``edge``'s NATS connection reaches the subscription of ``alias``'s holder.

    The holder subscribes before its WELCOME, yet nats-server sometimes routes another
    connection's request as if a subscription made a moment ago did not exist (the race of
    tests/cluster/conftest.wait_linkable); a visitor right after the WELCOME would get a 404. A
    probe that is answered (the holder answers an unknown op with an error) or times out got
    there; the holder's link subscription, made when it started, is then reachable too.
    """
    import msgpack
    import nats.errors

    assert edge.cluster is not None
    nc, subject = edge.cluster.nats.nc, edge.cluster.nats.subjects.tunnel(alias)
    with anyio.fail_after(timeout):
        while True:
            try:
                await nc.request(subject, msgpack.packb({"op": "probe"}), timeout=0.2)
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.01)
                continue
            except nats.errors.TimeoutError:
                return
            return


# Named apart from the fixtures they define, so a test module imports them without its tests'
# parameters shadowing the import: ``from tests.stack import stacks_fixture, stack_fixture, tunnel_fixture``.
@pytest.fixture(params=KINDS, name="stacks")
def stacks_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stacks]:
    """A factory of stacks of one kind, ``all`` or ``cluster`` (the parameter)."""
    factory = Stacks(request.param, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(name="stack")
async def stack_fixture(stacks: Stacks) -> AsyncIterator[Stack]:
    """A running stack with the default test settings."""
    async with stacks.start() as running:
        yield running


@pytest.fixture(name="tunnel")
async def tunnel_fixture(stack: Stack, upstream: Upstream) -> AsyncIterator[RunningAgent]:
    """The conftest's ``tunnel`` on the stack: visitors reach it through ``tunnel.public``."""
    async with stack.agent(upstream.port) as running:
        yield running
