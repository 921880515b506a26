"""An edge serves a bodyless request to a cached route without ASGI and without a task.

End to end over a real nats-server: an edge and a control node in this process (``tests.stack``),
a real agent and upstream. The edge's public listener is uvicorn-direct (the default): once an
alias's route is cached, a plain request goes from uvicorn's parser straight onto a stream of the
link to the control node (``EdgeApp.serve_plain``) and its response is written from that stream's
events (``_Taskless``). Each test checks that no request task is waiting at the edge while the
exchange is under way (so it fails on the ASGI path) and one of the exchange's ends: the response
timeout, the link lost before the head (a GET sent again, a DELETE answered 502 with the reason),
the link or the upstream lost mid-response (the visitor's connection aborted), and a download
larger than the windows paced by credit.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.core import hookspecs
from comzy.core.cluster.edge_router import EdgeRouter, RouteEntry
from comzy.core.edge import EdgeApp
from comzy.core.server import ServerContext
from comzy.core.stream import Stream
from comzy.core.types import Exchange, ForwardRequest, Reject
from tests.cluster.conftest import NatsServer
from tests.conftest import RunningAgent
from tests.helpers import wait_until
from tests.stack import Stack, Stacks
from tests.test_direct_http import exchange, request_tasks
from tests.upstream import Upstream, pattern_block

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


@asynccontextmanager
async def edge_tunnel(tmp_path: Path, nats_server: NatsServer, upstream: Upstream,
                      **overrides: Any) -> AsyncIterator[tuple[Stack, RunningAgent]]:
    """An edge, a control node and an agent for ``upstream``, the alias's route cached at the edge."""
    stacks = Stacks("cluster", tmp_path, nats_server)
    async with stacks.start(http_server="uvicorn-direct", **overrides) as stack, \
            stack.agent(upstream.port) as tunnel:
        async with tunnel.visitor() as client:
            # The first request looks the route up (a NATS request: the ASGI path); the rest are plain.
            assert (await client.get("/status/200")).status_code == 200
        assert route(stack.public, tunnel.alias) is not None
        yield stack, tunnel


def route(edge: ServerContext, alias: str) -> RouteEntry | None:
    router = edge.router
    assert isinstance(router, EdgeRouter)
    return router.cached(alias)


def host(tunnel: RunningAgent) -> bytes:
    return f"{tunnel.alias}.localhost".encode()


def edge_streams(stack: Stack, alias: str) -> list[Stream]:
    """The edge's streams on the link to the node holding ``alias``."""
    entry = route(stack.public, alias)
    return [] if entry is None else list(entry.session.streams.values())


def control_streams(stack: Stack, alias: str) -> dict[int, Stream]:
    """The control node's streams to the agent (the relayed ones)."""
    entry = stack.control.registry.get(alias)
    assert entry is not None
    return entry.session.streams


async def drop_links(stack: Stack, reason: str) -> None:
    """The control node ends its links (as when it goes away): the edge hears a BYE with ``reason``."""
    assert stack.control.cluster is not None
    stack.control.cluster.links.close_all(reason)


async def test_the_response_timeout_is_504_and_resets_the_stream_at_the_control_node(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream, response_timeout=0.5) as (stack, tunnel):
        close = b"GET /status/200 HTTP/1.1\r\nHost: " + host(tunnel) + b"\r\nConnection: close\r\n\r\n"
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def visit() -> None:
                answers.append(await exchange(stack.public, b"GET /hang HTTP/1.1\r\nHost: " + host(tunnel)
                                              + b"\r\n\r\n" + close))

            tg.start_soon(visit)
            await wait_until(lambda: bool(control_streams(stack, tunnel.alias)))
            assert request_tasks() == []  # the exchange waits for its head without a task
        answer = answers[0]
        assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), answer
        assert b"\r\n\r\nThe local service did not answer within 0.5 s.\n" in answer
        # Kept alive after the 504: the pipelined request behind it is answered on the same connection.
        assert answer.count(b"HTTP/1.1 ") == 2 and answer.endswith(b"status 200\n")
        # The CANCEL crossed the link and the relay: nothing is left open on either node.
        await wait_until(lambda: not control_streams(stack, tunnel.alias) and not edge_streams(stack, tunnel.alias))
        upstream.gate("hang").set()


