"""The local service used by end-to-end tests: a real HTTP/WebSocket app on port 0."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config

Scope = dict[str, Any]


class Upstream:
    """An ASGI app with routes for every fidelity test; ``gates`` let a test pace it."""

    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}
        self.requests: list[Scope] = []
        self.port = 0

    def gate(self, name: str) -> anyio.Event:
        """An event the app waits on for route ``name``."""
        return self.gates.setdefault(name, anyio.Event())

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.requests.append(scope)
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            await _drain(receive)
            body = b"" if code in (204, 304) or scope["method"] == "HEAD" else f"status {code}\n".encode()
            headers = [(b"x-status", str(code).encode())]
            if code not in (204, 304):
                headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif path == "/cookies":
            await _drain(receive)
            await _reply(send, 200, b"cookies\n", [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/"),
                                                   (b"x-multi", b"one"), (b"x-multi", b"two")])
        elif path == "/gzip":
            await _drain(receive)
            body = gzip.compress(b"compressed body " * 100)
            await _reply(send, 200, body, [(b"content-encoding", b"gzip"), (b"content-type", b"text/plain")])
        elif path == "/br":
            await _drain(receive)
            # Not real brotli: the tunnel must pass any encoded bytes untouched.
            body = bytes(range(256)) * 4
            await _reply(send, 200, body, [(b"content-encoding", b"br")])
        elif path == "/sse":
            await _drain(receive)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            for i in range(3):
                await self.gate(f"sse{i}").wait()
                await send({"type": "http.response.body", "body": f"data: event {i}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path.startswith("/bytes/"):
            await _drain(receive)
            total = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(total).encode()),
                                    (b"content-type", b"application/octet-stream")]})
            block = pattern_block()
            sent = 0
            while sent < total:
                chunk = block[: min(len(block), total - sent)]
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": sent < total})
        elif path == "/hang":
            await _drain(receive)
            await self.gate("hang").wait()
            await _reply(send, 200, b"late\n")
        elif path == "/drop-mid":
            await _drain(receive)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100000")]})
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            raise RuntimeError("upstream dies mid-response (expected by the test)")
        elif path == "/drop-mid-chunked":
            # No content-length: only an abort (not a clean end) can tell the visitor it was cut.
            await _drain(receive)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"y" * 1000, "more_body": True})
            raise RuntimeError("upstream dies mid-chunked-response (expected by the test)")
        elif path.startswith("/chunked/"):
            await _drain(receive)
            total = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream")]})
            block = pattern_block()
            sent = 0
            while sent < total:
                chunk = block[: min(len(block), total - sent)]
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/gzip-fixed":
            await _drain(receive)
            body = gzip.compress(b"compressed body " * 100, mtime=0)
            await _reply(send, 200, body, [(b"content-encoding", b"gzip"), (b"content-type", b"text/plain")])
        elif path == "/hop-headers":
            await _drain(receive)
            await _reply(send, 200, b"hop\n", [
                (b"connection", b"x-resp-hop"), (b"keep-alive", b"timeout=5"), (b"x-resp-hop", b"secret"),
                (b"proxy-authenticate", b"Basic realm=x"), (b"trailer", b"x-checksum"), (b"upgrade", b"h2c"),
                (b"x-resp-kept", b"yes")])
        elif path.startswith("/hold/"):
            # Like /hang, with a gate per name and an "<name>-arrived" event the test can wait on.
            await _drain(receive)
            name = path.rsplit("/", 1)[1]
            self.gate(f"{name}-arrived").set()
            await self.gate(name).wait()
            await _reply(send, 200, f"released {name}\n".encode())
        else:
            digest = hashlib.sha256()
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            info = {
                "method": scope["method"],
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query_string": scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "body_size": size,
                "body_sha256": digest.hexdigest(),
                "http_version": scope["http_version"],
            }
            await _reply(send, 200, json.dumps(info).encode(), [(b"content-type", b"application/json")])

    async def websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        path = scope["path"]
        if path == "/ws/mirror":
            await self.mirror(scope, receive, send)
            return
        if path == "/ws/deny":
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "websocket.http.response.body", "body": b"denied by upstream"})
            return
        subprotocol = scope["subprotocols"][0] if scope.get("subprotocols") else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        if path.startswith("/ws/close/"):
            code = int(path.rsplit("/", 1)[1])
            await send({"type": "websocket.close", "code": code, "reason": "upstream closes"})
            return
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.gates.setdefault("ws-closed-codes", anyio.Event())
                self.last_close_code = message.get("code")
                self.gate("ws-disconnect").set()
                return
            if message.get("text") is not None:
                text = message["text"]
                if text.startswith("close:"):
                    await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked"})
                    return
                await send({"type": "websocket.send", "text": "echo:" + text})
            else:
                await send({"type": "websocket.send", "bytes": b"echo:" + message["bytes"]})

    async def mirror(self, scope: Scope, receive: Any, send: Any) -> None:
        """/ws/mirror: send every message back unchanged, empty ones too.

        A text message "send-empty" is answered with an empty text and an empty binary message.
        """
        subprotocol = scope["subprotocols"][0] if scope.get("subprotocols") else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "send-empty":
                await send({"type": "websocket.send", "text": ""})
                await send({"type": "websocket.send", "bytes": b""})
            elif message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


def pattern_block(size: int = 65536) -> bytes:
    """Deterministic bytes the download tests can verify without storing the whole body."""
    return bytes((i * 7 + 3) % 251 for i in range(size))


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _reply(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    all_headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


def bound_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 with a free port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[int]:
    """Serve an ASGI app with hypercorn on a free port; yields the port."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("upstream")
    config.graceful_timeout = 1
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))
        yield port
        stop.set()


@asynccontextmanager
async def serve_upstream() -> AsyncIterator[Upstream]:
    """Start the test upstream; yields it with ``.port`` set."""
    app = Upstream()
    async with serve_asgi(app) as port:
        app.port = port
        yield app
