"""The agent's inspector (issue 15): capture bounded in count and body size, ngrok's local API
(/api/tunnels, /api/requests/http, replay), and the CLI's --inspect. Real server, agent and local
apps on port 0; the API is read over HTTP as a script would."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.agent import cli, inspector
from comzy.agent.capture import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_REQUESTS,
    MAX_ITEM_BYTES,
    MAX_STREAM_ITEMS,
    Capture,
    EventStreamParser,
    StreamLog,
)
from comzy.agent.client import Agent, AgentConfig, TunnelSpec
from comzy.agent.forward import LocalForwarder
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed
from tests.conftest import PYTHON, RecordingReporter, RunningAgent, cli_env, start_server, visitor
from tests.helpers import wait_until
from tests.stack import Stack, reachable, stack_fixture, stacks_fixture  # noqa: F401 (role all and a cluster)
from tests.test_websocket import exchange, open_ws
from tests.upstream import Upstream, serve_upstream

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def inspected(server: ServerContext, port: int, *, rewrite_host: bool = False,
                    max_requests: int = DEFAULT_MAX_REQUESTS, max_body: int = DEFAULT_MAX_BODY,
                    public: ServerContext | None = None) -> AsyncIterator[tuple[RunningAgent, httpx.AsyncClient]]:
    """An in-process agent with capture on, and a client for its local API (on 127.0.0.1:0); visitors
    reach it through ``public`` (an edge of a cluster whose control node is ``server``) if given."""
    capture = Capture(max_requests, max_body)
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", port, rewrite_host=rewrite_host, on_served=reporter.served.append,
                               capture=capture)
    agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=port), forwarder, reporter)
    tunnel = inspector.TunnelInfo(f"127.0.0.1:{port}")
    api = inspector.InspectorAPI(capture, tunnel, lambda _name: forwarder.local)
    sock = inspector.bind("127.0.0.1", [0])
    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=inspector.url_of(sock),
                                                                  timeout=30) as client:
        tg.start_soon(api.serve, sock)
        tg.start_soon(agent.run)
        welcome = await reporter.wait_connected()
        tunnel.public_url = str(welcome["url"])
        running = RunningAgent(agent, reporter, server)
        if public is not None and public is not server:
            running.public = public
            await reachable(public, running.alias)
        yield running, client
        await agent.close()
        tg.cancel_scope.cancel()
    await forwarder.aclose()


async def requests(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await api.get("/api/requests/http", params=params)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["transfer-encoding"] == "chunked"  # written an exchange at a time, never whole
    document = answer.json()
    assert document["uri"] == "/api/requests/http"
    return list(document["requests"])


def raw(message: dict[str, Any]) -> bytes:
    return base64.b64decode(message["raw"])


async def test_api_shows_tunnels_and_requests_in_ngroks_shape(server: ServerContext, upstream: Upstream) -> None:
    async with inspected(server, upstream.port) as (tunnel, api):
        tunnels = (await api.get("/api/tunnels")).json()
        # What `curl -s localhost:4040/api/tunnels | jq -r .tunnels[0].public_url` reads.
        assert tunnels["tunnels"][0]["public_url"] == tunnel.url
        assert tunnels["tunnels"][0]["name"] == "command_line"
        assert tunnels["tunnels"][0]["proto"] == "http"
        assert tunnels["tunnels"][0]["config"] == {"addr": f"http://127.0.0.1:{upstream.port}", "inspect": True}
        assert tunnels["uri"] == "/api/tunnels"
        assert (await api.get("/api/tunnels/command_line")).json()["public_url"] == tunnel.url

        async with tunnel.visitor() as visitor:
            sent = await visitor.post("/echo?x=1", content=b'{"hello": "world"}',
                                      headers={"content-type": "application/json", "x-one": "a"})
            assert sent.status_code == 200
            await visitor.get("/status/404")

        listed = await requests(api)
        assert [e["request"]["uri"] for e in listed] == ["/status/404", "/echo?x=1"]  # newest first
        echo = listed[1]
        assert set(echo) >= {"uri", "id", "tunnel_name", "remote_addr", "start", "duration", "request", "response"}
        assert echo["uri"] == f"/api/requests/http/{echo['id']}"
        assert echo["tunnel_name"] == "command_line"
        assert echo["remote_addr"] == "127.0.0.1"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d\d:\d\d", echo["start"])
        assert isinstance(echo["duration"], int) and echo["duration"] > 0  # nanoseconds, as ngrok's
        request = echo["request"]
        assert request["method"] == "POST"
        assert request["proto"] == "HTTP/1.1"
        assert request["headers"]["X-One"] == ["a"]
        assert request["headers"]["Content-Type"] == ["application/json"]
        assert raw(request).startswith(b"POST /echo?x=1 HTTP/1.1\r\n")
        assert raw(request).endswith(b'\r\n\r\n{"hello": "world"}')
        assert request["body_size"] == 18 and request["body_truncated"] is False
        response = echo["response"]
        assert response["status"] == "200 OK" and response["status_code"] == 200
        assert raw(response).startswith(b"HTTP/1.1 200 OK\r\n")
        assert raw(response).endswith(b"\r\n\r\n" + sent.content)
        assert echo["kind"] == "http" and echo["replay_of"] is None and echo["done"] is True
        assert listed[0]["response"]["status"] == "404 Not Found"

        one = await api.get(f"/api/requests/http/{echo['id']}")
        assert one.status_code == 200
        assert {k: v for k, v in one.json().items() if k != "duration"} == \
            {k: v for k, v in echo.items() if k != "duration"}
        assert [e["id"] for e in await requests(api, limit=1)] == [listed[0]["id"]]
        assert await requests(api, tunnel_name="another") == []

        missing = await api.get("/api/requests/http/nope")
        assert missing.status_code == 404
        assert set(missing.json()) == {"error_code", "status_code", "msg", "details"}
        # A page elsewhere whose DNS name points at 127.0.0.1 gets nothing.
        rebound = await api.get("/api/requests/http", headers={"host": "evil.example:4040"})
        assert rebound.status_code == 403

        cleared = await api.delete("/api/requests/http")
        assert cleared.status_code == 204
        assert await requests(api) == []


async def test_bodies_are_capped_and_marked_and_the_list_is_bounded(server: ServerContext,
                                                                    upstream: Upstream) -> None:
    async with inspected(server, upstream.port, max_requests=3, max_body=1000) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            body = bytes(range(256)) * 20  # 5120 bytes
            assert (await visitor.post("/echo", content=body)).status_code == 200
            download = await visitor.get("/bytes/5000")
            assert len(download.content) == 5000  # the visitor gets everything: only the copy is cut
            listed = await requests(api)
            download_entry, upload = listed[0], listed[1]
            assert upload["request"]["body_size"] == 5120 and upload["request"]["body_truncated"] is True
            assert raw(upload["request"]).endswith(b"\r\n\r\n" + body[:1000])
            assert download_entry["response"]["body_size"] == 5000
            assert download_entry["response"]["body_truncated"] is True
            assert raw(download_entry["response"]).endswith(b"\r\n\r\n" + download.content[:1000])

            refused = await api.post("/api/requests/http", json={"id": upload["id"]})
            assert refused.status_code == 400
            assert "--inspect-max-body" in refused.json()["msg"]

            for i in range(4):
                await visitor.get(f"/status/20{i}")
        listed = await requests(api)
        assert [e["request"]["uri"] for e in listed] == ["/status/203", "/status/202", "/status/201"]
        gone = await api.get(f"/api/requests/http/{upload['id']}")
        assert gone.status_code == 404


async def test_streams_are_recorded_as_such(server: ServerContext, upstream: Upstream) -> None:
    for i in range(3):
        upstream.gate(f"sse{i}").set()
    async with inspected(server, upstream.port) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/sse")).status_code == 200
        async with open_ws(tunnel.public, tunnel.alias, "/ws/mirror") as (ws, _):
            assert await exchange(ws, "ping") == "ping"
            await ws.close()

        async def both_done() -> bool:
            listed = await requests(api)
            return len(listed) == 2 and all(e["done"] for e in listed)

        # The WebSocket's end reaches the agent after the visitor's close: polled, as a script would.
        await wait_until(both_done)
        websocket, sse = await requests(api)
        assert sse["kind"] == "sse"
        assert b"data: event 0\n\n" in raw(sse["response"])
        assert websocket["kind"] == "websocket"
        assert websocket["response"]["status_code"] == 101
        assert raw(websocket["request"]).endswith(b"\r\n\r\nping")
        assert raw(websocket["response"]).endswith(b"\r\n\r\nping")
        refused = await api.post("/api/requests/http", json={"id": websocket["id"]})
        assert refused.status_code == 400


class Recorder:
    """A local app that keeps the exact bytes of each request it gets (Content-Length bodies)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(length[1])) if length else b""
                self.received.append(head + body)
                writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nok\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_replay_sends_the_same_bytes_again_even_with_the_tunnel_down(tmp_path: Path) -> None:
    recorder = Recorder()
    local = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    recorder.port = local.sockets[0].getsockname()[1]
    stop_server = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[ServerContext]) -> None:
        async with start_server(tmp_path / "data") as started:
            task_status.started(started)
            await stop_server.wait()

    async with local, anyio.create_task_group() as tg:
        server = await tg.start(run_server)
        async with inspected(server, recorder.port, rewrite_host=True) as (tunnel, api):
            async with tunnel.visitor() as visitor:
                answer = await visitor.post("/hook?n=1", content=b"event=paid&amount=12",
                                            headers={"content-type": "application/x-www-form-urlencoded"})
                assert answer.status_code == 201
            original = (await requests(api))[0]
            assert recorder.received[0].startswith(b"POST /hook?n=1 HTTP/1.1\r\n")
            assert f"\r\nhost: 127.0.0.1:{recorder.port}\r\n".encode() in recorder.received[0]  # the Host rule
            assert raw(original["request"]) == recorder.received[0]

            stop_server.set()
            await wait_until(lambda: tunnel.reporter.reconnects)  # the tunnel is down: the agent is reconnecting
            replayed = await api.post("/api/requests/http",
                                      json={"id": original["id"], "tunnel_name": "command_line"})
            assert replayed.status_code == 204
            assert len(recorder.received) == 2
            assert recorder.received[1] == recorder.received[0]  # byte for byte as first forwarded
            replay = (await requests(api))[0]
            assert replay["replay_of"] == original["id"]
            assert replay["response"]["status_code"] == 201
            assert raw(replay["request"]) == raw(original["request"])
            assert raw(replay["response"]).endswith(b"\r\n\r\nok\n")
            assert [e["id"] for e in await requests(api)][1] == original["id"]
            # With changes too: the edited request goes to the local service, not through the server.
            edited = await api.post("/api/requests/http", json={"id": original["id"], "body": "event=refunded"})
            assert edited.status_code == 204
            assert recorder.received[2].endswith(b"\r\n\r\nevent=refunded")
            assert b"\r\ncontent-length: 14" in recorder.received[2]
            assert (await requests(api))[0]["edited"] is True

            missing = await api.post("/api/requests/http", json={"id": "0000"})
            assert missing.status_code == 404
            not_json = await api.post("/api/requests/http", content=json.dumps({"id": original["id"]}),
                                      headers={"content-type": "text/plain"})
            assert not_json.status_code == 415
        tg.cancel_scope.cancel()


