"""uvicorn-direct (COMZY_HTTP_SERVER): uvicorn serving a plain request without ASGI.

A request without a body to a tunnel of this node is served by the edge on uvicorn's protocol itself
(``EdgeApp.serve_plain``, ``http_servers.PlainExchange``): no scope, no ASGI messages, no task; its
response is written from the stream's events. Everything else goes to the ASGI app as on uvicorn.
These tests check that no task serves such a request, that what a visitor sees is byte for byte what
uvicorn sends, for odd inputs too (a differential test), and the exchange's own ends: a response
timeout, a reset before and after the head, the visitor leaving, backpressure and after_response.
The whole suite also runs on it with ``COMZY_TEST_HTTP_SERVER=uvicorn-direct``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from comzy.core import hookspecs
from comzy.core.hooks import load_plugins, select_plugins
from comzy.core.server import ServerContext, run_server
from comzy.core.types import Exchange, Reject
from tests.conftest import RunningAgent, make_settings, start_agent, start_server
from tests.helpers import wait_until
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def tunnel_on(tmp_path: Path, kind: str, upstream: Upstream, **settings: Any) -> AsyncIterator[RunningAgent]:
    """A server with ``http_server=kind`` and an agent for ``upstream``."""
    async with start_server(tmp_path / kind, http_server=kind, **settings) as server, \
            start_agent(server, upstream.port) as agent:
        yield agent


async def exchange(server: ServerContext, payload: bytes | list[bytes], timeout: float = 10) -> bytes:
    """Send ``payload`` (pieces: one send each) on a new connection; all the listener answers until
    it closes the connection (every case ends so that it does), then ``<open>`` if it did not
    within ``timeout`` seconds."""
    answer = b""
    async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
        for piece in [payload] if isinstance(payload, bytes) else payload:
            await stream.send(piece)
        with anyio.move_on_after(timeout):
            while True:
                try:
                    answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return answer
    return answer + b"<open>"


def request_tasks() -> list[str]:
    """The names of the coroutines of running tasks that serve an HTTP request through ASGI."""
    names = []
    for task in asyncio.all_tasks():
        code = task.get_coro().cr_code  # type: ignore[union-attr]
        if code.co_name in ("run_asgi", "http", "_pump_request"):
            names.append(code.co_name)
    return names


# -- no task --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uvicorn-direct", "uvicorn"])
async def test_a_bodyless_request_waits_for_its_response_without_a_task(
        tmp_path: Path, upstream: Upstream, kind: str) -> None:
    async with tunnel_on(tmp_path, kind, upstream) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def visit() -> None:
                answers.append(await exchange(tunnel.public, b"GET /hold/notask HTTP/1.1\r\nHost: " + host
                                              + b"\r\nConnection: close\r\n\r\n"))

            tg.start_soon(visit)
            with anyio.fail_after(5):
                await upstream.gate("notask-arrived").wait()
            waiting = request_tasks()
            upstream.gate("notask").set()
        assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n") and answers[0].endswith(b"released notask\n")
        if kind == "uvicorn":
            assert waiting == ["run_asgi"]  # uvicorn's request task (the check can fail)
        else:
            assert waiting == []


# -- the differential test against uvicorn ----------------------------------------------------------

CLOSE = b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"

#: Odd and ordinary inputs: each is sent as is ({host}: the tunnel's) on a new connection.
CASES: dict[str, bytes | list[bytes]] = {
    "plain": b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "echo": b"GET /echo?a=1&b=%20x HTTP/1.1\r\nHost: {host}\r\nX-A: 1\r\nx-a: 2\r\nConnection: close\r\n\r\n",
    "head": b"HEAD /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "head of a chunked response": b"HEAD /chunked/100 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "204 and 304": b"GET /status/204 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /status/304 HTTP/1.1\r\nHost: {host}\r\n\r\n"
                   + CLOSE,
    "status 599": b"GET /status/599 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "chunked response": b"GET /chunked/3000 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "big response": b"GET /bytes/300000 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "hop-by-hop response headers": b"GET /hop-headers HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "repeated response headers": b"GET /cookies HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "reset after the head": b"GET /drop-mid HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "reset after the head, chunked": b"GET /drop-mid-chunked HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "content-length 0": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n" + CLOSE,
    "absolute form": b"GET http://elsewhere.example/echo?q HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "absolute form without a path": b"GET http://elsewhere.example HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "asterisk form": b"OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "no such tunnel": b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n" + CLOSE,
    "bad request line": b"GET\r\nHost: {host}\r\n\r\n",
    "unknown method token": b"G@T / HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: {host}\r\n\r\n",
    "HTTP/0.9 style": b"GET /\r\n\r\n",
    "two Host headers": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nHost: other.localhost\r\n\r\n",
    "no Host header": b"GET /echo HTTP/1.1\r\n\r\n",
    "no Host header, HTTP/1.0": b"GET /echo HTTP/1.0\r\n\r\n",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n\r\n" + CLOSE,
    "space before colon": b"GET /echo HTTP/1.1\r\nHost : {host}\r\n\r\n",
    "head past the server's bound": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"b" * 140_000 + b"\r\n\r\n",
    "head past the edge's limit": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
    "pipelined": b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n"
                 b"HEAD /status/201 HTTP/1.1\r\nHost: {host}\r\n\r\n" + CLOSE,
    "pipelined, a body second": b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\n"
                                b"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello" + CLOSE,
    "chunked body, extensions and trailers": b"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                                             b"\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n" + CLOSE,
    "invalid chunk size": b"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "transfer-encoding and content-length": b"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                                            b"Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two content-lengths": b"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "expect 100-continue": [b"POST /echo HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                            b"Connection: close\r\n\r\n", b"hello"],
    "expect 100-continue without a body": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\n\r\n" + CLOSE,
    "HTTP/1.0 keep-alive": b"GET /status/200 HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n" + CLOSE,
    "HTTP/1.0": b"GET /chunked/10 HTTP/1.0\r\nHost: {host}\r\n\r\n",
    "connection close": b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\nConnection: Keep-Alive, Close\r\n\r\n" + CLOSE,
    "hop-by-hop request headers": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: x-hop\r\nX-Hop: 1\r\n"
                                  b"Keep-Alive: 5\r\nTE: trailers\r\n\r\n" + CLOSE,
    "websocket upgrade refused": b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n",
    "h2c upgrade ignored": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" + CLOSE,
    "early close in the head": [b"GET /status/200 HTTP/1.1\r\nHost: {host}\r\n"],
    "a body sent with GET": b"GET /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc" + CLOSE,
}


def normalise(answer: bytes, aliases: dict[str, str]) -> bytes:
    """``answer`` without what differs between two servers for reasons of their own: the local
    service's Date and Server headers, and each tunnel's random alias."""
    for alias, placeholder in aliases.items():
        answer = answer.replace(alias.encode(), placeholder.encode())
    return re.sub(rb"(?im)^(date|server): [^\r\n]*\r\n", b"", answer)


async def test_uvicorn_direct_answers_odd_inputs_as_uvicorn_does(tmp_path: Path, upstream: Upstream) -> None:
    async with AsyncExitStack() as stack:
        direct = await stack.enter_async_context(tunnel_on(tmp_path, "uvicorn-direct", upstream))
        asgi = await stack.enter_async_context(tunnel_on(tmp_path, "uvicorn", upstream))
        assert len(direct.alias) == len(asgi.alias)  # the same lengths on both sides, Content-Length too
        placeholder = "a" * len(direct.alias)
        aliases = {direct.alias: placeholder, asgi.alias: placeholder}
        differences = []
        for name, payload in CASES.items():
            answers = []
            for tunnel in (direct, asgi):
                host = f"{tunnel.alias}.localhost".encode()
                pieces = [payload] if isinstance(payload, bytes) else payload
                answer = await exchange(tunnel.public, [piece.replace(b"{host}", host) for piece in pieces], 3)
                answers.append(normalise(answer, aliases))
            if answers[0] != answers[1]:
                differences.append(f"{name}:\n  uvicorn-direct {answers[0][:600]!r}\n  uvicorn        "
                                   f"{answers[1][:600]!r}")
            assert answers[1] or name.startswith("early close"), name  # every case gets some answer
        assert not differences, "\n".join(differences)


class InjectHeader:
    """Adds the response header a request's query names (``?name=HEX`` or ``?value=HEX``: a byte
    inside a header's name or value), as a before_response plugin may: the listener's own checks of
    a response head are then what decides what the visitor gets."""

    @hookspecs.hookimpl
    def before_response(self, response: Any, request: Any) -> None:
        where, _, hexed = request.target.partition(b"?")[2].partition(b"=")
        byte = bytes.fromhex(hexed.decode())
        if where == b"name":
            response.headers.append((b"x-" + byte + b"y", b"v"))
        else:
            response.headers.append((b"x-injected", b"a" + byte + b"b"))


async def test_uvicorn_direct_refuses_the_response_header_bytes_uvicorn_refuses(
        tmp_path: Path, upstream: Upstream) -> None:
    """Every byte in a response header's name and in its value: uvicorn-direct's one pass over
    all names and one over all values (``PlainExchange.start_response``) answers as uvicorn's check
    per header does (the connection closed without an answer for a refused byte)."""
    inject = [("inject", InjectHeader())]
    async with AsyncExitStack() as stack:
        direct = await stack.enter_async_context(tunnel_on(tmp_path, "uvicorn-direct", upstream, plugins=inject))
        asgi = await stack.enter_async_context(tunnel_on(tmp_path, "uvicorn", upstream, plugins=inject))
        aliases = {direct.alias: "a" * len(direct.alias), asgi.alias: "a" * len(asgi.alias)}
        differences, refused = [], {"name": 0, "value": 0}
        for where in ("name", "value"):
            for byte in range(256):
                answers = []
                for tunnel in (direct, asgi):
                    request = (f"GET /status/200?{where}={byte:02x} HTTP/1.1\r\nHost: {tunnel.alias}.localhost\r\n"
                               "Connection: close\r\n\r\n").encode()
                    answers.append(normalise(await exchange(tunnel.public, request, 3), aliases))
                if answers[0] != answers[1]:
                    differences.append(f"{where} byte {byte:#04x}: {answers[0][:300]!r} != {answers[1][:300]!r}")
                refused[where] += not answers[1]
        assert not differences, "\n".join(differences)
    # The bytes of uvicorn's HEADER_RE and HEADER_VALUE_RE.
    assert refused == {"name": 49, "value": 32}, refused


# -- the exchange's own ends --------------------------------------------------------------------------

async def test_response_timeout_is_504_and_the_stream_is_reset(tmp_path: Path, upstream: Upstream) -> None:
    async with tunnel_on(tmp_path, "uvicorn-direct", upstream, response_timeout=0.3) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        answer = await exchange(tunnel.public, b"GET /hang HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                                + CLOSE.replace(b"{host}", host))
        assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), answer
        assert b"did not answer within 0.3 s.\n" in answer
        assert answer.count(b"HTTP/1.1 ") == 2 and answer.endswith(b"status 200\n")  # kept alive after the 504
        entry = tunnel.server.registry.get(tunnel.alias)
        assert entry is not None
        await wait_until(lambda: not entry.session.streams)
        upstream.gate("hang").set()


async def test_a_reset_before_the_head_is_502(tmp_path: Path, upstream: Upstream) -> None:
    async with tunnel_on(tmp_path, "uvicorn-direct", upstream) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def visit() -> None:
                answers.append(await exchange(tunnel.public, b"GET /hold/r HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                                              + CLOSE.replace(b"{host}", host)))

            tg.start_soon(visit)
            with anyio.fail_after(5):
                await upstream.gate("r-arrived").wait()
            await tunnel.agent.close()  # the link goes: its streams are reset
        assert answers[0].startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answers[0]
        assert b"The tunnel failed before a response" in answers[0]


async def test_the_visitor_leaving_resets_the_stream_and_after_response_sees_it(
        tmp_path: Path, upstream: Upstream) -> None:
    seen: list[Exchange] = []

    class Recorder:
        @hookspecs.hookimpl
        def after_response(self, exchange: Exchange) -> None:
            seen.append(exchange)

    async with start_server(tmp_path / "d", plugins=[("recorder", Recorder())],
                            http_server="uvicorn-direct") as server, start_agent(server, upstream.port) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
            await stream.send(b"GET /hold/left HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            with anyio.fail_after(5):
                await upstream.gate("left-arrived").wait()
            entry = server.registry.get(tunnel.alias)
            assert entry is not None and len(entry.session.streams) == 1
        await wait_until(lambda: not entry.session.streams)
        await wait_until(lambda: bool(seen))
        assert seen[0].error == "visitor disconnected" and seen[0].status == 0
        assert entry.tunnel.streams_open == 0 and entry.tunnel.requests == 1
        # A whole exchange is reported with its figures, as on the ASGI path.
        answer = await exchange(server, CLOSE.replace(b"{host}", host))
        assert answer.endswith(b"status 200\n")
        await wait_until(lambda: len(seen) == 2)
        assert (seen[1].status, seen[1].bytes_out, seen[1].error) == (200, 11, None)
        upstream.gate("left").set()


async def test_a_visitor_that_does_not_read_holds_the_agent_back(tmp_path: Path, upstream: Upstream) -> None:
    size = 64 * 1024 * 1024
    async with tunnel_on(tmp_path, "uvicorn-direct", upstream) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        entry = tunnel.server.registry.get(tunnel.alias)
        assert entry is not None
        async with await anyio.connect_tcp("127.0.0.1", tunnel.public.ports.http) as stream:
            await stream.send(b"GET /bytes/%d HTTP/1.1\r\nHost: " % size + host + b"\r\nConnection: close\r\n\r\n")
            first = await stream.receive()
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            # Unread, the response stops: the stream's window bounds what the edge holds.
            streams: Callable[[], list[Any]] = lambda: list(entry.session.streams.values())  # noqa: E731
            await wait_until(lambda: bool(streams()) and streams()[0].buffered)
            held = streams()[0]._buffered
            assert held <= streams()[0]._window
            received = len(first)
            with anyio.fail_after(60):
                while True:
                    try:
                        received += len(await stream.receive())
                    except anyio.EndOfStream:
                        break
        head = first.index(b"\r\n\r\n") + 4
        assert received - head == size


class FailingResolver:
    """A plugin whose resolve_host fails for one host."""

    @hookspecs.hookimpl
    def resolve_host(self, host: str) -> str | None:
        if host == "boom.test":
            raise LookupError("domain table corrupt")
        return None


@pytest.mark.parametrize("kind", ["uvicorn-direct", "uvicorn"])
async def test_a_failing_hook_before_the_stream_is_uvicorns_500(tmp_path: Path, kind: str) -> None:
    async with start_server(tmp_path / "d", plugins=[("failing", FailingResolver())], http_server=kind) as server:
        answer = await exchange(server, b"GET / HTTP/1.1\r\nHost: boom.test\r\n\r\n")
    assert answer == (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
                      b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error")


async def test_with_every_built_in_plugin_a_bodyless_request_still_needs_no_task(
        tmp_path: Path, upstream: Upstream) -> None:
    """The default install enables every built-in plugin: their before_forward and before_response
    hooks are plain functions, called from the parser's callback, and after_response's too."""
    settings = make_settings(tmp_path / "d", plugins=None, http_server="uvicorn-direct")
    async with run_server(settings, load_plugins(select_plugins(None))) as server, \
            start_agent(server, upstream.port) as tunnel:
        assert server.hooks.has_before_forward and server.hooks.has_before_response
        assert server.hooks.has_after_response
        host = f"{tunnel.alias}.localhost".encode()
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def visit() -> None:
                answers.append(await exchange(server, b"GET /hold/plugins HTTP/1.1\r\nHost: " + host
                                              + b"\r\nConnection: close\r\n\r\n"))

            tg.start_soon(visit)
            with anyio.fail_after(5):
                await upstream.gate("plugins-arrived").wait()
            waiting = request_tasks()
            upstream.gate("plugins").set()
        assert waiting == []
        assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n") and answers[0].endswith(b"released plugins\n")
        entry = server.registry.get(tunnel.alias)
        assert entry is not None
        await wait_until(lambda: entry.tunnel.requests == 1 and entry.tunnel.streams_open == 0)


class RefuseSome:
    """Refuses /refuse* from before_forward, synchronously: answered from the parser's callback."""

    @hookspecs.hookimpl
    def before_forward(self, request: Any) -> None:
        if request.target.startswith(b"/refuse"):
            raise Reject("refused here", 403)


