"""examples/cluster/, run as written: run.sh starts a real nats-server (JetStream), 2 control nodes
and 2 edges on free loopback ports, a real nginx serves the example's site with a self-signed
wildcard certificate, a real ``comzy`` agent connects through nginx (wss://, the private CA in
SSL_CERT_FILE), and a visitor's https request through nginx reaches the local app; both edges serve
the tunnel, and any node's /api/tunnels lists it.

Skipped without nginx or nats-server; required under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from bench.procs import Proc
from bench.tools import free_ports, wait_listening
from comzy.core.tls import client_tls_context
from tests.conftest import PYTHON, ROOT, cli_env
from tests.test_deploy_nginx import nginx_binary
from tests.test_tls import Pki, make_pki
from tests.upstream import Upstream

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # four nodes start one after the other

EXAMPLE = ROOT / "examples" / "cluster"
NATS_SERVER = Path(os.environ.get("COMZY_TEST_NATS_SERVER", "/usr/sbin/nats-server"))
#: The example's ports (run.sh's defaults, and nginx.conf's upstreams), each swapped for a free one.
PORTS = {"NATS_PORT": 4223, "CONTROL1_PORT": 8191, "CONTROL2_PORT": 8291, "EDGE1_PORT": 8190, "EDGE2_PORT": 8290,
         "CONTROL1_ADMIN": 8193, "CONTROL2_ADMIN": 8293, "EDGE1_ADMIN": 8192, "EDGE2_ADMIN": 8292}
#: Generous on a loaded 2-core machine: each node imports, reaches NATS and migrates before "ready".
START_TIMEOUT = 240.0


def nats_server_binary() -> Path:
    """nats-server, or a skip (a failure under CI=true, where this test is required)."""
    if not NATS_SERVER.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the cluster example test: {NATS_SERVER} is missing (apt-get install nats-server)")
        pytest.skip(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    return NATS_SERVER


def comzy_server_command() -> str:
    """The ``comzy-server`` console script of the Python running the tests."""
    script = Path(PYTHON).parent / "comzy-server"
    found = str(script) if script.is_file() else shutil.which("comzy-server")
    assert found, "comzy-server is not installed in this environment (pip install -e '.[dev]')"
    return found


def site_for_test(ports: dict[str, int], nginx_port: int, pki: Pki) -> str:
    """The example's nginx.conf with this test's ports, names and certificate."""
    site = (EXAMPLE / "nginx.conf").read_text()
    replaced = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{nginx_port} ssl;")
    for name, default in PORTS.items():
        replaced = replaced.replace(f"127.0.0.1:{default} ", f"127.0.0.1:{ports[name]} ")
    replaced = (replaced.replace("/etc/letsencrypt/live/example.com/fullchain.pem", str(pki.cert))
                .replace("/etc/letsencrypt/live/example.com/privkey.pem", str(pki.key))
                .replace("example.com", "localhost"))
    directives = "\n".join(line for line in replaced.splitlines() if not line.lstrip().startswith("#"))
    # Every documented port was swapped (checked on the directives, not in comments or the test's paths).
    assert not re.search(r"127\.0\.0\.1:(8190|8191|8290|8291)\b", directives), directives
    assert not re.search(r"listen\s+(\S+:)?443\b", directives), directives
    assert "example.com" not in directives, directives
    return replaced


@contextmanager
def run_nginx(root: Path, site: str, port: int) -> Iterator[None]:
    """nginx serving ``site`` on loopback ``port`` from a temporary prefix."""
    nginx = nginx_binary()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # as root, nginx's workers run as an unprivileged user
    (root / "nginx.conf").write_text(f"""\
