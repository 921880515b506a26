"""Requests without a body, answered from the local connection's callbacks (no task; issue 13).

The agent writes a bodyless request to an idle pooled connection from the REQUEST callback and
sends the response back from that connection's read callback when it came whole with its head
(``LocalForwarder.start``); anything else goes on in a task from where it was. Each test runs a
real server, a real in-process agent and a raw local app that answers each request with exact
bytes, and checks what the visitor gets, the agent's request line, whether the local connection was
reused, and which path answered (``LocalForwarder.answered_without_task``). Every test runs on
asyncio's loop and on uvloop's (the agent's default where installed), when uvloop is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from comzy.agent import forward
from comzy.agent.forward import LocalForwarder
from comzy.core import protocol as p
from comzy.core.server import ServerContext
from tests.conftest import RunningAgent, start_agent, start_server
from tests.helpers import IN_CI, serve_tcp, wait_until
from tests.test_inspector import inspected, requests

pytestmark = pytest.mark.anyio

try:
    import uvloop  # noqa: F401 (only whether it is there)

    LOOPS = ["asyncio", "uvloop"]
except ImportError:
    if IN_CI:  # the test extra installs it: CI must run the uvloop variants
        raise
    LOOPS = ["asyncio"]


@pytest.fixture(params=LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Each test, its server and agent included, on asyncio's loop and on uvloop's."""
    return "asyncio", {"use_uvloop": request.param == "uvloop"}

#: A piece of an answer that closes the connection (without answering, if it comes first).
CLOSE = b"<close>"
#: A piece that keeps the connection open, unanswered, until the agent closes it.
HOLD = b"<hold>"

Answer = Callable[[int, int, bytes], list[bytes]]


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Local: yes\r\n%b\r\n%b" % (len(body), extra, body)


