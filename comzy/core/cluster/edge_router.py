"""The edge's route cache: which control node holds an alias, and the link session to it.

An edge holds no agent sessions. For an alias its registry does not know, it asks the cluster with
one NATS request on ``P.t.<alias>`` (the control node holding the alias answers; the first answer
counts), opens (or reuses) the link to that node and keeps the answer as a ``RouteEntry`` in a
bounded LRU cache, so the steady state costs no NATS round trip per visitor request. Unknown
aliases go into a small negative cache, so a flood of requests for hosts nobody serves does not
cost one NATS request each (docs/design/cluster.md 1.2 and 1.4).

Entries are dropped when a tunnel event names another session (or ``down``) for the alias, when the
link to the node dies, when the node answers a request with RESET MOVED, and when NATS is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import nats.errors
from nats.aio.msg import Msg

from comzy.core.cluster.connection import BusDown
from comzy.core.logs import RateLimitedLog
from comzy.core.session import Session
from comzy.core.types import Tunnel

if TYPE_CHECKING:
    from comzy.core.cluster.node import ClusterNode

log = logging.getLogger("comzy.cluster")

#: Aliases whose route an edge remembers (least recently used go first).
CACHE_SIZE = 65_536
#: Aliases remembered as held by nobody, and for how long (seconds): a tunnel that comes up is
#: announced on the tunnel events and clears its entry at once, so this only bounds a lost event.
NEGATIVE_SIZE = 10_000
NEGATIVE_TTL = 2.0
#: The lookup request, the same bytes every time.
LOOKUP = msgpack.packb({"op": "lookup"})
#: Bounds on the wait a holder may ask for before the next lookup (``{"retry": seconds}``).
MIN_RETRY = 0.01
MAX_RETRY = 0.5


class RouteError(Exception):
    """A lookup failed in a way the visitor is told about: ``status`` and the sentence (one line)."""

    status = 502


class LookupTimeout(RouteError):
    """The node holding the alias did not answer within COMZY_CLUSTER_LOOKUP_TIMEOUT: 504."""

    status = 504

    def __init__(self, alias: str, timeout: float) -> None:
        super().__init__(f"the control node holding {alias} did not answer the lookup within {timeout:g} s")


class BadLookupReply(RouteError):
    """The lookup's answer is not what the protocol says (a node of another version, or a bug): 502."""

    def __init__(self, alias: str, why: str) -> None:
        super().__init__(f"the control node holding {alias} answered the lookup with a malformed reply ({why})")


@dataclass(slots=True)
class RouteEntry:
    """Where an alias is served from, as an edge's ``EdgeApp`` uses it.

    ``tunnel`` and ``session`` mirror ``registry.Entry`` (``tunnel`` is the control node's snapshot
    at lookup time; ``session`` is the link session to ``node``). A stream for it is opened with
    ``session.open_stream(window=stream_window, credit=peer_window)`` and its REQUEST payload gets
    ``head_extra`` ({"al": alias, "ts": tunnel session}) so the control node can relay it.
    """

    tunnel: Tunnel
    session: Session
    node: str
    #: The agent's HELLO window: the credit an edge stream starts with (credit is end to end).
    peer_window: int
    #: The control node's stream window (what the agent was told in WELCOME): the edge's receive window.
    stream_window: int
    head_extra: dict[str, Any]


