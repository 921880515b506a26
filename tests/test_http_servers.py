"""The public listener's HTTP server (COMZY_HTTP_SERVER): hypercorn or uvicorn.

The whole suite runs on uvicorn with ``COMZY_TEST_HTTP_SERVER=uvicorn``; these tests pin what the
servers must share and what comzy adds to uvicorn: a bound on request heads (httptools has none),
a 400 for two Host headers (httptools lets them through), no Server/Date header, the WebSocket
message limit, and a clear start-up error when the selected server is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from pydantic import ValidationError

from comzy.core.http_servers import CorkedTransport, OneHostOnly, QuietAborts, ResponseAborted
from comzy.core.settings import ServerSettings, explain_validation_error
from comzy.core.websocket import Closed
from tests.conftest import start_agent, start_server
from tests.test_websocket import exchange, open_ws
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

SERVERS = [
    "hypercorn",
    "uvicorn",
    "uvicorn-direct",
]


@pytest.mark.parametrize("kind", SERVERS)
async def test_no_server_or_date_header_added(tmp_path: Path, kind: str) -> None:
    async with start_server(tmp_path / "data", http_server=kind) as server, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{server.ports.http}/", headers={"host": "nope.localhost"})
    assert response.status_code == 404
    assert "server" not in response.headers
    assert "date" not in response.headers


async def test_uvicorn_sends_a_small_response_in_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn writes a response's head as soon as the app starts it and the body on the next
    message; the cork (CorkedTransport) makes them one send, so the visitor's client wakes once."""
    sent: list[bytes] = []
    write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

    def counting_write(transport: Any, data: bytes) -> None:
        if transport.get_extra_info("sockname")[1] == port:
            sent.append(bytes(data))
        write(transport, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", counting_write)  # type: ignore[attr-defined]
    async with start_server(tmp_path / "data", http_server="uvicorn") as server:
        port = server.ports.http
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            for _ in range(2):  # twice on one connection: the cork is per transport, not per response
                await stream.send(b"GET / HTTP/1.1\r\nhost: nope.localhost\r\n\r\n")
                answer = b""
                with anyio.fail_after(10):
                    while not _whole_response(answer):
                        answer += await stream.receive()
                assert answer.startswith(b"HTTP/1.1 404 ")
    assert len(sent) == 2, [data[:60] for data in sent]
    assert all(data.startswith(b"HTTP/1.1 404 ") and b"\r\n\r\n" in data and not data.endswith(b"\r\n\r\n")
               for data in sent), "head and body in each single write"


@pytest.mark.parametrize(("method", "path"), [("GET", "/status/200"), ("HEAD", "/status/200"), ("GET", "/status/204"),
                                            ("GET", "/hop-headers")])
async def test_uvicorn_direct_sends_a_small_proxied_response_in_one_write(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, method: str, path: str) -> None:
    """The plain path gathers a small response that comes in one link message (the agent sends a
    small answer so) into one write to the socket, without the cork (PlainExchange.out)."""
    sent: list[bytes] = []
    write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]
    port = 0  # the public listener's, once it runs (the agent's link writes through the same class)

    def counting_write(transport: Any, data: bytes) -> None:
        if transport.get_extra_info("sockname")[1] == port:
            sent.append(bytes(data))
        write(transport, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", counting_write)  # type: ignore[attr-defined]
    async with start_server(tmp_path / "data", http_server="uvicorn-direct") as server, \
            start_agent(server, upstream.port) as running:
        port = server.ports.http
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            for _ in range(2):
                await stream.send(f"{method} {path} HTTP/1.1\r\nHost: {running.alias}.localhost\r\n\r\n".encode())
                answer = b""
                with anyio.fail_after(10):
                    while not (_whole_response(answer) if method == "GET" and b"204" not in answer[:12]
                               else answer.endswith(b"\r\n\r\n")):
                        answer += await stream.receive()
                assert answer.startswith(b"HTTP/1.1 20")
    assert len(sent) == 2, [data[:60] for data in sent]
    assert sent[0] == sent[1]


def _whole_response(data: bytes) -> bool:
    """Whether ``data`` holds a whole response with a Content-Length body."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return len(body) >= int(lengths[0])


@pytest.mark.parametrize("kind", SERVERS)
async def test_endless_request_head_is_cut_off_with_431(tmp_path: Path, kind: str) -> None:
    async with start_server(tmp_path / "data", http_server=kind, max_request_head=4096) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nhost: nope.localhost\r\n")
            piece = (b"x-filler: " + b"a" * 1000 + b"\r\n") * 4
            answer = b""
            # A piece at a time, each read by the server before the next: sending on after the
            # server closed would make the kernel reset the connection and drop its answer.
            for _ in range(256):  # up to 1 MB, far past the bound (twice the limit)
                await stream.send(piece)
                with anyio.move_on_after(0.05):
                    answer = await stream.receive()
                if answer:
                    break
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


@pytest.mark.parametrize("kind", SERVERS)
async def test_visitor_websocket_message_past_the_limit_closes_1009(tmp_path: Path, upstream: Upstream,
                                                                      kind: str) -> None:
    async with start_server(tmp_path / "data", http_server=kind, max_websocket_message=4096) as server, \
            start_agent(server, upstream.port) as running, open_ws(server, running.alias) as (ws, _):
        assert await exchange(ws, b"x" * 4000) == b"echo:" + b"x" * 4000
        closed = await exchange(ws, b"x" * 4097)
    assert isinstance(closed, Closed)
    assert closed.code == 1009


@pytest.mark.parametrize("kind", SERVERS)
async def test_an_abort_mid_response_is_not_logged_as_an_application_error(
        tmp_path: Path, upstream: Upstream, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """The agent lost mid-body: the visitor's connection is aborted on purpose, and neither server
    logs it as an error of the app with a traceback (one per visitor when an agent drops)."""
    caplog.set_level(logging.INFO)
    async with start_server(tmp_path / "data", http_server=kind) as server, \
            start_agent(server, upstream.port) as running:
        session = running.agent.session
        assert session is not None
        async with running.visitor() as client, client.stream("GET", f"/bytes/{64 * 1024 * 1024}") as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            with anyio.fail_after(10):
                await anext(chunks)
                await session.ws.aclose()  # the agent's link drops without a goodbye
                # The servers log an app's exception before they close the visitor's connection,
                # so once the visitor sees the abort, any such record is already there.
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    async for _ in chunks:
                        pass
    errors = [r for r in caplog.records if r.name in ("uvicorn.error", "comzy.http") and r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a deliberate abort"


def test_quiet_aborts_keeps_every_other_error() -> None:
    quiet = QuietAborts()

    def record(exc: BaseException | None) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                 None, (type(exc), exc, None) if exc else None)

    assert not quiet.filter(record(ResponseAborted("tunnel lost")))
    assert not quiet.filter(record(BaseExceptionGroup("g", [ResponseAborted("a"), ResponseAborted("b")])))
    assert quiet.filter(record(BaseExceptionGroup("g", [ResponseAborted("a"), KeyError("bug")])))
    assert quiet.filter(record(RuntimeError("a real bug")))
    assert quiet.filter(record(None))


async def raw_answer(port: int, request: bytes) -> bytes:
    """Everything the public listener sends back to ``request`` until it closes the connection."""
    answer = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        with anyio.fail_after(5):
            try:
                while True:
                    answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return answer


UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize(("headers", "why"), [
    (b"Host: {tunnel}\r\nHost: other.localhost\r\n", b"more than one Host header"),
    (b"Host: other.localhost\r\nHost: {tunnel}\r\n", b"more than one Host header"),
    (b"Host: {tunnel}\r\nHost: {tunnel}\r\n", b"more than one Host header"),
    (b"Host: {tunnel}\r\nX-A: 1\r\nhost: {tunnel}\r\n", b"more than one Host header"),
    (b"Host: {tunnel}\r\nHost: other.localhost\r\n" + UPGRADE, b"more than one Host header"),
    (b"X-A: 1\r\n", b"no Host header"),
], ids=["tunnel-first", "tunnel-second", "identical", "apart", "websocket", "none"])
async def test_two_host_headers_or_none_are_400_before_routing(tmp_path: Path, upstream: Upstream, kind: str,
                                                                headers: bytes, why: bytes) -> None:
    """RFC 9112 3.2: more than one Host (or none in HTTP/1.1) is a 400; the tunnel never sees it."""
    async with start_server(tmp_path / "data", http_server=kind) as server, \
            start_agent(server, upstream.port) as running:
        tunnel = f"{running.alias}.{server.settings.base_domain}".encode()
        request = b"GET /echo HTTP/1.1\r\n" + headers.replace(b"{tunnel}", tunnel) + b"\r\n"
        answer = await raw_answer(server.ports.http, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    _, _, body = answer.partition(b"\r\n\r\n")
    if kind.startswith("uvicorn") and b"Upgrade" not in headers:
        # comzy's own check (OneHostOnly) says why; hypercorn's h11 and wsproto answer with no body.
        assert why in body, answer
    assert upstream.requests == []
    assert [served.status for served in running.reporter.served] == []


@pytest.mark.parametrize("kind", SERVERS)
async def test_http10_without_host_is_still_routed_by_host(tmp_path: Path, kind: str) -> None:
    """HTTP/1.0 may omit Host: no 400, the edge's usual 404 for an unknown host."""
    async with start_server(tmp_path / "data", http_server=kind) as server:
        answer = await raw_answer(server.ports.http, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]
    assert b"Tunnel Not Active" in answer


@pytest.mark.parametrize(("extensions", "first"), [
    ({"websocket.http.response": {}}, {"type": "websocket.http.response.start", "status": 400}),
    ({}, {"type": "websocket.close", "code": 1002}),
])
async def test_one_host_only_refuses_a_websocket_upgrade_too(extensions: dict[str, Any], first: dict[str, Any]) -> None:
    """With wsproto, uvicorn's h11 refuses such upgrades first; the wrapper does not rely on it."""
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("the app saw an ambiguous request")

    async def receive() -> dict[str, Any]:
        raise AssertionError("nothing is read from an ambiguous request")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "http_version": "1.1", "extensions": extensions,
             "headers": [(b"host", b"a.localhost"), (b"host", b"b.localhost")]}
    await OneHostOnly(app)(scope, receive, send)
    assert {key: sent[0][key] for key in first} == first


