"""The account API (docs/agent_api.md): one error shape from the core and from any plugin serving it,
and an agent that knows only the documented API, not one plugin's wording."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.abc
import httpx
import pytest

from comzy import AdminRoute, hookimpl
from comzy.core.account_api import ErrorCode, error_document, read_error
from comzy.core.server import ServerContext
from comzy.plugins.auth_token import AuthToken, AuthTokenSettings
from comzy.plugins.auth_token.store import create_user
from tests.conftest import PYTHON, ROOT, cli_env, start_server

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("COMZY_DATABASE_URL", "COMZY_TOKEN", "COMZY_WS_SERVER", "COMZY_REQUIRE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


async def comzy(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """``comzy ARGS`` in a subprocess with HOME in tmp_path: exit status, stdout, stderr."""
    environment = cli_env(HOME=str(tmp_path / "home"), **env)
    # The agent under test is this checkout's, whatever is installed.
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = await anyio.run_process([PYTHON, "-m", "comzy.agent.cli", *args], env=environment, cwd=tmp_path,
                                   check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def api(server: ServerContext, token: str | None = None) -> httpx.AsyncClient:
    """A client for the agent listener's plain HTTP side."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}", headers=headers, timeout=20)


def error_of(response: httpx.Response) -> tuple[int, str]:
    """Status and code of an error answer, after checking it has exactly the documented shape."""
    document = response.json()
    assert set(document) == {"error"} and set(document["error"]) == {"code", "message"}, document
    assert isinstance(document["error"]["message"], str) and document["error"]["message"]
    code = document["error"]["code"]
    assert ErrorCode(code).status == response.status_code, (code, response.status_code)
    return response.status_code, code


def test_the_error_document_and_its_reader() -> None:
    document = error_document(ErrorCode.THROTTLED, "slow down")
    assert document == {"error": {"code": "throttled", "message": "slow down"}}
    assert read_error(json.loads(json.dumps(document))) == ("throttled", "slow down")
    assert read_error({"error": "an earlier Comzy's words"}) == ("", "an earlier Comzy's words")
    assert read_error({"user": "ana"}) is None
    assert {code.status for code in ErrorCode} == {400, 401, 404, 405, 413, 429, 500, 503}


async def test_the_core_answers_errors_in_the_documented_shape(tmp_path: Path) -> None:
    async with start_server(tmp_path) as server, api(server) as client:
        assert error_of(await client.get("/api/v1/me")) == (404, "no_api")
        assert error_of(await client.delete("/api/v1/aliases/x")) == (404, "no_api")
        assert error_of(await client.post("/api/v1/me", content=b"x" * (65 * 1024))) == (413, "too_large")
        status = (await client.get("/api/v1/status")).json()
        assert status["protocol"] == 1 and status["base_domain"] == server.settings.base_domain
        # A request h11 cannot read gets 400 bad_request, in the same shape.
        stream = await anyio.connect_tcp("127.0.0.1", server.ports.ws)
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
            answer = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
                    answer += await stream.receive()
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 400 ")
        assert json.loads(body)["error"]["code"] == "bad_request"


async def test_auth_token_answers_errors_in_the_documented_shape(tmp_path: Path) -> None:
    plugin = AuthToken(AuthTokenSettings(_env_file=None, refresh_seconds=0.05))
    async with start_server(tmp_path, plugins=[("auth_token", plugin)]) as server:
        token = await create_user(plugin.engine, "ana")
        async with api(server) as anonymous:
            assert error_of(await anonymous.get("/api/v1/me")) == (401, "unauthorized")
        async with api(server, "czy_wrong") as wrong:
            response = await wrong.get("/api/v1/me")
            assert error_of(response) == (401, "unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="comzy"'
        async with api(server, token) as ana:
            assert error_of(await ana.post("/api/v1/me")) == (405, "method_not_allowed")
            assert error_of(await ana.put("/api/v1/aliases/mine")) == (405, "method_not_allowed")
            assert error_of(await ana.delete("/api/v1/aliases/nobodys")) == (404, "not_found")
            assert error_of(await ana.get("/api/v1/aliases/a/b")) == (404, "no_api")
            me = (await ana.get("/api/v1/me")).json()
            assert me == {"user": "ana", "aliases": [], "max_aliases": 5}


class Accounts:
    """A third-party plugin serving the documented account API, in its own words."""

    def __init__(self) -> None:
        self.released: list[str] = []

    @hookimpl
    def agent_routes(self, server: ServerContext) -> list[AdminRoute]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            status, document = self.answer(scope)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(document).encode()})

        return [AdminRoute("/api/v1/me", app), AdminRoute("/api/v1/aliases", app)]

    def answer(self, scope: dict[str, Any]) -> tuple[int, Any]:
        headers = dict(scope["headers"])
        if headers.get(b"authorization") != b"Bearer zoe-token":
            return 401, error_document(ErrorCode.UNAUTHORIZED, "Zoe's server does not know you")
        if scope["path"] == "/api/v1/me":
            return 200, {"user": "zoe", "max_aliases": None, "aliases": [
                {"alias": "zoe-site", "port": 8080, "url": "https://zoe-site.example", "online": True,
                 "created_at": "2026-01-01T00:00:00+00:00"}]}
        name = unquote(scope["path"].removeprefix("/api/v1/aliases/"))
        if name == "busy":
            return 503, error_document(ErrorCode.UNAVAILABLE, "the ledger is being rebuilt, back at noon")
        if name != "zoe-site":
            return 404, error_document(ErrorCode.NOT_FOUND, f"no such thing as {name} in Zoe's books")
        self.released.append(name)
        return 200, {"released": name, "online": False}


