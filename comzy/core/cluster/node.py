"""``ClusterNode``: the composition root of a node in role edge or control.

It owns the node's NATS connection (``NatsNode``) and its links (``Links``), and starts and stops
the components the roles add (ownership and relay on control nodes, the route cache on edges,
the operator bus on both: docs/design/cluster.md section 6). A component is any object with
``async start()`` and ``async stop()``, registered with ``register`` before ``start``; components
start in registration order, once NATS is connected and the links are listening, and stop in the
reverse order, before the links close and NATS drains.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from comzy.core.cluster.connection import NatsNode
from comzy.core.cluster.control_relay import attach_control
from comzy.core.cluster.edge_router import EdgeRouter
from comzy.core.cluster.link import Links
from comzy.core.cluster.settings import ClusterSettings

if TYPE_CHECKING:
    from comzy.core.server import ServerContext

log = logging.getLogger("comzy.cluster")


class Component(Protocol):
    """A part of a cluster node with a lifetime (started after NATS, stopped before it)."""

    async def start(self) -> None:
        """Begin: subscribe, open buckets, start background work in ``node.task_group``."""

    async def stop(self) -> None:
        """End: release what ``start`` took; NATS is still connected."""


class ClusterNode:
    """One node of the cluster: NATS, links and the role's components, for a ``ServerContext``."""

    def __init__(self, server: ServerContext, settings: ClusterSettings) -> None:
        self.server = server
        self.settings = settings
        self.role = server.settings.role
        self.nats = NatsNode(settings, self.role, max_request_head=server.settings.max_request_head)
        self.links = Links(self.nats, link_timeout=settings.cluster_link_timeout,
                           window=server.settings.stream_window)
        #: The server's task group (set by start): components run their background tasks in it.
        self.task_group: anyio.abc.TaskGroup | None = None
        self._components: list[Component] = []
        self._started: list[Component] = []
        if self.role == "control":  # ownership and the relay (docs/design/cluster.md 2, 1.4-1.6)
            attach_control(self)
        if self.role == "edge":  # the route cache that EdgeApp asks for aliases it does not hold
            server.router = EdgeRouter(self)
            self.register(server.router)

    @property
    def node_id(self) -> str:
        """This node's id, ``<COMZY_NODE_NAME>-<8 hex>``."""
        return self.nats.node_id

    def register(self, component: Component) -> None:
        """Add a component (before ``start``); it starts and stops with the node."""
        if self.task_group is not None:
            raise RuntimeError("register components before the cluster node starts")
        self._components.append(component)

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Connect to NATS (waiting until it answers), listen for links, start the components."""
        self.task_group = task_group
        ports, s = self.server.ports, self.server.settings
        self.nats.admin = f"http://{s.admin_host}:{ports.admin}"
        await self.nats.start(task_group)
        await self.links.start(task_group)
        for component in self._components:
            await component.start()
            self._started.append(component)

    async def stop(self) -> None:
        """Stop the components (last started first), end the links, delete the lease, drain NATS."""
        with anyio.CancelScope(shield=True):
            for component in reversed(self._started):
                try:
                    await component.stop()
                except Exception:  # the others (and the lease, and NATS) must still be released
                    log.exception("cluster: stopping %s failed", type(component).__name__)
            self._started.clear()
            await self.links.stop()
            await self.nats.stop()

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` adds on a cluster node."""
        return {"role": self.role, "node": self.node_id,
                "nats": "connected" if self.nats.connected else "disconnected",
                "links": len(self.links), "nodes_seen": len(self.nats.live_nodes())}
