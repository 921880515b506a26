"""docs/deploy.md's Caddyfile, run as written by a real Caddy with a self-signed wildcard
certificate in front of a real server and agent (issue 17): the agent's link is wss:// through
Caddy, a visitor reaches the tunnel over https and opens a WebSocket, and the app behind the tunnel
sees X-Forwarded-Proto https and the visitor's address (which the request log records too), while
what the visitor forged (X-Forwarded-For, Forwarded) reaches neither the app nor the log.

Skipped where Caddy is not installed; required under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from bench.procs import Proc
from bench.tools import free_port
from comzy.core.tls import client_tls_context
from comzy.core.websocket import client_handshake
from tests.conftest import ROOT, start_server
from tests.helpers import wait_until
from tests.test_deploy_nginx import VISITOR_ADDRESS, RequestLog, agent_through_nginx
from tests.test_tls import Pki, make_pki
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

#: What a visitor claims about itself: none of it may count.
FORGED = {"x-forwarded-for": "203.0.113.66", "forwarded": "for=203.0.113.67;proto=http", "x-real-ip": "203.0.113.68"}


def caddy_binary() -> str:
    """caddy, or a skip (a failure under CI=true, where this test is required)."""
    found = shutil.which("caddy")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Caddy deployment test: install caddy (apt-get install caddy)")
        pytest.skip("caddy is not installed (apt-get install caddy)")
    return found


def documented_caddyfile() -> str:
    """docs/deploy.md's single-node Caddyfile (the one with a global grace_period)."""
    blocks = re.findall(r"```caddyfile\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    return next(block for block in blocks if "grace_period" in block and "127.0.0.1:8190" in block)


def caddyfile_for_test(caddyfile: str, root: Path, port: int, public: int, agents: int, pki: Pki) -> str:
    """The documented Caddyfile with this test's names, ports and certificate, and global options
    that keep Caddy to this test: no admin endpoint, storage in ``root``, loopback only, no port 80."""
    test_options = (f"\tadmin off\n\tstorage file_system {root / 'storage'}\n\tauto_https disable_redirects\n"
                    f"\tskip_install_trust\n\tdefault_bind 127.0.0.1\n\thttp_port {free_port()}\n"
                    f"\thttps_port {port}\n"
                    # Visitors connect to 127.0.0.1 (no SNI, see below): they get localhost's certificate.
                    "\tdefault_sni localhost\n")
    replaced = (caddyfile.replace("{\n", "{\n" + test_options, 1)
                .replace("127.0.0.1:8190", f"127.0.0.1:{public}")
                .replace("127.0.0.1:8191", f"127.0.0.1:{agents}")
                .replace("/etc/letsencrypt/live/tunnel.example.com/fullchain.pem", str(pki.cert))
                .replace("/etc/letsencrypt/live/tunnel.example.com/privkey.pem", str(pki.key))
                .replace("tunnel.example.com", "localhost"))
    assert "example.com" not in replaced and "127.0.0.1:8190" not in replaced and "127.0.0.1:8191" not in replaced
    return replaced


@contextmanager
def run_caddy(root: Path, port: int, public: int, agents: int, pki: Pki) -> Iterator[None]:
    """Caddy serving docs/deploy.md's Caddyfile on loopback ``port``, proxying to ``public`` and ``agents``."""
    caddy = caddy_binary()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "Caddyfile"
    config.write_text(caddyfile_for_test(documented_caddyfile(), root, port, public, agents, pki))
    # Caddy keeps its autosaved config and data under these: all inside the test's directory.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root), "XDG_CONFIG_HOME": str(root / "config"),
           "XDG_DATA_HOME": str(root / "data")}
    proc = Proc("caddy", [caddy, "run", "--config", str(config), "--adapter", "caddyfile"], env=env)
    try:
        proc.wait_for(r"serving initial configuration", timeout=30)
        yield
    finally:
        proc.stop()


