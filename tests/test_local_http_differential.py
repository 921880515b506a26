"""Odd responses from a raw-socket local app, each with the outcome written down (issue 13).

A differential table for the agent's HTTP/1.1 client (comzy/agent/local_http.py): bare LF line
ends, obsolete folding, repeated and listed Content-Lengths, odd transfer codings, chunk
extensions and trailers, odd status lines, 1xx before the answer, connection persistence, and
bytes after the body. Each response is served on a real loopback socket, then a second request
is made: the outcome is what the client made of the first (status, headers, body, or which
error) and whether the connection was reused, and the second answer must always be the fresh
one (nothing of the first response may reach the next visitor).

CASES holds what the client answered before it parsed responses with httptools (llhttp), its own
hand-written parser, measured on 2026-12-07; LLHTTP holds every case where the llhttp client
answers differently, each on purpose (the comment says why). Everything else must agree.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.abc
import pytest

from comzy.agent.local_http import MAX_HEAD, LocalClient, LocalError, MalformedResponse
from tests.helpers import serve_tcp

pytestmark = pytest.mark.anyio

FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"

Outcome = tuple[Any, ...]


class OddUpstream:
    """Answers the first request with ``wire`` (then closes if ``close``), every later one with FRESH."""

    def __init__(self, wire: bytes, close: bool) -> None:
        self.wire = wire
        self.close = close
        self.connections = 0
        self.requests = 0

    async def handle(self, sock: anyio.abc.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with sock:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await sock.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                _, _, buffer = buffer.partition(b"\r\n\r\n")  # requests without a body
                self.requests += 1
                if self.requests > 1:
                    await sock.send(FRESH)
                    continue
                await sock.send(self.wire)
                if self.close:
                    return


async def exchange(client: LocalClient, method: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await client.request(method, b"/", [(b"host", b"local")], None)
    try:
        body = b"".join([piece async for piece in response.body()])
    except BaseException:
        await client.discard(response.connection)
        raise
    await client.release(response.connection)
    return response.status, response.headers, body


async def outcome(wire: bytes, method: str = "GET", close: bool = False) -> Outcome:
    """What the client makes of ``wire``: ("ok", status, headers, body, reused) or ("malformed" |
    "error", message); checks on the way that the next exchange gets the fresh answer."""
    upstream = OddUpstream(wire, close)
    async with serve_tcp(upstream.handle) as port:
        client = LocalClient("127.0.0.1", port)
        try:
            with anyio.fail_after(5):
                try:
                    status, headers, body = await exchange(client, method)
                except MalformedResponse as exc:
                    result: Outcome = ("malformed", exc.what)
                except LocalError as exc:
                    result = ("error", str(exc))
                else:
                    result = ("ok", status, headers, body)
                assert await exchange(client, "GET") == (200, [(b"Content-Length", b"5")], b"fresh")
        finally:
            await client.aclose()
    if result[0] == "ok":
        result = (*result, upstream.connections == 1)
    return result


def ok(status: int, headers: list[tuple[bytes, bytes]], body: bytes, reused: bool) -> Outcome:
    return ("ok", status, headers, body, reused)


CL2 = [(b"Content-Length", b"2")]
TE = [(b"Transfer-Encoding", b"chunked")]
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
TOO_BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: " + b"a" * 2 * MAX_HEAD + b"\r\n\r\n"

#: name -> (response bytes, request method, the app closes after it, expected outcome).
CASES: dict[str, tuple[bytes, str, bool, Outcome]] = {
    "plain": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False, ok(200, CL2, b"ok", True)),
    "bare LF line ends": (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "GET", False, ok(200, CL2, b"ok", True)),
    "mixed line ends": (b"HTTP/1.1 200 OK\r\nX: 1\nContent-Length: 2\r\n\r\nok", "GET", False,
                        ok(200, [(b"X", b"1"), *CL2], b"ok", True)),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-Long: one\r\n  two\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                 ok(200, [(b"X-Long", b"one two"), *CL2], b"ok", True)),
    "obs-fold on the first line": (b"HTTP/1.1 200 OK\r\n Folded: x\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                                   ("malformed", "bad header continuation line b' Folded: x'")),
    "value whitespace": (b"HTTP/1.1 200 OK\r\nX-Y: \t spaced  value \t\r\nContent-Length: 2\r\n\r\nok", "GET",
                         False, ok(200, [(b"X-Y", b"spaced  value"), *CL2], b"ok", True)),
    "empty value": (b"HTTP/1.1 200 OK\r\nX-E:\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                    ok(200, [(b"X-E", b""), *CL2], b"ok", True)),
    "obs-text in a value": (b"HTTP/1.1 200 OK\r\nX: caf\xe9\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                            ok(200, [(b"X", b"caf\xe9"), *CL2], b"ok", True)),
    "NUL in a value": (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                       ("malformed", "malformed header line b'X: a\\x00b'")),
    "CR in a value": (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                      ("malformed", "malformed header line b'X: a\\rb'")),
    "DEL in a value": (b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                       ("malformed", "malformed header line b'X: a\\x7fb'")),
    "space in a name": (b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                        ("malformed", "malformed header line b'Bad Name: x'")),
    "space before the colon": (b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                               ("malformed", "malformed header line b'X-A : 1'")),
    "empty name": (b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                   ("malformed", "malformed header line b': x'")),
    # Content-Length
    "Content-Length repeated": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "GET",
                                False, ok(200, CL2, b"ok", True)),
    "Content-Length list 2, 2": (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", "GET", False,
                                 ok(200, CL2, b"ok", True)),
    "Content-Length repeated, then a bad name": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\nBad Name: x\r\n\r\nok", "GET", False,
        ("malformed", "malformed header line b'Bad Name: x'")),
    "Content-Length repeated, differing": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok" + SMUGGLED, "GET", False,
        ("malformed", "conflicting Content-Length values 2 and 3")),
    "Content-Length list 2, 3": (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok" + SMUGGLED, "GET", False,
                                 ("malformed", "conflicting Content-Length values in b'2, 3'")),
    "Content-Length 2,": (b"HTTP/1.1 200 OK\r\nContent-Length: 2,\r\n\r\nok", "GET", False,
                          ("malformed", "bad Content-Length b'2,'")),
    "Content-Length -1": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok", "GET", False,
                          ("malformed", "bad Content-Length b'-1'")),
    "Content-Length +2": (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", "GET", False,
                          ("malformed", "bad Content-Length b'+2'")),
    "Content-Length 20 digits": (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok", "GET",
                                 False, ("malformed", "bad Content-Length b'99999999999999999999'")),
    "Content-Length with spaces": (b"HTTP/1.1 200 OK\r\nContent-Length:   2  \r\n\r\nok", "GET", False,
                                   ok(200, CL2, b"ok", True)),
    "Content-Length longer than the body": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "GET", True,
                                            ("error", "the local service closed the connection before the end "
                                                      "of the response body")),
    "bytes after the body": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED, "GET", False,
                             ok(200, CL2, b"ok", False)),
    # A second response read with the first: nothing of its head is taken (its status was, under
    # llhttp, until issue 13's agent work).
    "a response of another status after the body": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED.replace(b"200 OK", b"403 Forbidden"), "GET", False,
        ok(200, CL2, b"ok", False)),
    "CRLF after the body": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n", "GET", False,
                            ok(200, CL2, b"ok", False)),
    # Transfer-Encoding
    "Content-Length then chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED,
        "GET", False, ("malformed", "both Content-Length (2) and Transfer-Encoding: chunked")),
    "chunked then Content-Length": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED,
        "GET", False, ("malformed", "both Content-Length (2) and Transfer-Encoding: chunked")),
    "gzip": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok", "GET", True,
             ("malformed", "unsupported Transfer-Encoding b'gzip'")),
    "gzip, chunked": (CHUNKED_OK.replace(b"chunked", b"gzip, chunked") + b"2\r\nok\r\n0\r\n\r\n", "GET", False,
                      ("malformed", "unsupported Transfer-Encoding b'gzip, chunked'")),
    "chunked, chunked": (CHUNKED_OK.replace(b"chunked", b"chunked, chunked") + b"2\r\nok\r\n0\r\n\r\n", "GET",
                         False, ("malformed", "unsupported Transfer-Encoding b'chunked, chunked'")),
    "chunked twice": (CHUNKED_OK.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
                      + b"2\r\nok\r\n0\r\n\r\n", "GET", False,
                      ("malformed", "unsupported Transfer-Encoding b'chunked'")),
    "CHUNKED": (CHUNKED_OK.replace(b"chunked", b"CHUNKED") + b"2\r\nok\r\n0\r\n\r\n", "GET", False,
                ok(200, [(b"Transfer-Encoding", b"CHUNKED")], b"ok", True)),
    "chunked": (CHUNKED_OK + b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n", "GET", False, ok(200, TE, b"ok!!!", True)),
    "chunk extensions": (CHUNKED_OK + b"2;a=b;c\r\nok\r\n0;last\r\n\r\n", "GET", False, ok(200, TE, b"ok", True)),
    "trailers": (CHUNKED_OK + b"2\r\nok\r\n0\r\nX-Trailer: 1\r\nX-More: 2\r\n\r\n", "GET", False,
                 ok(200, TE, b"ok", True)),
    "uppercase hex": (CHUNKED_OK + b"A\r\n0123456789\r\n0\r\n\r\n", "GET", False,
                      ok(200, TE, b"0123456789", True)),
    "space after the chunk size": (CHUNKED_OK + b"2 \r\nok\r\n0\r\n\r\n", "GET", False, ok(200, TE, b"ok", True)),
    "bare LF after the chunk size": (CHUNKED_OK + b"2\nok\r\n0\r\n\r\n", "GET", False,
                                     ("malformed", "bad chunk-size line b'2'")),
    "no CRLF after chunk data": (CHUNKED_OK + b"2\r\nokXX", "GET", False,
                                 ("malformed", "chunk data not followed by CRLF")),
    "chunk size not hex": (CHUNKED_OK + b"zz\r\n", "GET", False, ("malformed", "bad chunk-size line b'zz\\r'")),
    "chunk size of 17 hex digits": (CHUNKED_OK + b"fffffffffffffffff\r\n", "GET", False,
                                    ("malformed", "bad chunk-size line b'fffffffffffffffff\\r'")),
    "huge chunk size, cut short": (CHUNKED_OK + b"ffffffffffffffff\r\nok", "GET", True,
                                   ("error", "the local service closed the connection before the end of the "
                                             "response body")),
    "chunk size with 20 leading zeros": (CHUNKED_OK + b"00000000000000000002\r\nok\r\n0\r\n\r\n", "GET", False,
                                         ("malformed", "bad chunk-size line b'00000000000000000002\\r'")),
    "chunked cut short": (CHUNKED_OK + b"5\r\nab", "GET", True,
                          ("error", "the local service closed the connection before the end of the response body")),
    # status lines
    "no reason phrase": (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", "GET", False, ok(200, CL2, b"ok", True)),
    "empty reason phrase": (b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", "GET", False,
                            ok(200, CL2, b"ok", True)),
    "control byte in the reason": (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                                   ("malformed", "bad status line b'HTTP/1.1 200 O\\x01K'")),
    "unknown status 599": (b"HTTP/1.1 599 Odd\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                           ok(599, CL2, b"ok", True)),
    "two-digit status": (b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                         ("malformed", "bad status line b'HTTP/1.1 20 OK'")),
    "four-digit status": (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                          ("malformed", "bad status line b'HTTP/1.1 2000 OK'")),
    "not HTTP": (b"SPDY/3 200 OK\r\n\r\n", "GET", False, ("malformed", "bad status line b'SPDY/3 200 OK'")),
    "lowercase http": (b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                       ("malformed", "bad status line b'http/1.1 200 OK'")),
    "HTTP/1.2": (b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False, ok(200, CL2, b"ok", True)),
    # persistence
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False, ok(200, CL2, b"ok", False)),
    "HTTP/1.0 keep-alive": (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", "GET",
                            False, ok(200, [(b"Connection", b"keep-alive"), *CL2], b"ok", False)),
    "Connection: close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                          ok(200, [(b"Connection", b"close"), *CL2], b"ok", False)),
    "Connection: keep-alive, Close": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok", "GET", False,
        ok(200, [(b"Connection", b"keep-alive, Close"), *CL2], b"ok", False)),
    "body until close": (b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\nuntil the end", "GET", True,
                         ok(200, [(b"X", b"1")], b"until the end", False)),
    # 1xx and bodiless answers
    "100 then 200": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                     ok(200, CL2, b"ok", True)),
    "103 with Link then 200": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                               ok(200, CL2, b"ok", True)),
    "102 then 200": (b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET",
                     False, ok(200, CL2, b"ok", True)),
    "100 with Content-Length: 0": (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                                   ok(200, CL2, b"ok", True)),
    "100 with a body": (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED, "GET", False,
                        ("malformed", "a 100 response with a body (Content-Length: 5); a 1xx response has none")),
    "bytes after a 100": (b"HTTP/1.1 100 Continue\r\n\r\nhello" + SMUGGLED, "GET", False,
                          ("malformed", "bytes that are not a status line after a 100 response (a 1xx response "
                                        "has no body): b'helloHTTP/1.1 200 OK'")),
    "101": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "GET",
            False, ("malformed", "101 Switching Protocols to a plain HTTP request")),
    "204 with Content-Length": (b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n", "GET", False,
                                ok(204, [(b"Content-Length", b"99")], b"", True)),
    "304 with Content-Length": (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", "GET", False,
                                ok(304, [(b"Content-Length", b"99")], b"", True)),
    "HEAD with Content-Length": (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", False,
                                 ok(200, [(b"Content-Length", b"99")], b"", True)),
    "HEAD, chunked": (CHUNKED_OK, "HEAD", False, ok(200, TE, b"", True)),
    "HEAD without framing": (b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n", "HEAD", False, ok(200, [(b"X", b"1")], b"", True)),
    "HEAD, HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", False,
                       ok(200, [(b"Content-Length", b"99")], b"", False)),
    "HEAD, Connection: close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", "HEAD", False,
                                ok(200, [(b"Connection", b"close")], b"", False)),
    "HEAD, then a body": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "HEAD", False,
                          ok(200, CL2, b"", False)),
    # ends
    "closed without answering": (b"", "GET", True,
                                 ("error", "the local service closed the connection without answering")),
    "closed in the head": (b"HTTP/1.1 200 OK\r\nContent-Le", "GET", True,
                           ("error", "the local service closed the connection in the middle of a response head")),
    "head too large": (TOO_BIG_HEAD, "GET", False, ("malformed", f"response head larger than {MAX_HEAD} bytes")),
}

#: Where the llhttp client answers differently from the hand-written one (CASES), and why.
LLHTTP: dict[str, Outcome] = {
    # The same refusals in llhttp's words, with the line it refused (found by feeding it the head line
    # by line); in a chunked body, without the chunk-size line.
    "NUL in a value": ("malformed", "Invalid header value char in b'X: a\\x00b'"),
    "CR in a value": ("malformed", "Missing expected LF after header value in b'X: a\\rb'"),
    "DEL in a value": ("malformed", "Invalid header value char in b'X: a\\x7fb'"),
    "space in a name": ("malformed", "Invalid header token in b'Bad Name: x'"),
    "space before the colon": ("malformed", "Invalid header token in b'X-A : 1'"),
    "empty name": ("malformed", "Invalid header token in b': x'"),
    "Content-Length repeated, then a bad name": ("malformed", "Invalid header token in b'Bad Name: x'"),
    "Content-Length 20 digits": ("malformed", "Content-Length overflow in b'Content-Length: 99999999999999999999'"),
    "bare LF after the chunk size": ("malformed", "Expected LF after chunk size in the body"),
    "no CRLF after chunk data": ("malformed", "Expected LF after chunk data in the body"),
    "chunk size not hex": ("malformed", "Invalid character in chunk size in the body"),
    "chunk size of 17 hex digits": ("malformed", "Chunk size overflow in the body"),
    "control byte in the reason": ("malformed", "bad status line: control characters in the reason phrase b'O\\x01K'"),
    "two-digit status": ("malformed", "Invalid status code in b'HTTP/1.1 20 OK'"),
    "four-digit status": ("malformed", "Invalid response status in b'HTTP/1.1 2000 OK'"),
    "not HTTP": ("malformed", "Expected HTTP/, RTSP/ or ICE/ in b'SPDY/3 200 OK'"),
    "lowercase http": ("malformed", "Expected HTTP/, RTSP/ or ICE/ in b'http/1.1 200 OK'"),
    # There is no HTTP/1.2: llhttp knows the versions that exist (0.9, 1.0, 1.1, 2.0).
    "HTTP/1.2": ("malformed", "Invalid HTTP version in b'HTTP/1.2 200 OK'"),
    # llhttp skips empty lines before a response (as RFC 9112 2.2 allows before a request), so a
    # CRLF after the body is no response of its own: the connection stays reusable, and the next
    # answer (fresh) is read right.
    "CRLF after the body": ok(200, CL2, b"ok", True),
    # 20 digits for the size 2: llhttp takes the value (it refuses sizes past 64 bits), where the
    # old parser counted digits.
    "chunk size with 20 leading zeros": ok(200, TE, b"ok", True),
}


def test_the_differences_are_cases() -> None:
    assert set(LLHTTP) <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
async def test_odd_response(name: str) -> None:
    wire, method, close, before = CASES[name]
    assert await outcome(wire, method, close) == LLHTTP.get(name, before)


async def test_trailers_without_end_are_refused_not_buffered() -> None:
    """httptools joins a field's pieces in memory: a trailer section that never ends is refused
    after MAX_HEAD bytes without body data, not kept."""
    async def handle(sock: anyio.abc.SocketStream) -> None:
        async with sock:
            await sock.receive()
            await sock.send(CHUNKED_OK + b"2\r\nok\r\n0\r\nX-Endless: ")
            # Until the client gives up and closes.
            with anyio.move_on_after(5), contextlib.suppress(anyio.BrokenResourceError, OSError):
                for _ in range(2 * MAX_HEAD // 65536 + 2):
                    await sock.send(b"a" * 65536)

    async with serve_tcp(handle) as port:
        client = LocalClient("127.0.0.1", port)
        response = await client.request("GET", b"/", [(b"host", b"local")], None)
        body = response.body()
        assert await anext(body) == b"ok"
        with anyio.fail_after(5), pytest.raises(MalformedResponse, match="chunk framing or trailers without data"):
            await anext(body)
        await client.discard(response.connection)


async def test_many_small_chunks_are_not_taken_for_endless_framing() -> None:
    """More than MAX_HEAD bytes of chunked body made of one-byte chunks: every chunk has data."""
    count = MAX_HEAD // 4
    wire = CHUNKED_OK + b"1\r\nx\r\n" * count + b"0\r\n\r\n"
    assert await outcome(wire) == ok(200, TE, b"x" * count, True)


async def test_a_head_put_right_arrives_in_pieces() -> None:
    """A head llhttp refuses mid-way (a repeated Content-Length, then a folded line) is read to its
    end before it is put right, whichever read it ends in."""
    head = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n"
            b"X-Long: one\r\n two\r\n\r\nok")
    for cut in (40, 60, 80, len(head) - 3):
        async def handle(sock: anyio.abc.SocketStream, cut: int = cut) -> None:
            async with sock:
                await sock.receive()
                await sock.send(head[:cut])
                await anyio.sleep(0.05)  # a separate read on the client's side
                await sock.send(head[cut:])
                with contextlib.suppress(anyio.EndOfStream):
                    await sock.receive()  # until the client closes

        async with serve_tcp(handle) as port:
            client = LocalClient("127.0.0.1", port)
            try:
                assert await exchange(client, "GET") == (200, [(b"Content-Length", b"2"), (b"X-Long", b"one two")],
                                                         b"ok")
            finally:
                await client.aclose()