async def test_the_agent_speaks_the_documented_api_to_any_plugin(tmp_path: Path) -> None:
    accounts = Accounts()
    async with start_server(tmp_path, plugins=[("accounts", accounts)]) as server:
        url = f"ws://127.0.0.1:{server.ports.ws}"
        code, out, err = await comzy(tmp_path, "login", "--server", url, "--token", "guess")
        assert (code, out) == (1, "")
        assert err == f"comzy: login failed: {url} says: Zoe's server does not know you\n"
        code, out, err = await comzy(tmp_path, "login", "--server", url, "--token", "zoe-token")
        assert code == 0, err
        assert f"Logged in to {url} as zoe." in out and "Your aliases: zoe-site (port 8080)" in out
        code, out, err = await comzy(tmp_path, "status")
        assert code == 0, err
        assert "Login:   zoe (token from" in out and "Aliases: 1 (no limit)" in out
        assert "zoe-site  port 8080   online   https://zoe-site.example" in out
        code, out, err = await comzy(tmp_path, "aliases")
        assert code == 0 and "zoe owns 1 alias:" in out, err
        # The plugin's words are shown as they are; what the agent does follows the code.
        code, out, err = await comzy(tmp_path, "aliases", "release", "other")
        assert (code, err) == (1, f"comzy: {url} says: no such thing as other in Zoe's books\n")
        code, out, err = await comzy(tmp_path, "aliases", "release", "busy")
        assert (code, err) == (1, f"comzy: {url} says: the ledger is being rebuilt, back at noon\n")
        code, out, err = await comzy(tmp_path, "aliases", "release", "zoe-site")
        assert code == 0 and out == "Released zoe-site: anyone may take it now.\n", err
        assert accounts.released == ["zoe-site"]
        # A refused token: one sentence, the server's reason once, and what to do.
        refused = (f"{url} refused the token in COMZY_TOKEN: Zoe's server does not know you; run "
                   f"`comzy login --server {url}` with a token from the server's operator")
        code, out, err = await comzy(tmp_path, "status", COMZY_TOKEN="stale")
        assert code == 1 and f"\nLogin:   {refused}\n" in out, out
        code, out, err = await comzy(tmp_path, "aliases", COMZY_TOKEN="stale")
        assert (code, out, err) == (1, "", f"comzy: {refused}\n")


async def test_a_server_without_accounts_says_so_for_every_command(tmp_path: Path) -> None:
    async with start_server(tmp_path) as server:  # COMZY_PLUGINS=none: nothing serves the account API
        url = f"ws://127.0.0.1:{server.ports.ws}"
        no_accounts = (f"comzy: {url} has no user accounts (no plugin there serves the account API; its operator "
                       "enables one, such as auth_token, in COMZY_PLUGINS); anonymous tunnels work there without "
                       "logging in\n")
        code, out, err = await comzy(tmp_path, "login", "--server", url, "--token", "czy_x")
        assert (code, out, err) == (1, "", no_accounts)
        for action in ([], ["release", "mine"]):
            code, out, err = await comzy(tmp_path, "aliases", "--server", url, *action, COMZY_TOKEN="czy_x")
            assert (code, out, err) == (1, "", no_accounts), action
        code, out, err = await comzy(tmp_path, "status", "--server", url, COMZY_TOKEN="czy_x")
        assert code == 0, err
        assert f"Login:   a token in COMZY_TOKEN, but {no_accounts.removeprefix('comzy: ')}" in out


async def test_the_agent_reads_a_bounded_answer(tmp_path: Path) -> None:
    """Whatever answers at the server's address cannot make `comzy status` hold more than
    MAX_ANSWER: an endless chunked answer ends the call with one line, not with the memory."""
    from comzy.agent.account import MAX_ANSWER, AccountClient, AccountError

    sent = 0

    async def endless(stream: anyio.abc.SocketStream) -> None:
        nonlocal sent
        async with stream:
            await stream.receive()  # the request head (small: one read holds it)
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
            # Bounded: 8 times the cap at most (kernel buffers hold some MiB); the client must hang
            # up long before the end, and then the next send fails.
            with anyio.move_on_after(30), contextlib.suppress(anyio.BrokenResourceError, OSError):
                while sent < 8 * MAX_ANSWER:
                    await stream.send(chunk)
                    sent += 65536

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, endless)
        with pytest.raises(AccountError, match=r"answered with more than 4 MiB"):
            await AccountClient(f"ws://127.0.0.1:{port}").status()
        tg.cancel_scope.cancel()
    assert MAX_ANSWER < sent < 8 * MAX_ANSWER
