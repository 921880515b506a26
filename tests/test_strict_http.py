"""Strict HTTP at the edge (issue 10): framing a visitor cannot make ambiguous, targets and headers
the local app can trust. Each test replays the attack through a real server, agent and app, on role
``all`` and through an edge of a cluster (tests/stack.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from comzy import ForwardRequest, hookimpl
from comzy.core.server import ServerContext
from comzy.core.settings import ServerSettings
from tests.conftest import RunningAgent
from tests.helpers import wait_until
from tests.stack import Stacks, stack_fixture, stacks_fixture, tunnel_fixture  # noqa: F401 (both kinds)
from tests.test_http_fidelity import echo, header_values
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

HTTP_SERVER = os.environ.get("COMZY_TEST_HTTP_SERVER") or ServerSettings.model_fields["http_server"].default


def host_of(tunnel: RunningAgent) -> str:
    return f"{tunnel.alias}.{tunnel.public.settings.base_domain}"


async def raw_request(server: ServerContext, request: bytes) -> bytes:
    """Send ``request`` as is on a new connection; everything the listener answers until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
        await stream.send(request)
        answer = b""
        with anyio.fail_after(10):
            while True:
                try:
                    answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return answer
                if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                    head, _, body = answer.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(body) >= length:
                        return answer