def test_a_server_not_installed_fails_start_up_naming_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "uvicorn" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("COMZY_HTTP_SERVER", "uvicorn")
    with pytest.raises(ValidationError) as info:
        ServerSettings(_env_file=None)
    message = explain_validation_error(ServerSettings, info.value)
    assert "COMZY_HTTP_SERVER" in message
    assert "uvicorn is not installed" in message
    assert "pip install uvicorn" in message


def test_an_unknown_server_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_HTTP_SERVER", "granian")
    with pytest.raises(ValidationError) as info:
        ServerSettings(_env_file=None)
    assert "'hypercorn', 'uvicorn' or 'uvicorn-direct'" in explain_validation_error(ServerSettings, info.value)


# -- what comzy's uvicorn protocol keeps cheaper than uvicorn's own ---------------------------------

def test_the_cork_passes_the_whole_transport_interface_through_without_getattr() -> None:
    """CorkedTransport spells out every method of asyncio's Transport: a ``__getattr__`` fallback
    would put every attribute read of it, its own ``write`` included, on CPython's slow path."""
    missing = [name for name in dir(asyncio.Transport)
               if not name.startswith("_") and not hasattr(CorkedTransport, name)]
    assert missing == []
    assert "__getattr__" not in vars(CorkedTransport) and "__getattribute__" not in vars(CorkedTransport)


