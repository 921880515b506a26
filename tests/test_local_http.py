"""The agent's HTTP/1.1 client (comzy/agent/local_http.py) against a scripted local server.

Each test serves exact bytes from a real loopback socket, sometimes split into awkward pieces,
and checks what the client makes of them: the head, the body, and whether the connection is
reused. End-to-end fidelity (through server and agent) is in test_http_fidelity.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comzy.agent.local_http import LocalClient, LocalError, LocalResponse, MalformedResponse, _Connection
from tests.helpers import serve_tcp

pytestmark = pytest.mark.anyio

Script = Callable[[bytes], list[bytes]]


class ScriptedServer:
    """Answers each request head with the byte pieces ``script(head)`` returns, sent one by one.

    Records every request (head plus body bytes read) and how many connections were made.
    An empty piece list closes the connection without answering.
    """

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with client:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await client.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                body = b""
                if b"content-length: " in head.lower():
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(buffer) < length:
                        buffer += await client.receive()
                    body, buffer = buffer[:length], buffer[length:]
                elif b"transfer-encoding: chunked" in head.lower():
                    while not buffer.endswith(b"0\r\n\r\n"):
                        buffer += await client.receive()
                    body, buffer = buffer, b""
                self.requests.append(head + b"\r\n\r\n" + body)
                pieces = self.script(head)
                if not pieces:
                    return
                for piece in pieces:
                    await client.send(piece)
                    await anyio.sleep(0.001)  # separate reads on the client side
                if self.close_after:
                    return


@asynccontextmanager
async def scripted(script: Script, close_after: bool = False) -> AsyncIterator[tuple[LocalClient, ScriptedServer]]:
    """A LocalClient talking to a ScriptedServer on a free port."""
    server = ScriptedServer(script, close_after)
    async with serve_tcp(server.handle) as port:
        client = LocalClient("127.0.0.1", port)
        try:
            yield client, server
        finally:
            await client.aclose()


async def fetch(client: LocalClient, method: str = "GET", target: bytes = b"/",
                headers: list[tuple[bytes, bytes]] | None = None,
                body: list[bytes] | None = None) -> tuple[LocalResponse, bytes]:
    """One exchange: the response and its whole body; the connection is released for reuse."""
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in body or []:
            yield chunk

    response = await client.request(method, target, headers or [(b"host", b"local")],
                                    chunks() if body is not None else None)
    try:
        data = b"".join([piece async for piece in response.body()])
    except BaseException:
        await client.discard(response.connection)  # as the forwarder does after a failed body
        raise
    await client.release(response.connection)
    return response, data


def always(*pieces: bytes) -> Script:
    return lambda head: list(pieces)


async def test_content_length_body_and_reuse() -> None:
    async with scripted(always(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")) as (client, server):
        for _ in range(3):
            response, data = await fetch(client)
            assert (response.status, data) == (200, b"hello")
            assert response.headers == [(b"Content-Length", b"5"), (b"X-A", b"1")]
        assert server.connections == 1


async def test_whole_body_only_when_read_with_the_head() -> None:
    """whole_body() hands over a body that came with its head and frees the connection as body()
    would; a body still to come is None, and body() reads it."""
    async with scripted(always(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")) as (client, server):
        for _ in range(2):
            response = await client.request("GET", b"/", [(b"host", b"local")], None)
            assert response.whole_body() == b"hello"
            await client.release(response.connection)
        assert server.connections == 1
    async with scripted(always(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello")) as (client, server):
        response = await client.request("GET", b"/", [(b"host", b"local")], None)
        whole = response.whole_body()  # None while the body is on its way (1 ms later), as it usually is
        assert (whole if whole is not None else b"".join([piece async for piece in response.body()])) == b"hello"
        await client.release(response.connection)
        response = await client.request("GET", b"/", [(b"host", b"local")], None)
        assert response.status == 200
        await client.discard(response.connection)
        assert server.connections == 1


async def test_head_split_across_reads_and_header_order_and_duplicates() -> None:
    answer = (b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nX-Y:  spaced value \t\r\n",
              b"Set-Cookie: b=2\r\nContent-Le", b"ngth: 3\r\n\r", b"\nabc")
    async with scripted(always(*answer)) as (client, _):
        response, data = await fetch(client)
    assert response.status == 201
    assert response.headers == [(b"Set-Cookie", b"a=1"), (b"X-Y", b"spaced value"), (b"Set-Cookie", b"b=2"),
                                (b"Content-Length", b"3")]
    assert data == b"abc"


async def test_chunked_body_with_extensions_trailers_and_odd_splits() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel", b"lo\r", b"\n0000a\r\n",
              b"0123456789\r\n0\r\nTrailer: x\r\n\r\n")
    async with scripted(always(*answer)) as (client, server):
        for _ in range(2):
            _, data = await fetch(client)
            assert data == b"hello0123456789"
        assert server.connections == 1  # a complete chunked body leaves the connection reusable


async def test_trailer_fields_are_dropped_not_kept_on_the_pooled_connection() -> None:
    """A trailer section of tiny fields (up to MAX_HEAD of them) is not kept as tuples, 20-30 times
    its wire size, on the connection waiting in the pool for its next exchange."""
    trailers = b"".join(b"t%d: v\r\n" % index for index in range(2000))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: 1\r\n\r\n"
    answer = (head + b"2\r\nok\r\n0\r\n" + trailers + b"\r\n",)
    async with scripted(always(*answer)) as (client, server):
        response, data = await fetch(client)
        assert data == b"ok" and response.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-Head", b"1")]
        assert server.connections == 1 and len(client._idle) == 1  # pooled, reusable
        assert client._idle[0]._headers == []  # no trailer field kept


async def test_chunked_pieces_are_passed_on_as_they_arrive() -> None:
    """SSE and long polls: each chunk reaches the caller before the next one is sent."""
    gate = anyio.Event()

    async def handle(sock: anyio.abc.SocketStream) -> None:
        async with sock:
            await sock.receive()
            await sock.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            await gate.wait()
            await sock.send(b"7\r\nsecond\n\r\n0\r\n\r\n")

    async with serve_tcp(handle) as port:
        client = LocalClient("127.0.0.1", port)
        response = await client.request("GET", b"/events", [(b"host", b"local")], None)
        body = response.body()
        with anyio.fail_after(5):
            assert await anext(body) == b"first\n"
            gate.set()
            assert b"".join([piece async for piece in body]) == b"second\n"
        await client.discard(response.connection)


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_no_body_for_head_204_304(method: str, status: int) -> None:
    answer = b"HTTP/1.1 %d X\r\nContent-Length: 99\r\n\r\n" % status
    async with scripted(always(answer)) as (client, server):
        for _ in range(2):
            response, data = await fetch(client, method)
            assert (response.status, data) == (status, b"")
        assert server.connections == 1


async def test_informational_responses_skipped() -> None:
    answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with scripted(always(answer)) as (client, _):
        response, data = await fetch(client)
    assert (response.status, response.headers, data) == (200, [(b"Content-Length", b"2")], b"ok")


async def test_body_until_close_and_http10_are_not_reused() -> None:
    async with scripted(always(b"HTTP/1.0 200 OK\r\n\r\nuntil ", b"the end"), close_after=True) as (client, server):
        for _ in range(2):
            _, data = await fetch(client)
            assert data == b"until the end"
        assert server.connections == 2


async def test_http10_after_an_http11_1xx_is_not_reused() -> None:
    """The final head's version decides, not the 1xx's before it (whose "HTTP/1.1 " starts the read)."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(always(answer)) as (client, server):
        for _ in range(2):
            response, data = await fetch(client)
            assert (response.status, data) == (200, b"ok")
        assert server.connections == 2