async def test_content_length_with_transfer_encoding_is_400_and_never_forwarded(
        tunnel: RunningAgent, upstream: Upstream) -> None:
    smuggle = (f"POST /smuggle HTTP/1.1\r\nHost: {host_of(tunnel)}\r\nContent-Length: 4\r\n"
               "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()
    answer = await raw_request(tunnel.public, smuggle)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    if HTTP_SERVER == "hypercorn":  # uvicorn's parser refuses it before the edge, with its own words
        assert b"Content-Length and Transfer-Encoding together are refused" in answer
    assert not [s for s in upstream.requests if s["path"] == "/smuggle"]
    async with tunnel.visitor() as client:  # the tunnel is fine
        assert (await client.get("/after")).status_code == 200


@pytest.mark.parametrize(("target", "path", "query"), [
    (b"http://evil.example/x?q=1", "/x", "q=1"),
    (b"https://user:pw@evil.example:8443/a/b", "/a/b", ""),
    (b"http://evil.example", "/", ""),
])
async def test_absolute_form_target_reaches_the_app_in_origin_form(
        tunnel: RunningAgent, target: bytes, path: str, query: str) -> None:
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host_of(tunnel).encode() + b"\r\nConnection: close\r\n\r\n"
    answer = await raw_request(tunnel.public, request)
    if HTTP_SERVER.startswith("uvicorn") and path == "/" and not target.endswith(b"/"):
        # httptools refuses an absolute-form target without a path: refused is safe too.
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        return
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    info = httpx.Response(200, content=answer.partition(b"\r\n\r\n")[2]).json()
    assert (info["raw_path"], info["query_string"]) == (path, query)
    assert header_values(info, "host") == [host_of(tunnel)]


@pytest.mark.parametrize("named", ["host", "Host, content-length", "x-forwarded-for, host"])
async def test_connection_header_never_strips_host_or_content_length(tunnel: RunningAgent, named: str) -> None:
    async with tunnel.visitor() as client:
        info = echo(await client.post("/conn", content=b"12345", headers={"connection": named}))
    assert header_values(info, "host") == [host_of(tunnel)]
    assert header_values(info, "content-length") == ["5"]
    assert info["body_size"] == 5
    assert header_values(info, "x-forwarded-for") == ["127.0.0.1"]


@pytest.fixture
async def h2_tunnel(stacks: Stacks, upstream: Upstream) -> AsyncIterator[RunningAgent]:
    if HTTP_SERVER != "hypercorn":
        pytest.skip("HTTP/2 is served by hypercorn only (uvicorn speaks HTTP/1.1)")
    async with stacks.start() as stack, stack.agent(upstream.port) as running:
        yield running


def h2_client(tunnel: RunningAgent) -> httpx.AsyncClient:
    # Plain-text HTTP/2 with prior knowledge (h2c): what a client behind a TLS-terminating
    # proxy, or any gRPC-style client, sends.
    return tunnel.visitor(http1=False, http2=True)


async def test_http2_post_without_content_length_streams_its_body(h2_tunnel: RunningAgent) -> None:
    pieces = [os.urandom(100_000) for _ in range(5)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with h2_client(h2_tunnel) as client:
        response = await client.post("/h2-upload", content=body())
    info = echo(response)
    assert response.http_version == "HTTP/2"
    assert header_values(info, "content-length") == []  # h2 announced none: the body went chunked
    assert info["body_size"] == 500_000
    assert info["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


async def test_http2_post_whose_body_came_whole_gets_its_length(h2_tunnel: RunningAgent) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a small body"

    async with h2_client(h2_tunnel) as client:
        info = echo(await client.post("/h2-small", content=body()))
    assert info["body_size"] == len(b"a small body")
    assert header_values(info, "content-length") in ([str(len(b"a small body"))], [])


async def test_http2_get_has_no_body(h2_tunnel: RunningAgent) -> None:
    async with h2_client(h2_tunnel) as client:
        response = await client.get("/h2-get")
    info = echo(response)
    assert response.http_version == "HTTP/2"
    assert info["body_size"] == 0
    assert header_values(info, "content-length") == [] and header_values(info, "transfer-encoding") == []


async def test_http2_bodies_held_back_cannot_overrun_the_stream_limit(stacks: Stacks, upstream: Upstream) -> None:
    """An HTTP/2 request whose first DATA comes late used to pass the limits before its body came,
    and open its stream after: a thousand of them made a thousand streams (limit 256)."""
    if HTTP_SERVER != "hypercorn":
        pytest.skip("HTTP/2 is served by hypercorn only (uvicorn speaks HTTP/1.1)")
    release_body = anyio.Event()
    results: dict[str, httpx.Response] = {}

    async def late_body() -> AsyncIterator[bytes]:
        await release_body.wait()
        yield b"late"

    async with stacks.start(max_streams_per_tunnel=2) as stack, \
            stack.agent(upstream.port) as running, h2_client(running) as h2, running.visitor() as h1:

        async def hold(name: str) -> None:
            results[name] = await h1.get(f"/hold/{name}")

        async def late_post() -> None:
            results["late"] = await h2.post("/late", content=late_body())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "a")
                await upstream.gate("a-arrived").wait()
                tg.start_soon(late_post)  # one stream open: it would pass the limit now...
                await anyio.sleep(0.2)  # (an observation window: its HEADERS reach the edge)
                tg.start_soon(hold, "b")
                await upstream.gate("b-arrived").wait()
                release_body.set()  # ... but its body comes once the tunnel is full
                await wait_until(lambda: "late" in results)
                upstream.gate("a").set()
                upstream.gate("b").set()
    assert results["late"].status_code == 503, results["late"].text
    assert [r["path"] for r in upstream.requests if r["type"] == "http"] == ["/hold/a", "/hold/b"]


SPOOFED = {"x-forwarded-for": "203.0.113.7", "x-real-ip": "203.0.113.8", "forwarded": "for=203.0.113.9",
           "x-forwarded-proto": "https", "x-forwarded-host": "proxy.example", "x-forwarded-port": "443",
           "x-forwarded-prefix": "/app", "x-forwarded-ssl": "on"}


async def test_forwarding_headers_from_a_visitor_are_dropped(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        info = echo(await client.get("/spoof", headers=SPOOFED))
    assert header_values(info, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(info, "x-forwarded-proto") == ["http"]
    assert header_values(info, "x-forwarded-host") == [host_of(tunnel)]
    for name in ("x-real-ip", "forwarded", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-ssl"):
        assert header_values(info, name) == [], name


class ClientSeen:
    """A plugin recording the client address plugins are given for each request."""

    def __init__(self) -> None:
        self.clients: list[str] = []

    @hookimpl
    def before_forward(self, request: ForwardRequest) -> None:
        self.clients.append(request.client)


async def test_forwarding_headers_from_a_trusted_proxy_are_kept(stacks: Stacks, upstream: Upstream) -> None:
    seen = ClientSeen()
    async with stacks.start([("seen", seen)], trusted_proxies="10.0.0.0/8, 127.0.0.1/32") as stack, \
            stack.agent(upstream.port) as running, running.visitor() as client:
        info = echo(await client.get("/proxied", headers=SPOOFED))
    # Plugins (request logs, throttles, the dashboard) see the client the proxy names.
    assert seen.clients == ["203.0.113.7"]
    assert header_values(info, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    # A TLS-terminating proxy said https: the app must not be told http.
    for name, sent in SPOOFED.items():
        if name not in ("x-forwarded-for", "forwarded"):
            assert header_values(info, name) == [sent], name
    # Its Forwarded gets an element for the hop the edge saw.
    assert header_values(info, "forwarded") == [f"for=203.0.113.9, for=127.0.0.1;proto=http;host={host_of(running)}"]


def test_trusted_proxies_setting_names_a_bad_entry(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from comzy.core.settings import explain_validation_error
    from tests.conftest import make_settings

    with pytest.raises(ValidationError) as info:
        make_settings(tmp_path, trusted_proxies="127.0.0.1/32, nginx")
    message = explain_validation_error(type(make_settings(tmp_path)), info.value)
    assert "COMZY_TRUSTED_PROXIES" in message and "'nginx' is not an IP address or CIDR" in message
