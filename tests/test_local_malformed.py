"""A local app that sends malformed responses: the visitor gets 502, nothing smuggled gets through.

Each malformed answer is followed by a second, well-formed response on the same local
connection (what a response-splitting attack would want the next visitor to get). The agent
must answer the visitor 502 saying what was wrong, close that local connection, and serve the
visitor's next request, on the same visitor connection, from a fresh local connection.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from comzy.core.logs import RateLimitedLog
from comzy.core.server import ServerContext
from comzy.plugins.metrics import Metrics
from tests.conftest import admin_client, start_agent, start_server
from tests.helpers import serve_tcp, wait_until
from tests.test_http_fidelity import raw_exchanges
from tests.test_plugin_metrics import samples

pytestmark = pytest.mark.anyio

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"

MALFORMED = {
    "two Content-Lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                            "conflicting Content-Length values 5 and 6"),
    "a Content-Length list": (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
                              "conflicting Content-Length values in b'5, 6'"),
    "Content-Length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "both Content-Length (5) and Transfer-Encoding: chunked"),
    "a 1xx declaring a body": (
        b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
        "a 100 response with a body (Content-Length: 5)"),
    "body bytes after a 1xx": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
        "bytes that are not a status line after a 103 response"),
}


class MalformedApp:
    """A raw HTTP/1.1 local app: ``answer`` plus a smuggled response to the first ``bad`` requests,
    then a correct response that names its connection and its place on it."""

    def __init__(self, answer: bytes, bad: int = 1) -> None:
        self.answer = answer
        self.bad = bad
        self.connections = 0
        self.requests = 0

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        """Serve one connection (requests without a body)."""
        self.connections += 1
        number = self.connections
        answered = 0
        buffer = b""
        async with client:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await client.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests += 1
                answered += 1
                if self.requests <= self.bad:
                    await client.send(self.answer + SMUGGLED)
                else:
                    body = b"fresh: connection %d, request %d" % (number, answered)
                    await client.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_local_response_is_502_and_never_reused(server: ServerContext, case: str) -> None:
    answer, what = MALFORMED[case]
    app = MalformedApp(answer)
    async with serve_tcp(app.handle) as port, start_agent(server, port) as running:
        host = f"{running.alias}.{server.settings.base_domain}"
        (bad, bad_body), (good, good_body), (again, again_body) = await raw_exchanges(
            server, host, [("GET", "/first"), ("GET", "/second"), ("GET", "/third")])
    assert bad.status_code == 502
    text = bad_body.decode()
    assert f"the local service at 127.0.0.1:{port} sent a malformed response: {what}" in text, text
    assert "the connection to it was closed" in text
    # The same visitor connection goes on, served from a new local connection, which is then reused.
    assert (good.status_code, good_body) == (200, b"fresh: connection 2, request 1")
    assert (again.status_code, again_body) == (200, b"fresh: connection 2, request 2")
    assert app.connections == 2
    assert [served.status for served in running.reporter.served] == [502, 200, 200]
    assert what in (running.reporter.served[0].error or "")


async def test_repeated_malformed_responses_are_logged_once_per_interval(
        server: ServerContext, caplog: pytest.LogCaptureFixture) -> None:
    answer, _ = MALFORMED["two Content-Lengths"]
    app = MalformedApp(answer, bad=5)
    caplog.set_level(logging.WARNING, logger="comzy.agent")
    async with serve_tcp(app.handle) as port, start_agent(server, port) as running, running.visitor() as client:
        statuses = [(await client.get(f"/{i}")).status_code for i in range(6)]
    assert statuses == [502] * 5 + [200]
    lines = [record.getMessage() for record in caplog.records
             if record.name == "comzy.agent" and "malformed response" in record.getMessage()]
    assert len(lines) == 1, lines
    assert "conflicting Content-Length values 5 and 6" in lines[0]


def test_rate_limited_log_reports_the_first_then_a_count_per_interval(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    logger = logging.getLogger("comzy.test.ratelimit")
    limited = RateLimitedLog(logger, interval=60.0)
    caplog.set_level(logging.INFO, logger=logger.name)
    logged = []
    for step in (0, 1, 1, 57, 2, 30, 10, 100):  # seconds between events
        now[0] += step
        logged.append(limited("bad thing from %s", "peer"))
    assert logged == [True, False, False, False, True, False, False, True]
    assert [record.getMessage() for record in caplog.records] == [
        "bad thing from peer",
        "bad thing from peer (and 3 more like it in the 61 s before, not logged)",
        "bad thing from peer (and 2 more like it in the 140 s before, not logged)",
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)


async def test_malformed_local_responses_count_as_5xx_in_metrics(tmp_path: Path) -> None:
    answer, _ = MALFORMED["two Content-Lengths"]
    app = MalformedApp(answer, bad=3)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    by_class = "comzy_requests_total"
    async with start_server(tmp_path / "data", plugins=[("metrics", Metrics())]) as server, \
            serve_tcp(app.handle) as port, start_agent(server, port) as running, running.visitor() as client:
        statuses = [(await client.get(f"/{i}")).status_code for i in range(4)]
        assert statuses == [502, 502, 502, 200]
        async with admin_client(server) as admin:

            async def counted() -> bool:  # after_response runs once each exchange has ended
                values.update(samples((await admin.get("/metrics")).text))
                return values.get((by_class, (("status_class", "2xx"),)), 0) >= 1

            await wait_until(counted)
    assert values[(by_class, (("status_class", "5xx"),))] == 3
    assert values[(by_class, (("status_class", "2xx"),))] == 1