def test_the_response_header_checks_refuse_exactly_uvicorns_bytes() -> None:
    """start_response's two passes (names, values) refuse the bytes uvicorn's regexes find, no other."""
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from comzy.core import http_servers

    for check, regex in ((http_servers._NAME_CHECK, HEADER_RE), (http_servers._VALUE_CHECK, HEADER_VALUE_RE)):
        for byte in range(256):
            data = b"a" + bytes([byte]) + b"b"
            assert (data.translate(check) != data) == bool(regex.search(data)), (regex.pattern, byte)


@pytest.fixture
def keep_alive_1s(monkeypatch: pytest.MonkeyPatch) -> float:
    """uvicorn's keep-alive timeout at 1 s (it takes whole seconds); the server's own is longer."""
    import uvicorn

    original = uvicorn.Config.__init__

    def short_keep_alive(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["timeout_keep_alive"] = 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(uvicorn.Config, "__init__", short_keep_alive)
    return 1.0


async def _one_response(stream: anyio.abc.ByteStream, request: bytes) -> bytes:
    await stream.send(request)
    answer = b""
    with anyio.fail_after(5):
        while not _whole_response(answer):
            answer += await stream.receive()
    return answer


@pytest.mark.parametrize("kind", ["uvicorn", "uvicorn-direct"])
async def test_keep_alive_times_out_from_the_last_response(tmp_path: Path, upstream: Upstream, kind: str,
                                                           keep_alive_1s: float) -> None:
    """The keep-alive timer (one per connection, checked at its deadline rather than made and
    cancelled per request) closes a connection idle for the timeout since its last response, and
    only then: requests closer together than the timeout keep it open however long it lives."""
    async with start_server(tmp_path / "data", http_server=kind) as server, \
            start_agent(server, upstream.port) as running:
        request = f"GET /status/200 HTTP/1.1\r\nHost: {running.alias}.localhost\r\n\r\n".encode()
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.http)
        async with stream:
            for _ in range(5):  # 5 x 0.6 s: past the timeout since the first response, never since the last
                assert (await _one_response(stream, request)).startswith(b"HTTP/1.1 200 ")
                await anyio.sleep(0.6 * keep_alive_1s)
            answered = asyncio.get_running_loop().time()
            assert (await _one_response(stream, request)).startswith(b"HTTP/1.1 200 ")
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
            idle = asyncio.get_running_loop().time() - answered
    assert keep_alive_1s - 0.05 <= idle <= keep_alive_1s + 1.5, idle
