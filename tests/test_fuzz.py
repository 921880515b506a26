"""Fuzzing a live server's agent listener: every bad session is closed, everyone else keeps working."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

from comzy.core import protocol as p
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, WebSocket, connect
from tests.conftest import RunningAgent, start_agent, start_server, visitor
from tests.helpers import DisconnectWatcher
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

FT = p.FrameType
SEED = 0xC0FFEE
FUZZ_ROUNDS = 200
HANDSHAKE_TIMEOUT = 2.0  # short, so stalled cases end soon; long enough for a HELLO on a loaded machine
#: Bound on how long the server may take to close a bad connection (handshake timeout + slack).
CLOSE_WITHIN = 5.0
LINK_MESSAGE = 4 * 1024 * 1024


@asynccontextmanager
async def fuzz_target(tmp_path: Path, upstream: Upstream) -> AsyncIterator[tuple[ServerContext, RunningAgent,
                                                                                  DisconnectWatcher]]:
    """A live server with a short handshake timeout, a watcher plugin and a real agent."""
    watcher = DisconnectWatcher()
    async with (
        start_server(tmp_path / "data", [("watcher", watcher)], handshake_timeout=HANDSHAKE_TIMEOUT) as server,
        start_agent(server, upstream.port) as agent,
    ):
        yield server, agent, watcher


async def check_tunnel(agent: RunningAgent, tag: str) -> None:
    """A request through the real agent reaches the upstream intact."""
    async with agent.visitor(timeout=10) as client:
        response = await client.get(f"/fuzz/{tag}?x=%41")
    assert response.status_code == 200, response.text
    assert response.json()["raw_path"] == f"/fuzz/{tag}"
    assert response.json()["query_string"] == "x=%41"


async def read_until_eof(stream: anyio.abc.SocketStream) -> None:
    """Read (and drop) whatever the server sends until it closes the connection."""
    with anyio.fail_after(CLOSE_WITHIN):
        while True:
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return


async def until_closed(ws: WebSocket) -> tuple[Closed, list[p.Frame]]:
    """The frames the server sends before it closes, and the close."""
    frames: list[p.Frame] = []
    with anyio.fail_after(CLOSE_WITHIN):
        while True:
            message = await ws.receive()
            if isinstance(message, Closed):
                return message, frames
            assert isinstance(message, bytes), f"the server sent text: {message!r}"
            frames.extend(p.decode_message(message))


def is_protocol_error(message: bytes) -> bool:
    """Whether the codec rejects ``message`` (the garbage we send must be garbage)."""
    try:
        list(p.decode_message(message))
    except p.ProtocolError:
        return True
    return False


def hello(**extra: Any) -> bytes:
    """A HELLO frame like the stock agent's, with ``extra`` fields."""
    return p.encode(FT.HELLO, 0, {"v": p.PROTOCOL_VERSION, "agent": "fuzzer/1", "port": 1, **extra})


def random_bytes(rng: random.Random, low: int = 1, high: int = 2048) -> bytes:
    return rng.randbytes(rng.randint(low, high))


UPGRADE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


# -- (a) bytes before or instead of the WebSocket handshake ------------------------------------
def pre_handshake_payload(rng: random.Random) -> bytes:
    """Something that is not a WebSocket opening handshake."""
    kind = rng.randrange(6)
    if kind == 0:
        return random_bytes(rng)
    if kind == 1:
        return random_bytes(rng) + UPGRADE  # garbage, then a valid upgrade: still garbage
    if kind == 2:
        return b"GET / HTTP/1.1\r\n" + random_bytes(rng) + b"\r\n\r\n"
    if kind == 3:
        return b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"  # HTTP, but not an upgrade
    if kind == 4:
        return UPGRADE.replace(b"13", str(rng.randint(0, 12)).encode())  # a WebSocket version we do not speak
    return UPGRADE[: rng.randrange(1, len(UPGRADE) - 4)]  # cut short: EOF or the timeout ends it


async def fuzz_raw(server: ServerContext, payload: bytes, send_eof: bool) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
    async with stream:
        try:
            await stream.send(payload)
            if send_eof:
                await stream.send_eof()
        except (anyio.BrokenResourceError, OSError):
            pass  # already closed on us: fine
        await read_until_eof(stream)


