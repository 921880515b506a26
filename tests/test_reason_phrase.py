"""The status line a visitor gets: the standard reason phrase of the code, from either public
listener server (uvicorn, hypercorn) and from the admin listener, through a real tunnel.

ASGI cannot carry a local app's own phrase to the server, so the visitor gets the standard one
(``200 OK`` even when the app said ``200 Fine``), and a code without one (599) an empty phrase:
``HTTP/1.1 599 `` is a valid status line (RFC 9112 4). Before, hypercorn (and so the admin
listener) sent ``HTTP/1.1 200 `` for everything, which urllib reports as ``HTTP Error 404: ``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import anyio
import h11
import pytest

from comzy.core.hypercorn_compat import standard_phrase
from tests.conftest import RunningAgent, start_agent, start_server
from tests.helpers import serve_tcp
from tests.test_http_servers import SERVERS, UPGRADE, raw_answer
from tests.test_local_http import ScriptedServer, always
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


def status_line(answer: bytes) -> bytes:
    return answer.partition(b"\r\n")[0]


async def first_line(port: int, request: bytes) -> bytes:
    """The status line the listener on ``port`` answers ``request`` with (read no further: a
    WebSocket stays open)."""
    answer = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        with anyio.fail_after(5):
            while b"\r\n" not in answer:
                answer += await stream.receive()
    return status_line(answer)


def tunnel_host(running: RunningAgent) -> str:
    return running.url.split("://", 1)[1].split("/", 1)[0]


def request(running: RunningAgent, target: str, extra: bytes = b"Connection: close\r\n") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {tunnel_host(running)}\r\n".encode() + extra + b"\r\n"


@pytest.mark.parametrize("kind", SERVERS)
async def test_the_local_apps_status_comes_with_its_standard_phrase(tmp_path: Path, upstream: Upstream,
                                                                   kind: str) -> None:
    async with start_server(tmp_path / "data", http_server=kind) as server, \
            start_agent(server, upstream.port) as running:
        lines = [await first_line(server.ports.http, request(running, f"/status/{code}"))
                 for code in (200, 201, 404, 418, 503, 599)]
        # What the issue saw: urllib's error names the reason, not an empty one.
        asked = urllib.request.Request(f"http://127.0.0.1:{server.ports.http}/status/404",
                                       headers={"Host": tunnel_host(running)})
        with pytest.raises(urllib.error.HTTPError) as refused:
            await anyio.to_thread.run_sync(urllib.request.urlopen, asked)
        refused.value.close()  # the error holds the response, and with it the connection
        upgrade = await first_line(server.ports.http, request(running, "/ws/echo", UPGRADE))
        denied = await first_line(server.ports.http, request(running, "/ws/deny", UPGRADE))
    assert lines == [b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created", b"HTTP/1.1 404 Not Found",
                     b"HTTP/1.1 418 I'm a Teapot", b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 599 "]
    assert str(refused.value) == "HTTP Error 404: Not Found"
    assert upgrade == b"HTTP/1.1 101 Switching Protocols"
    assert denied == b"HTTP/1.1 403 Forbidden"


@pytest.mark.parametrize("kind", SERVERS)
async def test_an_apps_own_phrase_becomes_the_standard_one(tmp_path: Path, kind: str) -> None:
    """The app says ``HTTP/1.0 200 Fine``: ASGI has no field for it, so the visitor gets ``200 OK``."""
    app = ScriptedServer(always(b"HTTP/1.0 200 Fine\r\nContent-Length: 2\r\n\r\nok"), close_after=True)
    async with serve_tcp(app.handle) as port, start_server(tmp_path / "data", http_server=kind) as server, \
            start_agent(server, port) as running:
        answer = await raw_answer(server.ports.http, request(running, "/"))
    assert status_line(answer) == b"HTTP/1.1 200 OK" and answer.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("kind", SERVERS)
async def test_the_edges_own_answers_have_phrases(tmp_path: Path, kind: str) -> None:
    async with start_server(tmp_path / "data", http_server=kind) as server:
        unknown = await raw_answer(server.ports.http, b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n"
                                                      b"Connection: close\r\n\r\n")
    assert status_line(unknown) == b"HTTP/1.1 404 Not Found"
    assert b"Tunnel Not Active" in unknown


async def test_the_admin_listener_has_phrases(tmp_path: Path) -> None:
    async with start_server(tmp_path / "data") as server:
        refused = await raw_answer(server.ports.admin, b"GET /api/tunnels HTTP/1.1\r\nHost: localhost\r\n"
                                                       b"Connection: close\r\n\r\n")
    assert status_line(refused) == b"HTTP/1.1 401 Unauthorized"


def test_h11_still_sends_no_phrase_of_its_own() -> None:
    """Pins why the patch exists: when h11 fills in phrases itself, hypercorn_compat's patch can go."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.next_event()
    unpatched = getattr(h11.Connection.send, "__wrapped__", h11.Connection.send)
    sent = unpatched(connection, h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
    assert sent is not None and sent.startswith(b"HTTP/1.1 404 \r\n")
    assert (standard_phrase(404), standard_phrase(599)) == (b"Not Found", b"")
