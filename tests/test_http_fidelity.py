"""End-to-end HTTP fidelity: a visitor, the real server, the real agent and a real local app.

Each test drives real HTTP over loopback through the public listener, the agent WebSocket
and the agent's forwarder to an upstream on port 0, and checks what arrives on the far side.
Every test runs twice (tests/stack.py): on role ``all``, and through an edge of a cluster, where
the visitor's stream also crosses NATS and the control node's relay.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import h11
import httpx
import pytest

from comzy.core.server import ServerContext
from tests.conftest import RunningAgent, visitor
from tests.helpers import serve_tcp, upgrade_status_line
from tests.stack import Stack, Stacks, stack_fixture, stacks_fixture, tunnel_fixture  # noqa: F401 (both kinds)
from tests.upstream import Upstream, pattern_block

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
TRANSPORT_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


def echo(response: httpx.Response) -> dict[str, Any]:
    """The upstream echo route's JSON, after checking it answered."""
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


def header_values(info: dict[str, Any], name: str) -> list[str]:
    """Values of header ``name`` (any case) as the upstream saw them, in order."""
    return [v for n, v in info["headers"] if n.lower() == name]


def pattern_digest(total: int) -> str:
    """sha256 of the first ``total`` bytes of the upstream's repeating download pattern."""
    block = pattern_block()
    digest = hashlib.sha256()
    left = total
    while left:
        chunk = block[: min(len(block), left)]
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def free_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def raw_exchanges(server: ServerContext, host: str,
                        requests: list[tuple[str, str]]) -> list[tuple[h11.Response, bytes]]:
    """Send requests one after another on ONE keep-alive connection, parsing replies with h11.

    Any stray body byte after a HEAD, 204 or 304 response would be read as the next status
    line and make h11 raise, which an ordinary client (that drops the connection) would hide.
    """
    conn = h11.Connection(h11.CLIENT)
    results: list[tuple[h11.Response, bytes]] = []
    async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as sock:
        for method, target in requests:
            await sock.send(conn.send(h11.Request(method=method, target=target, headers=[("Host", host)]))
                            + conn.send(h11.EndOfMessage()))
            response: h11.Response | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await sock.receive())
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert response is not None
            results.append((response, body))
            conn.start_next_cycle()
    return results


