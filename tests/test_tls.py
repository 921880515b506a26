"""TLS as a self-hoster deploys it (issue 17): SSL_CERT_PATH/SSL_KEY_PATH checked at start-up, the
agent listener and its account API over TLS, the agent told in one line when it speaks the wrong
one, and one trust setting (SSL_CERT_FILE or --cacert) for everything the agent does.

Certificates are made in the test with the openssl binary (no network, no fixed files).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from comzy.agent.account import AccountClient, AccountError
from comzy.agent.client import Agent, AgentConfig, TLSMisconfigured
from comzy.agent.forward import LocalForwarder
from comzy.core.server import ServerContext, describe
from comzy.core.tls import TLSConfigError, client_tls_context, server_tls_context
from comzy.core.websocket import TLSMismatch, connect
from tests.conftest import RecordingReporter, make_settings, start_server, visitor
from tests.test_cli import SERVER, agent_env, run_agent, run_cli, server_env, wait_banner
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a certificate it signed for localhost, *.localhost and 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path
    other_key: Path


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl binary is needed to make test certificates")
    return openssl


async def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate signed by it, and an unrelated key (for mismatches)."""
    openssl = _openssl()
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "cert.pem", directory / "key.pem", directory / "cert.csr"
    other_key, ext = directory / "other.key", directory / "san.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    await anyio.run_process([openssl, "req", "-x509", *ec, "-days", "1", "-subj", "/CN=Comzy test CA",
                             "-keyout", str(ca_key), "-out", str(ca)])
    await anyio.run_process([openssl, "req", *ec, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr)])
    ext.write_text("subjectAltName=DNS:localhost,DNS:*.localhost,IP:127.0.0.1\n")
    await anyio.run_process([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)])
    await anyio.run_process([openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                             "-out", str(other_key)])
    return Pki(ca, cert, key, other_key)


@pytest.fixture
async def pki(tmp_path: Path) -> Pki:
    return await make_pki(tmp_path)


@asynccontextmanager
async def tls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[ServerContext]:
    async with start_server(tmp_path / "data", ssl_cert_path=pki.cert, ssl_key_path=pki.key) as server:
        yield server