async def test_a_refusal_answered_while_parsing_does_not_cut_the_request_pipelined_behind_it(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal finished inside the parser's callback arms uvicorn's keep-alive timer; a request
    parsed after it in the same read is then being served, and the timer must not close its
    connection (uvicorn disarms the timer only when a read begins)."""
    import uvicorn

    keep_alive = 1  # seconds (uvicorn takes whole seconds); the server's own is 75
    original = uvicorn.Config.__init__

    def short_keep_alive(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["timeout_keep_alive"] = keep_alive
        original(self, *args, **kwargs)

    monkeypatch.setattr(uvicorn.Config, "__init__", short_keep_alive)
    refuse = [("refuse", RefuseSome())]
    async with start_server(tmp_path / "d", plugins=refuse, http_server="uvicorn-direct") as server, \
            start_agent(server, upstream.port) as tunnel:
        host = f"{tunnel.alias}.localhost".encode()
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def visit() -> None:
                pipelined = (b"GET /refuse HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                             b"GET /hold/k HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
                answers.append(await exchange(server, pipelined))

            tg.start_soon(visit)
            with anyio.fail_after(5):
                await upstream.gate("k-arrived").wait()
            await anyio.sleep(keep_alive + 1)  # past the keep-alive timeout, the held request still served
            upstream.gate("k").set()
    assert answers[0].startswith(b"HTTP/1.1 403 Forbidden\r\n"), answers[0]
    assert answers[0].count(b"HTTP/1.1 ") == 2 and answers[0].endswith(b"released k\n"), answers[0]
