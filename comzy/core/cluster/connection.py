"""A node's one NATS connection: connect (and keep connecting), subjects, the node lease.

One ``nats.Client`` per node on purpose: NATS keeps the order of one connection's messages to
one subscriber, which the link sequence numbers (link.py) rely on. It is a ``LinkClient``
(nats_client.py, re-exported here with ``PENDING_SIZE``).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgpack
import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.kv import KeyValue

from comzy import __version__
from comzy.core.cluster import ClusterError
from comzy.core.cluster.nats_client import PENDING_SIZE, LinkClient
from comzy.core.cluster.settings import ClusterSettings, mask_url
from comzy.core.logs import RateLimitedLog

log = logging.getLogger("comzy.cluster")

#: Room a link message needs beyond a request head: the link header, frame headers and the other
#: keys of the REQUEST map.
PAYLOAD_MARGIN = 64 * 1024
#: Longest wait between two attempts of the first connection.
CONNECT_BACKOFF_MAX = 5.0
#: nats-py options that bound how long a dead NATS server goes unnoticed (ping_interval x
#: (max_outstanding_pings + 1) s) and how fast a node reconnects (docs/design/cluster.md 1.7).
PING_INTERVAL = 5
MAX_OUTSTANDING_PINGS = 2
RECONNECT_TIME_WAIT = 0.5

Callback = Callable[[], Awaitable[None] | None]


class BusDown(Exception):
    """This node is not connected to NATS right now (the message says so, for a 502)."""

    def __init__(self, message: str = "this node cannot reach the cluster's message bus (NATS)") -> None:
        super().__init__(message)


class Subjects:
    """Every NATS subject and bucket name of one cluster (prefix ``comzy.<cluster>``)."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.prefix = f"comzy.{cluster}"
        #: Core tunnel events (up/down): route caches and fencing (WP2, WP3).
        self.tunnel_events = f"{self.prefix}.ev.tunnel"
        self.aliases_bucket = f"comzy_{cluster}_aliases"
        self.nodes_bucket = f"comzy_{cluster}_nodes"

    def tunnel(self, alias: str) -> str:
        """Requests to the node holding ``alias`` (lookup, close, notify); the first answer counts."""
        return f"{self.prefix}.t.{alias}"

    def link(self, dst: str, src: str) -> str:
        """Link messages from node ``src`` to node ``dst``."""
        return f"{self.prefix}.n.{dst}.l.{src}"

    def links_to(self, node: str) -> str:
        """Every link message to ``node`` (its one link subscription)."""
        return f"{self.prefix}.n.{node}.l.*"

    def no_responders(self, src: str, dst: str, epoch: int) -> str:
        """The reply subject of ``src``'s link messages to ``dst``: where nats-server's 503 lands
        when ``dst`` has gone. The epoch is in it so that a 503 for an old link never ends a new one."""
        return f"{self.prefix}.n.{src}.nr.{dst}.{epoch}"

    def no_responders_to(self, node: str) -> str:
        """Every 503 for ``node``'s link messages."""
        return f"{self.prefix}.n.{node}.nr.*.*"

    def rpc(self, node: str, op: str) -> str:
        """Node-directed requests (``evict``, ``tunnels``, ``ping``)."""
        return f"{self.prefix}.n.{node}.rpc.{op}"

    def bus(self, topic: str) -> str:
        """Plugin events on ``topic``."""
        return f"{self.prefix}.bus.{topic}"

    def gather(self, topic: str) -> str:
        """Scatter/gather requests on ``topic``."""
        return f"{self.prefix}.all.{topic}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node's lease: who it is, as it wrote itself into the nodes bucket."""

    id: str
    role: str
    name: str
    version: str
    started: float
    admin: str

    def encode(self) -> bytes:
        """The lease value (msgpack)."""
        return msgpack.packb({"role": self.role, "name": self.name, "version": self.version,
                              "started": self.started, "admin": self.admin})

    @classmethod
    def decode(cls, node_id: str, value: bytes) -> NodeInfo | None:
        """The lease ``value`` of ``node_id``; None if it is not one (another writer's garbage)."""
        try:
            data = msgpack.unpackb(value)
            return cls(node_id, str(data["role"]), str(data["name"]), str(data["version"]),
                       float(data["started"]), str(data["admin"]))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            return None


def tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    """The TLS context COMZY_NATS_TLS_* ask for, if any (a CA alone verifies the server)."""
    if settings.nats_tls_ca is None and settings.nats_tls_cert is None:
        return None
    context = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        context.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    return context