@asynccontextmanager
async def wss_agent(server: ServerContext, port: int, url: str, cacert: str | None) -> AsyncIterator[Agent]:
    reporter = RecordingReporter()
    forwarder = LocalForwarder("127.0.0.1", port)
    agent = Agent(AgentConfig(servers=[url], port=port, cacert=cacert), forwarder, reporter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(10):
            await reporter.wait_connected()
        yield agent
        await agent.close()
        tg.cancel_scope.cancel()
    await forwarder.aclose()


# -- item 4: bad TLS settings are one line at start-up ---------------------------------------------

def _tls_error(tmp_path: Path, **overrides: object) -> str:
    with pytest.raises(TLSConfigError) as caught:
        server_tls_context(make_settings(tmp_path / "data", **overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_every_bad_tls_file_is_one_line_naming_it(tmp_path: Path, pki: Pki,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.pem"
    not_pem = tmp_path / "der.bin"
    not_pem.write_bytes(b"\x30\x82\x01\x0a not a pem file")
    monkeypatch.setenv("SSL_CERT_PATH", "set")  # the names reported are the ones set
    monkeypatch.setenv("SSL_KEY_PATH", "set")
    assert "SSL_CERT_PATH=" + str(missing) in _tls_error(tmp_path, ssl_cert_path=missing, ssl_key_path=pki.key)
    assert "no such file" in _tls_error(tmp_path, ssl_cert_path=missing, ssl_key_path=pki.key)
    assert "is a directory" in _tls_error(tmp_path, ssl_cert_path=tmp_path, ssl_key_path=pki.key)
    message = _tls_error(tmp_path, ssl_cert_path=pki.cert, ssl_key_path=tmp_path)
    assert message.startswith(f"SSL_KEY_PATH={tmp_path} is a directory")
    message = _tls_error(tmp_path, ssl_cert_path=not_pem, ssl_key_path=pki.key)
    assert message.startswith(f"SSL_CERT_PATH={not_pem} holds no PEM certificate")
    message = _tls_error(tmp_path, ssl_cert_path=pki.cert, ssl_key_path=pki.other_key)
    assert "does not belong to the certificate" in message and "SSL_KEY_PATH=" in message
    assert "SSL_KEY_PATH" in _tls_error(tmp_path, ssl_cert_path=pki.cert, ssl_key_path=None)
    # Under the COMZY_ names, those are the ones reported.
    monkeypatch.delenv("SSL_CERT_PATH")
    monkeypatch.setenv("COMZY_SSL_CERT_PATH", "set")
    assert _tls_error(tmp_path, ssl_cert_path=missing, ssl_key_path=pki.key).startswith("COMZY_SSL_CERT_PATH=")
    # The right pair loads.
    assert isinstance(server_tls_context(make_settings(tmp_path / "data", ssl_cert_path=pki.cert,
                                                       ssl_key_path=pki.key)), ssl.SSLContext)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: there is no unreadable file to test with")
async def test_an_unreadable_key_is_named(tmp_path: Path, pki: Pki) -> None:
    pki.key.chmod(0)
    assert "permission denied" in _tls_error(tmp_path, ssl_cert_path=pki.cert, ssl_key_path=pki.key)


async def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path, pki: Pki) -> None:
    encrypted = tmp_path / "encrypted.key"
    await anyio.run_process([_openssl(), "pkey", "-in", str(pki.key), "-aes256", "-passout", "pass:secret",
                             "-out", str(encrypted)])
    assert "is encrypted" in _tls_error(tmp_path, ssl_cert_path=pki.cert, ssl_key_path=encrypted)


@pytest.mark.parametrize("case", ["missing", "directory", "empty key", "mismatch", "not pem"])
async def test_comzy_server_refuses_bad_tls_before_ready(tmp_path: Path, pki: Pki, case: str) -> None:
    cert_name = "COMZY_SSL_CERT_PATH" if case == "mismatch" else "SSL_CERT_PATH"
    cert, key = str(pki.cert), str(pki.key)
    expected = {"missing": "SSL_CERT_PATH=/nonexistent/cert.pem: no such file",
                "directory": f"SSL_KEY_PATH={tmp_path} is a directory",
                "empty key": "SSL_CERT_PATH is set but SSL_KEY_PATH is not (or is empty)",
                "mismatch": "does not belong to the certificate in COMZY_SSL_CERT_PATH=",
                "not pem": f"SSL_KEY_PATH={pki.ca} holds no PEM private key"}[case]
    if case == "missing":
        cert = "/nonexistent/cert.pem"
    elif case == "directory":
        key = str(tmp_path)
    elif case == "empty key":
        key = ""
    elif case == "mismatch":
        key = str(pki.other_key)
    else:
        key = str(pki.ca)
    env = server_env(tmp_path / "data", **{cert_name: cert, "SSL_KEY_PATH": key})
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code == 2, cli.describe()
    assert cli.lines["stderr"] == [cli.lines["stderr"][0]], cli.describe()  # one line
    assert expected in cli.stderr, cli.describe()
    assert "ready" not in cli.stderr and "Traceback" not in cli.stderr


def test_an_empty_ssl_setting_means_no_tls(tmp_path: Path) -> None:
    """The seed's .env disables TLS with `SSL_CERT_PATH=` and `SSL_KEY_PATH=`."""
    settings = make_settings(tmp_path / "data", ssl_cert_path="", ssl_key_path=" ")
    assert settings.ssl_cert_path is None and settings.ssl_key_path is None
    assert server_tls_context(settings) is None


# -- item 1: the agent listener speaks TLS -------------------------------------------------------

async def test_agent_link_and_account_api_over_tls(tmp_path: Path, pki: Pki, upstream: Upstream) -> None:
    async with tls_server(tmp_path, pki) as server:
        url = f"wss://localhost:{server.ports.ws}"
        assert any(f"agents   wss://127.0.0.1:{server.ports.ws}" in line and "--server wss://HOST:" in line
                   for line in describe(server)), describe(server)
        async with wss_agent(server, upstream.port, url, str(pki.ca)) as agent:
            assert agent.alias is not None
            async with visitor(server, agent.alias, verify=False) as client:
                client.base_url = httpx.URL(f"https://127.0.0.1:{server.ports.http}")
                response = await client.get("/through-tls")
            assert response.status_code == 200 and response.json()["raw_path"] == "/through-tls"
            # The peer address the server recorded is the agent's, through the TLS layer.
            assert server.tunnels()[0].client_address == "127.0.0.1"
        status = await AccountClient(url, cacert=str(pki.ca)).status()
        assert status.base_domain == "localhost"


async def test_plain_http_on_the_tls_agent_port_is_told_to_use_wss(tmp_path: Path, pki: Pki) -> None:
    async with tls_server(tmp_path, pki) as server:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{server.ports.ws}/api/v1/status")
        assert response.status_code == 400
        assert response.text.strip() == f"this port speaks TLS: use wss://127.0.0.1:{server.ports.ws}"
        # The stock agent says so in one line, for the tunnel and for the account commands.
        url = f"ws://127.0.0.1:{server.ports.ws}"
        with pytest.raises(TLSMismatch, match=re.escape(
                f"{url} answered in plain text: the server speaks TLS on this port, use wss://127.0.0.1:")):
            await connect(url, 1 << 20)
        with pytest.raises(AccountError, match="answered in plain text: the server speaks TLS on this port"):
            await AccountClient(url).status()
        # A TLS client that gives up mid-handshake costs nothing: the next agent is served.
        async with await anyio.connect_tcp("127.0.0.1", server.ports.ws) as raw:
            await raw.send(b"\x16\x03\x01\x00\x05hello")
        status = await AccountClient(f"wss://localhost:{server.ports.ws}", cacert=str(pki.ca)).status()
        assert status.base_domain == "localhost"


async def test_wss_to_a_plain_agent_port_is_told_to_use_ws(tmp_path: Path, pki: Pki) -> None:
    async with start_server(tmp_path / "data") as server:
        url = f"wss://127.0.0.1:{server.ports.ws}"
        started = anyio.current_time()
        with pytest.raises(TLSMismatch, match=re.escape(
                f"{url} does not speak TLS on this port: use ws://127.0.0.1:{server.ports.ws}")):
            await connect(url, 1 << 20, ssl_context=client_tls_context(str(pki.ca)))
        # At once, not after the server's handshake timeout (the seed's agents waited it out).
        assert anyio.current_time() - started < server.settings.handshake_timeout / 2
        with pytest.raises(AccountError, match="does not speak TLS on this port: use ws://"):
            await AccountClient(url, cacert=str(pki.ca)).status()
        agent = Agent(AgentConfig(servers=[url], port=9), LocalForwarder("127.0.0.1", 9), RecordingReporter())
        with pytest.raises(TLSMisconfigured, match="does not speak TLS on this port"):
            await agent.run()


# -- item 3: one trust setting for everything the agent does -------------------------------------

async def test_an_untrusted_certificate_says_how_to_trust_it(tmp_path: Path, pki: Pki) -> None:
    async with tls_server(tmp_path, pki) as server:
        url = f"wss://localhost:{server.ports.ws}"
        hint = "trust its CA with SSL_CERT_FILE=CA.pem or --cacert CA.pem"
        with pytest.raises(TLSMismatch, match=re.escape(hint)):
            await connect(url, 1 << 20, ssl_context=client_tls_context())
        with pytest.raises(AccountError, match=re.escape(hint)):
            await AccountClient(url).status()
    with pytest.raises(ValueError, match="--cacert"):
        client_tls_context(str(tmp_path / "absent.pem"))


async def test_ssl_cert_file_and_cacert_serve_tunnel_and_account_commands(tmp_path: Path, pki: Pki,
                                                                          upstream: Upstream) -> None:
    env = server_env(tmp_path / "data", SSL_CERT_PATH=str(pki.cert), SSL_KEY_PATH=str(pki.key))
    async with run_cli(SERVER, env=env, cwd=tmp_path) as server_cli:
        banner = await wait_banner(server_cli)
        url = f"wss://localhost:{banner.ws}"
        # comzy status: untrusted, then trusted by SSL_CERT_FILE, then by --cacert.
        for extra, args, trusted in (({}, [], False), ({"SSL_CERT_FILE": str(pki.ca)}, [], True),
                                     ({}, ["--cacert", str(pki.ca)], True)):
            env = agent_env(**extra)
            if "SSL_CERT_FILE" not in extra:
                env.pop("SSL_CERT_FILE", None)  # this machine's own setting must not decide the test
            async with run_cli("comzy.agent.cli", "status", "--server", url, *args, env=env, cwd=tmp_path) as cli:
                code = await cli.wait_exit()
            assert (code == 0) == trusted, cli.describe()
            assert (": reachable, " in cli.stdout) == trusted, cli.describe()
            assert "Traceback" not in cli.stderr
            if not trusted:
                assert "SSL_CERT_FILE=CA.pem or --cacert CA.pem" in cli.stderr, cli.describe()
        # The tunnel, with SSL_CERT_FILE and with --cacert.
        for extra, args in (({"SSL_CERT_FILE": str(pki.ca)}, []), ({}, ["--cacert", str(pki.ca)])):
            async with run_agent(upstream.port, None, tmp_path, "--server", url, *args,
                                 env=agent_env(**extra)) as cli:
                await cli.wait_for(r"^Public URL: https://")
                cli.signal(signal.SIGINT)
                assert await cli.wait_exit() == 0, cli.describe()
        # A ws:// agent on the TLS port: one line, exit 1, no traceback.
        async with run_agent(upstream.port, banner.ws, tmp_path) as cli:
            assert await cli.wait_exit() == 1
        assert "the server speaks TLS on this port, use wss://127.0.0.1:" in cli.stderr, cli.describe()
        assert "Traceback" not in cli.stderr
        server_cli.signal(signal.SIGTERM)
        assert await server_cli.wait_exit() == 0, server_cli.describe()
