"""``server.bus``: events and scatter/gather between the nodes, for plugins and the operator view.

One interface, two implementations, so a plugin is written once (docs/design/cluster.md 3):

- ``LocalBus`` (role ``all``): the one process is the whole cluster. ``publish`` calls the
  subscribers at once, ``gather`` asks the one local answerer. No NATS, no task, no copy: a
  publish nobody subscribed to is one dict lookup.
- ``ClusterBus`` (roles edge and control): ``publish`` queues and returns; a flusher sends each
  topic's queued events as one NATS message every ``BATCH_INTERVAL`` (sooner past
  ``BATCH_BYTES``) to ``P.bus.<topic>``. Every node, this one included, delivers them to its
  subscribers. ``gather`` sends one request to ``P.all.<topic>``; every node answers (with
  nothing when it has no answerer for the topic), in chunks that fit NATS's ``max_payload``.

Events and answers cross processes as msgpack: dicts, lists, str, bytes, int, float, bool, None.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgpack

from comzy.core.logs import RateLimitedLog

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from comzy.core.cluster.node import ClusterNode

log = logging.getLogger("comzy.cluster.bus")

#: ``handler(node, event)``: ``node`` is the id of the node that published ("" in role all).
EventHandler = Callable[[str, dict[str, Any]], None]
#: ``handler(request) -> answer`` (or an awaitable of it).
Answerer = Callable[[Any], Any]

#: How long a publish may wait in the queue before it is sent: events go out at most this late.
BATCH_INTERVAL = 0.05
#: Queued bytes that send the batch at once instead of at the end of the interval.
BATCH_BYTES = 256 * 1024
#: Events and bytes queued (all topics) past which new events are dropped and counted.
QUEUE_LIMIT = 10_000
QUEUE_BYTES = 16 * 1024 * 1024
#: Room in a NATS message for what is not an event or an answer's bytes (keys, node id).
ENVELOPE_MARGIN = 1024
#: gather's default wait for the nodes that have not answered yet.
GATHER_TIMEOUT = 2.0
#: A topic is NATS subject tokens (dots between them), so that it can name a subject of its own.
TOPIC = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_topic(topic: str) -> str:
    """``topic`` if it is valid; ValueError (one line, saying what is allowed) if not."""
    if not isinstance(topic, str) or len(topic) > 128 or not TOPIC.fullmatch(topic):
        raise ValueError(f"bus topic {topic!r} is not valid: use letters, digits, '_' and '-', with dots "
                         "between words (e.g. 'myplugin.events'), at most 128 characters")
    return topic


def _deliver(handlers: list[EventHandler], node: str, event: dict[str, Any]) -> None:
    for handler in handlers:
        try:
            handler(node, event)
        except Exception:  # one subscriber's bug must not cost the publisher or the other subscribers
            log.exception("bus: a subscriber failed on an event from node %r", node)


class Bus(Protocol):
    """What plugins use as ``server.bus`` (docs/plugin_hooks.md, "The server argument")."""

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Send ``event`` to every node's subscribers of ``topic``; never blocks."""

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        """Call ``handler(node, event)`` for each event on ``topic`` from any node."""

    def answer(self, topic: str, handler: Answerer) -> None:
        """Answer this node's part of every ``gather`` on ``topic``."""

    async def gather(self, topic: str, request: Any = None, timeout: float = GATHER_TIMEOUT) -> dict[str, Any]:
        """Every node's answer to ``request`` on ``topic``, by node id."""
        ...

    def nodes(self) -> list[str]:
        """The ids of the nodes alive now (this one included)."""
        ...


class LocalBus:
    """The bus of role ``all``: this process is the only node (its id is ``""``).

    ``publish`` runs the subscribers before it returns, in the publisher's task: a subscriber must
    not block (queue the work, as the dashboard's feed does). Answers go through msgpack as they
    would between nodes, so an answer that cannot cross a process fails here too.
    """

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._handlers: dict[str, list[EventHandler]] = {}
        self._answers: dict[str, Answerer] = {}
        # Topics checked once each, so that a topic a cluster would refuse is refused here too.
        self._topics: set[str] = set()

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Deliver ``event`` to this process's subscribers of ``topic`` now."""
        if topic not in self._topics:
            self._topics.add(check_topic(topic))
        handlers = self._handlers.get(topic)
        if handlers:
            _deliver(handlers, self.node, event)

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        """Call ``handler(node, event)`` for each event published on ``topic``."""
        self._handlers.setdefault(check_topic(topic), []).append(handler)

    def answer(self, topic: str, handler: Answerer) -> None:
        """Answer ``gather(topic, request)`` with ``handler(request)`` (sync or async); one per topic."""
        if check_topic(topic) in self._answers:
            raise ValueError(f"bus topic {topic!r} already has an answerer on this node; answer each topic once")
        self._answers[topic] = handler

    async def gather(self, topic: str, request: Any = None, timeout: float = GATHER_TIMEOUT) -> dict[str, Any]:
        """``{node: answer}`` from this process's answerer, or ``{}`` when there is none."""
        handler = self._answers.get(check_topic(topic))
        if handler is None:
            return {}
        request = msgpack.unpackb(msgpack.packb(request))  # a request a cluster could not send fails here too
        with anyio.move_on_after(timeout):
            try:
                answer = handler(request)
                if inspect.isawaitable(answer):
                    answer = await answer
                return {self.node: msgpack.unpackb(msgpack.packb(answer))}
            except Exception:  # as on a cluster node: logged, and this node's answer left out
                log.exception("bus: the answerer of %s failed; this node's answer is left out", topic)
        return {}

    def nodes(self) -> list[str]:
        """``[node]`` (``[""]`` in role all): this process."""
        return [self.node]