async def test_connection_close_header_is_honoured() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\nx"
    async with scripted(always(answer)) as (client, server):
        await fetch(client)
        await fetch(client)
        assert server.connections == 2


async def test_bytes_after_the_body_make_the_connection_unusable() -> None:
    async with scripted(always(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK")) as (client, server):
        _, data = await fetch(client)
        assert data == b"x"
        await fetch(client)
        assert server.connections == 2


async def test_bare_lf_head_and_folded_header_like_h11() -> None:
    answer = b"HTTP/1.1 200 OK\nX-Long: one\n  two\nContent-Length: 2\n\nok"
    async with scripted(always(answer)) as (client, _):
        response, data = await fetch(client)
    assert response.headers == [(b"X-Long", b"one two"), (b"Content-Length", b"2")]
    assert data == b"ok"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n Folded: first\r\n\r\n",
])
async def test_invalid_responses_are_errors(answer: bytes) -> None:
    async with scripted(always(answer), close_after=True) as (client, _):
        with pytest.raises(MalformedResponse, match="malformed response from the local service"):
            await fetch(client)


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"


def first_then(first: bytes, then: bytes) -> Script:
    """Answers the first request with ``first`` and every later one with ``then``."""
    answers = [first]
    return lambda head: [answers.pop() if answers else then]