# -- The command line ----------------------------------------------------------------------------
def agent_command(port: int, server: ServerContext, *args: str) -> list[str]:
    return [PYTHON, "-m", "comzy.agent.cli", str(port), "--local-host", "127.0.0.1",
            "--server", f"ws://127.0.0.1:{server.ports.ws}", "--log", *args]


async def lines_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> list[str]:
    """The process's output lines up to the first that matches ``pattern``."""
    assert proc.stdout is not None
    seen: list[str] = []
    with anyio.fail_after(timeout):
        while not seen or not re.search(pattern, seen[-1]):
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            if not line:
                raise AssertionError(f"the agent ended before printing {pattern}:\n{''.join(seen)}")
            seen.append(line)
    return seen


@contextmanager
def agent_process(args: list[str], home: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, env=cli_env(HOME=str(home)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_the_cli_prints_the_inspector_under_the_public_url_and_serves_the_api(
        server: ServerContext, upstream: Upstream, tmp_path: Path) -> None:
    command = agent_command(upstream.port, server, "--inspect", "127.0.0.1:0", "--inspect-max-body", "1K")
    with agent_process(command, tmp_path) as proc:
        lines = await lines_until(proc, r"^Press Ctrl-C")
        printed = [line.strip() for line in lines]
        at = next(i for i, line in enumerate(printed) if line.startswith("Public URL: "))
        public_url = printed[at].split(": ", 1)[1]
        assert re.fullmatch(r"Inspector: http://127\.0\.0\.1:\d+", printed[at + 1])
        api_url = printed[at + 1].split(": ", 1)[1]
        assert not api_url.endswith(":0")
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
            # curl -s localhost:PORT/api/tunnels | jq -r .tunnels[0].public_url
            assert (await api.get("/api/tunnels")).json()["tunnels"][0]["public_url"] == public_url
            async with httpx.AsyncClient(timeout=30) as visitor:
                host = public_url.split("//", 1)[1]
                answer = await visitor.post(f"http://127.0.0.1:{server.ports.http}/cli", content=b"z" * 3000,
                                            headers={"host": host})
                assert answer.status_code == 200
            await lines_until(proc, r"^POST\s+/cli 200")
            entry = (await requests(api))[0]
            assert entry["request"]["body_size"] == 3000
            assert entry["request"]["body_truncated"] is True
            assert raw(entry["request"]).endswith(b"\r\n\r\n" + b"z" * 1024)  # --inspect-max-body 1K


async def test_inspect_off_serves_nothing_and_prints_nothing(server: ServerContext, upstream: Upstream,
                                                             tmp_path: Path) -> None:
    with agent_process(agent_command(upstream.port, server, "--inspect", "off"), tmp_path) as proc:
        lines = await lines_until(proc, r"^Press Ctrl-C")
        assert not [line for line in lines if "Inspector" in line or "inspector" in line]


async def test_a_busy_explicit_address_is_an_error_that_says_what_to_do(server: ServerContext, upstream: Upstream,
                                                                        tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = await anyio.run_process(agent_command(upstream.port, server, "--inspect", f"127.0.0.1:{port}"),
                                       env=cli_env(HOME=str(tmp_path)), check=False)
    assert done.returncode == 2
    error = done.stderr.decode()
    assert f"the inspector cannot listen on 127.0.0.1:{port}" in error
    assert "--inspect off" in error
    bad = await anyio.run_process(agent_command(upstream.port, server, "--inspect", "here"),
                                  env=cli_env(HOME=str(tmp_path)), check=False)
    assert bad.returncode == 2
    assert "is not an address" in bad.stderr.decode()


class Notices:
    """Stands in for the CLI's output: keeps its notices."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, str]] = []

    def notice(self, level: str, message: str) -> None:
        self.notices.append((level, message))


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_the_default_port_falls_back_to_the_next_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        spare = free_port()
        # As 4040 busy and 4041 free: the range is a module constant, here one the test controls.
        monkeypatch.setattr(inspector, "DEFAULT_PORTS", [taken, spare])
        output = Notices()
        sock = cli.open_inspector(argparse.Namespace(inspect=None), output)  # type: ignore[arg-type]
        assert sock is not None
        with sock:
            assert sock.getsockname() == ("127.0.0.1", spare)
        assert output.notices == []

        monkeypatch.setattr(inspector, "DEFAULT_PORTS", [taken])
        assert cli.open_inspector(argparse.Namespace(inspect=None), output) is None  # type: ignore[arg-type]
        level, message = output.notices[0]
        assert level == "warning"
        assert "all in use" in message and "--inspect 127.0.0.1:PORT" in message


def test_addresses_and_sizes() -> None:
    assert inspector.parse_address("127.0.0.1:4050") == ("127.0.0.1", 4050)
    assert inspector.parse_address("4050") == ("127.0.0.1", 4050)
    assert inspector.parse_address("[::1]:4050") == ("::1", 4050)
    with pytest.raises(ValueError, match="HOST:PORT"):
        inspector.parse_address("localhost")
    assert inspector.is_loopback("localhost") and inspector.is_loopback("::1") and inspector.is_loopback("127.0.0.2")
    assert not inspector.is_loopback("0.0.0.0") and not inspector.is_loopback("192.168.1.10")
    args = cli.parse_args(["3000", "--inspect-max-body", "64K", "--inspect-max-requests", "20"])
    assert (args.inspect_max_body, args.inspect_max_requests) == (64 * 1024, 20)
    assert cli.parse_args(["3000", "--inspect-max-body", "2MiB"]).inspect_max_body == 2 * 1024 * 1024
    assert cli.parse_args(["3000"]).inspect_max_body == 1024 * 1024


def test_the_status_screen_shows_the_inspector_under_the_public_url() -> None:
    from io import StringIO

    from rich.console import Console

    from comzy.agent.screen import Screen

    screen = Screen("localhost:3000", out=StringIO())
    screen.inspector = "http://127.0.0.1:4041"
    console = Console(file=StringIO(), width=100, height=30, record=True)
    console.print(screen.render(100, 30))
    text = [line.strip() for line in console.export_text().splitlines()]
    at = next(i for i, line in enumerate(text) if line.startswith("Public URL"))
    assert re.fullmatch(r"Inspector\s+http://127\.0\.0\.1:4041", text[at + 1])


def test_a_non_loopback_address_is_taken_only_when_given_and_then_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, list[int]]] = []

    def bind_on_loopback(host: str, ports: list[int]) -> socket.socket:
        asked.append((host, list(ports)))  # tests bind 127.0.0.1 only: the address asked for is what counts
        return socket.create_server(("127.0.0.1", 0))

    monkeypatch.setattr(inspector, "bind", bind_on_loopback)
    output = Notices()
    sock = cli.open_inspector(argparse.Namespace(inspect="192.0.2.10:4040"), output)  # type: ignore[arg-type]
    assert sock is not None
    sock.close()
    assert asked == [("192.0.2.10", [4040])]
    level, message = output.notices[0]
    assert level == "warning" and "not a loopback address" in message and "no password" in message

    output.notices.clear()
    sock = cli.open_inspector(argparse.Namespace(inspect=None), output)  # type: ignore[arg-type]
    assert sock is not None
    sock.close()
    assert asked[1] == (inspector.DEFAULT_HOST, list(inspector.DEFAULT_PORTS)) == ("127.0.0.1", list(range(4040, 4050)))
    assert output.notices == []


# -- Replay with changes (Comzy's extension of ngrok's replay) -------------------------------------
async def test_a_replay_with_changes_reaches_the_local_service_with_them(server: ServerContext) -> None:
    recorder = Recorder()
    local = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    recorder.port = local.sockets[0].getsockname()[1]
    async with local, inspected(server, recorder.port, rewrite_host=True, max_body=1000) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.post("/hook?n=1", content=b"a" * 1500,
                                       headers={"content-type": "text/plain"})).status_code == 201
        original = (await requests(api))[0]
        assert original["request"]["body_truncated"] is True  # cut: only a replay with a new body can go

        edited = await api.post("/api/requests/http", json={
            "id": original["id"], "tunnel_name": "command_line", "method": "PUT", "uri": "/hook?n=2",
            "headers": [["Content-Type", "application/json"], ["X-Edited", "yes \u00e9"], ["Host", "evil.example"],
                        ["Content-Length", "999"], ["Transfer-Encoding", "chunked"]],
            "body": '{"amount": 13, "note": "caf\u00e9"}'})
        assert edited.status_code == 204, edited.text
        body = '{"amount": 13, "note": "caf\u00e9"}'.encode()
        sent = recorder.received[-1]
        head, _, sent_body = sent.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"PUT /hook?n=2 HTTP/1.1"
        # The Host rule (--host-header rewrite) as for a forward; the body framed by the agent.
        assert sorted(lines[1:]) == sorted([
            b"Content-Type: application/json", b"X-Edited: yes \xe9", f"Host: 127.0.0.1:{recorder.port}".encode(),
            b"content-length: %d" % len(body)])
        assert sent_body == body
        replay = (await requests(api))[0]
        assert replay["replay_of"] == original["id"] and replay["edited"] is True
        assert edited.headers["location"] == f"/api/requests/http/{replay['id']}"
        assert replay["request"]["method"] == "PUT" and replay["request"]["uri"] == "/hook?n=2"
        assert raw(replay["request"]) == sent
        assert replay["response"]["status_code"] == 201
        assert original["edited"] is False

        # Bytes as base64; only the body changed: method, target and headers are the original's.
        assert (await api.post("/api/requests/http", json={
            "id": original["id"], "body_base64": base64.b64encode(b"\x00\xff binary").decode()})).status_code == 204
        head, _, sent_body = recorder.received[-1].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /hook?n=1 HTTP/1.1\r\n") and b"\r\ncontent-type: text/plain" in head
        assert sent_body == b"\x00\xff binary" and b"content-length: 9" in head
        # No edit at all is the plain replay, which a cut body cannot be.
        assert (await api.post("/api/requests/http", json={"id": original["id"]})).status_code == 400


@pytest.mark.parametrize(("edits", "reason"), [
    ({"method": "GE T"}, '"method" must be an HTTP method'),
    ({"method": ""}, '"method" must be an HTTP method'),
    ({"method": "X" * 33}, '"method" must be an HTTP method'),
    ({"uri": "hook"}, '"uri" must be a path starting with "/"'),
    ({"uri": "/a b"}, '"uri" must be a path starting with "/"'),
    ({"uri": "/a\r\nX-Injected: 1"}, '"uri" must be a path starting with "/"'),
    ({"uri": "/" + "a" * 8192}, '"uri" must be a path starting with "/"'),
    ({"headers": [["X-A", "1\r\nX-Injected: 1"]]}, "headers[0] (X-A): a header value must not contain CR, LF"),
    ({"headers": [["X-A", "nul\x00"]]}, "must not contain CR, LF, NUL"),
    ({"headers": [["X-A", "\u2713"]]}, "beyond Latin-1"),
    ({"headers": [["X A", "1"]]}, "headers[0]: a header name is a token"),
    ({"headers": [["X-A", "1"], ["Bad:Name", "1"]]}, "headers[1]: a header name is a token"),
    ({"headers": [["X-A"]]}, "headers[0] must be a [name, value] pair of strings"),
    ({"headers": {"X-A": "1"}}, '"headers" must be a list of at most 100'),
    ({"headers": [["X-A", "1"]] * 101}, '"headers" must be a list of at most 100'),
    ({"headers": [["X-A", "v" * 33000], ["X-B", "v" * 33000]]}, "longer than 65536 bytes"),
    ({"headers": [["Host", "a"], ["host", "b"]]}, "at most one Host header"),
    ({"body": "x", "body_base64": "eA=="}, "not both"),
    ({"body": 12}, '"body" must be a string'),
    ({"body_base64": "not base64!"}, '"body_base64" must be a string of standard base64'),
    ({"body": "x" * 1001}, "more than --inspect-max-body (1000)"),
    ({"methd": "PUT"}, "unknown field 'methd'"),
])
async def test_invalid_edits_are_refused_with_a_reason_and_nothing_is_sent(
        server: ServerContext, edits: dict[str, Any], reason: str) -> None:
    recorder = Recorder()
    local = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    recorder.port = local.sockets[0].getsockname()[1]
    async with local, inspected(server, recorder.port, max_body=1000) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.post("/hook", content=b"x")).status_code == 201
        original = (await requests(api))[0]
        refused = await api.post("/api/requests/http", json={"id": original["id"], **edits})
        assert refused.status_code == 400
        assert reason in refused.json()["msg"]
        assert len(recorder.received) == 1  # the original only
        assert len(await requests(api)) == 1  # no replay listed


# -- Streams: a WebSocket's messages, an event stream's events -------------------------------------
async def detail(api: httpx.AsyncClient, entry: dict[str, Any]) -> dict[str, Any]:
    answer = await api.get(f"/api/requests/http/{entry['id']}")
    assert answer.status_code == 200
    return dict(answer.json())


async def done_entries(api: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    """The list once ``count`` exchanges are there and over (a WebSocket's end reaches the agent
    after the visitor's close: polled, as a script would)."""
    async def all_done() -> bool:
        listed = await requests(api)
        return len(listed) == count and all(e["done"] for e in listed)

    await wait_until(all_done)
    return await requests(api)


async def test_websocket_messages_are_recorded_both_ways_with_the_close(server: ServerContext,
                                                                         upstream: Upstream) -> None:
    async with inspected(server, upstream.port) as (tunnel, api):
        async with open_ws(tunnel.public, tunnel.alias, "/ws") as (ws, _):
            assert await exchange(ws, "hello") == "echo:hello"
            assert await exchange(ws, b"\x00\x01") == b"echo:\x00\x01"
            closed = await exchange(ws, "close:4001")  # the local service closes
            assert isinstance(closed, Closed) and closed.code == 4001
        async with open_ws(tunnel.public, tunnel.alias, "/ws") as (ws, _):
            assert await exchange(ws, "x") == "echo:x"
            await ws.close(4002, "bye")  # the visitor closes

        by_visitor, by_local = await done_entries(api, 2)
        # The list has the counts only; the detail has the messages.
        assert by_local["stream"] == {"count": 5, "dropped": 0, "bytes": 5 + 10 + 2 + 7 + 10,
                                      "close": {"direction": "out", "code": 4001, "reason": "asked"}}
        stream = (await detail(api, by_local))["stream"]
        assert stream["limits"] == {"max_items": MAX_STREAM_ITEMS, "max_item_bytes": MAX_ITEM_BYTES,
                                    "max_bytes": min(DEFAULT_MAX_BODY, MAX_STREAM_ITEMS * MAX_ITEM_BYTES)}
        messages = stream["messages"]
        assert [(m["seq"], m["direction"], m["type"], base64.b64decode(m["data"]), m["size"], m["truncated"])
                for m in messages] == [
            (0, "in", "text", b"hello", 5, False), (1, "out", "text", b"echo:hello", 10, False),
            (2, "in", "binary", b"\x00\x01", 2, False), (3, "out", "binary", b"echo:\x00\x01", 7, False),
            (4, "in", "text", b"close:4001", 10, False)]
        times = [m["time"] for m in messages]
        assert times == sorted(times) and times[0] > 0 and times[-1] <= (await detail(api, by_local))["duration"]
        assert by_visitor["stream"]["close"] == {"direction": "in", "code": 4002, "reason": "bye"}
        assert [m["direction"] for m in (await detail(api, by_visitor))["stream"]["messages"]] == ["in", "out"]


async def test_a_websocket_keeps_its_last_messages_and_cuts_long_ones(server: ServerContext,
                                                                      upstream: Upstream) -> None:
    async with inspected(server, upstream.port) as (tunnel, api):
        async with open_ws(tunnel.public, tunnel.alias, "/ws/mirror") as (ws, _):
            for i in range(150):
                assert await exchange(ws, f"m{i:03d}") == f"m{i:03d}"
            big = bytes(range(256)) * 40  # 10240 bytes: passes whole, kept cut
            assert await exchange(ws, big) == big
            await ws.close()
        (entry,) = await done_entries(api, 1)
        assert entry["stream"]["count"] == 302
        assert entry["stream"]["dropped"] == 302 - MAX_STREAM_ITEMS
        messages = (await detail(api, entry))["stream"]["messages"]
        assert len(messages) == MAX_STREAM_ITEMS
        assert [m["seq"] for m in messages] == list(range(302 - MAX_STREAM_ITEMS, 302))  # the last ones
        assert base64.b64decode(messages[0]["data"]) == f"m{(302 - MAX_STREAM_ITEMS) // 2:03d}".encode()
        for message in messages[-2:]:
            assert message["size"] == len(big) and message["truncated"] is True
            assert base64.b64decode(message["data"]) == big[:MAX_ITEM_BYTES]


class EventSource:
    """A local app that answers an event stream a piece at a time: a piece goes out once the test
    has seen the previous one reach the visitor, so the agent reads each piece on its own."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.proceed: asyncio.Queue[None] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in self.pieces:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await self.proceed.get()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


#: Events cut everywhere a chunk can cut them: within a field, between CR and LF, before the blank
#: line; LF, CRLF and CR line ends; a comment; an event whose data is longer than a message is kept.
SSE_PIECES = [b"data: fir", b"st\r", b"\ndata: second\r\n\r", b'\nevent: tick\nid: 7\nretry: 3000\ndata: {"n": 7}\r',
              b"\r: keep-alive\n\ndata: ", b"x" * 3000, b"x" * 3000 + b"\n", b"\n", b"data: last\n\n"]


async def test_event_stream_events_are_parsed_across_chunk_boundaries(server: ServerContext) -> None:
    source = EventSource(SSE_PIECES)
    local = await asyncio.start_server(source.handle, "127.0.0.1", 0)
    async with local, inspected(server, local.sockets[0].getsockname()[1]) as (tunnel, api):
        async with tunnel.visitor() as visitor, visitor.stream("GET", "/events") as response:
            received, expected = b"", b""
            pieces = iter(SSE_PIECES)
            expected = next(pieces)
            async for data in response.aiter_raw():
                received += data
                if len(received) == len(expected):  # this piece reached the visitor: send the next one
                    source.proceed.put_nowait(None)
                    expected += next(pieces, b"")
            assert received == b"".join(SSE_PIECES)
        (entry,) = await done_entries(api, 1)
        assert entry["kind"] == "sse"
        assert entry["stream"] == {"count": 4, "dropped": 0, "bytes": len(received), "close": None}
        events = (await detail(api, entry))["stream"]["events"]
        assert [(e["seq"], e["event"], e["id"], e["retry"], e["data"][:20], e["truncated"]) for e in events] == [
            (0, "message", None, None, "first\nsecond", False),
            (1, "tick", "7", 3000, '{"n": 7}', False),
            (2, "message", None, None, "x" * 20, True),
            (3, "message", None, None, "last", False)]
        assert len(events[2]["data"]) == MAX_ITEM_BYTES
        # Each event's size is its bytes on the wire (an event ends at its blank line's first byte).
        assert sum(e["size"] for e in events) + len(b": keep-alive\n\n") == len(received)
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)


def test_the_event_stream_parser_gives_the_same_events_however_the_bytes_are_cut() -> None:
    stream = (b"\xef\xbb\xbfdata: first\r\ndata: second\r\n\r\nevent: tick\nid: 7\nretry: 3000\n"
              b'data: {"n": 7}\r\r: comment\n\ndata: last\n\ndata:no-space\ndata\n\nid: a\x00b\nretry: x\n'
              b"data: " + b"y" * 5000 + b"\n\nevent: unfinished\ndata: never dispatched\n")

    def parse(pieces: list[bytes], cap: int = DEFAULT_MAX_BODY) -> tuple[list[tuple[Any, ...]], int, int, int]:
        log = StreamLog(0, cap)
        parser = EventStreamParser(log)
        for piece in pieces:
            parser.feed(piece)
        return [item[2:] for _, item in log.items], log.count, log.dropped, log.bytes

    whole = parse([stream])
    assert [(event, event_id, retry, data[:12], truncated) for event, event_id, retry, data, _, truncated
            in whole[0]] == [
        ("message", None, None, "first\nsecond", False), ("tick", "7", 3000, '{"n": 7}', False),
        ("message", None, None, "last", False), ("message", None, None, "no-space\n", False),
        ("message", None, None, "y" * 12, True)]  # an id with NUL and a retry not a number are ignored
    assert len(whole[0][-1][3]) == MAX_ITEM_BYTES
    assert whole[1:] == (5, 0, len(stream))
    for size in (1, 2, 3, 5, 7, 64, 4096):
        assert parse([stream[i:i + size] for i in range(0, len(stream), size)]) == whole, size
    for cut in range(len(stream) - 5000):  # every cut in two, with an empty piece too
        assert parse([stream[:cut], b"", stream[cut:]]) == whole, cut

    # Bounds: the last MAX_STREAM_ITEMS events, and no more kept bytes than the cap.
    assert parse([b"data: %d\n\n" % i for i in range(1000)])[1:3] == (1000, 1000 - MAX_STREAM_ITEMS)
    events, count, dropped, _ = parse([b"data: " + b"a" * 300 + b"\n\n"] * 50, cap=1000)
    assert (count, dropped, len(events)) == (50, 47, 3)
    # A line without an end keeps only its first bytes, however long.
    log = StreamLog(0, DEFAULT_MAX_BODY)
    parser = EventStreamParser(log)
    for _ in range(1000):
        parser.feed(b"data: " + b"z" * 65536)
    assert len(parser.pending) <= MAX_ITEM_BYTES + 16 and len(parser.data) == 0


async def test_streams_and_an_edited_replay_on_role_all_and_through_an_edge(stack: Stack, upstream: Upstream) -> None:
    # Capture is the agent's: whether visitors come through the node or an edge and NATS, it records the same.
    for i in range(3):
        upstream.gate(f"sse{i}").set()
    async with inspected(stack.control, upstream.port, public=stack.public) as (tunnel, api):
        async with open_ws(tunnel.public, tunnel.alias, "/ws") as (ws, _):
            assert await exchange(ws, "hello") == "echo:hello"
            await ws.close(4003, "done")
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/sse")).status_code == 200
            assert (await visitor.get("/echo?n=1")).status_code == 200
        echo, sse, websocket = await done_entries(api, 3)
        assert [(m["direction"], base64.b64decode(m["data"]))
                for m in (await detail(api, websocket))["stream"]["messages"]] == [("in", b"hello"),
                                                                                    ("out", b"echo:hello")]
        assert websocket["stream"]["close"] == {"direction": "in", "code": 4003, "reason": "done"}
        assert [e["data"] for e in (await detail(api, sse))["stream"]["events"]] == [f"event {i}" for i in range(3)]
        # A replayed event stream is parsed again.
        assert (await api.post("/api/requests/http", json={"id": sse["id"]})).status_code == 204
        replay = (await requests(api))[0]
        assert replay["replay_of"] == sse["id"] and replay["kind"] == "sse" and replay["stream"]["count"] == 3
        replayed = await api.post("/api/requests/http", json={"id": echo["id"], "uri": "/echo?n=2",
                                                              "headers": [["X-Edited", "1"]]})
        assert replayed.status_code == 204
        assert upstream.requests[-1]["path"] == "/echo" and upstream.requests[-1]["query_string"] == b"n=2"
        assert (b"x-edited", b"1") in upstream.requests[-1]["headers"]


async def test_several_tunnels_capture_their_names_and_replay_to_their_own_service(
        server: ServerContext, upstream: Upstream) -> None:
    # comzy 3000 8080 (one capture, two forwarders): each exchange names its tunnel, the list filters
    # by it, and a replay goes to the local service of the tunnel its request came through (with that
    # tunnel's Host rule when edited), or to the one named; never silently to the first tunnel's.
    async with serve_upstream() as second:
        capture = Capture()
        reporter = RecordingReporter()
        specs = [TunnelSpec("web", upstream.port), TunnelSpec("api", second.port)]
        forwarders = {"web": LocalForwarder("127.0.0.1", upstream.port, capture=capture, name="web"),
                      "api": LocalForwarder("127.0.0.1", second.port, rewrite_host=True, capture=capture,
                                            name="api")}
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port,
                                  tunnels=specs), forwarders["web"], reporter, forwarders)
        web = inspector.TunnelInfo(f"127.0.0.1:{upstream.port}", name="web")
        web.more = [inspector.TunnelInfo(f"127.0.0.1:{second.port}", name="api")]
        api = inspector.InspectorAPI(capture, web, lambda name: forwarders[name].local)
        sock = inspector.bind("127.0.0.1", [0])
        async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=inspector.url_of(sock),
                                                                      timeout=30) as client:
            tg.start_soon(api.serve, sock)
            tg.start_soon(agent.run)
            await reporter.wait_connected()
            for name, path in (("web", "/echo?to=web"), ("api", "/echo?to=api")):
                async with visitor(server, agent.resumes[name][0]) as public:
                    assert (await public.get(path)).status_code == 200
            listed = await requests(client)
            assert [(e["tunnel_name"], e["request"]["uri"]) for e in listed] == \
                [("api", "/echo?to=api"), ("web", "/echo?to=web")]
            assert [e["request"]["uri"] for e in await requests(client, tunnel_name="api")] == ["/echo?to=api"]
            assert await requests(client, tunnel_name="command_line") == []
            seen = len(upstream.requests), len(second.requests)

            # The api tunnel's request replays to the api tunnel's service, as it was forwarded.
            replayed = await client.post("/api/requests/http", json={"id": listed[0]["id"]})
            assert replayed.status_code == 204
            assert (len(upstream.requests), len(second.requests)) == (seen[0], seen[1] + 1)
            assert (await requests(client))[0]["tunnel_name"] == "api"
            # Edited, it follows the api tunnel's Host rule (rewrite to its local address).
            edited = await client.post("/api/requests/http", json={"id": listed[0]["id"], "uri": "/echo?edited=1",
                                                                   "headers": [["Host", "visitor.example"]]})
            assert edited.status_code == 204
            assert (b"host", f"127.0.0.1:{second.port}".encode()) in \
                [(n.lower(), v) for n, v in second.requests[-1]["headers"]]
            # Named, the web tunnel's request goes to the api tunnel's service instead.
            named = await client.post("/api/requests/http", json={"id": listed[1]["id"], "tunnel_name": "api"})
            assert named.status_code == 204
            assert second.requests[-1]["query_string"] == b"to=web" and len(upstream.requests) == seen[0]
            assert (await requests(client))[0]["tunnel_name"] == "api"
            unknown = await client.post("/api/requests/http", json={"id": listed[1]["id"], "tunnel_name": "db"})
            assert unknown.status_code == 404 and "web, api" in unknown.text
            await agent.close()
            tg.cancel_scope.cancel()
        for forwarder in forwarders.values():
            await forwarder.aclose()


async def test_a_replay_after_the_local_service_closed_its_idle_connection_goes_through(
        server: ServerContext) -> None:
    # A local server's keep-alive timeout (uvicorn's is 5 s) closes the pooled connection while the
    # developer reads the request: the replay must open a new one, as a forward does, not answer 502.
    received: list[bytes] = []

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # keep-alive, then closes anyway
        await writer.drain()
        writer.close()

    local = await asyncio.start_server(answer_then_close, "127.0.0.1", 0)
    async with local, inspected(server, local.sockets[0].getsockname()[1]) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/hook")).status_code == 200
        original = (await requests(api))[0]
        for edits in ({}, {"uri": "/hook?again=1"}):
            replayed = await api.post("/api/requests/http", json={"id": original["id"], **edits})
            assert replayed.status_code == 204, replayed.text
        assert [head.split(b"\r\n", 1)[0] for head in received] == \
            [b"GET /hook HTTP/1.1", b"GET /hook HTTP/1.1", b"GET /hook?again=1 HTTP/1.1"]


async def test_a_replay_retries_once_on_a_fresh_connection_when_the_pooled_one_dies_unanswered(
        server: ServerContext) -> None:
    # The close can also come as the replay is sent: each connection here answers its first request
    # and drops the second unanswered. A forward retries that once; so does a replay.
    heads: list[bytes] = []

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            heads.append(b"dropped " + await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    local = await asyncio.start_server(one_per_connection, "127.0.0.1", 0)
    async with local, inspected(server, local.sockets[0].getsockname()[1]) as (tunnel, api):
        async with tunnel.visitor() as visitor:
            assert (await visitor.get("/hook")).status_code == 200
        original = (await requests(api))[0]
        replayed = await api.post("/api/requests/http", json={"id": original["id"], "uri": "/hook?n=2"})
        assert replayed.status_code == 204, replayed.text
        assert [head.split(b"\r\n", 1)[0] for head in heads] == \
            [b"GET /hook HTTP/1.1", b"dropped GET /hook?n=2 HTTP/1.1", b"GET /hook?n=2 HTTP/1.1"]
        assert (await requests(api))[0]["response"]["status_code"] == 200