# -- (b) after the WebSocket handshake ---------------------------------------------------------
def garbage_after_hello(rng: random.Random) -> bytes | str:
    """A message that must end an established session with a protocol error."""
    kind = rng.randrange(10)
    if kind == 0:
        while True:
            message = random_bytes(rng)
            if is_protocol_error(message):
                return message
    if kind == 8:  # a PING bigger than its 8-byte clock (it used to be echoed, queued unread)
        return p.encode(FT.PING, 0, random_bytes(rng, p.MAX_PING_PAYLOAD + 1, p.MAX_FRAME_PAYLOAD))
    if kind == 1:  # a valid frame, then a truncated one
        frame = p.encode(FT.PING, 0, random_bytes(rng, 0, 64))
        whole = hello(pad=random_bytes(rng, 1, 64))
        return frame + whole[: rng.randrange(1, len(whole))]
    if kind == 2:  # announced length beyond the limit
        return p.HEADER.pack(rng.randint(p.MAX_FRAME_PAYLOAD + 1, 2**32 - 1), rng.choice(list(FT)), 0, 0)
    if kind == 3:  # an unknown frame type
        return p.HEADER.pack(0, rng.randint(15, 255), 0, 0)
    if kind == 4:  # a stream frame on stream 0, or a control frame on a stream
        if rng.random() < 0.5:
            return p.HEADER.pack(3, FT.DATA, 0, 0) + b"abc"
        return p.HEADER.pack(4, FT.PING, 0, rng.randint(1, 2**32 - 1)) + b"ping"
    if kind == 5:  # a map frame whose payload is not a msgpack map
        body = rng.choice([msgpack.packb([1, 2]), b"\xc1", random_bytes(rng, 1, 3)[:1] + b"\xc1"])
        return p.HEADER.pack(len(body), FT.NOTICE, 0, 0) + body
    if kind == 6:  # frames the server never accepts from an agent after the handshake
        return rng.choice([p.encode(FT.REQUEST, 1, p.RequestHead("GET", b"/", []).to_payload()), hello()])
    if kind == 7:  # a text message on the binary link
        return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 64)))
    return p.encode_data(1, bytes(p.MAX_DATA_FRAME + rng.randint(1, 1024)))  # oversized DATA


def before_hello(rng: random.Random) -> tuple[bytes | str, str]:
    """A first message that is not a usable HELLO, and what the server must do about it."""
    kind = rng.randrange(6)
    if kind == 0:
        while True:
            message = random_bytes(rng)
            if is_protocol_error(message):
                return message, "drop"
    if kind == 1:
        whole = hello()
        return whole[: rng.randrange(1, len(whole))], "drop"  # a truncated HELLO
    if kind == 2:
        return "HELLO", "reject"  # text instead of HELLO
    if kind == 3:
        return p.encode(FT.PING, 0, b"hi"), "reject"  # a valid frame that is not HELLO
    if kind == 4:
        return hello() + p.encode(FT.PING, 0, b"x"), "reject"  # HELLO must come alone
    return p.encode(FT.HELLO, 0, {"v": rng.choice([0, 2, 99, "1", None])}), "reject"  # wrong version


async def fuzz_before_hello(server: ServerContext, rng: random.Random) -> None:
    message, expected = before_hello(rng)
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
    try:
        await ws.send(message)
        closed, frames = await until_closed(ws)
    finally:
        await ws.aclose()
    if expected == "reject":
        assert [f.type for f in frames] == [FT.REJECT], (message, frames)
        assert closed.code == 1008
    else:
        assert frames == []  # a broken first frame is dropped without a word


async def fuzz_after_hello(server: ServerContext, rng: random.Random, registered: set[str]) -> None:
    garbage = garbage_after_hello(rng)
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
    try:
        await ws.send(hello())
        welcome = await ws.receive()
        assert isinstance(welcome, bytes)
        [frame] = p.decode_message(welcome)
        assert frame.type == FT.WELCOME
        registered.add(frame.payload["alias"])
        await ws.send(garbage)
        closed, _ = await until_closed(ws)
    finally:
        await ws.aclose()
    assert closed.code == 1002, (garbage[:40], closed)