class EdgeRouter:
    """An edge's route cache (``server.router``): ``cached`` (sync) and ``lookup`` (one NATS request).

    It is a ``ClusterNode`` component: ``start`` subscribes to the tunnel events, ``stop`` ends that.
    """

    def __init__(self, cluster: ClusterNode, *, cache_size: int = CACHE_SIZE,
                 negative_size: int = NEGATIVE_SIZE, negative_ttl: float = NEGATIVE_TTL) -> None:
        self.cluster = cluster
        self.nats = cluster.nats
        self.links = cluster.links
        self.timeout = cluster.settings.cluster_lookup_timeout
        self.cache_size = cache_size
        self.negative_size = negative_size
        self.negative_ttl = negative_ttl
        self._routes: OrderedDict[str, RouteEntry] = OrderedDict()
        #: node id -> aliases cached for it, so a dead link drops its entries without a scan.
        self._by_node: dict[str, set[str]] = {}
        #: alias -> monotonic time until which it counts as held by nobody.
        self._negative: OrderedDict[str, float] = OrderedDict()
        #: Lookups in flight: concurrent visitors of a cold alias share one NATS request. Each runs
        #: in a task of its own, so a visitor who leaves does not cancel it for the others.
        self._inflight: dict[str, asyncio.Task[RouteEntry | None]] = {}
        self._subscription: Any = None
        self._noise = RateLimitedLog(log, interval=10.0)
        self.links.on_link_closed(self._link_closed)
        self.nats.on_disconnect(self.clear)
        self.nats.on_reconnect(self.clear)

    def __len__(self) -> int:
        return len(self._routes)

    # -- lifetime (ClusterNode component) ---------------------------------------------------
    async def start(self) -> None:
        """Listen to the tunnel events (route invalidation)."""
        nc = self.nats.nc
        self._subscription = await nc.subscribe(self.nats.subjects.tunnel_events, cb=self._on_event)
        await nc.flush()

    async def stop(self) -> None:
        """Stop listening; forget every route."""
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()
            self._subscription = None
        for task in list(self._inflight.values()):
            task.cancel()
        self.clear()

    # -- the edge's questions ------------------------------------------------------------------
    def cached(self, alias: str) -> RouteEntry | None:
        """The cached route for ``alias`` whose link is still up (no await, no NATS)."""
        entry = self._routes.get(alias)
        if entry is None:
            return None
        if entry.session.closed is not None:
            self._drop(alias)  # its link ended; the link-closed callback may not have run yet
            return None
        self._routes.move_to_end(alias)
        return entry

    async def lookup(self, alias: str) -> RouteEntry | None:
        """Ask the cluster who holds ``alias``; None when nobody does (404).

        Raises ``LookupTimeout`` (504), ``BadLookupReply`` (502) or ``BusDown`` (502, this edge is
        not connected to NATS). Concurrent calls for one alias share one request.
        """
        entry = self.cached(alias)
        if entry is not None:
            return entry
        until = self._negative.get(alias)
        if until is not None:
            if until > time.monotonic():
                return None
            del self._negative[alias]
        task = self._inflight.get(alias)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(alias))
            self._inflight[alias] = task
            task.add_done_callback(lambda done: self._asked(alias, done))
        return await asyncio.shield(task)

    def _asked(self, alias: str, task: asyncio.Task[RouteEntry | None]) -> None:
        if self._inflight.get(alias) is task:
            del self._inflight[alias]
        if not task.cancelled():
            task.exception()  # its callers re-raise it; when all of them left, it is not "never retrieved"

    async def _ask(self, alias: str) -> RouteEntry | None:
        """One lookup: asked again, within the one timeout, while the holder says to retry."""
        deadline = time.monotonic() + self.timeout
        while True:
            if not self.nats.connected:
                raise BusDown("this edge cannot reach the cluster's message bus (NATS)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LookupTimeout(alias, self.timeout)
            try:
                msg = await self.nats.nc.request(self.nats.subjects.tunnel(alias), LOOKUP, timeout=left)
            except nats.errors.NoRespondersError:
                self._remember_nobody(alias)
                return None
            except nats.errors.TimeoutError:
                raise LookupTimeout(alias, self.timeout) from None
            except nats.errors.Error as exc:  # closed, reconnecting, draining: the bus is not there
                raise BusDown(f"this edge cannot reach the cluster's message bus (NATS): {exc}") from None
            reply = self._reply(alias, msg.data)
            retry = reply.get("retry")
            if retry is None:
                entry = self._entry(alias, reply)
                self._store(entry)
                return entry
            # The holder is re-checking its claim (after a NATS reconnect or a lost lease): ask again
            # shortly, bounded by the lookup's timeout, rather than wait it out as for a silent node.
            if not isinstance(retry, (int, float)) or isinstance(retry, bool):
                raise BadLookupReply(alias, f"'retry' is {type(retry).__name__}, not a number of seconds")
            await asyncio.sleep(min(max(float(retry), MIN_RETRY), MAX_RETRY, max(deadline - time.monotonic(), 0.0)))

    @staticmethod
    def _reply(alias: str, data: bytes) -> dict[str, Any]:
        try:
            reply = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadLookupReply(alias, f"{type(exc).__name__}: {exc}") from None
        if not isinstance(reply, dict):
            raise BadLookupReply(alias, f"a {type(reply).__name__}, not a map")
        return reply

    def _entry(self, alias: str, reply: dict[str, Any]) -> RouteEntry:
        try:
            node, session = reply["node"], reply["session"]
            if not isinstance(node, str) or not node or not isinstance(session, int):
                raise TypeError("node or session of the wrong type")
            tunnel = Tunnel.from_view({**reply["tunnel"], "session": session}, node)
            peer_window, stream_window = int(reply["aw"]), int(reply["sw"])
            if peer_window <= 0 or stream_window <= 0:
                raise ValueError("windows must be positive")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise BadLookupReply(alias, f"{type(exc).__name__}: {exc}") from None
        if tunnel.alias != alias:
            raise BadLookupReply(alias, f"it names {tunnel.alias!r}")
        link = self.links.get(node)  # BusDown when NATS went away meanwhile
        return RouteEntry(tunnel=tunnel, session=link, node=node, peer_window=peer_window,
                          stream_window=stream_window, head_extra={"al": alias, "ts": session})

    # -- the cache -----------------------------------------------------------------------------
    def _store(self, entry: RouteEntry) -> None:
        alias = entry.tunnel.alias
        if alias in self._routes:
            self._drop(alias)
        self._routes[alias] = entry
        self._by_node.setdefault(entry.node, set()).add(alias)
        self._negative.pop(alias, None)
        while len(self._routes) > self.cache_size:
            self._drop(next(iter(self._routes)))

    def _remember_nobody(self, alias: str) -> None:
        self._negative[alias] = time.monotonic() + self.negative_ttl
        self._negative.move_to_end(alias)
        while len(self._negative) > self.negative_size:
            self._negative.popitem(last=False)

    def _drop(self, alias: str) -> None:
        entry = self._routes.pop(alias, None)
        if entry is not None:
            aliases = self._by_node.get(entry.node)
            if aliases is not None:
                aliases.discard(alias)
                if not aliases:
                    del self._by_node[entry.node]

    def invalidate(self, alias: str, node: str | None = None, session: int | None = None) -> None:
        """Forget ``alias``'s route (only if it still points at ``node``/``session`` when given),
        and that nobody held it."""
        self._negative.pop(alias, None)
        entry = self._routes.get(alias)
        if entry is None:
            return
        if (node is None or entry.node == node) and (session is None or entry.tunnel.session == session):
            self._drop(alias)

    def clear(self) -> None:
        """Forget everything (NATS lost or back: the cluster may have changed meanwhile)."""
        self._routes.clear()
        self._by_node.clear()
        self._negative.clear()

    # -- invalidation sources ----------------------------------------------------------------------
    def _link_closed(self, peer: str, reason: str) -> None:
        for alias in list(self._by_node.get(peer, ())):
            self._drop(alias)

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = msgpack.unpackb(msg.data)
            op, alias = event["op"], event["alias"]
            node, session = event.get("node"), event.get("session")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            self._noise("cluster: dropped a malformed tunnel event")
            return
        if not isinstance(alias, str):
            return
        self._negative.pop(alias, None)  # up or down: what we knew about nobody holding it is stale
        entry = self._routes.get(alias)
        if entry is None:
            return
        if op == "up" and entry.node == node and entry.tunnel.session == session:
            return  # our own route announced again
        if op == "down" and (entry.node != node or entry.tunnel.session != session):
            return  # an older session went down; the one we route to is newer
        self._drop(alias)