class ClusterBus:
    """The bus of a cluster node, over its NATS connection (a ``ClusterNode`` component)."""

    def __init__(self, cluster: ClusterNode) -> None:
        self.cluster = cluster
        self.nats = cluster.nats
        self._handlers: dict[str, list[EventHandler]] = {}
        self._answers: dict[str, Answerer] = {}
        self._queue: dict[str, list[bytes]] = {}
        self._topics: set[str] = set()
        self._queued = 0
        self._queued_bytes = 0
        self._lagged: dict[str, int] = {}
        #: Events dropped since start: the queue was full, NATS refused them, or one was too large.
        self.dropped = 0
        self._wakeup = anyio.Event()
        self._full = anyio.Event()
        self._subscriptions: list[Any] = []
        self._noise = RateLimitedLog(log, interval=10.0, level=logging.WARNING)

    @property
    def node(self) -> str:
        """This node's id."""
        return self.nats.node_id

    # -- lifetime -------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to every topic's events and gathers (one wildcard subscription each), start the flusher."""
        nc, subjects = self.nats.nc, self.nats.subjects
        self._event_prefix = subjects.bus("")
        self._gather_prefix = subjects.gather("")
        # One subscription per kind rather than one per topic: subscribe() stays synchronous, with no
        # window in which a just-subscribed topic misses events. Every node runs the same plugins, so
        # a node rarely receives a topic nobody on it wants; such messages are dropped unparsed.
        self._subscriptions = [
            await nc.subscribe(self._event_prefix + ">", cb=self._on_events,
                               pending_msgs_limit=100_000, pending_bytes_limit=64 * 1024 * 1024),
            await nc.subscribe(self._gather_prefix + ">", cb=self._on_gather),
        ]
        await nc.flush()
        self.nats.on_reconnect(self._wake)
        assert self.cluster.task_group is not None
        self.cluster.task_group.start_soon(self._flusher)

    async def stop(self) -> None:
        """Send what is queued (the last tunnels' events), then unsubscribe."""
        if self.nats.connected:
            with anyio.move_on_after(2.0):
                await self._flush()
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # NATS is gone already: nothing to undo
                log.debug("bus: unsubscribe failed: %s", exc)
        self._subscriptions = []

    # -- events ---------------------------------------------------------------------------
    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Queue ``event`` for every node's subscribers of ``topic``; never blocks. Past the queue's
        bound the event is dropped, and subscribers get ``{"type": "lagged", "dropped": N}`` first."""
        if topic not in self._topics:
            self._topics.add(check_topic(topic))
        data = msgpack.packb(event)  # here, so that an event msgpack cannot carry fails at the caller
        if self._queued >= QUEUE_LIMIT or self._queued_bytes + len(data) > QUEUE_BYTES:
            self._lag(topic, 1)
            return
        queue = self._queue.get(topic)
        if queue is None:
            queue = self._queue[topic] = []
        queue.append(data)
        self._queued += 1
        self._queued_bytes += len(data)
        self._wakeup.set()
        if self._queued_bytes >= BATCH_BYTES:
            self._full.set()

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        """Call ``handler(node, event)`` for each event on ``topic`` from every node (this one too)."""
        self._handlers.setdefault(check_topic(topic), []).append(handler)

    def _wake(self) -> None:
        self._wakeup.set()

    def _lag(self, topic: str, count: int) -> None:
        self.dropped += count
        self._lagged[topic] = self._lagged.get(topic, 0) + count
        self._wakeup.set()

    async def _flusher(self) -> None:
        while True:
            await self._wakeup.wait()
            with anyio.move_on_after(BATCH_INTERVAL):
                await self._full.wait()
            self._wakeup = anyio.Event()
            self._full = anyio.Event()
            if self.nats.connected:
                await self._flush()
            # else: the queue keeps (up to its bound) until the reconnect callback wakes us.

    async def _flush(self) -> None:
        queue, lagged = self._queue, self._lagged
        self._queue, self._lagged, self._queued, self._queued_bytes = {}, {}, 0, 0
        limit = min(BATCH_BYTES, self.nats.max_payload - ENVELOPE_MARGIN)
        for topic in queue.keys() | lagged.keys():
            batch: list[bytes] = []
            size = 0
            dropped = lagged.get(topic, 0)
            for data in queue.get(topic, ()):
                if len(data) > limit:
                    self._noise("bus: an event on %s of %d bytes is larger than a bus message may be (%d); "
                                "dropped it", topic, len(data), limit)
                    dropped += 1
                    self.dropped += 1
                    continue
                if batch and size + len(data) > limit:
                    dropped = await self._send(topic, batch, dropped)
                    batch, size = [], 0
                batch.append(data)
                size += len(data)
            if batch or dropped:
                await self._send(topic, batch, dropped)

    async def _send(self, topic: str, batch: list[bytes], dropped: int) -> int:
        """Publish one batch (with the count of events dropped before it); returns the drops still
        to report (0 once sent)."""
        import nats.errors  # the module is imported only on cluster nodes

        body = msgpack.packb({"n": self.node, "d": dropped, "e": batch})
        try:
            await self.nats.nc.publish(self._event_prefix + topic, body)
        except nats.errors.Error as exc:  # NATS went away: these are lost, and said to be
            self._noise("bus: cannot publish on %s: %s", topic, exc)
            self._lag(topic, dropped + len(batch))
            self.dropped -= dropped  # counted already, when they were dropped
        return 0

    async def _on_events(self, msg: Msg) -> None:
        handlers = self._handlers.get(msg.subject[len(self._event_prefix):])
        if not handlers:
            return
        try:
            envelope = msgpack.unpackb(msg.data)
            node, dropped, events = str(envelope["n"]), int(envelope["d"]), envelope["e"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            self._noise("bus: dropped a malformed message on %s", msg.subject)
            return
        if dropped:
            _deliver(handlers, node, {"type": "lagged", "dropped": dropped})
        for data in events:
            _deliver(handlers, node, msgpack.unpackb(data))

    # -- scatter/gather -------------------------------------------------------------------
    def answer(self, topic: str, handler: Answerer) -> None:
        """Answer this node's part of ``gather(topic, request)`` with ``handler(request)`` (sync or
        async); one answerer per topic."""
        if check_topic(topic) in self._answers:
            raise ValueError(f"bus topic {topic!r} already has an answerer on this node; answer each topic once")
        self._answers[topic] = handler

    async def _on_gather(self, msg: Msg) -> None:
        if msg.reply and self.cluster.task_group is not None:
            # In a task of its own: a slow answerer must not hold up this node's other answers.
            self.cluster.task_group.start_soon(self._answer, msg)

    async def _answer(self, msg: Msg) -> None:
        import nats.errors

        topic = msg.subject[len(self._gather_prefix):]
        handler = self._answers.get(topic)
        chunks: list[bytes] = []
        if handler is not None:
            try:
                answer = handler(msgpack.unpackb(msg.data))
                if inspect.isawaitable(answer):
                    answer = await answer
                data = msgpack.packb(answer)
            except Exception:
                log.exception("bus: the answerer of %s failed; this node's answer is left out", topic)
                data = None
            if data is not None:
                size = self.nats.max_payload - ENVELOPE_MARGIN
                chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        try:
            if not chunks:  # "nothing from me": the gatherer need not wait for this node
                await self.nats.nc.publish(msg.reply, msgpack.packb({"n": self.node, "k": 0}))
            for index, chunk in enumerate(chunks):
                await self.nats.nc.publish(msg.reply, msgpack.packb(
                    {"n": self.node, "i": index, "k": len(chunks), "b": chunk}))
        except nats.errors.Error as exc:
            self._noise("bus: cannot answer %s: %s", topic, exc)

    async def gather(self, topic: str, request: Any = None, timeout: float = GATHER_TIMEOUT) -> dict[str, Any]:
        """``{node: answer}`` from every node that answers ``request`` on ``topic`` within ``timeout``.

        It returns as soon as every live node (the lease table) has answered or said it has no
        answerer; a node that stays silent is left out (compare with ``nodes()``). Raises
        ``BusDown`` when this node is not connected to NATS.
        """
        from comzy.core.cluster.connection import BusDown

        check_topic(topic)
        if not self.nats.connected:
            raise BusDown()
        nc = self.nats.nc
        expected = set(self.nats.live_nodes()) | {self.node}
        parts: dict[str, list[bytes | None]] = {}
        finished: set[str] = set()
        changed = anyio.Event()

        async def collect(msg: Msg) -> None:
            try:
                reply = msgpack.unpackb(msg.data)
                node, total = str(reply["n"]), int(reply["k"])
                if total == 0:
                    finished.add(node)
                else:
                    pieces = parts.setdefault(node, [None] * total)
                    pieces[int(reply["i"])] = bytes(reply["b"])
                    if all(piece is not None for piece in pieces):
                        finished.add(node)
            except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException):
                self._noise("bus: dropped a malformed answer to %s", topic)
                return
            changed.set()

        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(self._gather_prefix + topic, msgpack.packb(request), reply=inbox)
            with anyio.move_on_after(timeout):
                while not expected <= finished:
                    await changed.wait()
                    changed = anyio.Event()
        finally:
            await subscription.unsubscribe()
        return {node: msgpack.unpackb(b"".join(p for p in parts[node] if p is not None))
                for node in finished if node in parts}

    def nodes(self) -> list[str]:
        """The ids of the nodes whose lease was alive at the last scan (this one included)."""
        return sorted(set(self.nats.live_nodes()) | {self.node})