@pytest.mark.parametrize(("answer", "what"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
     "conflicting Content-Length values 5 and 6"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!", "conflicting Content-Length values in b'5, 6'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\nhello", "bad Content-Length b'5,'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "both Content-Length (5) and Transfer-Encoding: chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "both Content-Length (5) and Transfer-Encoding: chunked"),
    (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     "a 100 response with a body (Content-Length: 5)"),
    (b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "a 103 response with a body"),
    (b"HTTP/1.1 100 Continue\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     "bytes that are not a status line after a 100 response"),
])
async def test_malformed_framing_is_refused_and_the_connection_closed(answer: bytes, what: str) -> None:
    """Each answer is followed by a smuggled response: it must never be served to anyone."""
    good = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    async with scripted(first_then(answer + SMUGGLED, good)) as (client, server):
        with pytest.raises(MalformedResponse, match=re.escape(what)):
            await fetch(client)
        for _ in range(2):
            response, data = await fetch(client)
            assert (response.status, data) == (200, b"fresh")
        assert server.connections == 2  # the malformed one was closed; the next one is reused


@pytest.mark.parametrize("lengths", [b"Content-Length: 5, 5", b"Content-Length: 5\r\nContent-Length: 5",
                                     b"Content-Length: 5 ,5\r\nContent-Length: 5"])
async def test_identical_content_lengths_are_one_length(lengths: bytes) -> None:
    """RFC 9110 8.6: a recipient may take repeated identical values as one."""
    async with scripted(always(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n%b\r\nX-B: 2\r\n\r\nhello" % lengths)) \
            as (client, server):
        for _ in range(2):
            response, data = await fetch(client)
            assert data == b"hello"
            # Passed on as one plain value, in its place: the next hop may not take a list.
            assert [n.lower() for n, _ in response.headers] == [b"x-a", b"content-length", b"x-b"]
            assert dict(response.headers)[b"Content-Length"] == b"5"
        assert server.connections == 1


async def test_informational_response_with_zero_content_length_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(always(answer)) as (client, server):
        for _ in range(2):
            _, data = await fetch(client)
            assert data == b"ok"
        assert server.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
])
async def test_body_cut_short_is_an_error(answer: bytes) -> None:
    async with scripted(always(answer), close_after=True) as (client, _):
        with pytest.raises(LocalError, match="before the end of the response body"):
            await fetch(client)


async def test_request_bytes_on_the_wire() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with scripted(always(answer)) as (client, server):
        await fetch(client, "GET", b"/a%20b?c=d", [(b"host", b"local"), (b"X-Dup", b"1"), (b"x-dup", b"2")])
        await fetch(client, "POST", b"/up", [(b"host", b"local"), (b"content-length", b"6")], [b"abc", b"", b"def"])
        await fetch(client, "PUT", b"/up", [(b"host", b"local"), (b"transfer-encoding", b"chunked")], [b"abc", b"de"])
    assert server.requests == [
        b"GET /a%20b?c=d HTTP/1.1\r\nhost: local\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n",
        b"POST /up HTTP/1.1\r\nhost: local\r\ncontent-length: 6\r\n\r\nabcdef",
        b"PUT /up HTTP/1.1\r\nhost: local\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    ]


@pytest.mark.parametrize(("method", "target", "headers", "body"), [
    ("GET", b"/", [(b"x-evil", b"a\r\nInjected: yes")], None),
    ("GET", b"/", [(b"x-evil", b"a\nInjected: yes")], None),
    ("GET", b"/", [(b"x-evil", b"a\rInjected: yes")], None),
    ("GET", b"/", [(b"x-evil: a\r\nInjected", b"yes")], None),
    ("GET", b"/", [(b"", b"x")], None),
    ("GET", b"/", [(b"bad name", b"x")], None),
    ("GET", b"/a b", [], None),
    ("GET BAD", b"/", [], None),
    ("POST", b"/", [(b"content-length", b"2")], [b"abc"]),
    ("POST", b"/", [(b"content-length", b"5")], [b"abc"]),
])
async def test_requests_that_cannot_be_sent_unchanged_are_refused(
        method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: list[bytes] | None) -> None:
    async with scripted(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as (client, server):
        with pytest.raises(LocalError, match=r"request cannot be sent as HTTP/1\.1"):
            await fetch(client, method, target, [(b"host", b"local"), *headers], body)
    # Nothing that would smuggle a second request reached the local app.
    assert all(b"Injected" not in request for request in server.requests)


async def test_closed_without_answering() -> None:
    async with scripted(lambda head: []) as (client, _):
        with pytest.raises(LocalError, match="closed the connection without answering"):
            await fetch(client)


# -- property: no framing ambiguity ever lets the smuggled response through --------------------------------

_PREAMBLES = {  # 1xx responses before the real one, and whether the client must refuse them
    b"HTTP/1.1 100 Continue\r\n\r\n": False,
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n": False,
    b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n": False,
    b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello": True,
    b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n": True,
    b"HTTP/1.1 100 Continue\r\n\r\nhello": True,
}
_FRAMING = [b"Content-Length: 5", b"Content-Length: 6", b"Content-Length: 5, 5", b"Content-Length: 5, 6",
            b"Transfer-Encoding: chunked"]


def _expected(preambles: list[bytes], framing: list[bytes], stream: bytes) -> bytes | None:
    """What a strict client must make of the response: its body, or None for a refusal."""
    if any(_PREAMBLES[preamble] for preamble in preambles):
        return None
    chunked = framing.count(b"Transfer-Encoding: chunked")
    lengths = {part.strip() for line in framing if line.startswith(b"Content-Length")
               for part in line.split(b":")[1].split(b",")}
    if chunked > 1 or len(lengths) > 1 or (chunked and lengths):
        return None
    return b"hello" if chunked else stream[: int(lengths.pop())]


@settings(max_examples=200, deadline=None)
@given(preambles=st.lists(st.sampled_from(list(_PREAMBLES)), max_size=2),
       framing=st.lists(st.sampled_from(_FRAMING), min_size=1, max_size=3),
       pieces=st.lists(st.integers(min_value=1, max_value=40), max_size=4))
def test_framing_never_serves_the_smuggled_response(preambles: list[bytes], framing: list[bytes],
                                                    pieces: list[int]) -> None:
    """Whatever the 1xx and framing headers, the client refuses or reads exactly the declared body,
    and the bytes after it (a smuggled response) always keep the connection out of the pool."""
    chunked = b"Transfer-Encoding: chunked" in framing
    body = b"5\r\nhello\r\n0\r\n\r\n" if chunked else b"hello"
    stream = body + SMUGGLED
    wire = b"".join(preambles) + b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(framing) + b"\r\n\r\n" + stream
    expected = _expected(preambles, framing, stream)

    async def read() -> bytes:
        conn = _Connection()
        rest = wire
        for size in pieces:  # the bytes arrive in several reads
            conn.data_received(rest[:size])
            rest = rest[size:]
        conn.data_received(rest)
        await conn.read_head("GET", True)
        data = b"".join([piece async for piece in conn.body()])
        assert not conn.reusable
        return data

    if expected is None:
        with pytest.raises(MalformedResponse):
            asyncio.run(read())
    else:
        assert asyncio.run(read()) == expected