async def fuzz_hello_fields(server: ServerContext, rng: random.Random, registered: set[str]) -> None:
    """HELLO with random values in every field: WELCOME or REJECT, never a crash."""
    values: list[Any] = [None, True, -1, 0, 2**64 - 1, -(2**63), math.inf, -math.inf, math.nan, 1e300, "",
                         "x" * 300, "UPPER", "a-b", b"\xff", [], [1, [2]], {}, {"secret": ["x"] * 20},
                         {"alias": 5, "secret": "s" * 40}]
    fields = {key: rng.choice(values) for key in ("port", "subdomain", "token", "window", "resume", "agent")
              if rng.random() < 0.7}
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
    try:
        await ws.send(hello(**fields))
        answer = await ws.receive()
        assert isinstance(answer, bytes), (fields, answer)
        [frame] = p.decode_message(answer)
        assert frame.type in (FT.WELCOME, FT.REJECT), fields
        if frame.type == FT.WELCOME:
            registered.add(frame.payload["alias"])
            await ws.close(1000, "done")
        else:
            closed, _ = await until_closed(ws)
            assert closed.code == 1008
    finally:
        await ws.aclose()


# -- the tests ------------------------------------------------------------------------------------
async def test_fuzzing_the_agent_listener_harms_nobody(tmp_path: Path, upstream: Upstream) -> None:
    rng = random.Random(SEED)
    registered: set[str] = set()
    async with fuzz_target(tmp_path, upstream) as (server, agent, watcher):
        cases: list[Callable[[], Any]] = []
        for _ in range(FUZZ_ROUNDS):
            case_rng = random.Random(rng.getrandbits(64))
            kind = rng.randrange(4)
            if kind == 0:
                payload, eof = pre_handshake_payload(case_rng), case_rng.random() < 0.5
                cases.append(lambda payload=payload, eof=eof: fuzz_raw(server, payload, eof))
            elif kind == 1:
                cases.append(lambda r=case_rng: fuzz_before_hello(server, r))
            elif kind == 2:
                cases.append(lambda r=case_rng: fuzz_after_hello(server, r, registered))
            else:
                cases.append(lambda r=case_rng: fuzz_hello_fields(server, r, registered))
        limiter = anyio.CapacityLimiter(50)
        fuzzing_done = anyio.Event()
        served_during = 0

        async def run(case: Callable[[], Any]) -> None:
            async with limiter:
                await case()

        async def traffic() -> None:
            # Real requests keep flowing through the real agent while the fuzzer runs.
            nonlocal served_during
            while not fuzzing_done.is_set():
                await check_tunnel(agent, f"during-{served_during}")
                served_during += 1

        async with anyio.create_task_group() as outer:
            outer.start_soon(traffic)
            async with anyio.create_task_group() as tg:
                for case in cases:
                    tg.start_soon(run, case)
            fuzzing_done.set()

        assert served_during >= 1
        assert registered, "no fuzz session got past HELLO: the fuzzer tests too little"
        # Every fuzz tunnel is gone; the real one is untouched.
        with anyio.fail_after(CLOSE_WITHIN):
            await watcher.wait_for(*registered)
        assert agent.alias not in watcher.ended
        assert [e.tunnel.alias for e in server.registry.entries()] == [agent.alias]
        assert agent.reporter.reconnects == []
        await check_tunnel(agent, "after")
        # The server still accepts new agents.
        async with start_agent(server, upstream.port) as second:
            assert second.alias != agent.alias
            await check_tunnel(second, "second-agent")


async def test_text_instead_of_hello_is_rejected_with_a_reason(tmp_path: Path, upstream: Upstream) -> None:
    async with fuzz_target(tmp_path, upstream) as (server, agent, _):
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
        try:
            await ws.send('{"type": "hello"}')
            closed, frames = await until_closed(ws)
        finally:
            await ws.aclose()
        assert [f.type for f in frames] == [FT.REJECT]
        assert frames[0].payload["code"] == "protocol"
        assert "binary HELLO" in frames[0].payload["reason"]
        assert closed.code == 1008
        await check_tunnel(agent, "after-text")