async def test_a_get_whose_link_is_lost_before_the_head_is_sent_again(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel), tunnel.visitor() as client:
        first_link = route(stack.public, tunnel.alias).session  # type: ignore[union-attr]
        async with anyio.create_task_group() as tg:
            answers: list[httpx.Response] = []

            async def visit() -> None:
                answers.append(await client.get("/hold/again"))

            tg.start_soon(visit)
            with anyio.fail_after(10):
                await upstream.gate("again-arrived").wait()
            assert request_tasks() == []
            upstream.gate("again-arrived").__init__()  # type: ignore[misc]  # armed for the second arrival
            await drop_links(stack, "the test's control node went away")
            # Looked up again and sent over a new link: the upstream sees the request a second time.
            with anyio.fail_after(10):
                await upstream.gate("again-arrived").wait()
            assert request_tasks() == []  # the retry's lookup ran in a task; the wait for its head does not
            upstream.gate("again").set()
        assert answers[0].status_code == 200 and answers[0].text == "released again\n"
        assert [scope["path"] for scope in upstream.requests].count("/hold/again") == 2
        assert first_link.closed is not None
        assert route(stack.public, tunnel.alias).session is not first_link  # type: ignore[union-attr]
        await wait_until(lambda: not control_streams(stack, tunnel.alias))


async def test_a_retry_whose_lookup_fails_unexpectedly_is_still_answered(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the retry's lookup (an exception nobody expected) must not leave the visitor waiting:
    the retry's task is past every deadline, so it answers 502 itself."""
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel), tunnel.visitor() as client:
        async with anyio.create_task_group() as tg:
            answers: list[httpx.Response] = []

            async def visit() -> None:
                answers.append(await client.get("/hold/bug"))

            tg.start_soon(visit)
            with anyio.fail_after(10):
                await upstream.gate("bug-arrived").wait()

            async def broken_lookup(self: EdgeApp, alias: str, host: str) -> Any:
                raise RuntimeError("a lookup bug")

            monkeypatch.setattr(EdgeApp, "_find_route", broken_lookup)
            with anyio.fail_after(10):
                await drop_links(stack, "the test's control node went away")
                await wait_until(lambda: bool(answers))
        response = answers[0]
        assert response.status_code == 502
        assert response.text == "The tunnel failed before a response: RuntimeError('a lookup bug')\n"
        upstream.gate("bug").set()


async def test_a_delete_whose_link_is_lost_before_the_head_is_502_with_the_reason(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel), tunnel.visitor() as client:
        async with anyio.create_task_group() as tg:
            answers: list[httpx.Response] = []

            async def visit() -> None:
                answers.append(await client.delete("/hold/del"))

            tg.start_soon(visit)
            with anyio.fail_after(10):
                await upstream.gate("del-arrived").wait()
            assert request_tasks() == []
            await drop_links(stack, "the test's control node went away")
        response = answers[0]
        assert response.status_code == 502
        assert response.text == (f"The tunnel failed before a response: tunnel session ended: node "
                                 f"{stack.control.node} ended the link: the test's control node went away\n")
        assert [scope["path"] for scope in upstream.requests].count("/hold/del") == 1  # not sent again
        upstream.gate("del").set()
        # The tunnel is unharmed: the next request looks the route up again and is served.
        assert (await client.get("/status/200")).status_code == 200


async def test_the_link_lost_mid_response_aborts_the_visitor(tmp_path: Path, nats_server: NatsServer,
                                                              upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel), tunnel.visitor() as client:
        received = 0
        async with client.stream("GET", f"/bytes/{512 * MIB}") as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            while received < MIB:
                received += len(await anext(chunks))
            assert request_tasks() == []
            await drop_links(stack, "the test's control node went away mid-response")
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # never a clean, truncated 200
                async for chunk in chunks:
                    received += len(chunk)
        assert received < 512 * MIB


async def test_the_upstream_lost_mid_chunked_response_aborts_the_visitor(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel):
        answer = await exchange(stack.public, b"GET /drop-mid-chunked HTTP/1.1\r\nHost: " + host(tunnel) + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked\r\n" in answer
        assert b"y" * 1000 in answer
        assert not answer.endswith(b"0\r\n\r\n") and not answer.endswith(b"<open>")  # closed, never ended


async def test_a_download_larger_than_the_windows_is_paced_by_credit(tmp_path: Path, nats_server: NatsServer,
                                                                     upstream: Upstream) -> None:
    size = 64 * MIB
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel):
        async with await anyio.connect_tcp("127.0.0.1", stack.public.ports.http) as visitor:
            await visitor.send(b"GET /bytes/%d HTTP/1.1\r\nHost: " % size + host(tunnel)
                               + b"\r\nConnection: close\r\n\r\n")
            first = await visitor.receive()
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            # Unread, the response stops: the edge's stream holds at most its window (the agent
            # waits for credit), which is not read while the visitor's connection is paused.
            await wait_until(lambda: bool(edge_streams(stack, tunnel.alias))
                             and edge_streams(stack, tunnel.alias)[0].buffered)
            assert request_tasks() == []
            [held] = edge_streams(stack, tunnel.alias)
            assert held._buffered <= held._window
            digest, block, received = hashlib.sha256(), pattern_block(), len(first)
            head = first.index(b"\r\n\r\n") + 4
            digest.update(first[head:])
            with anyio.fail_after(60):
                while True:
                    try:
                        data = await visitor.receive()
                    except anyio.EndOfStream:
                        break
                    received += len(data)
                    digest.update(data)
        assert received - head == size
        expected = hashlib.sha256()
        for offset in range(0, size, len(block)):
            expected.update(block[:min(len(block), size - offset)])
        assert digest.hexdigest() == expected.hexdigest()
        await wait_until(lambda: not edge_streams(stack, tunnel.alias))


