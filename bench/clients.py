"""Python clients for the cases no stock tool measures: SSE first event, WebSocket echo, a slow visitor.

Blocking sockets with TCP_NODELAY: the same client code talks to the local app directly and to
the tunnel's public port (with ``Host: <alias>.localhost``), so its own cost is in both figures.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request

READ_SIZE = 65536


def connect(port: int, timeout: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` with Nagle off."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sse_first_event(port: int, host: str, timeout: float = 10.0) -> float:
    """Seconds from starting the request (connect included) to holding the first whole event."""
    started = time.perf_counter()
    with connect(port, timeout) as sock:
        sock.sendall(f"GET /sse HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        received = b""
        while b"data: ready\n\n" not in received:
            data = sock.recv(READ_SIZE)
            if not data:
                raise ConnectionError(f"stream ended before the first event: {received[:200]!r}")
            received += data
        elapsed = time.perf_counter() - started
    if not received.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"SSE answer was not 200: {received[:200]!r}")
    return elapsed


def sse_latencies(port: int, host: str, count: int) -> dict[str, Any]:
    """``count`` sequential first-event latencies: median, p90 and every sample, in ms."""
    samples = [sse_first_event(port, host) * 1000 for _ in range(count)]
    ordered = sorted(samples)
    return {"first_event_p50_ms": statistics.median(ordered),
            "first_event_p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
            "samples": count, "samples_ms": [round(sample, 4) for sample in samples], "errors": 0}


def ws_echo(port: int, host: str, duration: float, size: int = 32, timeout: float = 10.0) -> dict[str, Any]:
    """Sequential round trips of ``size``-byte binary messages for ``duration`` seconds."""
    conn = WSConnection(ConnectionType.CLIENT)
    with connect(port, timeout) as sock:
        sock.sendall(conn.send(Request(host=host, target="/ws")))
        accepted = False
        while not accepted:
            data = sock.recv(READ_SIZE)
            if not data:
                raise ConnectionError("connection closed during the WebSocket handshake")
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    raise ConnectionError(f"WebSocket upgrade refused with {event.status_code}")
        payload = b"x" * size
        round_trips = 0
        latencies: list[float] = []
        started = time.perf_counter()
        deadline = started + duration
        now = started
        while now < deadline:
            sock.sendall(conn.send(BytesMessage(payload)))
            echoed = b""
            while len(echoed) < size:
                data = sock.recv(READ_SIZE)
                if not data:
                    raise ConnectionError("WebSocket closed during the echo test")
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, BytesMessage):
                        echoed += event.data
            sent_at, now = now, time.perf_counter()
            if echoed != payload:
                raise ConnectionError("the echo did not match what was sent")
            latencies.append(now - sent_at)
            round_trips += 1
        elapsed = now - started
        sock.sendall(conn.send(CloseConnection(code=1000)))
    return {"round_trips_per_s": round_trips / elapsed, "round_trip_p50_ms": statistics.median(latencies) * 1000,
            "round_trips": round_trips, "seconds": elapsed, "errors": 0}


class SlowVisitor(threading.Thread):
    """Downloads a large file but reads only ``rate`` bytes/s, until stopped.

    A small receive buffer makes the backpressure reach the tunnel within a second instead of
    after several MiB of kernel autotuned buffer.
    """

    def __init__(self, port: int, host: str, path: str, rate: int, chunk: int = 16384) -> None:
        super().__init__(name="slow-visitor", daemon=True)
        self.port, self.host, self.path, self.rate, self.chunk = port, host, path, rate, chunk
        self.received = 0
        self.status_ok = False
        self.error: str | None = None
        self.started_reading = threading.Event()
        self._stop_reading = threading.Event()

    def run(self) -> None:
        """Read at the set rate until ``stop`` (or the end of the file)."""
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.settimeout(30)
            with sock:
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
                pause = self.chunk / self.rate
                while not self._stop_reading.is_set():
                    data = sock.recv(self.chunk)
                    if not data:
                        break
                    if not self.received:
                        self.status_ok = data.startswith(b"HTTP/1.1 200")
                        self.started_reading.set()
                    self.received += len(data)
                    self._stop_reading.wait(pause)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started_reading.set()

    def stop(self) -> None:
        """Stop reading and close the connection."""
        self._stop_reading.set()
        self.join(35)
