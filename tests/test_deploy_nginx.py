"""docs/deploy.md's nginx site, run as written by a real nginx with a self-signed wildcard
certificate in front of a real server and agent (issue 17): the agent's link is wss:// through
nginx, a visitor reaches the tunnel over https and opens a WebSocket, and the app behind the
tunnel sees X-Forwarded-Proto https and the visitor's address, which the request log records too.

Skipped where nginx is not installed; required under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from bench.procs import Proc
from bench.tools import free_port, wait_listening
from comzy import hookimpl
from comzy.agent.client import Agent, AgentConfig
from comzy.agent.forward import LocalForwarder
from comzy.core.server import ServerContext
from comzy.core.tls import client_tls_context
from comzy.core.types import Exchange
from comzy.core.websocket import client_handshake
from tests.conftest import ROOT, RecordingReporter, start_server
from tests.test_tls import Pki, make_pki
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

#: Where the visitor connects from: another loopback address than nginx's, so "the visitor's
#: address" and "the proxy's" can be told apart end to end.
VISITOR_ADDRESS = "127.0.0.2"


def nginx_binary() -> str:
    """nginx, or a skip (a failure under CI=true, where this test is required)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the nginx deployment test: install nginx (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


def documented_nginx_blocks() -> tuple[str, str]:
    """docs/deploy.md's nginx blocks: the main-context lines and the site (http context)."""
    blocks = re.findall(r"```nginx\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    main = next(block for block in blocks if "worker_shutdown_timeout" in block)
    site = next(block for block in blocks if "server_name" in block)
    return main, site


def site_for_test(site: str, port: int, public: int, agents: int, pki: Pki) -> str:
    """The documented site with this test's names, ports and certificate."""
    replaced = (site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
                .replace("127.0.0.1:8190", f"127.0.0.1:{public}")
                .replace("127.0.0.1:8191", f"127.0.0.1:{agents}")
                .replace("/etc/letsencrypt/live/tunnel.example.com/fullchain.pem", str(pki.cert))
                .replace("/etc/letsencrypt/live/tunnel.example.com/privkey.pem", str(pki.key))
                .replace("tunnel.example.com", "localhost"))
    # Every documented name, port and path was swapped (checked on the directives, not the whole text:
    # the test's own paths may hold any digits, e.g. pytest's /tmp/pytest-of-root/pytest-443/).
    assert "example.com" not in replaced and not re.search(r"listen\s+(\S+:)?(443|8190|8191)\b", replaced), replaced
    assert "127.0.0.1:8190" not in replaced and "127.0.0.1:8191" not in replaced, replaced
    return replaced


@contextmanager
def run_nginx(root: Path, port: int, public: int, agents: int, pki: Pki) -> Iterator[None]:
    """nginx serving docs/deploy.md's site on loopback ``port``, proxying to ``public`` and ``agents``."""
    nginx = nginx_binary()
    main, site = documented_nginx_blocks()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # as root, nginx's workers run as an unprivileged user
    for path in (pki.cert, pki.key):
        path.chmod(0o644)  # nginx's master reads them, but keep the workers able to as well
    (root / "nginx.conf").write_text(f"""\
{main}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
{site_for_test(site, port, public, agents, pki)}
}}
""")
    proc = Proc("nginx", [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")])
    try:
        if not wait_listening(port, proc, timeout=10.0):
            log = (root / "error.log").read_text() if (root / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start with docs/deploy.md's site:\n{proc.output()}\n{log}")
        yield
    finally:
        proc.stop()


class RequestLog:
    """Records what the request log would: each finished exchange's client address."""

    def __init__(self) -> None:
        self.clients: list[tuple[str, str]] = []

    @hookimpl
    def after_response(self, exchange: Exchange) -> None:
        self.clients.append((exchange.request.path, exchange.request.client))


@asynccontextmanager
async def agent_through_nginx(server: ServerContext, port: int, local: int, pki: Pki) -> AsyncIterator[Agent]:
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", local)
    agent = Agent(AgentConfig(servers=[f"wss://localhost:{port}"], port=local, cacert=str(pki.ca)), forwarder,
                  reporter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(15):
            await reporter.wait_connected()
        yield agent
        await agent.close()
        tg.cancel_scope.cancel()
    await forwarder.aclose()


async def test_documented_nginx_site_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    nginx_binary()
    pki = await make_pki(tmp_path)
    log = RequestLog()
    # nginx cannot report a port 0 it bound: its port is picked free first, for the public URLs.
    port = free_port()
    async with start_server(tmp_path / "data", plugins=[("request_log", log)], trusted_proxies="127.0.0.1/32",
                            public_url=f"https://{{alias}}.localhost:{port}",
                            public_agent_url=f"wss://localhost:{port}") as server:
        with run_nginx(tmp_path / "nginx", port, server.ports.http, server.ports.ws, pki):
            async with agent_through_nginx(server, port, upstream.port, pki) as agent:
                alias = agent.alias
                assert alias is not None
                # The agent's link came through nginx, which the server trusts to name the agent;
                # the agent is told the public https URL.
                assert server.tunnels()[0].client_address == "127.0.0.1"
                assert server.tunnels()[0].public_url == f"https://{alias}.localhost:{port}"
                # Visitors check the certificate by its IP name: OpenSSL matches no wildcard right
                # under a one-label name (*.localhost); nginx routes them by Host.
                tls = client_tls_context(str(pki.ca))
                transport = httpx.AsyncHTTPTransport(local_address=VISITOR_ADDRESS, verify=tls)
                async with httpx.AsyncClient(transport=transport, timeout=15) as client:
                    response = await client.get(f"https://127.0.0.1:{port}/behind-nginx?x=1",
                                                headers={"host": f"{alias}.localhost:{port}",
                                                         "forwarded": "for=203.0.113.67;proto=http"})
                assert response.status_code == 200, response.text
                seen = {name.lower(): value for name, value in response.json()["headers"]}
                assert seen["x-forwarded-proto"] == "https"
                assert seen["x-forwarded-for"].split(",")[0].strip() == VISITOR_ADDRESS
                assert seen["x-real-ip"] == VISITOR_ADDRESS
                assert seen["host"] == f"{alias}.localhost:{port}"
                assert "forwarded" not in seen  # the visitor's own: removed by nginx, never trusted
                assert ("/behind-nginx", VISITOR_ADDRESS) in log.clients
                # A visitor's WebSocket through nginx's TLS, nginx's upgrade and the tunnel.
                stream = await anyio.connect_tcp("127.0.0.1", port, local_host=VISITOR_ADDRESS, tls=True,
                                                 ssl_context=tls, tls_standard_compatible=False)
                ws, _ = await client_handshake(stream, f"{alias}.localhost:{port}", "/ws/echo", 1 << 20)
                try:
                    await ws.send("through nginx")
                    with anyio.fail_after(10):
                        assert await ws.receive() == "echo:through nginx"
                finally:
                    await ws.aclose()
                # The account API reaches the agent listener through the same site.
                async with httpx.AsyncClient(verify=client_tls_context(str(pki.ca)), timeout=10) as client:
                    status = (await client.get(f"https://localhost:{port}/api/v1/status")).json()
                assert status["agent_url"] == f"wss://localhost:{port}"


def test_the_documented_site_keeps_what_agents_and_visitors_need() -> None:
    """The lines docs/deploy.md explains are in the site the test runs."""
    main, site = documented_nginx_blocks()
    assert "worker_shutdown_timeout" in main
    for line in ("proxy_set_header Host $http_host;", "proxy_set_header Upgrade $http_upgrade;",
                 "proxy_buffering off;", "proxy_request_buffering off;", "client_max_body_size 0;",
                 "proxy_set_header X-Forwarded-Proto $scheme;", "server_name *.tunnel.example.com;",
                 'proxy_set_header Forwarded "";',
                 "server_name tunnel.example.com;"):
        assert line in site, line