class LocalApp:
    """A raw HTTP/1.1 local app: ``answer(connection, request, head)`` (numbered from 1 on each
    connection) gives the pieces each request gets, sent one by one with a pause between them."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.heads: list[bytes] = []
        #: Connections the agent closed while the app held a request unanswered.
        self.dropped: list[int] = []

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        index = 0
        buffer = b""
        async with client:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await client.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                index += 1
                self.heads.append(head)
                for piece in self.answer(number, index, head):
                    if piece == CLOSE:
                        return
                    if piece == HOLD:
                        try:
                            while True:
                                await client.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            self.dropped.append(number)
                            return
                    await client.send(piece)
                    await anyio.sleep(0.02)  # a read of its own on the agent's side


@asynccontextmanager
async def tunnel_to(tmp_path: Path, app: LocalApp) -> AsyncIterator[tuple[RunningAgent, httpx.AsyncClient]]:
    """A server, an in-process agent for ``app`` and a visitor."""
    async with start_server(tmp_path / "data") as server, serve_tcp(app.handle) as port, \
            start_agent(server, port) as agent, agent.visitor() as visitor:
        yield agent, visitor


def forwarder(agent: RunningAgent) -> LocalForwarder:
    return agent.agent.forwarder


def always(*pieces: bytes) -> Answer:
    return lambda _connection, _request, _head: list(pieces)


async def test_a_small_answer_goes_back_without_a_task_on_a_pooled_connection(tmp_path: Path) -> None:
    app = LocalApp(lambda connection, request, _head: [ok(b"reply %d.%d" % (connection, request))])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        answers = [await visitor.get(f"/page?n={n}", headers={"x-visitor": "1"}) for n in range(4)]
        assert [a.text for a in answers] == ["reply 1.1", "reply 1.2", "reply 1.3", "reply 1.4"]
        assert all(a.status_code == 200 and a.headers["x-local"] == "yes" for a in answers)
        # The first request found no idle connection (a task connected); the others took it.
        assert forwarder(agent).answered_without_task == 3
        assert app.connections == 1
        assert all(b"\r\nx-visitor: 1" in head for head in app.heads)
        assert app.heads[3].startswith(b"GET /page?n=3 HTTP/1.1\r\n")
        lines = agent.reporter.served
        assert [(s.method, s.target, s.status, s.error) for s in lines] == \
            [("GET", f"/page?n={n}", 200, None) for n in range(4)]
        assert all(s.duration > 0 for s in lines)


@pytest.mark.parametrize(("method", "answer", "status"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", 200),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 99\r\n\r\n", 304),
])
async def test_answers_without_a_body(tmp_path: Path, method: str, answer: bytes, status: int) -> None:
    app = LocalApp(lambda _connection, request, _head: [ok(b"first")] if request == 1 else [answer])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        assert (await visitor.get("/")).text == "first"
        for _ in range(2):
            response = await visitor.request(method, "/nothing")
            assert response.status_code == status
            assert response.content == b""
        assert forwarder(agent).answered_without_task == 2
        assert app.connections == 1  # no body was waited for: the connection serves on
        assert [s.status for s in agent.reporter.served] == [200, status, status]


async def test_informational_answers_are_skipped(tmp_path: Path) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    app = LocalApp(lambda _connection, request, _head: [ok()] if request == 1 else [early + ok(b"after hints")])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        response = await visitor.get("/hinted")
        assert (response.status_code, response.text) == (200, "after hints")
        assert forwarder(agent).answered_without_task == 1
        assert app.connections == 1


async def test_chunked_answers_whole_or_in_pieces(tmp_path: Path) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def answer(_connection: int, request: int, _head: bytes) -> list[bytes]:
        if request == 2:  # all in one read: answered from the callback
            return [chunked + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"]
        if request == 3:  # the body in later reads: a task reads it
            return [chunked + b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
        return [ok()]

    app = LocalApp(answer)
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        assert (await visitor.get("/whole")).text == "hello world"
        assert forwarder(agent).answered_without_task == 1
        assert (await visitor.get("/pieces")).text == "hello world"
        assert forwarder(agent).answered_without_task == 1
        assert (await visitor.get("/after")).text == "hello"
        assert forwarder(agent).answered_without_task == 2
        assert app.connections == 1  # both chunked answers ended cleanly: the connection serves on


async def test_an_answer_until_close_is_read_by_a_task_and_the_connection_not_reused(tmp_path: Path) -> None:
    def answer(_connection: int, request: int, _head: bytes) -> list[bytes]:
        if request == 2:
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ", b"the end", CLOSE]
        return [ok()]

    app = LocalApp(answer)
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        assert (await visitor.get("/stream")).text == "until the end"
        assert forwarder(agent).answered_without_task == 0
        assert (await visitor.get("/next")).text == "hello"
        assert app.connections == 2


async def test_a_large_answer_keeps_its_flow_control(tmp_path: Path) -> None:
    big = bytes(range(256)) * 4096 * 3  # 3 MiB: more than the stream's credit and several reads
    app = LocalApp(lambda _connection, request, _head: [ok(big)] if request == 2 else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        async with visitor.stream("GET", "/big") as response:
            got = bytearray()
            async for chunk in response.aiter_bytes():
                got += chunk
                if len(got) < 1024 * 1024:
                    await anyio.sleep(0.001)  # a slow visitor for the first MiB
        assert bytes(got) == big
        assert forwarder(agent).answered_without_task == 0
        assert (await visitor.get("/next")).text == "hello"
        assert app.connections == 1  # the whole body was read: the connection serves on


async def test_a_pooled_connection_closed_before_answering_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    # The local app closes its idle keep-alive connection just as the next request comes (Node
    # does after 5 s): the request goes again on a new connection, and the visitor never knows.
    app = LocalApp(lambda connection, request, _head: [CLOSE] if request == 2 else [ok(b"conn %d" % connection)])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        assert (await visitor.get("/")).text == "conn 1"
        response = await visitor.get("/again")
        assert (response.status_code, response.text) == (200, "conn 2")
        assert app.connections == 2
        assert [head.split(b"\r\n")[0] for head in app.heads] == \
            [b"GET / HTTP/1.1", b"GET /again HTTP/1.1", b"GET /again HTTP/1.1"]
        assert [(s.status, s.error) for s in agent.reporter.served] == [(200, None), (200, None)]


async def test_a_malformed_answer_on_a_pooled_connection_is_a_502_and_the_connection_closed(
        tmp_path: Path) -> None:
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    app = LocalApp(lambda connection, request, _head: [bad] if (connection, request) == (1, 2)
                   else [ok(b"conn %d" % connection)])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        response = await visitor.get("/bad")
        assert response.status_code == 502
        assert "sent a malformed response: conflicting Content-Length values 5 and 6" in response.text
        assert (await visitor.get("/next")).text == "conn 2"
        served = agent.reporter.served[1]
        assert served.status == 502 and served.error is not None and "conflicting Content-Length" in served.error


async def test_a_head_cut_short_on_a_pooled_connection_is_a_502(tmp_path: Path) -> None:
    app = LocalApp(lambda connection, request, _head: [b"HTTP/1.1 200 OK\r\nContent-", CLOSE]
                   if (connection, request) == (1, 2) else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        response = await visitor.get("/cut")
        assert response.status_code == 502
        assert "failed: the local service closed the connection in the middle of a response head" in response.text
        assert agent.reporter.served[1].status == 502
        assert app.connections == 1  # not retried: the local app had begun to answer
        assert (await visitor.get("/next")).status_code == 200


async def test_the_local_connection_is_closed_when_the_visitor_leaves(tmp_path: Path) -> None:
    app = LocalApp(lambda connection, request, _head: [HOLD] if (connection, request) == (1, 2) else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        with pytest.raises(httpx.ReadTimeout):
            await visitor.get("/slow", timeout=0.5)
        # The server resets the stream; the agent closes the local connection at once instead of
        # waiting for an answer that would go nowhere, and never reuses it.
        await wait_until(lambda: app.dropped == [1])
        await wait_until(lambda: len(agent.reporter.served) == 2)
        served = agent.reporter.served[1]
        assert served.target == "/slow" and served.status == 0
        assert served.error is not None and "stream reset" in served.error
        assert (await visitor.get("/next")).status_code == 200
        assert app.connections == 2


async def test_the_local_connection_is_closed_when_the_session_ends(tmp_path: Path) -> None:
    app = LocalApp(lambda connection, request, _head: [HOLD] if (connection, request) == (1, 2) else [ok()])
    async with start_server(tmp_path / "data") as server, serve_tcp(app.handle) as port, \
            start_agent(server, port) as agent, agent.visitor() as visitor:
        await visitor.get("/")
        async with anyio.create_task_group() as tg:
            tg.start_soon(visitor.get, "/held")
            await wait_until(lambda: len(app.heads) == 2)
            await agent.agent.close()
            await wait_until(lambda: app.dropped == [1])
            tg.cancel_scope.cancel()
        await wait_until(lambda: len(agent.reporter.served) == 2)
        assert agent.reporter.served[1].error is not None


async def test_the_inspector_records_answers_sent_from_callbacks(server: ServerContext) -> None:
    app = LocalApp(lambda _connection, request, _head: [ok(b"answer %d" % request, b"X-Two: 2\r\n")])
    async with serve_tcp(app.handle) as port, inspected(server, port) as (agent, api), \
            agent.visitor() as visitor:
        await visitor.get("/one")
        await visitor.get("/two?q=1", headers={"x-asked": "yes"})
        assert forwarder(agent).answered_without_task == 1
        listed = await requests(api)
        assert [e["request"]["uri"] for e in listed] == ["/two?q=1", "/one"]
        two = listed[0]
        assert two["done"] is True and two["duration"] > 0
        assert two["request"]["method"] == "GET" and two["request"]["headers"]["X-Asked"] == ["yes"]
        assert two["request"]["body_size"] == 0
        assert two["response"]["status_code"] == 200
        assert two["response"]["headers"]["X-Two"] == ["2"]
        assert two["response"]["body_size"] == len(b"answer 2")


async def test_an_answer_read_whole_but_beyond_the_credit_waits_for_it(tmp_path: Path) -> None:
    # The server lets the agent send 64 KiB on a stream before it grants more: a 100 KB answer
    # that came in one read cannot all go at once, so a task sends it as credit comes.
    body = bytes(range(256)) * 400
    app = LocalApp(lambda _connection, request, _head: [ok(body)] if request == 2 else [ok()])
    async with start_server(tmp_path / "data", stream_window=65536) as server, serve_tcp(app.handle) as port, \
            start_agent(server, port) as agent, agent.visitor() as visitor:
        await visitor.get("/")
        assert (await visitor.get("/100k")).content == body
        assert forwarder(agent).answered_without_task == 0
        assert app.connections == 1


async def test_a_small_body_written_apart_from_its_head_goes_on_as_it_is_read(tmp_path: Path) -> None:
    # Many apps (an ASGI server among them) write the head and the body apart: the body comes in
    # later reads, and is sent on from the connection's callbacks as each one is read.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"

    def answer(_connection: int, request: int, _head: bytes) -> list[bytes]:
        if request == 2:
            return [head, b"hello world"]
        if request == 3:
            return [head + b"he", b"llo ", b"world"]
        return [ok()]

    app = LocalApp(answer)
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        assert (await visitor.get("/apart")).text == "hello world"
        assert (await visitor.get("/pieces")).text == "hello world"
        assert forwarder(agent).answered_without_task == 2
        assert (await visitor.get("/next")).text == "hello"
        assert app.connections == 1  # each body ended where its length said: the connection serves on
        assert [s.status for s in agent.reporter.served] == [200] * 4


async def test_a_body_cut_short_after_its_head_resets_the_stream(tmp_path: Path) -> None:
    app = LocalApp(lambda _connection, request, _head: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                                                         b"only this", CLOSE] if request == 2 else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        with pytest.raises(httpx.RemoteProtocolError):
            await visitor.get("/cut")
        await wait_until(lambda: len(agent.reporter.served) == 2)
        served = agent.reporter.served[1]
        assert served.status == 200
        assert served.error == ("local service failed mid-response: the local service closed the connection "
                                "before the end of the response body")
        assert forwarder(agent).answered_without_task == 0
        assert (await visitor.get("/next")).text == "hello"


async def test_the_local_connection_is_closed_when_the_visitor_leaves_during_the_body(tmp_path: Path) -> None:
    app = LocalApp(lambda connection, request, _head: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                                                       b"the first bytes", HOLD]
                   if (connection, request) == (1, 2) else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        async with visitor.stream("GET", "/slow-body") as response:
            assert await response.aiter_raw().__anext__() == b"the first bytes"
        # The visitor left mid-body: the server resets the stream and the agent closes the local
        # connection at once (it is never reused).
        await wait_until(lambda: app.dropped == [1])
        await wait_until(lambda: len(agent.reporter.served) == 2)
        assert "stream reset" in (agent.reporter.served[1].error or "")
        assert (await visitor.get("/next")).text == "hello"
        assert app.connections == 2


async def test_bytes_after_a_body_read_apart_make_the_connection_unusable(tmp_path: Path) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    app = LocalApp(lambda connection, request, _head: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                                                       b"hello" + smuggled]
                   if (connection, request) == (1, 2) else [ok(b"conn %d" % connection)])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        assert (await visitor.get("/two")).text == "hello"
        assert forwarder(agent).answered_without_task == 1
        assert (await visitor.get("/next")).text == "conn 2"  # never the smuggled answer


async def test_a_request_served_by_a_task_closes_its_local_connection_when_the_visitor_leaves(tmp_path: Path) -> None:
    # The first request finds no idle connection, so a task serves it; the local app never answers.
    # Once the server resets the stream, the agent closes that connection at once (the local app
    # sees its client leave), as it does for a request served from callbacks.
    app = LocalApp(lambda connection, request, _head: [HOLD] if connection == 1 else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        with pytest.raises(httpx.ReadTimeout):
            await visitor.get("/held", timeout=0.5)
        with anyio.fail_after(5):
            await wait_until(lambda: app.dropped == [1])
            await wait_until(lambda: len(agent.reporter.served) == 1)
        served = agent.reporter.served[0]
        assert served.status == 0 and served.error is not None and "stream reset" in served.error
        assert (await visitor.get("/next")).status_code == 200


async def test_an_event_stream_closes_its_local_connection_when_the_visitor_leaves(tmp_path: Path) -> None:
    # A response whose body comes as the app has something to say (Server-Sent Events): a visitor
    # that leaves between two events must not hold the local connection until the next one.
    first = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" \
            b"d\r\ndata: first\n\n\r\n"
    app = LocalApp(lambda connection, request, _head: [first, HOLD] if (connection, request) == (1, 2) else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")  # the connection is pooled: the event stream is asked from callbacks
        async with visitor.stream("GET", "/events") as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for chunk in response.aiter_bytes():
                assert chunk == b"data: first\n\n"
                break
        with anyio.fail_after(5):
            await wait_until(lambda: app.dropped == [1])
            await wait_until(lambda: len(agent.reporter.served) == 2)
        served = agent.reporter.served[1]
        assert served.status == 200 and served.error is not None and "stream reset" in served.error


def link_messages(agent: RunningAgent) -> list[list[tuple[p.FrameType, int]]]:
    """From now on, each message the agent writes on its link, as its frames' (type, stream id):
    the WebSocket's ``write_message`` is wrapped, the message still written by it."""
    session = agent.agent.session
    assert session is not None and session.attached
    ws = session.ws
    write = ws.write_message
    messages: list[list[tuple[p.FrameType, int]]] = []

    def counted(message: bytes) -> None:
        messages.append([(frame.type, frame.stream) for frame in p.decode_message(bytes(message))])
        write(message)

    ws.write_message = counted  # type: ignore[method-assign]
    return messages


