"""The live feed: events fanned out to WebSocket clients without ever waiting for one.

Publishing appends to each client's bounded queue and wakes its sender; it never awaits, so
traffic never waits for a slow dashboard. A client whose queue is full misses events; before
its next event it gets ``{"type": "lagged", "dropped": N}``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from comzy import Exchange, ForwardRequest, ServerContext, Tunnel


def tunnel_view(tunnel: Tunnel, server: ServerContext) -> dict[str, Any]:
    """A tunnel as the feed and the API show it. ``policies`` holds the plugins' public summaries of
    its policy (``describe_policy``), never their metadata, which may hold secrets (password hashes)."""
    return {
        "alias": tunnel.alias, "session": tunnel.session, "url": tunnel.public_url, "user": tunnel.user,
        "port": tunnel.port,
        "client": tunnel.client_address, "since": tunnel.created_at, "expires_at": tunnel.expires_at,
        "requests": tunnel.requests, "bytes_in": tunnel.bytes_in, "bytes_out": tunnel.bytes_out,
        "streams_open": tunnel.streams_open, "websockets_open": tunnel.websockets_open, "node": tunnel.node,
        "name": tunnel.name,
        "policies": server.describe_policies(tunnel),
    }


def request_view(exchange: Exchange) -> dict[str, Any]:
    """A finished request as a feed event."""
    request = exchange.request
    return {
        "type": "request", "time": exchange.started_at, "alias": request.alias, "method": request.method,
        "path": request.path, "status": exchange.status, "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out, "duration_ms": round(exchange.duration * 1000, 3),
        "client": request.client, "websocket": request.websocket, "error": exchange.error,
    }


def refused_view(request: ForwardRequest, status: int, plugin: str) -> dict[str, Any]:
    """A request a plugin refused before it reached the agent (401, 403, 429...), as a feed event:
    a ``request`` event with ``refused_by`` (the plugin), nothing sent either way."""
    return {
        "type": "request", "time": time.time(), "alias": request.alias, "method": request.method,
        "path": request.path, "status": status, "bytes_in": 0, "bytes_out": 0, "duration_ms": 0.0,
        "client": request.client, "websocket": request.websocket, "error": f"refused by {plugin}",
        "refused_by": plugin,
    }


class Subscriber:
    """One feed client's queue."""

    def __init__(self, limit: int) -> None:
        self.queue: deque[dict[str, Any]] = deque()
        self.limit = limit
        self.dropped = 0
        self.wakeup = anyio.Event()

    def push(self, event: dict[str, Any]) -> None:
        """Queue ``event``, or count it as missed when the queue is full."""
        if len(self.queue) >= self.limit:
            self.dropped += 1
        else:
            self.queue.append(event)
        self.wakeup.set()

    async def next_batch(self) -> list[dict[str, Any]]:
        """Everything queued (a ``lagged`` event first if some were missed), waiting if empty."""
        while not self.queue and not self.dropped:
            await self.wakeup.wait()
            self.wakeup = anyio.Event()
        batch: list[dict[str, Any]] = []
        if self.dropped:
            batch.append({"type": "lagged", "dropped": self.dropped, "time": time.time()})
            self.dropped = 0
        batch.extend(self.queue)
        self.queue.clear()
        return batch


class Series:
    """Requests and bytes per second for the last ``seconds`` seconds."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.buckets: deque[list[int]] = deque()  # [second, requests, bytes_in, bytes_out]

    def add(self, when: float, bytes_in: int, bytes_out: int) -> None:
        """Count one request at unix time ``when``."""
        second = int(when)
        buckets = self.buckets
        if buckets:  # most requests fall in the newest second: counted without the rest
            newest = buckets[-1]
            if newest[0] == second:
                newest[1] += 1
                newest[2] += bytes_in
                newest[3] += bytes_out
                return
        if not self.buckets or self.buckets[-1][0] < second:
            self.buckets.append([second, 0, 0, 0])
        bucket = self.buckets[-1] if self.buckets[-1][0] == second else self._find(second)
        if bucket is None:
            return  # older than what is kept
        bucket[1] += 1
        bucket[2] += bytes_in
        bucket[3] += bytes_out
        while self.buckets and self.buckets[0][0] <= second - self.seconds:
            self.buckets.popleft()

    def _find(self, second: int) -> list[int] | None:
        # A request that started before the newest bucket (a long download): count it where it began.
        for bucket in reversed(self.buckets):
            if bucket[0] == second:
                return bucket
            if bucket[0] < second:
                break
        return None

    def view(self) -> Iterator[dict[str, int]]:
        """The buckets, oldest first (seconds without requests are absent)."""
        for second, requests, bytes_in, bytes_out in self.buckets:
            yield {"t": second, "requests": requests, "bytes_in": bytes_in, "bytes_out": bytes_out}


class FeedHub:
    """Fans events out to every subscriber; keeps recent requests and the per-second series."""

    def __init__(self, queue_limit: int, recent: int, history_seconds: int) -> None:
        self.queue_limit = queue_limit
        self.subscribers: set[Subscriber] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.series = Series(history_seconds)
        self.published = 0

    def subscribe(self) -> Subscriber:
        """A new subscriber (call :meth:`unsubscribe` when its client leaves)."""
        subscriber = Subscriber(self.queue_limit)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop delivering to ``subscriber``."""
        self.subscribers.discard(subscriber)

    def publish(self, event: dict[str, Any]) -> None:
        """Deliver ``event`` to every subscriber (never waits)."""
        self.published += 1
        for subscriber in self.subscribers:
            subscriber.push(event)

    def record(self, event: dict[str, Any]) -> None:
        """Record and publish a finished request (a ``request_view``, from any node)."""
        self.recent.append(event)
        self.series.add(event["time"], event["bytes_in"], event["bytes_out"])
        self.publish(event)