async def test_a_visitor_who_leaves_mid_download_resets_the_stream_across_the_link(
        tmp_path: Path, nats_server: NatsServer, upstream: Upstream) -> None:
    async with edge_tunnel(tmp_path, nats_server, upstream) as (stack, tunnel):
        async with await anyio.connect_tcp("127.0.0.1", stack.public.ports.http) as visitor:
            await visitor.send(b"GET /bytes/%d HTTP/1.1\r\nHost: " % (512 * MIB) + host(tunnel) + b"\r\n\r\n")
            assert (await visitor.receive()).startswith(b"HTTP/1.1 200 OK\r\n")
            await wait_until(lambda: bool(edge_streams(stack, tunnel.alias))
                             and edge_streams(stack, tunnel.alias)[0].buffered)
            assert request_tasks() == []
        # The visitor hung up: the edge resets its stream, the RESET crosses the link and the relay.
        await wait_until(lambda: not edge_streams(stack, tunnel.alias) and not control_streams(stack, tunnel.alias))
        await wait_until(lambda: bool(tunnel.reporter.served))
        assert tunnel.reporter.served[-1].error is not None
        async with tunnel.visitor() as client:
            assert (await client.get("/status/200")).status_code == 200


class EdgeHooks:
    """The edge's own hooks: a custom host for the tunnel, a refusal, a header added, every exchange recorded."""

    def __init__(self) -> None:
        self.alias = ""
        self.seen: list[Exchange] = []

    @hookspecs.hookimpl
    def resolve_host(self, host: str) -> str | None:
        return self.alias if host == "custom.test" else None

    @hookspecs.hookimpl
    def before_forward(self, request: ForwardRequest) -> None:
        if request.target.startswith(b"/private"):
            raise Reject("private", 403, "Private, says the edge.\n")
        request.headers.append((b"x-edge-hook", b"yes"))

    @hookspecs.hookimpl
    def after_response(self, exchange: Exchange) -> None:
        self.seen.append(exchange)


async def test_the_edges_hooks_run_on_the_plain_path(tmp_path: Path, nats_server: NatsServer,
                                                     upstream: Upstream) -> None:
    hooks = EdgeHooks()
    stacks = Stacks("cluster", tmp_path, nats_server)
    async with stacks.start(edge_plugins=[("edge-hooks", hooks)], http_server="uvicorn-direct") as stack, \
            stack.agent(upstream.port) as tunnel:
        hooks.alias = tunnel.alias
        custom = httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.public.ports.http}",
                                   headers={"host": "custom.test"}, timeout=30.0)
        async with custom:
            assert (await custom.get("/status/200")).status_code == 200  # the lookup: the ASGI path
            async with anyio.create_task_group() as tg:
                answers: list[httpx.Response] = []

                async def visit() -> None:
                    answers.append(await custom.get("/hold/hooked"))

                tg.start_soon(visit)
                with anyio.fail_after(10):
                    await upstream.gate("hooked-arrived").wait()
                assert request_tasks() == []
                upstream.gate("hooked").set()
            assert answers[0].status_code == 200 and answers[0].text == "released hooked\n"
            assert (b"x-edge-hook", b"yes") in upstream.requests[-1]["headers"]  # before_forward's edit arrived
            refused = await custom.get("/private")
            assert refused.status_code == 403 and refused.text == "Private, says the edge.\n"
        assert [s["path"] for s in upstream.requests].count("/private") == 0
        await wait_until(lambda: len(hooks.seen) == 2)  # the refusal is not an exchange
        held = hooks.seen[1]
        assert (held.request.target, held.status, held.bytes_out, held.error) == (b"/hold/hooked", 200, 16, None)
        assert held.tunnel.alias == tunnel.alias and held.tunnel.node == stack.control.node