worker_shutdown_timeout 30s;
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
{site}
}}
""")
    proc = Proc("nginx", [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")])
    try:
        if not wait_listening(port, proc, timeout=10.0):
            log = (root / "error.log").read_text() if (root / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start with examples/cluster/nginx.conf:\n{proc.output()}\n{log}")
        yield
    finally:
        proc.stop()


@contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    """Stop ``proc`` (SIGTERM by its PID, SIGKILL after the grace) when the block ends."""
    try:
        yield proc
    finally:
        proc.stop(grace=60)


async def get_until_ok(client: httpx.AsyncClient, url: str, host: str, timeout: float = 20.0) -> httpx.Response:
    """GET until 200: right after the agent's WELCOME, an edge's NATS connection may not see the
    control node's alias subscription yet (nats-server's visibility race), and says 404."""
    with anyio.fail_after(timeout):
        while True:
            response = await client.get(url, headers={"host": host})
            if response.status_code == 200:
                return response
            assert response.status_code == 404, response.text
            await anyio.sleep(0.05)


async def test_cluster_example_behind_nginx(tmp_path: Path, upstream: Upstream) -> None:
    nginx_binary()
    nats = nats_server_binary()
    (tmp_path / "pki").mkdir()
    pki = await make_pki(tmp_path / "pki")
    *chosen, nginx_port = free_ports(len(PORTS) + 1)  # all different: two processes on one port fail
    ports = dict(zip(PORTS, chosen, strict=True))
    state = tmp_path / "state"
    env = cli_env(NATS_SERVER=str(nats), COMZY_SERVER=comzy_server_command(), STATE_DIR=str(state),
                  BASE_DOMAIN="localhost", COMZY_PUBLIC_URL=f"https://{{alias}}.localhost:{nginx_port}",
                  COMZY_PUBLIC_AGENT_URL=f"wss://localhost:{nginx_port}", READY_TIMEOUT=str(int(START_TIMEOUT)),
                  **{name: str(port) for name, port in ports.items()})
    env.pop("COMZY_NATS_URL")  # run.sh points the nodes at its own nats-server
    with running(Proc("run.sh", ["bash", str(EXAMPLE / "run.sh")], env=env, cwd=tmp_path)) as cluster:
        await anyio.to_thread.run_sync(lambda: cluster.wait_for(r"^cluster ready: ", timeout=START_TIMEOUT + 30))
        with run_nginx(tmp_path / "nginx", site_for_test(ports, nginx_port, pki), nginx_port):
            agent_env = cli_env(SSL_CERT_FILE=str(pki.ca))
            agent_args = [PYTHON, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1",
                          "--server", f"wss://localhost:{nginx_port}"]
            with running(Proc("agent", agent_args, env=agent_env)) as agent:
                url = await anyio.to_thread.run_sync(
                    lambda: agent.wait_for(r"Public URL: (https://([a-z0-9-]+)\.localhost:\d+)", timeout=60))
                public, alias = url[1], url[2]
                assert public == f"https://{alias}.localhost:{nginx_port}"
                host = f"{alias}.localhost:{nginx_port}"
                # The visitor checks nginx's certificate by its IP name (OpenSSL matches no wildcard
                # right under a one-label name such as *.localhost); nginx routes by Host.
                async with httpx.AsyncClient(verify=client_tls_context(str(pki.ca)), timeout=15) as client:
                    response = await get_until_ok(client, f"https://127.0.0.1:{nginx_port}/via-nginx?x=1", host)
                    seen = {name.lower(): value for name, value in response.json()["headers"]}
                    assert seen["x-forwarded-proto"] == "https"
                    assert seen["host"] == host
                    assert upstream.requests[-1]["path"] == "/via-nginx"
                    # nginx spreads visitors over both edges: a few more requests all succeed.
                    for index in range(4):
                        again = await client.get(f"https://127.0.0.1:{nginx_port}/again/{index}",
                                                 headers={"host": host})
                        assert again.status_code == 200, again.text
                # Each edge on its own serves the tunnel held on a control node.
                async with httpx.AsyncClient(timeout=15) as client:
                    for edge in ("EDGE1_PORT", "EDGE2_PORT"):
                        direct = await get_until_ok(client, f"http://127.0.0.1:{ports[edge]}/edge", host)
                        assert direct.status_code == 200
                    # One operator view: every node's admin API lists the tunnel, whichever node holds it.
                    token = (state / "data" / "admin_token").read_text().strip()
                    for admin in ("EDGE1_ADMIN", "EDGE2_ADMIN", "CONTROL1_ADMIN", "CONTROL2_ADMIN"):
                        health = await client.get(f"http://127.0.0.1:{ports[admin]}/healthz",
                                                  headers={"authorization": f"Bearer {token}"})
                        assert health.status_code == 200 and health.json()["nats"] == "connected", health.text
                        listed = await client.get(f"http://127.0.0.1:{ports[admin]}/api/tunnels",
                                                  headers={"authorization": f"Bearer {token}"})
                        assert listed.status_code == 200, listed.text
                        assert alias in listed.text, (admin, listed.text)
    # run.sh stopped every process it started (SIGTERM by PID): each node logged its clean stop.
    assert cluster.popen.returncode == 143, cluster.output()
    for name in ("control1", "control2", "edge1", "edge2"):
        log = (state / f"{name}.log").read_text()
        assert log.rstrip().endswith("stopped"), f"{name}:\n{log[-2000:]}"
    assert "Server Exiting" in (state / "nats.log").read_text()


async def test_the_ports_chosen_for_the_example_are_all_different() -> None:
    """Six processes and nginx each need a port of their own: ``free_port()`` in a row once gave the
    nats-server and an edge the same one (CI, 2026-12-07), so they are chosen together."""
    ports = free_ports(len(PORTS) + 1)
    assert len(set(ports)) == len(ports) == len(PORTS) + 1
    assert all(1 <= port <= 65535 for port in ports)