# -- methods, targets, headers ---------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_any_method_reaches_local_app(tunnel: RunningAgent, method: str) -> None:
    body = f"body of {method}".encode() if method in ("POST", "PUT", "PATCH", "PROPFIND") else b""
    async with tunnel.visitor() as client:
        info = echo(await client.request(method, "/dav/item", content=body or None))
    assert info["method"] == method
    assert info["raw_path"] == "/dav/item"
    assert info["body_size"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("target", [
    b"/a%2Fb/%7E/x?q=%20a&b=1+2",
    b"/%E2%82%AC/sp%20ace/?x=%2F%3F%26&empty=&&flag&q=a?b",
    b"/a/./b/../c//d;p=1?%zz=%",
    b"/",
    b"/no-query",
])
async def test_raw_target_preserved_byte_for_byte(tunnel: RunningAgent, target: bytes) -> None:
    path, _, query = target.partition(b"?")
    async with tunnel.visitor() as client:
        info = echo(await client.request("GET", "/", extensions={"target": target}))
    assert info["raw_path"].encode("latin-1") == path
    assert info["query_string"].encode("latin-1") == query


async def test_raw_path_url_form(tunnel: RunningAgent) -> None:
    """The same, built with httpx.URL(raw_path=...) as a client library would."""
    raw = b"/a%2Fb/%7E/x?q=%20a&b=1+2"
    url = httpx.URL(f"http://127.0.0.1:{tunnel.public.ports.http}", raw_path=raw)
    async with tunnel.visitor() as client:
        info = echo(await client.request("GET", url))
    assert info["raw_path"] == "/a%2Fb/%7E/x"
    assert info["query_string"] == "q=%20a&b=1+2"


async def test_request_header_duplicates_and_order(tunnel: RunningAgent) -> None:
    sent = [("X-Dup", "one"), ("x-order-A", "1"), ("X-DUP", "two"), ("X-Order-b", "2"), ("Accept-Encoding", "br")]
    async with tunnel.visitor() as client:
        info = echo(await client.get("/headers", headers=sent))
    watched = {name.lower() for name, _ in sent}
    # ASGI lowercases names; values, duplicates and their relative order must survive.
    arrived = [(n.lower(), v) for n, v in info["headers"] if n.lower() in watched]
    assert arrived == [(n.lower(), v) for n, v in sent]


async def test_response_duplicate_headers_arrive_separately(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        response = await client.get("/cookies")
    assert response.status_code == 200
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.get_list("x-multi") == ["one", "two"]
    raw = [(n.lower(), v) for n, v in response.headers.raw if n.lower() in (b"set-cookie", b"x-multi")]
    assert raw == [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/"),
                   (b"x-multi", b"one"), (b"x-multi", b"two")]
    assert sorted(response.cookies.keys()) == ["a", "b"]


# -- HEAD, bodiless statuses, status codes -------------------------------------------------

async def test_head_204_304_carry_no_body(tunnel: RunningAgent) -> None:
    host = f"{tunnel.alias}.{tunnel.public.settings.base_domain}"
    results = await raw_exchanges(tunnel.public, host, [
        ("HEAD", "/bytes/5000"), ("GET", "/status/204"), ("GET", "/status/304"), ("HEAD", "/status/200"),
        ("GET", "/status/201"),
    ])
    (head, head_body), (no_content, nc_body), (not_modified, nm_body), (_, _), (created, created_body) = results
    assert head.status_code == 200
    assert dict(head.headers)[b"content-length"] == b"5000"
    assert head_body == b""
    assert no_content.status_code == 204 and nc_body == b""
    assert not_modified.status_code == 304 and nm_body == b""
    # The connection stayed in step: the last reply is read cleanly after the bodiless ones.
    assert created.status_code == 201 and created_body == b"status 201\n"


@pytest.mark.parametrize("code", [200, 201, 202, 299, 404, 418, 451, 500, 503, 599])
async def test_status_codes_as_sent(tunnel: RunningAgent, code: int) -> None:
    async with tunnel.visitor() as client:
        response = await client.get(f"/status/{code}")
    assert response.status_code == code
    assert response.headers["x-status"] == str(code)
    assert response.content == f"status {code}\n".encode()


# -- streaming -----------------------------------------------------------------------------

async def test_chunked_upload_of_unknown_length(tunnel: RunningAgent) -> None:
    parts = [b"first", b"x" * 100_000, b"", b"\x00\xff" * 3, bytes(range(256)) * 300, b"last"]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await anyio.lowlevel.checkpoint()  # separate writes, so the body really arrives in pieces

    async with tunnel.visitor() as client:
        info = echo(await client.post("/upload", content=body()))
    whole = b"".join(parts)
    assert info["body_size"] == len(whole)
    assert info["body_sha256"] == hashlib.sha256(whole).hexdigest()


async def test_20_mib_upload_byte_exact(tunnel: RunningAgent) -> None:
    total = 20 * MIB
    digest = hashlib.sha256()
    block = pattern_block()

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            # Vary the chunk edges so frame boundaries never line up with the pattern.
            chunk = block[: min(len(block) - sent % 997, total - sent)]
            digest.update(chunk)
            sent += len(chunk)
            yield chunk

    async with tunnel.visitor() as client:
        info = echo(await client.post("/upload", content=body(), headers={"content-length": str(total)}))
    assert info["body_size"] == total
    assert info["body_sha256"] == digest.hexdigest()


async def test_50_mib_download_byte_exact(tunnel: RunningAgent) -> None:
    total = 50 * MIB
    digest = hashlib.sha256()
    size = 0
    async with tunnel.visitor() as client, client.stream("GET", f"/bytes/{total}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(total)
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == total
    assert digest.hexdigest() == pattern_digest(total)


async def test_sse_head_then_each_event_as_sent(tunnel: RunningAgent, upstream: Upstream) -> None:
    async with tunnel.visitor() as client:
        with anyio.fail_after(5):
            async with client.stream("GET", "/sse") as response:
                # The head is here while the upstream still waits to send its first event.
                assert not upstream.gate("sse0").is_set()
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                chunks = response.aiter_raw()
                pending = b""
                for i in range(3):
                    upstream.gate(f"sse{i}").set()
                    expected = f"data: event {i}\n\n".encode()
                    # Event i must arrive while gate i+1 is still closed: as sent, not at the end.
                    while len(pending) < len(expected):
                        pending += await anext(chunks)
                    assert pending[: len(expected)] == expected
                    pending = pending[len(expected):]
                assert not upstream.gate("sse3").is_set()
                rest = b"".join([chunk async for chunk in chunks])
                assert pending + rest == b""


@pytest.mark.parametrize("path", ["/gzip", "/gzip-fixed", "/br"])
async def test_content_encoding_passes_untouched(tunnel: RunningAgent, upstream: Upstream, path: str) -> None:
    async def raw_get(client: httpx.AsyncClient) -> tuple[httpx.Headers, bytes]:
        async with client.stream("GET", path, headers={"accept-encoding": "gzip, br"}) as response:
            assert response.status_code == 200
            return response.headers, b"".join([chunk async for chunk in response.aiter_raw()])

    async with tunnel.visitor() as client:
        headers, body = await raw_get(client)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{upstream.port}") as direct:
        direct_headers, direct_body = await raw_get(direct)
    assert headers["content-encoding"] == direct_headers["content-encoding"]
    assert headers["content-length"] == str(len(body))
    if path == "/gzip":
        # gzip stamps the time into the stream, so compare the decoded text and the framing.
        assert body[:2] == b"\x1f\x8b"
        assert gzip.decompress(body) == gzip.decompress(direct_body)
    else:
        assert body == direct_body


# -- proxy headers ---------------------------------------------------------------------------

async def test_hop_by_hop_request_headers_stripped_and_forwarded_set(tunnel: RunningAgent) -> None:
    sent = [
        ("Connection", "close, X-Secret-Hop"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
        ("Upgrade", "foo/1"), ("Trailer", "X-Checksum"), ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("X-Secret-Hop", "must not cross"), ("X-Kept", "yes"), ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-IP", "203.0.113.8"), ("Forwarded", "for=203.0.113.9"), ("X-Forwarded-Proto", "https"),
    ]
    async with tunnel.visitor() as client:
        info = echo(await client.get("/hop", headers=sent))
    names = {n.lower() for n, _ in info["headers"]}
    for hop in ("connection", "keep-alive", "te", "upgrade", "trailer", "proxy-authorization", "x-secret-hop"):
        assert hop not in names, f"{hop} crossed the tunnel"
    assert header_values(info, "x-kept") == ["yes"]
    # The visitor is no trusted proxy (COMZY_TRUSTED_PROXIES is unset): what it claims is dropped.
    assert header_values(info, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(info, "x-real-ip") == []
    assert header_values(info, "forwarded") == []
    assert header_values(info, "x-forwarded-proto") == ["http"]
    host = f"{tunnel.alias}.{tunnel.public.settings.base_domain}"
    assert header_values(info, "x-forwarded-host") == [host]
    assert header_values(info, "host") == [host]


async def test_forwarded_for_set_without_prior(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        info = echo(await client.get("/xff"))
    assert header_values(info, "x-forwarded-for") == ["127.0.0.1"]


async def test_hop_by_hop_response_headers_stripped(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        response = await client.get("/hop-headers")
    assert response.status_code == 200
    assert response.text == "hop\n"
    assert response.headers["x-resp-kept"] == "yes"
    for hop in ("keep-alive", "x-resp-hop", "proxy-authenticate", "trailer", "upgrade"):
        assert hop not in response.headers, f"{hop} reached the visitor"
    assert "x-resp-hop" not in response.headers.get("connection", "").lower()


async def test_host_rewritten_when_asked(stack: Stack, upstream: Upstream) -> None:
    async with stack.agent(upstream.port, rewrite_host=True) as running, running.visitor() as client:
        info = echo(await client.get("/host"))
    assert header_values(info, "host") == [f"127.0.0.1:{upstream.port}"]
    # The original host is still available to the app.
    assert header_values(info, "x-forwarded-host") == [f"{running.alias}.{stack.public.settings.base_domain}"]


# -- errors ------------------------------------------------------------------------------------

async def test_unknown_host_404_names_host(tunnel: RunningAgent) -> None:
    async with visitor(tunnel.public, "nobody-here") as client:
        response = await client.get("/x")
    assert response.status_code == 404
    assert "Tunnel Not Active" in response.text
    assert f"nobody-here.{tunnel.public.settings.base_domain}" in response.text


async def test_local_app_refuses_502_names_address(stack: Stack) -> None:
    port = free_port()
    async with stack.agent(port) as running, running.visitor() as client:
        response = await client.get("/anything")
    assert response.status_code == 502
    assert f"127.0.0.1:{port}" in response.text
    assert "refused" in response.text


async def test_no_response_head_in_time_504(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start(response_timeout=0.5) as stack, \
            stack.agent(upstream.port) as running, running.visitor() as client:
        started = time.monotonic()
        response = await client.get("/hang")
        elapsed = time.monotonic() - started
        upstream.gate("hang").set()
        assert response.status_code == 504
        assert 0.45 <= elapsed < 5
        # The tunnel is still fine afterwards.
        assert (await client.get("/status/200")).status_code == 200


@pytest.mark.parametrize("path", ["/drop-mid", "/drop-mid-chunked"])
async def test_local_app_dies_mid_response_aborts_visitor(tunnel: RunningAgent, path: str) -> None:
    async with tunnel.visitor() as client:
        with pytest.raises(TRANSPORT_ERRORS):
            await client.get(path)
        # Only that exchange was hurt.
        assert (await client.get("/status/200")).status_code == 200


@pytest.mark.parametrize("path", [f"/bytes/{512 * MIB}", f"/chunked/{512 * MIB}"])
async def test_agent_lost_mid_response_aborts_visitor(tunnel: RunningAgent, path: str) -> None:
    session = tunnel.agent.session
    assert session is not None
    received = 0
    async with tunnel.visitor() as client, client.stream("GET", path) as response:
        assert response.status_code == 200
        chunks = response.aiter_raw()
        with anyio.fail_after(10):
            while received < MIB:
                received += len(await anext(chunks))
            await session.ws.aclose()  # the agent's link drops without a goodbye
            with pytest.raises(TRANSPORT_ERRORS):
                async for chunk in chunks:
                    received += len(chunk)
    assert received < 512 * MIB


# -- keep-alive with a local app that drops idle connections -------------------------------------

class IdleClosingApp:
    """A bare HTTP/1.1 keep-alive server that closes connections the way Node does.

    It closes a connection silently after ``idle`` seconds without a request. With
    ``answers_per_connection`` it also closes, without answering, any request past that
    count: the race where the app closes just as the next request is written.
    """

    def __init__(self, idle: float, answers_per_connection: int | None = None) -> None:
        self.idle = idle
        self.answers_per_connection = answers_per_connection
        self.connections = 0
        self.idle_closes = 0
        self.dropped_requests = 0
        self.port = 0

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        """Serve one connection."""
        self.connections += 1
        number = self.connections
        answered = 0
        buffer = b""
        async with client:
            while True:
                with anyio.move_on_after(self.idle) as idle:
                    while b"\r\n\r\n" not in buffer:
                        try:
                            buffer += await client.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            return
                if idle.cancelled_caught:
                    self.idle_closes += 1
                    return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                if self.answers_per_connection is not None and answered >= self.answers_per_connection:
                    self.dropped_requests += 1
                    return
                answered += 1
                target = head.split(b"\r\n", 1)[0].split(b" ")[1]
                body = b"conn %d answer %d for %s" % (number, answered, target)
                await client.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                  % (len(body), body))


@asynccontextmanager
async def serve_app(app: IdleClosingApp) -> AsyncIterator[IdleClosingApp]:
    """Run ``app`` on a free loopback port."""
    async with serve_tcp(app.handle) as port:
        app.port = port
        yield app


async def test_requests_after_local_app_drops_idle_connections(stack: Stack) -> None:
    async with serve_app(IdleClosingApp(idle=0.3)) as app, \
            stack.agent(app.port) as running, running.visitor() as client:
        for round_ in range(4):
            for i in range(2):  # the second one may reuse the connection the first one opened
                response = await client.get(f"/round/{round_}/{i}")
                assert response.status_code == 200
                assert response.text.endswith(f"for /round/{round_}/{i}")
            await anyio.sleep(0.45)  # longer than the app's idle timeout: it closes the connection
    assert app.idle_closes >= 3
    assert all(served.status == 200 for served in running.reporter.served)


async def test_request_on_connection_closed_under_it_is_retried(stack: Stack) -> None:
    async with serve_app(IdleClosingApp(idle=5, answers_per_connection=1)) as app, \
            stack.agent(app.port) as running, running.visitor() as client:
        for i in range(5):
            response = await client.get(f"/again/{i}")
            assert response.status_code == 200, response.text
            assert response.text.endswith(f"for /again/{i}")
    # Pooled connections really were closed under the agent, and no visitor saw it.
    assert app.dropped_requests >= 1
    assert all(served.status == 200 for served in running.reporter.served)


# -- limits and concurrency --------------------------------------------------------------------------

async def test_request_head_too_large_431(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start(max_request_head=4096) as stack, \
            stack.agent(upstream.port) as running, running.visitor() as client:
        big = await client.get("/big", headers={"x-big": "a" * 6000})
        small = await client.get("/small", headers={"x-big": "b" * 2000})
        # A WebSocket upgrade takes the same path through the limits.
        upgrade = await upgrade_status_line(stack.public.ports.http, client.headers["host"], "/ws/mirror",
                                            f"X-Big: {'c' * 6000}\r\n")
    assert upgrade.startswith(b"HTTP/1.1 431 ")
    assert big.status_code == 431
    assert big.headers["connection"] == "close"
    assert "4096" in big.text
    assert header_values(echo(small), "x-big") == ["b" * 2000]
    assert [s["path"] for s in upstream.requests if s["type"] == "http"] == ["/small"]


async def test_max_streams_per_tunnel_503_then_recovers(stacks: Stacks, upstream: Upstream) -> None:
    async with stacks.start(max_streams_per_tunnel=2) as stack, \
            stack.agent(upstream.port) as running, running.visitor() as client:
        held: dict[str, httpx.Response] = {}

        async def hold(name: str) -> None:
            held[name] = await client.get(f"/hold/{name}")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for name in ("a", "b"):
                    tg.start_soon(hold, name)
                    await upstream.gate(f"{name}-arrived").wait()
                busy = await client.get("/status/200")
                assert busy.status_code == 503
                assert busy.headers["retry-after"] == "1"
                # A refused visitor's connection is closed: kept alive, it would keep its head's buffer.
                assert busy.headers["connection"] == "close"
                # A WebSocket visitor takes the same path through the limits.
                status = await upgrade_status_line(stack.public.ports.http, client.headers["host"], "/ws/mirror")
                assert status.startswith(b"HTTP/1.1 503 ")
                upstream.gate("a").set()
                upstream.gate("b").set()
            assert held["a"].text == "released a\n"
            assert held["b"].text == "released b\n"
            again = await client.get("/status/200")
    assert again.status_code == 200


async def test_many_concurrent_requests(tunnel: RunningAgent) -> None:
    results: dict[int, dict[str, Any]] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = f"payload {i} ".encode() * (i * 50)
        response = await client.post(f"/many/{i}?i={i}", content=body)
        info = echo(response)
        assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
        results[i] = info

    async with tunnel.visitor() as client:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, client, i)
    assert sorted(results) == list(range(50))
    for i, info in results.items():
        assert info["raw_path"] == f"/many/{i}"
        assert info["query_string"] == f"i={i}"