async def test_malformed_frame_from_a_serving_agent_ends_only_its_session(tmp_path: Path,
                                                                          upstream: Upstream) -> None:
    """A raw agent answers a visitor's REQUEST with a bad frame: the visitor gets a 502, the rest works."""
    async with fuzz_target(tmp_path, upstream) as (server, agent, watcher):
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
        try:
            await ws.send(hello())
            welcome = await ws.receive()
            assert isinstance(welcome, bytes)
            alias = next(p.decode_message(welcome)).payload["alias"]
            result: dict[str, Any] = {}

            async def visit() -> None:
                async with visitor(server, alias, timeout=10) as client:
                    result["response"] = await client.get("/victim")

            async with anyio.create_task_group() as tg:

                tg.start_soon(visit)
                with anyio.fail_after(5):
                    message = await ws.receive()
                assert isinstance(message, bytes)
                request = next(p.decode_message(message))  # END may ride along (a request without a body)
                assert request.type == FT.REQUEST
                assert p.RequestHead.from_payload(request.payload).target == b"/victim"
                # A WS_CLOSE whose code is not a close code.
                await ws.send(p.encode(FT.WS_CLOSE, request.stream, {"code": "not a number"}))
                closed, _ = await until_closed(ws)
            assert closed.code == 1002
            assert result["response"].status_code == 502
        finally:
            await ws.aclose()
        with anyio.fail_after(CLOSE_WITHIN):
            await watcher.wait_for(alias)
        assert "protocol error" in watcher.ended[alias]
        await check_tunnel(agent, "after-bad-agent")


async def test_oversized_link_message_closes_the_session(tmp_path: Path, upstream: Upstream) -> None:
    async with fuzz_target(tmp_path, upstream) as (server, agent, watcher):
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
        try:
            await ws.send(hello())
            welcome = await ws.receive()
            assert isinstance(welcome, bytes)
            alias = next(p.decode_message(welcome)).payload["alias"]
            # Many valid frames, but more than the largest message the link accepts (2 MiB).
            await ws.send(p.encode(FT.PING, 0, b"x" * 1000) * 2500)
            closed, _ = await until_closed(ws)
        finally:
            await ws.aclose()
        assert closed.code == 1009
        with anyio.fail_after(CLOSE_WITHIN):
            await watcher.wait_for(alias)
        await check_tunnel(agent, "after-oversized")


async def test_partial_http_handshake_is_closed_after_the_handshake_timeout(tmp_path: Path,
                                                                            upstream: Upstream) -> None:
    async with fuzz_target(tmp_path, upstream) as (server, agent, _):
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
        async with stream:
            started = anyio.current_time()
            await stream.send(UPGRADE[:-2])  # the head never ends
            await read_until_eof(stream)
            elapsed = anyio.current_time() - started
        assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2.0
        await check_tunnel(agent, "after-slow-handshake")


async def test_websocket_without_hello_is_closed_after_the_handshake_timeout(tmp_path: Path,
                                                                             upstream: Upstream) -> None:
    async with fuzz_target(tmp_path, upstream) as (server, agent, _):
        started = anyio.current_time()
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
        try:
            closed, frames = await until_closed(ws)  # we never send HELLO
        finally:
            await ws.aclose()
        elapsed = anyio.current_time() - started
        assert frames == []
        assert closed.code == 1006
        assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2.0
        assert len(server.registry) == 1
        await check_tunnel(agent, "after-silent-handshake")


async def test_handshake_split_across_reads_is_accepted(tmp_path: Path, upstream: Upstream) -> None:
    """A slow but honest agent whose upgrade request arrives in pieces still gets its 101."""
    async with fuzz_target(tmp_path, upstream) as (server, _, _):
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
        async with stream:
            for start in range(0, len(UPGRADE), 40):
                await stream.send(UPGRADE[start : start + 40])
                await anyio.sleep(0.02)  # let the server read each piece on its own
            with anyio.fail_after(5):
                answer = await stream.receive()
        assert answer.startswith(b"HTTP/1.1 101 ")


async def test_agent_leaving_before_hello_releases_the_connection(tmp_path: Path, upstream: Upstream) -> None:
    """EOF right after the upgrade: the server closes its side at once (no leaked socket)."""
    async with fuzz_target(tmp_path, upstream) as (server, agent, _):
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
        async with stream:
            await stream.send(UPGRADE)
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 101 ")
            started = anyio.current_time()
            await stream.send_eof()
            await read_until_eof(stream)
            assert anyio.current_time() - started < HANDSHAKE_TIMEOUT  # closed on EOF, not by the timeout
        await check_tunnel(agent, "after-early-eof")