async def test_documented_caddyfile_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    caddy_binary()
    pki = await make_pki(tmp_path)
    log = RequestLog()
    port = free_port()  # Caddy's port is picked first, for the public URLs
    async with start_server(tmp_path / "data", plugins=[("request_log", log)], trusted_proxies="127.0.0.1/32",
                            public_url=f"https://{{alias}}.localhost:{port}",
                            public_agent_url=f"wss://localhost:{port}") as server:
        with run_caddy(tmp_path / "caddy", port, server.ports.http, server.ports.ws, pki):
            async with agent_through_nginx(server, port, upstream.port, pki) as agent:
                alias = agent.alias
                assert alias is not None
                # The agent's link came through Caddy (trusted to name the agent, here 127.0.0.1);
                # the agent is told the public https URL.
                assert server.tunnels()[0].client_address == "127.0.0.1"
                assert server.tunnels()[0].public_url == f"https://{alias}.localhost:{port}"
                # Visitors check the certificate by its IP name: OpenSSL matches no wildcard right
                # under a one-label name (*.localhost); Caddy routes them by Host.
                tls = client_tls_context(str(pki.ca))
                transport = httpx.AsyncHTTPTransport(local_address=VISITOR_ADDRESS, verify=tls)
                async with httpx.AsyncClient(transport=transport, timeout=15) as client:
                    response = await client.get(f"https://127.0.0.1:{port}/behind-caddy?x=1",
                                                headers={"host": f"{alias}.localhost:{port}", **FORGED})
                assert response.status_code == 200, response.text
                seen: dict[str, list[str]] = {}
                for name, value in response.json()["headers"]:
                    seen.setdefault(name.lower(), []).append(value)
                assert seen["x-forwarded-proto"] == ["https"]
                assert seen["x-forwarded-for"] == [f"{VISITOR_ADDRESS}, 127.0.0.1"]  # Caddy's, then the edge's hop
                assert seen["x-forwarded-host"] == [f"{alias}.localhost:{port}"]
                assert seen["host"] == [f"{alias}.localhost:{port}"]
                assert "forwarded" not in seen and "x-real-ip" not in seen, seen
                assert ("/behind-caddy", VISITOR_ADDRESS) in log.clients
                # A visitor's WebSocket through Caddy's TLS, its upgrade and the tunnel.
                stream = await anyio.connect_tcp("127.0.0.1", port, local_host=VISITOR_ADDRESS, tls=True,
                                                 ssl_context=tls, tls_standard_compatible=False)
                ws, _ = await client_handshake(stream, f"{alias}.localhost:{port}", "/ws/echo", 1 << 20)
                try:
                    await ws.send("through caddy")
                    with anyio.fail_after(10):
                        assert await ws.receive() == "echo:through caddy"
                finally:
                    await ws.aclose()
                await wait_until(lambda: ("/ws/echo", VISITOR_ADDRESS) in log.clients)  # logged once closed
                # The account API reaches the agent listener through the same Caddy.
                async with httpx.AsyncClient(verify=client_tls_context(str(pki.ca)), timeout=10) as client:
                    status = (await client.get(f"https://localhost:{port}/api/v1/status")).json()
                assert status["agent_url"] == f"wss://localhost:{port}"


def test_the_documented_caddyfile_keeps_what_agents_and_visitors_need() -> None:
    """The lines docs/deploy.md explains are in the Caddyfile the test runs."""
    caddyfile = documented_caddyfile()
    for line in ("grace_period 30s", "tunnel.example.com {", "*.tunnel.example.com {", "header_up -Forwarded",
                 "flush_interval -1", "reverse_proxy 127.0.0.1:8190", "reverse_proxy 127.0.0.1:8191"):
        assert line in caddyfile, line
    assert caddyfile.count("header_up -Forwarded") == 2 and caddyfile.count("header_up -X-Real-IP") == 2