def frames_of(messages: list[list[tuple[p.FrameType, int]]], kinds: set[p.FrameType]) -> list[list[p.FrameType]]:
    """Per message, its frames of ``kinds`` (messages with none left out)."""
    return [found for message in messages if (found := [kind for kind, _ in message if kind in kinds])]


ANSWER = {p.FrameType.RESPONSE, p.FrameType.DATA, p.FrameType.END}


async def test_a_whole_small_answer_goes_back_in_one_link_message(tmp_path: Path) -> None:
    app = LocalApp(lambda _connection, _request, head: [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"]
                   if head.startswith(b"HEAD ") else [ok(b"x" * 1000)])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        messages = link_messages(agent)
        for n in range(3):
            assert (await visitor.get(f"/{n}")).content == b"x" * 1000
        head = (await visitor.head("/head"))
        assert head.status_code == 200 and head.content == b""
        assert frames_of(messages, ANSWER) == [[p.FrameType.RESPONSE, p.FrameType.DATA, p.FrameType.END]] * 3 + \
            [[p.FrameType.RESPONSE, p.FrameType.END]]


async def test_a_head_written_alone_waits_for_its_body_to_go_with_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # nginx writes a head and a file's bytes apart (sendfile): the agent often reads the head alone,
    # the body a moment later. The head waits for it (HOLD_HEAD at most), so the server gets one
    # message, and in a cluster the control node sends one NATS message, not two.
    monkeypatch.setattr(forward, "HOLD_HEAD", 30.0)  # the body, 20 ms later, is what sends the head
    app = LocalApp(lambda _connection, request, _head: [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
                                                        b"hello world"] if request > 1 else [ok()])
    async with tunnel_to(tmp_path, app) as (agent, visitor):
        await visitor.get("/")
        messages = link_messages(agent)
        with anyio.fail_after(10):
            assert (await visitor.get("/apart")).text == "hello world"
        assert forwarder(agent).answered_without_task == 1
        assert frames_of(messages, ANSWER) == [[p.FrameType.RESPONSE, p.FrameType.DATA, p.FrameType.END]]
        assert (await visitor.get("/next")).text == "hello world"
        assert app.connections == 1


async def test_a_head_whose_body_is_late_still_reaches_the_visitor_first(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A local app that sends its head and holds its body (it has its reasons: a progress bar, a
    # slow computation): the head waits HOLD_HEAD at most, then goes alone, as it did.
    monkeypatch.setattr(forward, "HOLD_HEAD", 0.05)
    body_may_go = anyio.Event()
    connections: list[anyio.abc.SocketStream] = []

    async def handle(client: anyio.abc.SocketStream) -> None:
        connections.append(client)
        async with client:
            for request in (1, 2):
                buffer = b""
                while b"\r\n\r\n" not in buffer:
                    buffer += await client.receive()
                if request == 1:
                    await client.send(ok())
                    continue
                await client.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Early: yes\r\n\r\n")
                await body_may_go.wait()
                await client.send(b"late")
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await client.receive()

    async with start_server(tmp_path / "data") as server, serve_tcp(handle) as port, \
            start_agent(server, port) as agent, agent.visitor() as visitor:
        await visitor.get("/")
        messages = link_messages(agent)
        with anyio.fail_after(10):
            async with visitor.stream("GET", "/late") as response:
                assert response.headers["x-early"] == "yes"  # before a byte of the body was written
                body_may_go.set()
                assert await response.aread() == b"late"
        assert frames_of(messages, ANSWER) == [[p.FrameType.RESPONSE], [p.FrameType.DATA, p.FrameType.END]]
        assert forwarder(agent).answered_without_task == 1
        assert len(connections) == 1