class NatsNode:
    """This node on NATS: its id, subjects, connection, JetStream buckets and lease.

    ``start`` connects (retrying until NATS answers: nats-py retries only reconnects) and puts
    the lease; nats-py then reconnects forever by itself, and the callbacks registered with
    ``on_disconnect``/``on_reconnect`` run on each change. ``stop`` deletes the lease and drains.
    """

    def __init__(self, settings: ClusterSettings, role: str, *, max_request_head: int, admin: str = "") -> None:
        self.settings = settings
        self.role = role
        self.node_id = f"{settings.node_name}-{secrets.token_hex(4)}"
        self.subjects = Subjects(settings.cluster_name)
        self.max_request_head = max_request_head
        #: The admin listener's URL, written into the lease (set before start()).
        self.admin = admin
        self.nc: LinkClient = LinkClient()
        self.js: JetStreamContext = None  # type: ignore[assignment]  # set by start()
        self.max_payload = 0
        self.started = time.time()
        self._on_disconnect: list[Callback] = []
        self._on_reconnect: list[Callback] = []
        self._on_lease_lost: list[Callback] = []
        self._on_slow_consumer: list[Callable[[str], None]] = []
        self._kv: dict[str, KeyValue] = {}
        self._lease_revision: int | None = None
        self._live: dict[str, NodeInfo] = {}
        self._stopping = False
        self._errors = RateLimitedLog(log, interval=10.0, level=logging.WARNING)
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- state and callbacks ------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the NATS connection is up."""
        return self.nc.is_connected

    def on_disconnect(self, callback: Callback) -> None:
        """Call ``callback`` whenever the NATS connection is lost (links close there)."""
        self._on_disconnect.append(callback)

    def on_reconnect(self, callback: Callback) -> None:
        """Call ``callback`` whenever nats-py has reconnected (subscriptions are replayed by then)."""
        self._on_reconnect.append(callback)

    def on_lease_lost(self, callback: Callback) -> None:
        """Call ``callback`` when this node's lease had expired and was recreated: other nodes may
        have taken its aliases meanwhile, so ownership must be reconciled (WP2)."""
        self._on_lease_lost.append(callback)

    def on_slow_consumer(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(subject)`` when nats-py dropped a message of ``subject`` because its
        subscription fell behind (the links concerned must end: they lost a message)."""
        self._on_slow_consumer.append(callback)

    async def _run_callbacks(self, callbacks: list[Callback], what: str) -> None:
        for callback in list(callbacks):
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one component's bug must not stop the others from hearing of it
                log.exception("cluster: a %s callback failed", what)

    async def _disconnected(self) -> None:
        if not self._stopping:
            log.warning("cluster: lost NATS (%s); reconnecting", self.settings.masked_url)
        await self._run_callbacks(self._on_disconnect, "disconnect")

    async def _reconnected(self) -> None:
        log.info("cluster: reconnected to NATS at %s", _masked(self.nc.connected_url))
        await self._run_callbacks(self._on_reconnect, "reconnect")
        if self._task_group is not None:
            # The lease may have expired while we were away: put it back now, not a third of a TTL later.
            self._task_group.start_soon(self._refresh_lease)

    async def _error(self, error: Exception) -> None:
        if isinstance(error, nats.errors.SlowConsumerError):
            for callback in list(self._on_slow_consumer):
                callback(error.subject)
        # nats-py reports each failed (re)connect attempt here: at most one line per 10 s.
        if self.js is None:  # not connected yet: nats-py 2.16 retries the first connect itself
            self._errors("cluster: cannot connect to NATS at %s: %s; retrying", self.settings.masked_url,
                         _describe(error))
        else:
            self._errors("cluster: NATS: %s", _describe(error))

    # -- start and stop -------------------------------------------------------------------
    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Connect (waiting as long as it takes), check NATS fits, put the lease, keep it fresh."""
        self._task_group = task_group
        await self._connect()
        self.max_payload = self.nc.max_payload
        needed = self.max_request_head + PAYLOAD_MARGIN
        if self.max_payload < needed:
            await self.nc.close()
            raise ClusterError(
                f"NATS max_payload {self.max_payload // 1024} KiB is too small for COMZY_MAX_REQUEST_HEAD="
                f"{self.max_request_head}: it must be at least {needed // 1024} KiB; raise max_payload in the "
                "NATS server's configuration or lower COMZY_MAX_REQUEST_HEAD")
        self.js = self.nc.jetstream(timeout=2.0)
        await self._refresh_lease()
        task_group.start_soon(self._lease_loop)

    async def _connect(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "servers": s.servers, "name": f"comzy {self.role} {self.node_id}",
            "error_cb": self._error, "disconnected_cb": self._disconnected, "reconnected_cb": self._reconnected,
            "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": RECONNECT_TIME_WAIT,
            "ping_interval": PING_INTERVAL, "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
            "pending_size": PENDING_SIZE, "connect_timeout": 2,
        }
        if s.nats_user is not None:
            options["user"] = s.nats_user
            options["password"] = s.nats_password.get_secret_value() if s.nats_password else ""
        if s.nats_token is not None:
            options["token"] = s.nats_token.get_secret_value()
        if s.nats_creds is not None:
            options["user_credentials"] = str(s.nats_creds)
        if s.nats_nkey_seed is not None:
            options["nkeys_seed"] = str(s.nats_nkey_seed)
        context = tls_context(s)
        if context is not None:
            options["tls"] = context
        # nats-py 2.16 with max_reconnect_attempts=-1 keeps trying the first connect itself (and
        # reports each failure to error_cb); older ones raise at once, so this loop retries them.
        delay = 0.1
        report = self._errors
        while True:
            client = LinkClient()
            try:
                await client.connect(**options)
            except Exception as exc:  # nats-py raises many kinds; all mean "not yet", and are logged
                with anyio.CancelScope(shield=True):
                    await client.close()
                report("cluster: cannot connect to NATS at %s: %s; retrying", s.masked_url, _describe(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)
                continue
            self.nc = client
            log.info("cluster: connected to NATS at %s as node %s", _masked(client.connected_url), self.node_id)
            return

    async def stop(self) -> None:
        """Delete the lease (other nodes see this one gone at once) and drain the connection."""
        self._stopping = True
        if self.connected and self._lease_revision is not None:
            with anyio.move_on_after(2.0):
                try:
                    await (await self.kv_nodes()).delete(self.node_id)
                except Exception as exc:  # the lease then expires by its TTL: only slower
                    log.warning("cluster: could not delete the lease: %s", _describe(exc))
        with anyio.move_on_after(5.0):
            try:
                if self.nc.is_connected:
                    await self.nc.drain()
            except Exception as exc:
                log.warning("cluster: draining NATS failed: %s", _describe(exc))
        if self.js is not None and not self.nc.is_closed:  # a client that never connected has nothing to close
            await self.nc.close()

    # -- buckets ----------------------------------------------------------------------------
    async def _bucket(self, name: str, ttl: float) -> KeyValue:
        kv = self._kv.get(name)
        if kv is not None:
            return kv
        storage = StorageType.FILE if self.settings.cluster_kv_storage == "file" else StorageType.MEMORY
        try:
            kv = await self.js.create_key_value(bucket=name, history=1, ttl=ttl, storage=storage,
                                                replicas=self.settings.cluster_kv_replicas, direct=True)
        except nats.js.errors.BadRequestError as exc:
            # Made before by a node with other settings (its TTL wins); use it as it is.
            log.warning("cluster: bucket %s exists with other settings (%s); using it as it is", name,
                        exc.description)
            kv = await self.js.key_value(name)
        self._kv[name] = kv
        return kv

    async def kv_nodes(self) -> KeyValue:
        """The bucket of node leases, ``comzy_<cluster>_nodes`` (TTL COMZY_CLUSTER_NODE_TTL)."""
        return await self._bucket(self.subjects.nodes_bucket, self.settings.cluster_node_ttl)

    async def kv_aliases(self) -> KeyValue:
        """The bucket of alias records, ``comzy_<cluster>_aliases`` (TTL COMZY_CLUSTER_ALIAS_TTL)."""
        return await self._bucket(self.subjects.aliases_bucket, self.settings.cluster_alias_ttl)

    # -- the lease ------------------------------------------------------------------------
    def info(self) -> NodeInfo:
        """This node's lease."""
        return NodeInfo(self.node_id, self.role, self.settings.node_name, __version__, self.started, self.admin)

    def live_nodes(self) -> dict[str, NodeInfo]:
        """The nodes whose lease was alive at the last scan (every TTL/3; this node included)."""
        return dict(self._live)

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.cluster_node_ttl / 3)
            await self._refresh_lease()

    async def _refresh_lease(self) -> None:
        """Put the lease (update with the revision we wrote last) and rescan the others."""
        if self._stopping or not self.connected:
            return
        try:
            kv = await self.kv_nodes()
            value = self.info().encode()
            if self._lease_revision is None:
                self._lease_revision = await kv.put(self.node_id, value)
            else:
                try:
                    self._lease_revision = await kv.update(self.node_id, value, last=self._lease_revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    # It expired (we were cut off longer than the TTL): others may hold our aliases now.
                    log.warning("cluster: node lease %s had expired; recreated it", self.node_id)
                    self._lease_revision = await kv.put(self.node_id, value)
                    await self._run_callbacks(self._on_lease_lost, "lease-lost")
            self._live = await self._scan(kv)
        except Exception as exc:  # NATS went away mid-way: the next refresh (or reconnect) retries
            self._errors("cluster: cannot refresh the node lease: %s", _describe(exc))

    async def _scan(self, kv: KeyValue) -> dict[str, NodeInfo]:
        watcher = await kv.watchall(ignore_deletes=True)
        live: dict[str, NodeInfo] = {}
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all delivered
                    break
                if entry.value:
                    info = NodeInfo.decode(entry.key, entry.value)
                    if info is not None:
                        live[entry.key] = info
        finally:
            await watcher.stop()
        return live


def _masked(url: Any) -> str:
    return mask_url(url.geturl()) if url is not None else "?"


def _describe(error: BaseException) -> str:
    """One line for a nats-py error (several have an empty str())."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
